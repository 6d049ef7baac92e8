//! Fresh initialisation of parameters by name (torchvision's defaults, seeded): a model's
//! own initialisation and the supernet's branches for tensors they cannot inherit.
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// Fresh initialisation of one tensor by name: convs Kaiming-normal (fan-out, ReLU gain, as
/// torchvision), BN weight 1 / bias 0 / mean 0 / var 1.
pub fn fresh_tensor(name: &str, shape: &[usize], rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let numel: usize = shape.iter().product();
    let data: Vec<f32> = if name == "fc.weight" {
        // PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / (shape[1].max(1) as f64).sqrt();
        (0..numel)
            .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect()
    } else if name.ends_with("running_var") || is_bn_weight(name) {
        vec![1.0; numel]
    } else if name.ends_with("running_mean") || name.ends_with(".bias") {
        vec![0.0; numel]
    } else {
        // conv weight [O, I/g, kh, kw]: fan_out = O * kh * kw.
        let fan_out =
            shape[0] * shape.get(2).copied().unwrap_or(1) * shape.get(3).copied().unwrap_or(1);
        let std = (2.0 / fan_out.max(1) as f64).sqrt();
        (0..numel).map(|_| (normal(rng) * std) as f32).collect()
    };
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn is_bn_weight(name: &str) -> bool {
    name.ends_with(".weight") && (name.contains("bn") || name.starts_with("downsample.1"))
}

/// Standard normal via Box-Muller (seeded, reproducible across platforms).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
