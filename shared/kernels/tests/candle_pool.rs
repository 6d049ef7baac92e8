//! `threads::size_candle_pool`: candle's own pool for its element-wise ops follows the size
//! given at start (its own test binary: the pool is created once per process).
use adaptivenet_kernels::threads::{size_candle_pool, CANDLE_VAR};
use candle_core::{Device, Tensor};

/// Names of this process's threads that belong to candle's barrier pool.
fn candle_pool_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with("candle-bp"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_pool_sized_to_one_thread_spawns_no_spinning_workers() {
    std::env::remove_var(CANDLE_VAR);
    assert_eq!(size_candle_pool(1), 1);
    assert_eq!(std::env::var(CANDLE_VAR).unwrap(), "1");
    // A value already in force (set by the user, or by the first call) is kept.
    assert_eq!(size_candle_pool(3), 1);
    // Large element-wise ops: candle runs these on its pool (creating it on first use).
    let a = Tensor::ones((512, 1024), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = ((&a + &a).unwrap() * 3.0)
        .unwrap()
        .clamp(0f32, 6f32)
        .unwrap();
    assert_eq!(
        y.sum_all().unwrap().to_scalar::<f32>().unwrap(),
        6.0 * 512.0 * 1024.0
    );
    if std::path::Path::new("/proc/self/task").exists() {
        assert_eq!(candle_pool_threads(), 0, "candle spawned pool workers");
    }
}
