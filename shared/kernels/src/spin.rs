//! A small pool of persistent workers that spin between jobs, for the per-op splits of batch-1
//! inference ([`crate::threads::map_ranges`]).
//!
//! Why not rayon's pool for these: rayon parks an idle worker after a few microseconds, and
//! on a VM waking a parked worker (and its halted vCPU) took 6 µs at best and 37 µs at the
//! 90th percentile (2-vCPU Xeon KVM guest), against ops of 100-300 µs: a 1x1 112 -> 672 on
//! 14x14 ran in 236 µs on one thread and 176 µs (median; 285 at p90) on two. ONNX Runtime's
//! workers spin between ops for the same reason. Here each worker spins for
//! [`spin_for`] after its last job (env `ADAPTIVENET_SPIN_US`, default 500 µs; `0`: park at
//! once), then parks until the next one: a model's ops follow each other within microseconds,
//! so within one forward pass no wake-up is paid, and an idle process burns at most that
//! long per worker.
//!
//! The caller runs part 0 itself and waits (spinning) for the workers' parts. One job at a
//! time: a call from a worker, or while another thread's job runs, gets `false` from [`run`]
//! and runs its parts elsewhere (the caller falls back to rayon).

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// A job: a borrowed closure with its lifetime erased (see the safety note in [`run`]).
type Job = *const (dyn Fn(usize) + Sync + 'static);

struct Worker {
    /// Bumped by the caller once `job` holds the next job.
    posted: AtomicUsize,
    /// Set to `posted` by the worker when that job finished.
    done: AtomicUsize,
    job: UnsafeCell<Option<(Job, usize)>>,
    sleeping: AtomicBool,
    panicked: AtomicBool,
    thread: OnceLock<Thread>,
}

// SAFETY: `job` is written only by the caller holding the pool (`BUSY`) while the worker is
// idle (its `done == posted`), and read by the worker only after it observed a new `posted`
// (Release/Acquire on `posted` orders the write before the read).
unsafe impl Sync for Worker {}
unsafe impl Send for Worker {}

static WORKERS: Mutex<Vec<Arc<Worker>>> = Mutex::new(Vec::new());
static BUSY: AtomicBool = AtomicBool::new(false);

thread_local! {
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// How long an idle worker spins before it parks: env `ADAPTIVENET_SPIN_US` (read once;
/// `off` there routes the splits to rayon instead, see [`crate::threads`]).
pub(crate) fn spin_for() -> Duration {
    static D: OnceLock<Duration> = OnceLock::new();
    *D.get_or_init(|| {
        let us = std::env::var("ADAPTIVENET_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(500);
        Duration::from_micros(us)
    })
}

fn worker_loop(w: Arc<Worker>) {
    IN_WORKER.with(|c| c.set(true));
    let mut seen = 0;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            let p = w.posted.load(Ordering::Acquire);
            if p != seen {
                seen = p;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins % 256 == 0 && since.elapsed() >= spin_for() {
                // Sleeping is announced before the last check of `posted`, and the caller
                // posts before it reads `sleeping` (both SeqCst): either this sees the job or
                // the caller unparks (a token that makes `park` return at once).
                w.sleeping.store(true, Ordering::SeqCst);
                if w.posted.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                w.sleeping.store(false, Ordering::SeqCst);
                since = Instant::now();
            }
            std::hint::spin_loop();
        }
        // SAFETY: see `Worker`'s Sync impl; the caller keeps the closure alive until `done`.
        let (job, part) = unsafe { (*w.job.get()).expect("a posted job") };
        // SAFETY: the closure outlives this call (the caller waits for `done`).
        let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(part) }));
        if r.is_err() {
            w.panicked.store(true, Ordering::Relaxed);
        }
        w.done.store(seen, Ordering::Release);
    }
}

/// At least `n` workers (started on first use, kept for the process). `None` if a thread
/// could not be started.
fn workers(n: usize) -> Option<Vec<Arc<Worker>>> {
    let mut ws = WORKERS.lock().unwrap_or_else(|e| e.into_inner());
    while ws.len() < n {
        let w = Arc::new(Worker {
            posted: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            sleeping: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            thread: OnceLock::new(),
        });
        let w2 = w.clone();
        let h = std::thread::Builder::new()
            .name(format!("adaptivenet-spin-{}", ws.len()))
            .spawn(move || worker_loop(w2))
            .ok()?;
        let _ = w.thread.set(h.thread().clone());
        ws.push(w);
    }
    Some(ws[..n].to_vec())
}

/// Waits for the posted jobs of `ws` even if the caller's own part panics (the workers
/// borrow the caller's closure), then frees the pool.
struct Wait<'a> {
    ws: &'a [Arc<Worker>],
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        for w in self.ws {
            let p = w.posted.load(Ordering::Relaxed);
            let mut spins = 0u32;
            while w.done.load(Ordering::Acquire) != p {
                spins = spins.wrapping_add(1);
                if spins % 4096 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        BUSY.store(false, Ordering::Release);
    }
}

/// Runs `f(0) .. f(parts - 1)`, part 0 on the calling thread and the others on spinning
/// workers, and returns once all are done (`true`). Returns `false` without running anything
/// when the pool is in use (by another thread, or this is a worker) or a worker could not be
/// started: the caller then runs the parts another way. A part that panics panics here after
/// every part has finished.
pub(crate) fn run(parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    if parts <= 1 {
        if parts == 1 {
            f(0);
        }
        return true;
    }
    if IN_WORKER.with(Cell::get) || BUSY.swap(true, Ordering::Acquire) {
        return false;
    }
    let Some(ws) = workers(parts - 1) else {
        BUSY.store(false, Ordering::Release);
        return false;
    };
    // SAFETY: only the lifetime is erased; `Wait` (dropped before this function returns,
    // also on unwind) waits until every worker finished its part, so no worker uses `f`
    // after this call.
    let job: Job =
        unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f as *const _) };
    for (i, w) in ws.iter().enumerate() {
        // SAFETY: the worker is idle (the last job's `Wait` saw it done) and we hold BUSY.
        unsafe { *w.job.get() = Some((job, i + 1)) };
        w.posted.fetch_add(1, Ordering::SeqCst);
        if w.sleeping.load(Ordering::SeqCst) {
            if let Some(t) = w.thread.get() {
                t.unpark();
            }
        }
    }
    {
        let _wait = Wait { ws: &ws };
        f(0);
    }
    let panicked = ws.iter().any(|w| w.panicked.swap(false, Ordering::Relaxed));
    assert!(!panicked, "a kernel worker panicked");
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn runs_every_part_exactly_once() {
        for parts in 1..=3 {
            for _ in 0..200 {
                let hits: Vec<AtomicU64> = (0..parts).map(|_| AtomicU64::new(0)).collect();
                let ran = run(parts, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                if ran {
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            }
        }
    }

    #[test]
    fn nested_calls_and_a_busy_pool_decline_instead_of_deadlocking() {
        let inner = AtomicU64::new(0);
        let ran = run(2, &|_| {
            // From inside a job: the pool is busy (caller) or this is a worker.
            if !run(2, &|_| ()) {
                inner.fetch_add(1, Ordering::Relaxed);
            }
        });
        if ran {
            assert_eq!(inner.load(Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn a_panicking_part_panics_the_caller_after_all_parts_finished() {
        let finished = AtomicU64::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            run(2, &|i| {
                if i == 1 {
                    panic!("part 1");
                }
                std::thread::sleep(Duration::from_millis(5));
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        // Either the pool ran it (and the panic reached the caller) or it declined.
        if r.is_err() {
            assert_eq!(finished.load(Ordering::Relaxed), 1);
        }
        // The pool is usable again.
        let n = AtomicU64::new(0);
        for _ in 0..10 {
            run(2, &|_| {
                n.fetch_add(1, Ordering::Relaxed);
            });
        }
    }
}
