//! Helpers shared by the core's integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

/// The torchvision parity fixtures: `$ADAPTIVENET_FIXTURES`, else the copy committed under
/// `tests/fixtures/torchvision` (PyTorch weights and reference outputs).
pub fn fixtures_dir() -> PathBuf {
    if let Ok(p) = std::env::var("ADAPTIVENET_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torchvision")
}

/// Max absolute difference of two tensors of equal shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
