//! How much the search may keep in memory on this device, decided when it profiles.
//!
//! Cross-generation prefix reuse (`search/prefix.rs`) saves module passes in proportion to
//! the activations it may keep: on the bench's trained ResNet-20 supernet (population 64 x 8
//! generations, 500 images) a 256 MiB bound saved 3.5 % of the passes, 1 GiB 14 %, 2 GiB
//! 24 % (all the search ever offered it, 1.9 GiB). What it costs is memory, and reading a
//! kept activation back instead of recomputing it. Both are properties of the device, so
//! the bound is measured here rather than fixed: a quarter of the memory available when
//! profiling (the rest stays for serving, the OS and other programs), and none at all if
//! reading an activation back is not clearly cheaper than the fastest module that could
//! recompute it (memory slow against compute, e.g. a reuse cache far beyond a small
//! last-level cache on a fast accelerator). The search releases the memory when it ends.
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The bound when the available memory cannot be read (the search's own default).
pub const FALLBACK_BYTES: usize = 256 << 20;
/// Below this a bound holds too few activations to be worth keeping any.
pub const MIN_BYTES: usize = 16 << 20;
/// Largest buffer the read bandwidth is measured on (beyond the last-level cache of most
/// edge CPUs, small enough to measure in tens of milliseconds).
const PROBE_BYTES: usize = 64 << 20;

/// The profiling-time decision on cross-generation reuse: logged, stored with the latency
/// table and sent in heartbeats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReusePlan {
    /// Bytes of activations the search may keep across generations (0: off).
    pub bytes: usize,
    /// Memory available when profiled (`MemAvailable`), if readable.
    pub mem_available: Option<u64>,
    /// Sequential read bandwidth measured over a buffer written beforehand, GB/s.
    pub read_gb_s: f64,
    /// Time to read a kept activation back over time to recompute it with the fastest
    /// module at its position, at the worst position (below 1: a hit pays).
    pub hit_cost_ratio: f64,
    /// Why, in words.
    pub reason: String,
}

impl ReusePlan {
    /// The decision from what was measured (pure, so it is tested on its own).
    pub fn decide(mem_available: Option<u64>, read_gb_s: f64, hit_cost_ratio: f64) -> ReusePlan {
        let plan = |bytes: usize, reason: String| ReusePlan {
            bytes,
            mem_available,
            read_gb_s,
            hit_cost_ratio,
            reason,
        };
        let mib = |b: u64| b >> 20;
        if !(hit_cost_ratio.is_finite() && hit_cost_ratio < 1.0) {
            return plan(
                0,
                format!(
                    "off: reading a kept activation back ({read_gb_s:.1} GB/s) costs {hit_cost_ratio:.2}x recomputing it"
                ),
            );
        }
        let paid = format!("a hit costs {hit_cost_ratio:.3}x recomputing ({read_gb_s:.1} GB/s)");
        match mem_available {
            None => plan(
                FALLBACK_BYTES,
                format!(
                    "{} MiB, available memory unknown; {paid}",
                    FALLBACK_BYTES >> 20
                ),
            ),
            Some(m) => {
                let quarter = usize::try_from(m / 4).unwrap_or(usize::MAX);
                if quarter < MIN_BYTES {
                    plan(
                        0,
                        format!(
                            "off: a quarter of the {} MiB available is too little",
                            mib(m)
                        ),
                    )
                } else {
                    plan(
                        quarter,
                        format!(
                            "{} MiB, a quarter of the {} MiB available; {paid}",
                            quarter >> 20,
                            mib(m)
                        ),
                    )
                }
            }
        }
    }

    /// Measures and decides: `out_bytes[i]` is the activation one image leaves at position
    /// `i` (what a hit reads back), `fastest_ms[i]` the per-image latency of the fastest
    /// module there (what a hit saves at least).
    pub fn measure(out_bytes: &[usize], fastest_ms: &[f64]) -> ReusePlan {
        let mem = mem_available();
        let probe = mem.map_or(PROBE_BYTES, |m| {
            PROBE_BYTES.min(usize::try_from(m / 16).unwrap_or(usize::MAX))
        });
        let gb_s = read_gb_s(probe.max(1 << 20));
        let ratio = out_bytes
            .iter()
            .zip(fastest_ms)
            .map(|(&b, &ms)| (b as f64 / (gb_s * 1e9) * 1e3) / ms)
            .fold(0.0, f64::max);
        ReusePlan::decide(mem, gb_s, ratio)
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux; `None` elsewhere or unreadable).
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Sequential read bandwidth in GB/s over `bytes` written beforehand (the best of three
/// passes, so a page fault or a preemption does not count).
fn read_gb_s(bytes: usize) -> f64 {
    let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        // Integer sums vectorise (a float sum would be bound by its add latency instead).
        let s = buf.iter().fold(0u64, |a, &v| a.wrapping_add(v));
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (buf.len() * 8) as f64 / best.max(1e-9) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_a_quarter_of_available_memory_when_a_hit_pays() {
        let gib = 1u64 << 30;
        let p = ReusePlan::decide(Some(8 * gib), 10.0, 0.05);
        assert_eq!(p.bytes, 2 << 30);
        assert!(p.reason.contains("2048 MiB"), "{}", p.reason);
        // Too little memory: off rather than a bound that holds nothing useful.
        assert_eq!(ReusePlan::decide(Some(32 << 20), 10.0, 0.05).bytes, 0);
        // Unknown memory: the search's default.
        assert_eq!(ReusePlan::decide(None, 10.0, 0.05).bytes, FALLBACK_BYTES);
        // Reading back costs as much as recomputing (or could not be measured): off.
        for r in [1.0, 3.0, f64::NAN] {
            let p = ReusePlan::decide(Some(8 * gib), 1.0, r);
            assert_eq!(p.bytes, 0, "{r}");
            assert!(p.reason.starts_with("off"), "{}", p.reason);
        }
    }

    #[test]
    fn measuring_on_this_machine_gives_a_finite_decision() {
        // An activation of 50 KB per image against a 0.1 ms module: any memory system that
        // reads faster than 0.5 GB/s makes a hit pay.
        let p = ReusePlan::measure(&[50_000, 25_000], &[0.1, 0.05]);
        assert!(p.read_gb_s.is_finite() && p.read_gb_s > 0.5, "{p:?}");
        assert!(p.hit_cost_ratio > 0.0 && p.hit_cost_ratio < 1.0, "{p:?}");
        assert!(p.bytes > 0, "{p:?}");
    }
}
