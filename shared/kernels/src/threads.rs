//! Thread policy for every kernel of this crate.
//!
//! * A global cap on the number of threads ([`max_threads`], set with [`set_max_threads`] or
//!   the environment variable [`ENV_VAR`] = `ADAPTIVENET_THREADS`, read once on first use).
//! * A per-op FLOP threshold ([`flop_threshold`], [`set_flop_threshold`]): an op whose
//!   arithmetic work is below it runs single-threaded, whatever the cap; per-op thread spin-up
//!   and work splitting cost more than they save on small feature maps.
//! * [`current`] returns the cap that is in force; record it with every latency figure
//!   (see [`describe`] for a one-line summary).
//!
//! Parallel work is run on rayon's global pool (the one `gemm` uses), never on more than
//! [`max_threads`] workers, and never on more workers than the pool has; the per-op splits of
//! [`map_ranges`] (one image's output channels, ...) on a few spinning workers instead (see
//! `spin.rs`: rayon's wake-up per op cost more than a 1x1 conv on a 14x14 map gained).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Environment variable read on first use: the maximum number of threads (`>= 1`).
pub const ENV_VAR: &str = "ADAPTIVENET_THREADS";

/// Default per-op FLOP threshold below which an op runs on one thread. A split on the
/// spinning workers costs about 2 µs (see `spin.rs`), so 1 MFLOP (~10 µs of work) is where it
/// starts to pay; it was 20 MFLOP while every split woke rayon's workers. Batch-1 inference
/// at 2 threads (Xeon KVM guest, 2 vCPUs): Lite0 224 1 thread 9.4 ms; 2 threads at 20 MFLOP
/// 7.5, at 1 MFLOP 5.9; MobileNetV2 1.0 224 7.4 / 6.2 / 5.2-5.6.
pub const DEFAULT_FLOP_THRESHOLD: u64 = 1_000_000;

/// How much more work than [`flop_threshold`] a GEMM split by the `gemm` crate over rayon
/// needs to run on several threads: rayon wakes its workers per call (6-37 µs on a VM).
pub const RAYON_FLOP_FACTOR: u64 = 20;

static MAX_THREADS: AtomicUsize = AtomicUsize::new(0); // 0 = not initialised yet
static FLOP_THRESHOLD: AtomicU64 = AtomicU64::new(DEFAULT_FLOP_THRESHOLD);

/// Number of hardware threads usable by this process, bounded by rayon's global pool size.
pub fn available() -> usize {
    let hw = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    hw.min(rayon::current_num_threads()).max(1)
}

/// Default cap when neither [`set_max_threads`] nor [`ENV_VAR`] is used: **1 thread on
/// machines with at most 2 hardware threads**, else all of them (ops below
/// [`flop_threshold`] still run on one).
///
/// Measured on the 2-vCPU dev box (see the crate docs): with the second core shared with
/// other processes, 2 threads lost to 1 on 22 of 25 op benchmarks (up to 2.2x slower) and won
/// at most 1.2x; even on a quiet machine 2 threads won only on some large ops (1.1-2.1x) and
/// lost on others. Set `ADAPTIVENET_THREADS=2` for a dedicated 2-core training box.
pub fn default_threads() -> usize {
    match available() {
        n if n <= 2 => 1,
        n => n,
    }
}

fn init() -> usize {
    let n = std::env::var(ENV_VAR)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or_else(default_threads);
    // Keep a value set concurrently by `set_max_threads`.
    match MAX_THREADS.compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => n,
        Err(cur) => cur,
    }
}

/// The configured maximum number of threads (always `>= 1`).
pub fn max_threads() -> usize {
    match MAX_THREADS.load(Ordering::Relaxed) {
        0 => init(),
        n => n,
    }
}

/// The thread cap in force right now: record it next to every latency figure.
pub fn current() -> usize {
    max_threads()
}

/// Sets the maximum number of threads; `0` restores the default (env var, else
/// [`default_threads`]).
pub fn set_max_threads(n: usize) {
    if n == 0 {
        MAX_THREADS.store(0, Ordering::Relaxed);
        init();
    } else {
        MAX_THREADS.store(n, Ordering::Relaxed);
    }
}

/// Environment variable candle reads, once, to size its own thread pool.
pub const CANDLE_VAR: &str = "CANDLE_NUM_THREADS";

/// Sizes candle's own pool to `n` threads unless [`CANDLE_VAR`] is already set, and returns
/// the size in force.
///
/// candle's element-wise ops (its binary and unary maps: what ops this crate does not replace
/// run on) use candle's barrier pool, sized once on first use from [`CANDLE_VAR`], else from
/// the physical core count, whatever this crate's cap says; its threads spin while they wait
/// for each other. In a 1-thread Lite0 fine-tune on a loaded 2-vCPU host, 38 % of the samples
/// were that spinning (the caller in candle's `BarrierGuard::drop`, the worker in its wait
/// loop). Call at program start, before the first tensor op and before other threads exist
/// (it sets an environment variable).
pub fn size_candle_pool(n: usize) -> usize {
    if let Some(set) = std::env::var(CANDLE_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&v| v > 0)
    {
        return set;
    }
    let n = n.max(1);
    std::env::set_var(CANDLE_VAR, n.to_string());
    n
}

/// Per-op FLOP threshold: ops with less work run single-threaded.
pub fn flop_threshold() -> u64 {
    FLOP_THRESHOLD.load(Ordering::Relaxed)
}

/// Sets the per-op FLOP threshold (`0` = always use [`max_threads`]).
pub fn set_flop_threshold(flops: u64) {
    FLOP_THRESHOLD.store(flops, Ordering::Relaxed);
}

/// Number of threads an op doing `flops` floating point operations will use.
pub fn for_flops(flops: u64) -> usize {
    if flops < flop_threshold() {
        1
    } else {
        max_threads().min(rayon::current_num_threads()).max(1)
    }
}

/// One-line description of the policy, e.g. `threads=2 threshold=1000000flop`.
pub fn describe() -> String {
    format!("threads={} threshold={}flop", current(), flop_threshold())
}

/// Splits `0..n` into `parts` contiguous ranges of near-equal length.
pub(crate) fn split(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let base = n / parts;
    let rem = n % parts;
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for i in 0..parts {
        let len = base + usize::from(i < rem);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Runs `f(item_index, item)` over `out` cut into items of `item_len` elements, on up to
/// `threads` workers (contiguous blocks of items per worker).
pub(crate) fn for_each_item<T, F>(out: &mut [T], item_len: usize, threads: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync,
{
    if item_len == 0 {
        return;
    }
    let n_items = out.len() / item_len;
    if threads <= 1 || n_items <= 1 {
        for (i, item) in out.chunks_mut(item_len).enumerate() {
            f(i, item);
        }
        return;
    }
    let per = n_items.div_ceil(threads.min(n_items));
    if crate::spin::enabled() {
        // As `par_chunks_mut` below: a last, shorter item is one more item.
        let len = out.len();
        let parts = len.div_ceil(per * item_len);
        let base = SendMut(out.as_mut_ptr());
        let job = |part: usize| {
            let first = part * per;
            let start = first * item_len;
            let end = ((first + per) * item_len).min(len);
            // SAFETY: parts cover disjoint element ranges `start..end` of `out` (within
            // `len`), and `spin::run` returns only after every part finished, while `out` is
            // still mutably borrowed here.
            let chunk =
                unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
            for (j, item) in chunk.chunks_mut(item_len).enumerate() {
                f(first + j, item);
            }
        };
        if crate::spin::run(parts, &job) {
            return;
        }
    }
    use rayon::prelude::*;
    out.par_chunks_mut(per * item_len)
        .enumerate()
        .for_each(|(ci, chunk)| {
            for (j, item) in chunk.chunks_mut(item_len).enumerate() {
                f(ci * per + j, item);
            }
        });
}

/// Runs `f(range)` for `0..n` split into up to `threads` contiguous ranges; returns the
/// per-range results in order.
pub(crate) fn map_ranges<R, F>(n: usize, threads: usize, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(Range<usize>) -> R + Sync,
{
    let ranges = split(n, threads);
    if ranges.len() <= 1 {
        return ranges.into_iter().map(f).collect();
    }
    if crate::spin::enabled() {
        // On the spinning workers (see `spin`): part 0 on this thread, no wake-up per op.
        let slots: Vec<std::sync::Mutex<Option<R>>> =
            ranges.iter().map(|_| std::sync::Mutex::new(None)).collect();
        let job = |i: usize| {
            let r = f(ranges[i].clone());
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        };
        if crate::spin::run(ranges.len(), &job) {
            return slots
                .into_iter()
                .map(|s| {
                    s.into_inner()
                        .unwrap_or_else(|e| e.into_inner())
                        .expect("every part ran")
                })
                .collect();
        }
    }
    use rayon::prelude::*;
    ranges.into_par_iter().map(&f).collect()
}

/// A pointer to disjoint parts of one slice, handed to the workers of [`for_each_item`].
struct SendMut<T>(*mut T);
// SAFETY: each worker touches only its own part of the slice (see `for_each_item`).
unsafe impl<T: Send> Sync for SendMut<T> {}
impl<T> SendMut<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_threshold_and_cap() {
        set_max_threads(2);
        assert_eq!(current(), 2);
        set_flop_threshold(1000);
        assert_eq!(for_flops(999), 1);
        assert_eq!(for_flops(1000), 2.min(rayon::current_num_threads()));
        assert!(describe().contains("threads=2"));
        set_flop_threshold(DEFAULT_FLOP_THRESHOLD);
        set_max_threads(0);
        assert!(current() >= 1);
    }

    #[test]
    fn parallel_helpers_cover_every_item_once_with_a_short_last_item() {
        for len in [0usize, 1, 5, 16, 17, 1000, 1001] {
            for item in [1usize, 4, 16] {
                let mut out = vec![0u32; len];
                for_each_item(&mut out, item, 2, |i, chunk| {
                    assert!(chunk.len() <= item);
                    for (j, v) in chunk.iter_mut().enumerate() {
                        *v += (i * item + j) as u32 + 1;
                    }
                });
                assert!(
                    out.iter().enumerate().all(|(k, &v)| v == k as u32 + 1),
                    "len {len} item {item}"
                );
            }
            let parts = map_ranges(len, 2, |r| r);
            let flat: Vec<usize> = parts.into_iter().flatten().collect();
            assert_eq!(flat, (0..len).collect::<Vec<_>>());
        }
    }

    #[test]
    fn split_covers() {
        for n in 0..20 {
            for p in 1..5 {
                let r = split(n, p);
                assert_eq!(r.first().map(|r| r.start).unwrap_or(0), 0);
                assert_eq!(r.last().map(|r| r.end).unwrap_or(0), n);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
            }
        }
    }
}
