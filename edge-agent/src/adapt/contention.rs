//! A built-in background load generator for the contention demo (`--contention
//! INTENSITY[:START_S:DURATION_S]`): `ceil(INTENSITY)` threads doing small dense matrix
//! products (ALU and cache pressure, like a co-located workload) on a schedule. Thread `k`
//! is busy a fraction `min(1, INTENSITY - k)` of every 10 ms period, so 1.5 means one fully
//! busy core plus one at 50%.
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{EdgeError, Result};

/// Upper bound on the intensity (threads): a demo knob, not a fork bomb.
pub const MAX_INTENSITY: f64 = 64.0;
const PERIOD: Duration = Duration::from_millis(10);

/// When and how hard to load the machine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContentionSpec {
    /// Busy threads (fractional: the last one runs a duty cycle).
    pub intensity: f64,
    /// Seconds after the start of serving.
    pub start_s: f64,
    /// Seconds of load; `None` = until the agent stops.
    pub duration_s: Option<f64>,
}

impl ContentionSpec {
    /// The intensity active `t_s` seconds after the start (0 outside the schedule).
    pub fn intensity_at(&self, t_s: f64) -> f64 {
        let on = t_s >= self.start_s && self.duration_s.is_none_or(|d| t_s < self.start_s + d);
        if on {
            self.intensity
        } else {
            0.0
        }
    }
}

impl FromStr for ContentionSpec {
    type Err = EdgeError;

    /// `INTENSITY` or `INTENSITY:START_S:DURATION_S`, e.g. `2`, `1.5:10:20`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| EdgeError::config("contention", format!("{s:?}: {why}"));
        let parts: Vec<&str> = s.split(':').collect();
        let num = |v: &str, what: &str| -> Result<f64> {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(format!("{what} {v:?} is not a number")))
        };
        let (intensity, start_s, duration_s) = match parts.as_slice() {
            [i] => (num(i, "intensity")?, 0.0, None),
            [i, st, d] => (
                num(i, "intensity")?,
                num(st, "start")?,
                Some(num(d, "duration")?),
            ),
            _ => {
                return Err(bad(
                    "expected INTENSITY or INTENSITY:START_S:DURATION_S".into()
                ))
            }
        };
        if !(intensity > 0.0 && intensity <= MAX_INTENSITY) {
            return Err(bad(format!("intensity must be in (0, {MAX_INTENSITY}]")));
        }
        if start_s < 0.0 {
            return Err(bad("start must be >= 0".into()));
        }
        if duration_s.is_some_and(|d| d <= 0.0) {
            return Err(bad("duration must be > 0".into()));
        }
        Ok(ContentionSpec {
            intensity,
            start_s,
            duration_s,
        })
    }
}

/// Running load threads; stopped (and joined) by [`Contention::stop`] or on drop.
#[derive(Debug)]
pub struct Contention {
    pub spec: ContentionSpec,
    t0: Instant,
    stop: Arc<AtomicBool>,
    work: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// One 48x48 matrix product (~221k multiply-adds), kept opaque to the optimiser.
fn matmul_step(a: &[f32], b: &[f32], c: &mut [f32], n: usize) {
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            for j in 0..n {
                c[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    std::hint::black_box(&mut *c);
}

impl Contention {
    /// Starts the threads; the schedule counts from `t0`.
    pub fn start(spec: ContentionSpec, t0: Instant) -> Contention {
        let stop = Arc::new(AtomicBool::new(false));
        let work = Arc::new(AtomicU64::new(0));
        let n_threads = spec.intensity.ceil() as usize;
        let threads = (0..n_threads)
            .map(|k| {
                let duty = (spec.intensity - k as f64).clamp(0.0, 1.0);
                let (stop, work) = (stop.clone(), work.clone());
                std::thread::Builder::new()
                    .name(format!("contention-{k}"))
                    .spawn(move || run(spec, t0, duty, &stop, &work))
            })
            .filter_map(|r| match r {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!("contention thread not started: {e}");
                    None
                }
            })
            .collect();
        Contention {
            spec,
            t0,
            stop,
            work,
            threads,
        }
    }

    /// The intensity scheduled now.
    pub fn intensity_now(&self) -> f64 {
        self.spec.intensity_at(self.t0.elapsed().as_secs_f64())
    }

    /// Matrix products done so far (evidence the load ran).
    pub fn work_done(&self) -> u64 {
        self.work.load(Ordering::Relaxed)
    }

    /// Stops and joins the threads; returns the matrix products done.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.work_done()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Contention {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(spec: ContentionSpec, t0: Instant, duty: f64, stop: &AtomicBool, work: &AtomicU64) {
    const N: usize = 48;
    let a: Vec<f32> = (0..N * N).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..N * N).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; N * N];
    while !stop.load(Ordering::Relaxed) {
        let period = Instant::now();
        if spec.intensity_at(t0.elapsed().as_secs_f64()) <= 0.0 {
            std::thread::sleep(PERIOD);
            continue;
        }
        let busy = PERIOD.mul_f64(duty);
        while period.elapsed() < busy && !stop.load(Ordering::Relaxed) {
            matmul_step(&a, &b, &mut c, N);
            work.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(rest) = PERIOD.checked_sub(period.elapsed()) {
            if !rest.is_zero() {
                std::thread::sleep(rest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag_and_names_the_field_on_errors() {
        let s: ContentionSpec = "1.5:10:20".parse().unwrap();
        assert_eq!(
            s,
            ContentionSpec {
                intensity: 1.5,
                start_s: 10.0,
                duration_s: Some(20.0)
            }
        );
        assert_eq!(s.intensity_at(9.9), 0.0);
        assert_eq!(s.intensity_at(10.0), 1.5);
        assert_eq!(s.intensity_at(30.0), 0.0);
        let always: ContentionSpec = "2".parse().unwrap();
        assert_eq!(always.intensity_at(1e6), 2.0);
        for bad in [
            "", "0", "-1", "x", "1:2", "1:-1:3", "1:0:0", "100", "nan", "1:2:3:4",
        ] {
            let e = bad.parse::<ContentionSpec>().unwrap_err();
            assert!(e.to_string().contains("contention"), "{bad}: {e}");
        }
    }

    #[test]
    fn threads_work_only_inside_the_schedule_and_stop() {
        let spec: ContentionSpec = "1:0.2:0.3".parse().unwrap();
        let t0 = Instant::now();
        let c = Contention::start(spec, t0);
        std::thread::sleep(Duration::from_millis(50));
        // Before the start nothing ran.
        assert_eq!(c.work_done(), 0);
        std::thread::sleep(Duration::from_millis(650).saturating_sub(t0.elapsed()));
        let done = c.work_done();
        assert!(done > 0, "no work in the active phase");
        // After the end the counter stops moving.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.work_done(), done);
        assert_eq!(c.stop(), done);
    }
}
