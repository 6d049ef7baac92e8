//! The conditions a latency figure was measured under (nn-Meter's lesson: a latency without
//! threads, CPU and governor is not comparable).
use serde::{Deserialize, Serialize};

/// Measurement conditions stored with every latency table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conditions {
    /// Worker threads the tensor library was pinned to.
    pub threads: usize,
    /// Deployment batch size the modules were timed at.
    pub batch: usize,
    /// `model name` from /proc/cpuinfo, or `unknown`.
    pub cpu_model: String,
    /// cpufreq scaling governor of cpu0, if readable.
    pub governor: Option<String>,
    /// Logical CPUs visible to the process.
    pub logical_cpus: usize,
}

impl Conditions {
    /// Reads the machine's conditions; never fails (unknowns are recorded as such).
    pub fn detect(threads: usize, batch: usize) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let governor =
            std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
                .ok()
                .map(|s| s.trim().to_string());
        Conditions {
            threads,
            batch,
            cpu_model,
            governor,
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The kernels crate's thread cap variable (read once, on the first kernel call).
pub const KERNEL_THREADS_VAR: &str = "ADAPTIVENET_THREADS";

/// Pins the tensor library's worker threads: the kernels' cap (which the model code runs
/// on) and candle's and rayon's pools. All are read on first use, so this must run before the
/// first tensor operation (the CLI calls it first thing in `main`); later calls only change
/// what is recorded.
pub fn pin_threads(threads: usize) {
    let n = threads.max(1).to_string();
    std::env::set_var(KERNEL_THREADS_VAR, &n);
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", &n);
}

/// The thread count in force per the environment (what [`pin_threads`] set: the kernels' cap
/// first, then rayon's), else the number of logical CPUs.
pub fn current_threads() -> usize {
    [KERNEL_THREADS_VAR, "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|v| {
            std::env::var(v)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
