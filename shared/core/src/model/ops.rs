//! The few tensor primitives the chain models are built from. Every forward pass of every
//! family goes through these functions, so switching a primitive to a faster kernel is a
//! one-place change and the oracle and its all-original subnet share one code path.
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Tensor, D};

use super::spec::Act;
use crate::Result;

/// Process-wide backend switch: `true` runs [`conv2d`], [`conv2d_fused`] and
/// [`max_pool_3x3_s2_p1`] on stock candle ops instead of the kernels crate (the reference
/// column of `cargo bench --bench kernels` and of `tests/backends.rs`). Default: `false`.
static STOCK_CANDLE: AtomicBool = AtomicBool::new(false);

/// Selects stock candle ops (`true`) or the kernels crate (`false`, the default) for the
/// conv and max-pool primitives, process-wide.
pub fn set_stock_candle(on: bool) {
    STOCK_CANDLE.store(on, Ordering::Relaxed);
}

/// Whether stock candle ops are selected (see [`set_stock_candle`]).
pub fn stock_candle() -> bool {
    STOCK_CANDLE.load(Ordering::Relaxed)
}

/// Stock candle conv2d (zero padding per side, explicit when asymmetric).
fn conv2d_stock(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    (t, b, l, r): (usize, usize, usize, usize),
    groups: usize,
) -> Result<Tensor> {
    if t == b && t == l && t == r {
        return Ok(x.conv2d(w, t, stride, 1, groups)?);
    }
    let x = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
    Ok(x.conv2d(w, 0, stride, 1, groups)?)
}

/// The kernels crate's parameters for a square stride, per-side padding, no dilation.
fn kernel_params(
    stride: usize,
    pad: (usize, usize, usize, usize),
    groups: usize,
) -> adaptivenet_kernels::Conv2dParams {
    adaptivenet_kernels::Conv2dParams {
        stride: (stride, stride),
        padding: pad,
        dilation: (1, 1),
        groups,
    }
}

/// 2-D convolution with per-side padding (top, bottom, left, right); differentiable (the
/// kernels crate's GEMM / direct depthwise ops with their own backward).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: (usize, usize, usize, usize),
    groups: usize,
) -> Result<Tensor> {
    if stock_candle() {
        return conv2d_stock(x, w, stride, pad, groups);
    }
    let p = kernel_params(stride, pad, groups);
    Ok(adaptivenet_kernels::conv2d(x, w, None, &p)?)
}

/// [`conv2d`] plus a per-channel bias, differentiable in the input, weight and bias.
pub fn conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: (usize, usize, usize, usize),
    groups: usize,
) -> Result<Tensor> {
    if stock_candle() {
        return Ok(conv2d_stock(x, w, stride, pad, groups)?.broadcast_add(&per_channel(bias)?)?);
    }
    let p = kernel_params(stride, pad, groups);
    Ok(adaptivenet_kernels::conv2d(x, w, Some(bias), &p)?)
}

/// Inference-only conv + bias + optional activation in one kernel (BN already folded).
pub fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: (usize, usize, usize, usize),
    groups: usize,
    act: Option<Act>,
) -> Result<Tensor> {
    if stock_candle() {
        let y = conv2d_stock(x, w, stride, pad, groups)?.broadcast_add(&per_channel(bias)?)?;
        return match act {
            Some(a) => activation(&y, a),
            None => Ok(y),
        };
    }
    let p = kernel_params(stride, pad, groups);
    Ok(adaptivenet_kernels::conv2d_fused(
        x,
        w,
        Some(bias),
        &p,
        kernel_act(act),
    )?)
}

/// Inference 1x1 conv on a weight packed by [`adaptivenet_kernels::pack_pointwise`] (BN
/// folded): `act(conv(x) + bias + residual)` in one kernel. Not differentiable.
pub fn pointwise_packed(
    x: &Tensor,
    packed: &Tensor,
    out_channels: usize,
    bias: &Tensor,
    act: Option<Act>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    Ok(adaptivenet_kernels::pointwise_packed(
        x,
        packed,
        out_channels,
        Some(bias),
        kernel_act(act),
        residual,
    )?)
}

/// Inference MBConv expand 1x1 conv (weight packed by
/// [`adaptivenet_kernels::pack_pointwise`]) and depthwise conv (`dw_weight [hidden, 1, K,
/// K]`), BN folded into both, fused: `act(dw(act(expand(x) + eb)) + db)` without storing the
/// expanded map (see [`adaptivenet_kernels::expand_dw_packed`]). Not differentiable.
#[allow(clippy::too_many_arguments)]
pub fn expand_dw_packed(
    x: &Tensor,
    expand_packed: &Tensor,
    hidden: usize,
    expand_bias: &Tensor,
    dw_weight: &Tensor,
    dw_bias: &Tensor,
    stride: usize,
    pad: (usize, usize, usize, usize),
    act: Option<Act>,
) -> Result<Tensor> {
    Ok(adaptivenet_kernels::expand_dw_packed(
        x,
        expand_packed,
        hidden,
        Some(expand_bias),
        dw_weight,
        Some(dw_bias),
        &kernel_params(stride, pad, hidden),
        kernel_act(act),
    )?)
}

/// Inference conv (one group, any kernel, stride and per-side padding) on a weight packed
/// by [`adaptivenet_kernels::pack_conv`] (BN folded): `act(conv(x) + bias + residual)` in
/// one kernel, no im2col. `out_channels` and `kernel` are the unpacked weight's. Not
/// differentiable.
#[allow(clippy::too_many_arguments)]
pub fn conv_packed(
    x: &Tensor,
    packed: &Tensor,
    out_channels: usize,
    kernel: (usize, usize),
    bias: &Tensor,
    stride: usize,
    pad: (usize, usize, usize, usize),
    act: Option<Act>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    Ok(adaptivenet_kernels::conv_packed(
        x,
        packed,
        out_channels,
        kernel,
        Some(bias),
        &kernel_params(stride, pad, 1),
        kernel_act(act),
        residual,
    )?)
}

/// Inference stride-1 3x3 conv on a weight packed by
/// [`adaptivenet_kernels::pack_winograd`] or `pack_winograd_tile` (BN folded), by Winograd
/// F(2x2, 3x3) or F(4x4, 3x3) (the packed shape says which):
/// `act(conv(x) + bias + residual)` with the bias, residual add and activation in the output
/// transform. Not differentiable.
pub fn winograd_packed(
    x: &Tensor,
    packed: &Tensor,
    out_channels: usize,
    bias: &Tensor,
    pad: (usize, usize, usize, usize),
    act: Option<Act>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    Ok(adaptivenet_kernels::winograd_packed(
        x,
        packed,
        out_channels,
        Some(bias),
        &kernel_params(1, pad, 1),
        kernel_act(act),
        residual,
    )?)
}

fn kernel_act(act: Option<Act>) -> adaptivenet_kernels::Activation {
    use adaptivenet_kernels::Activation;
    match act {
        None => Activation::None,
        Some(Act::Relu) => Activation::Relu,
        Some(Act::Relu6) => Activation::Relu6,
    }
}

/// Broadcasts a per-channel vector over NCHW.
fn per_channel(v: &Tensor) -> Result<Tensor> {
    Ok(v.reshape((1, v.elem_count(), 1, 1))?)
}

/// Eval-mode batch norm with running statistics.
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (scale, shift) = bn_scale_shift(gamma, beta, mean, var, eps)?;
    Ok(x.broadcast_mul(&per_channel(&scale)?)?
        .broadcast_add(&per_channel(&shift)?)?)
}

/// Inference-mode BN as a per-channel `(scale, shift)`: `y = x * scale + shift`. Candle ops,
/// so differentiable in the BN's parameters.
pub fn bn_scale_shift(
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let scale = (gamma / (var + eps)?.sqrt()?)?;
    let shift = (beta - (mean * &scale)?)?;
    Ok((scale, shift))
}

/// Train-mode batch norm followed by `act`: normalises with batch statistics and returns
/// the updated running statistics (PyTorch semantics: unbiased variance in the running
/// estimate). One fused kernel with its own backward, the activation included
/// ([`adaptivenet_kernels::batch_norm_train_act`]: no BN-output tensor and gradient between
/// them, bit-identical to BN then [`activation`]); the candle composition under
/// [`set_stock_candle`] is the reference it is tested against.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    momentum: f64,
    act: Option<Act>,
) -> Result<(Tensor, Tensor, Tensor)> {
    if stock_candle() {
        let (y, m, v) = batch_norm_train_stock(x, gamma, beta, mean, var, eps, momentum)?;
        let y = match act {
            Some(a) => activation(&y, a)?,
            None => y,
        };
        return Ok((y, m, v));
    }
    let (y, bmean, bvar) =
        adaptivenet_kernels::batch_norm_train_act(x, gamma, beta, eps, kernel_act(act))?;
    running_stats(&y, bmean, bvar, mean, var, momentum)
}

/// `y` with the running statistics updated from the batch's (PyTorch semantics: unbiased
/// variance in the running estimate).
fn running_stats(
    y: &Tensor,
    bmean: Tensor,
    bvar: Tensor,
    mean: &Tensor,
    var: &Tensor,
    momentum: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, _, h, w) = y.dims4()?;
    let count = (n * h * w) as f64;
    let unbiased = if count > 1.0 {
        (bvar * (count / (count - 1.0)))?
    } else {
        bvar
    };
    let new_mean = ((mean * (1.0 - momentum))? + (bmean * momentum)?)?;
    let new_var = ((var * (1.0 - momentum))? + (unbiased * momentum)?)?;
    Ok((y.clone(), new_mean, new_var))
}

/// [`conv2d`] (no bias) then [`batch_norm_train`] with `act`, as one kernel op for training
/// ([`adaptivenet_kernels::conv_bn_train`]: the conv output is not a tensor of the autograd
/// graph, so the backward does not zero-fill and add its gradient; same values and
/// gradients). Under [`set_stock_candle`] the two stock compositions.
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: (usize, usize, usize, usize),
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    momentum: f64,
    act: Option<Act>,
) -> Result<(Tensor, Tensor, Tensor)> {
    if stock_candle() {
        let z = conv2d_stock(x, w, stride, pad, groups)?;
        return batch_norm_train(&z, gamma, beta, mean, var, eps, momentum, act);
    }
    let p = kernel_params(stride, pad, groups);
    let (y, bmean, bvar) =
        adaptivenet_kernels::conv_bn_train(x, w, gamma, beta, &p, eps, kernel_act(act))?;
    running_stats(&y, bmean, bvar, mean, var, momentum)
}

/// [`batch_norm_train`] composed of stock candle ops (the reference).
#[allow(clippy::too_many_arguments)]
fn batch_norm_train_stock(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    momentum: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, h, w) = x.dims4()?;
    let count = (n * h * w) as f64;
    let xt = x.transpose(0, 1)?.reshape((c, n * h * w))?;
    let bmean = xt.mean(D::Minus1)?;
    let centered = xt.broadcast_sub(&bmean.unsqueeze(1)?)?;
    let bvar = centered.sqr()?.mean(D::Minus1)?;
    let inv = ((&bvar + eps)?.sqrt()?.recip()? * gamma)?;
    let y = centered
        .broadcast_mul(&inv.unsqueeze(1)?)?
        .broadcast_add(&beta.unsqueeze(1)?)?
        .reshape((c, n, h, w))?
        .transpose(0, 1)?;
    let unbiased = if count > 1.0 {
        (bvar.detach() * (count / (count - 1.0)))?
    } else {
        bvar.detach()
    };
    let new_mean = ((mean * (1.0 - momentum))? + (bmean.detach() * momentum)?)?;
    let new_var = ((var * (1.0 - momentum))? + (unbiased * momentum)?)?;
    Ok((y.contiguous()?, new_mean, new_var))
}

/// Activation; ReLU and ReLU6 on f32 run the kernels crate's ops (one-pass backward).
pub fn activation(x: &Tensor, act: Act) -> Result<Tensor> {
    let ours = !stock_candle() && x.dtype() == candle_core::DType::F32;
    Ok(match act {
        Act::Relu if ours => adaptivenet_kernels::relu(x)?,
        Act::Relu => x.relu()?,
        Act::Relu6 if ours => adaptivenet_kernels::relu6(x)?,
        Act::Relu6 => x.clamp(0f32, 6f32)?,
    })
}

/// Residual join `act(y + shortcut)`: ReLU on f32 runs one fused kernel (one pass forward
/// and backward instead of candle's add, ReLU and their temporaries).
pub fn add_act(y: &Tensor, shortcut: &Tensor, act: Act) -> Result<Tensor> {
    if act == Act::Relu
        && !stock_candle()
        && y.dtype() == candle_core::DType::F32
        && y.dims() == shortcut.dims()
    {
        return Ok(adaptivenet_kernels::add_relu(y, shortcut)?);
    }
    activation(&(y + shortcut)?, act)
}

/// 3x3 / stride 2 / padding 1 max-pool (torchvision ResNet stem), padding acting as -inf;
/// differentiable.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    if stock_candle() {
        let (n, c, h, w) = x.dims4()?;
        let ninf = |shape: (usize, usize, usize, usize)| {
            Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())
        };
        let col = ninf((n, c, h, 1))?;
        let xp = Tensor::cat(&[&col, x, &col], 3)?;
        let row = ninf((n, c, 1, w + 2))?;
        let xp = Tensor::cat(&[&row, &xp, &row], 2)?;
        return Ok(xp.max_pool2d_with_stride((3, 3), (2, 2))?);
    }
    Ok(adaptivenet_kernels::max_pool2d(x, (3, 3), (2, 2), (1, 1))?)
}

/// Global average pool NCHW → NC.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.mean((2, 3))?)
}

/// `x @ w^T + b`; differentiable. Runs as a 1x1 conv with bias on the kernels crate: candle
/// 0.11's `matmul` calls `utils::get_num_threads`, which reads `/proc/cpuinfo` on every call
/// unless `RAYON_NUM_THREADS` is set (once per forward pass here; slow on many-core hosts).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if stock_candle() {
        return Ok(x.matmul(&w.t()?)?.broadcast_add(b)?);
    }
    let (n, f) = x.dims2()?;
    let c = w.dim(0)?;
    let y = adaptivenet_kernels::conv2d(
        &x.reshape((n, f, 1, 1))?,
        &w.reshape((c, f, 1, 1))?,
        Some(b),
        &adaptivenet_kernels::Conv2dParams::default(),
    )?;
    Ok(y.reshape((n, c))?)
}
