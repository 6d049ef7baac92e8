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
//! The caller runs part 0 itself, then runs any part no worker has started yet (a worker
//! whose core another process holds may wait milliseconds for a time slice; spinning for it
//! made 2 threads 5x slower than 1 on a busy host), and waits for the rest. One job at a
//! time: a call from a worker, or while another thread's job runs, gets `false` from [`run`]
//! and runs its parts elsewhere (the caller falls back to rayon).

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// A job: a borrowed closure with its lifetime erased (see the safety note in [`run`]).
type Job = *const (dyn Fn(usize) + Sync + 'static);

/// One part of one call: run by whoever claims it first, the worker it was posted to or the
/// caller (which takes back the parts no worker started: on a host whose other cores are
/// busy a worker may wait milliseconds for a time slice, and the caller must not).
struct Part {
    job: Job,
    index: usize,
    taken: AtomicBool,
    /// Set before `done` when the part panicked, so whoever waits on `done` sees it.
    panicked: AtomicBool,
    done: AtomicBool,
}

// SAFETY: `job` is dereferenced only by the claimant of `taken`, and the caller of `run`
// waits for `done` of every part a worker claimed before the closure's borrow ends.
unsafe impl Sync for Part {}
unsafe impl Send for Part {}

impl Part {
    /// Runs the part if nobody claimed it yet; a panic is caught and recorded in `panicked`.
    fn claim_and_run(&self) {
        if self.taken.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: see the Sync impl; the closure outlives this call.
        let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*self.job)(self.index) }));
        self.panicked.store(r.is_err(), Ordering::Relaxed);
        self.done.store(true, Ordering::Release);
    }
}

struct Worker {
    /// Bumped by the caller once `part` holds the next part.
    posted: AtomicUsize,
    part: Mutex<Option<Arc<Part>>>,
    sleeping: AtomicBool,
    thread: OnceLock<Thread>,
}

static WORKERS: Mutex<Vec<Arc<Worker>>> = Mutex::new(Vec::new());
static BUSY: AtomicBool = AtomicBool::new(false);

thread_local! {
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Env `ADAPTIVENET_SPIN_US` (read once): how long an idle worker spins before it parks
/// (default 500 µs), or `off`: no spinning workers, the splits run on rayon (`None`).
fn setting() -> Option<Duration> {
    static S: OnceLock<Option<Duration>> = OnceLock::new();
    *S.get_or_init(|| match std::env::var("ADAPTIVENET_SPIN_US").as_deref() {
        Ok("off") => None,
        Ok(v) => Some(Duration::from_micros(v.trim().parse().unwrap_or(500))),
        Err(_) => Some(Duration::from_micros(500)),
    })
}

/// Whether the splits use the spinning workers at all (not with `ADAPTIVENET_SPIN_US=off`).
pub(crate) fn enabled() -> bool {
    setting().is_some()
}

/// How long an idle worker spins before it parks.
fn spin_for() -> Duration {
    setting().unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
            if spins.is_multiple_of(256) && since.elapsed() >= spin_for() {
                // Sleeping is announced before the last check of `posted`, and the caller
                // posts before it reads `sleeping` (both SeqCst): either this sees the part or
                // the caller unparks (a token that makes `park` return at once).
                w.sleeping.store(true, Ordering::SeqCst);
                if w.posted.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                w.sleeping.store(false, Ordering::SeqCst);
                since = Instant::now();
            } else if spins.is_multiple_of(8) {
                // Lets a thread that shares this core run (the caller, when other processes
                // hold the other cores): a spinning worker that kept its time slice made 2
                // threads slower than 1 on a busy host.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let part = lock(&w.part).clone();
        if let Some(part) = part {
            part.claim_and_run();
        }
    }
}

/// At least `n` workers (started on first use, kept for the process). `None` if a thread
/// could not be started.
fn workers(n: usize) -> Option<Vec<Arc<Worker>>> {
    let mut ws = lock(&WORKERS);
    while ws.len() < n {
        let w = Arc::new(Worker {
            posted: AtomicUsize::new(0),
            part: Mutex::new(None),
            sleeping: AtomicBool::new(false),
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

/// Takes back the parts no worker started and waits for the ones they did, even if the
/// caller's own part panics (the workers borrow the caller's closure); then frees the pool.
struct Finish<'a> {
    parts: &'a [Arc<Part>],
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        for p in self.parts {
            p.claim_and_run();
        }
        for p in self.parts {
            let mut spins = 0u32;
            while !p.done.load(Ordering::Acquire) {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) {
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
/// workers (or on the caller, for those no worker started by the time its own part is done),
/// and returns once all are done (`true`). Returns `false` without running anything when the
/// pool is in use (by another thread, or this is a worker) or a worker could not be started:
/// the caller then runs the parts another way. A part that panics panics here after every
/// part has finished.
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
    // SAFETY: only the lifetime is erased; `Finish` (dropped before this function returns,
    // also on unwind) waits until every part a worker claimed is done, so no worker uses `f`
    // after this call.
    let job: Job =
        unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f as *const _) };
    let posted: Vec<Arc<Part>> = (1..parts)
        .map(|index| {
            Arc::new(Part {
                job,
                index,
                taken: AtomicBool::new(false),
                panicked: AtomicBool::new(false),
                done: AtomicBool::new(false),
            })
        })
        .collect();
    for (w, p) in ws.iter().zip(&posted) {
        *lock(&w.part) = Some(p.clone());
        w.posted.fetch_add(1, Ordering::SeqCst);
        if w.sleeping.load(Ordering::SeqCst) {
            if let Some(t) = w.thread.get() {
                t.unpark();
            }
        }
    }
    {
        let _finish = Finish { parts: &posted };
        f(0);
    }
    // Every part is done (`Finish` waited), and its panic flag was set before `done`.
    assert!(
        !posted.iter().any(|p| p.panicked.load(Ordering::Relaxed)),
        "a kernel worker panicked"
    );
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
