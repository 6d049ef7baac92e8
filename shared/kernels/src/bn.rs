//! Eval-time folding of BatchNorm into the preceding convolution.

use candle_core::{DType, Tensor};

use crate::KernelError;

/// Folds eval-mode BatchNorm `y = gamma * (z - mean) / sqrt(var + eps) + beta`, applied to the
/// output `z` of a conv with weight `w` `[O, ...]` and optional bias `b` `[O]`, into a new
/// weight and bias: `w' = w * s[o]`, `b' = (b - mean) * s + beta` with
/// `s = gamma / sqrt(var + eps)`. Computed in f64, returned in `w`'s dtype.
pub fn fold_bn(
    w: &Tensor,
    b: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dtype = w.dtype();
    let dims = w.dims();
    let o = *dims
        .first()
        .ok_or_else(|| KernelError::Shape("fold_bn: weight must have rank >= 1".into()))?;
    let vec64 = |t: &Tensor, what: &str| -> candle_core::Result<Tensor> {
        if t.elem_count() != o {
            return Err(KernelError::Shape(format!(
                "fold_bn: {what} has {} elements, expected {o}",
                t.elem_count()
            ))
            .into());
        }
        t.flatten_all()?.to_dtype(DType::F64)
    };
    let gamma = vec64(gamma, "gamma")?;
    let beta = vec64(beta, "beta")?;
    let mean = vec64(mean, "mean")?;
    let var = vec64(var, "var")?;
    let scale = (gamma / (var + eps)?.sqrt()?)?;
    let mut sdims = vec![1usize; dims.len()];
    sdims[0] = o;
    let w2 = w
        .to_dtype(DType::F64)?
        .broadcast_mul(&scale.reshape(sdims)?)?
        .to_dtype(dtype)?;
    let b0 = match b {
        Some(b) => vec64(b, "bias")?,
        None => Tensor::zeros(o, DType::F64, w.device())?,
    };
    let b2 = ((b0 - mean)? * scale)?.add(&beta)?.to_dtype(dtype)?;
    Ok((w2, b2))
}
