//! Fast CPU kernels for CNN blocks, as candle custom ops with forward and backward.
//!
//! Stock candle 0.11 runs conv2d through a generic im2col + copy path, runs grouped convs as
//! one conv per group, and has no padded max-pool; this crate replaces those ops for the
//! model core (f32, CPU backend).
//!
//! # API
//!
//! * [`conv2d`]: differentiable conv (grads for x, w, bias). `groups == 1` and general groups
//!   run im2col + [`gemm`]; depthwise (`groups == C == O`) runs a direct kernel.
//! * [`conv2d_fused`]: inference-only conv + bias + [`Activation`] (ReLU, ReLU6), the bias and
//!   activation applied while the output tile is cache-hot.
//! * [`fold_bn`]: folds eval-mode BatchNorm into the preceding conv's weight and bias.
//! * [`max_pool2d`]: any kernel/stride, `-inf` padding like PyTorch, with backward.
//! * [`global_avg_pool`]: `[N, C, H, W] -> [N, C]`, with backward.
//! * [`threads`]: thread policy; [`threads::current`] must be recorded with every latency.
//!
//! Inputs may be non-contiguous (they are made contiguous first). Only f32 is implemented;
//! other dtypes return an error naming the dtype. Only the CPU device is implemented.
//!
//! # Layout
//!
//! * `src/lib.rs`: public API, parameter types, [`KernelError`].
//! * `src/threads.rs`: thread policy (global cap, per-op FLOP threshold, rayon helpers).
//! * `src/geom.rs`: conv geometry (output size, asymmetric padding, valid tap ranges).
//! * `src/conv.rs`: the conv custom ops (`CustomOp2`/`CustomOp3` forward + `bwd`, which calls
//!   the no-autograd ops for grad-input, grad-weight and grad-bias).
//! * `src/gemm_path.rs`: im2col into a reused per-thread buffer (none at all for 1x1 stride-1
//!   unpadded convs: the input already is the GEMM operand), `gemm`, col2im; parallel over
//!   the batch when `N` is large enough, else inside the GEMM.
//! * `src/depthwise.rs`: direct depthwise forward / grad-input / grad-weight, run-time
//!   AVX2+FMA dispatch, parallel over planes (grad-weight: over channels).
//! * `src/pool.rs`: max-pool and global average pool ops.
//! * `src/bn.rs`: BatchNorm folding (computed in f64).
//! * `tests/`: parity against candle's reference ops and finite-difference gradient checks.
//! * `benches/ops.rs`: `cargo bench -p adaptivenet-kernels --bench ops`, ours vs candle.
//!
//! # Measured performance
//!
//! See `MEASUREMENTS` below (filled from `benches/ops.rs`).
#![doc = include_str!("../MEASUREMENTS.md")]

mod bn;
mod conv;
mod depthwise;
mod gemm_path;
mod geom;
mod pool;
mod storage;
pub mod threads;

use candle_core::{DType, Tensor};

pub use bn::fold_bn;

/// Activation fused into [`conv2d_fused`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Activation {
    #[default]
    None,
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

/// Conv parameters. Padding per side: (top, bottom, left, right) so TF-"SAME" asymmetric
/// padding is expressible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    pub stride: (usize, usize),
    /// (top, bottom, left, right)
    pub padding: (usize, usize, usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: (1, 1),
            padding: (0, 0, 0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

impl Conv2dParams {
    /// Square stride, symmetric padding `pad` on every side, no dilation, one group.
    pub fn new(stride: usize, pad: usize) -> Self {
        Self {
            stride: (stride, stride),
            padding: (pad, pad, pad, pad),
            ..Self::default()
        }
    }

    /// Same parameters with `groups` groups.
    pub fn with_groups(self, groups: usize) -> Self {
        Self { groups, ..self }
    }

    /// TensorFlow "SAME" padding for an input of `input` = (H, W): output = ceil(input /
    /// stride), the extra padding going to the bottom/right.
    pub fn same(input: (usize, usize), kernel: (usize, usize), stride: (usize, usize)) -> Self {
        let pad = |i: usize, k: usize, s: usize| {
            let o = i.div_ceil(s);
            let total = ((o - 1) * s + k).saturating_sub(i);
            (total / 2, total - total / 2)
        };
        let (t, b) = pad(input.0, kernel.0, stride.0);
        let (l, r) = pad(input.1, kernel.1, stride.1);
        Self {
            stride,
            padding: (t, b, l, r),
            ..Self::default()
        }
    }
}

/// Errors of this crate (returned wrapped in `candle_core::Error`).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("adaptivenet-kernels: {op}: {arg} has dtype {dtype}, only f32 is supported")]
    DType {
        op: &'static str,
        arg: &'static str,
        dtype: &'static str,
    },
    #[error("adaptivenet-kernels: {op}: {arg} is not contiguous")]
    NotContiguous { op: &'static str, arg: &'static str },
    #[error("adaptivenet-kernels: {0}")]
    Shape(String),
}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}

fn check_f32(t: &Tensor, op: &'static str, arg: &'static str) -> candle_core::Result<()> {
    if t.dtype() != DType::F32 {
        return Err(KernelError::DType {
            op,
            arg,
            dtype: t.dtype().as_str(),
        }
        .into());
    }
    Ok(())
}

fn conv_impl(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: &Conv2dParams,
    act: Activation,
    autograd: bool,
) -> candle_core::Result<Tensor> {
    check_f32(x, "conv2d", "x")?;
    check_f32(w, "conv2d", "weight")?;
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let op = conv::ConvOp { p: *p, act };
    match bias {
        Some(b) => {
            check_f32(b, "conv2d", "bias")?;
            let b = b.contiguous()?;
            if autograd {
                x.apply_op3(&w, &b, op)
            } else {
                x.apply_op3_no_bwd(&w, &b, &op)
            }
        }
        None if autograd => x.apply_op2(&w, op),
        None => x.apply_op2_no_bwd(&w, &op),
    }
}

/// Differentiable conv2d: `x [N, C, H, W]` f32, `w [O, C/groups, KH, KW]`, optional bias
/// `[O]`. `groups == 1` runs im2col/`gemm`; `groups == C == O` (depthwise) a direct kernel;
/// other groups a GEMM per group.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: &Conv2dParams,
) -> candle_core::Result<Tensor> {
    conv_impl(x, w, bias, p, Activation::None, true)
}

/// Inference-only conv + bias + activation (the result does not track gradients).
pub fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: &Conv2dParams,
    act: Activation,
) -> candle_core::Result<Tensor> {
    conv_impl(x, w, bias, p, act, false)
}

/// Max pooling over `x [N, C, H, W]` with `-inf` padding (PyTorch semantics, `ceil_mode =
/// false`, padding at most half the kernel), any kernel and stride; differentiable (the
/// gradient goes to the first maximum of each window).
pub fn max_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> candle_core::Result<Tensor> {
    check_f32(x, "max_pool2d", "x")?;
    x.contiguous()?
        .apply_op1(pool::MaxPool(kernel, stride, padding))
}

/// Global average pooling `[N, C, H, W] -> [N, C]`; differentiable.
pub fn global_avg_pool(x: &Tensor) -> candle_core::Result<Tensor> {
    check_f32(x, "global_avg_pool", "x")?;
    x.contiguous()?.apply_op1(pool::GlobalAvgPool)
}
