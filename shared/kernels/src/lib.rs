//! Fast CPU kernels for CNN blocks, as candle custom ops with forward and backward.
//!
//! Stock candle 0.11's CPU conv2d reaches a fraction of its own matmul speed on the same
//! im2col product, runs grouped (depthwise) convs as one conv per group, and has no padded
//! max-pool nor a max-pool backward for kernel != stride; this crate replaces those ops for
//! the model core (f32, CPU backend).
//!
//! # API
//!
//! * [`conv2d`]: differentiable conv (grads for x, w, bias). `groups == 1` and general groups
//!   run im2col + [`gemm`]; depthwise (`groups == C == O`) runs a direct kernel.
//! * [`conv2d_fused`]: inference-only conv + bias + [`Activation`] (ReLU, ReLU6), the bias and
//!   activation applied while the output tile is cache-hot.
//! * [`pack_conv`] + [`conv_packed`] (and the 1x1 [`pack_pointwise`] + [`pointwise_packed`]):
//!   inference on a weight packed once when a module is installed, with bias, activation and
//!   a residual add fused into the micro-kernel's epilogue.
//! * [`pack_winograd`] / [`pack_winograd_tile`] + [`winograd_packed`]: the same for stride-1
//!   3x3 convs by Winograd F(2x2, 3x3) or F(4x4, 3x3), as [`winograd_tile`] picks (measured
//!   per shape).
//! * [`fold_bn`]: folds eval-mode BatchNorm into the preceding conv's weight and bias.
//! * [`max_pool2d`]: any kernel/stride, `-inf` padding like PyTorch, with backward.
//! * [`global_avg_pool`]: `[N, C, H, W] -> [N, C]`, with backward.
//! * [`batch_norm_train`]: train-mode BatchNorm (batch statistics) as one op with a fused
//!   backward, and [`batch_norm_train_act`] with the following ReLU / ReLU6 in the same op;
//!   [`relu`], [`relu6`] and [`add_relu`] (residual join) with one-pass backward.
//! * [`conv_bn_train`]: conv + train-mode BN (+ activation) as one op for training (the conv
//!   output never becomes a graph tensor, so candle does not zero-fill and add its gradient).
//! * [`sgd_update`]: in-place SGD step (momentum, Nesterov, weight decay), bit-identical to
//!   the candle composition.
//! * [`threads`]: thread policy; [`threads::current`] must be recorded with every latency.
//! * [`alloc::retain_freed_memory`]: glibc setting that binaries call at start (freed
//!   feature maps are reused instead of being unmapped and faulted in again), and
//!   [`alloc::release_freed_memory`] at the end of a phase that held far more than what
//!   follows.
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
//!   the batch when `N` is large enough, else inside the GEMM. Small feature maps in a batch
//!   are stacked side by side into one GEMM (forward and grad-weight) at a row pitch of an
//!   odd number of cache lines (4 KiB-multiple pitches alias in L1). The grad-weight GEMM
//!   reads a pixel-major im2col (`[P, K]`), so neither operand needs a transposing pack.
//!   The grad-input of a stride-1 conv runs as the forward conv with the flipped,
//!   transposed kernel (for a 1x1 conv: the forward with `W^T`). Training's 1x1 convs
//!   (stride 1, unpadded) run forward and grad-input on `src/pointwise.rs`'s direct kernels
//!   instead, the weight packed per call.
//! * `src/pw_train.rs`: the weight gradient of a 1x1 conv as direct dot products on NCHW
//!   (4x3 register tiles over blocks of images, small maps packed into contiguous rows).
//! * `src/depthwise.rs`: direct depthwise forward per plane (run-time AVX2+FMA dispatch,
//!   parallel over planes) and which training forwards it keeps (large stride-1 planes);
//!   `src/conv.rs` sends the other training forwards and both gradients to
//!   `src/dw_lanes.rs`: 8 channels in the SIMD lanes and every valid (output, input, tap)
//!   triple one vector multiply-add, no padding or partial vectors (parallel over images;
//!   grad-weight over channel blocks).
//! * `src/dw_direct.rs`: register-blocked depthwise forward (3x3 / 5x5, stride 1 / 2, bias +
//!   activation fused), used by every inference depthwise forward it supports.
//! * `src/expand_dw.rs`, `src/infer.rs`: [`expand_dw_packed`], an MBConv block's expand 1x1
//!   conv and depthwise fused (the hidden map made 16 channels at a time and consumed while
//!   in cache), where [`expand_dw_fuses`] (expanded maps of 1 MiB and more).
//! * `src/pointwise.rs`, `src/infer.rs`: [`pack_pointwise`] and [`pointwise_packed`], the
//!   inference 1x1 conv as a direct GEMM on a pre-packed weight with bias, activation and
//!   residual add fused (`tests/mbconv.rs` checks both against candle).
//! * `src/direct.rs`, `src/infer.rs`: [`pack_conv`] and [`conv_packed`], the inference conv
//!   for any kernel size and stride (ResNet's 3x3, strided 1x1 shortcuts, stems) on the same
//!   packed layout and micro-kernel: the input copied once into zero-padded stride phases,
//!   no im2col, bias, activation and residual add fused (AVX-512 32-position tiles where
//!   the CPU has avx512f; on AVX2-only CPUs bands of im2col columns through the pointwise
//!   GEMM, which beat the stride-phase loop there on every shape; [`conv_packed_on`] forces
//!   a level for tests and benches; `tests/direct.rs`).
//! * `src/winograd.rs`, `src/infer.rs`: [`pack_winograd`], [`pack_winograd_tile`] and
//!   [`winograd_packed`], Winograd F(2x2, 3x3) and F(4x4, 3x3) for stride-1 3x3 inference
//!   convs (any padding): the weight transformed once at pack time, per chunk of tile rows
//!   an input transform, 16 (36) GEMMs `[O x C] x [C x tiles]` and an output transform
//!   with bias, residual add and activation fused; [`winograd_tile`] says on which shapes
//!   which form beats the direct conv (`tests/winograd.rs`).
//! * `src/cpu.rs`: the one run-time CPU check every SIMD kernel dispatches on ([`isa`]).
//! * `src/pool.rs`: max-pool and global average pool ops.
//! * `src/bn.rs`: BatchNorm folding (computed in f64); `src/bn_train.rs`: train-mode BN;
//!   `src/conv_bn.rs`: conv + train-mode BN in one op on the same kernels.
//! * `src/eltwise.rs`: ReLU and add + ReLU with their backward.
//! * `src/optim.rs`: in-place SGD update.
//! * `tests/parity.rs`: forward parity against candle's reference ops (≤ 1e-4), backward
//!   against candle's autograd, fused activations, BN folding (≤ 1e-5), dtype/shape errors.
//! * `tests/train_ops.rs`: train-mode BN, ReLU and add + ReLU against candle's composition
//!   (<= 1e-4) and finite differences.
//! * `tests/dw_train.rs`: the training depthwise kernels on MobileNet-style shapes against a
//!   naive f64 forward, the f64 gradients and finite differences.
//! * `tests/pw_train.rs`: 1x1 conv gradients against their f64 definitions, 1 vs 2 threads.
//! * `tests/grads.rs`: gradients against central finite differences for every op, and
//!   multi-threaded paths against single-threaded ones; `tests/common/`: helpers.
//! * `benches/ops.rs`: `cargo bench -p adaptivenet-kernels --bench ops`, ours vs candle.
//! * `benches/train_layers.rs`: every conv, BN and ReLU6 of an EfficientNet-Lite0 training
//!   step at 64x64, batch 32, timed alone per layer and summed per kind.
//! * `benches/packed.rs`: `cargo bench --bench packed`, the packed direct conv vs im2col +
//!   GEMM per conv shape of ResNet-20 (batch 1 and 100) and ResNet-18, by thread CPU time;
//!   then the direct conv vs Winograd per stride-1 3x3 shape (keys `wino ...`).
//!
//! # Thread policy
//!
//! [`threads`]: a global cap ([`threads::set_max_threads`], env `ADAPTIVENET_THREADS`) and a
//! per-op FLOP threshold ([`threads::DEFAULT_FLOP_THRESHOLD`] = 1 MFLOP; 20x that for GEMMs
//! split over rayon) below which an op runs on one thread; per-op splits run on a few
//! persistent workers that spin between ops (`spin.rs`). Default cap: **1 on machines with <= 2 hardware threads** (measured,
//! below), else all. Convs parallelise over the batch when `N` is large enough, else inside
//! the GEMM; depthwise and pooling over planes. Record [`threads::current`] (or
//! [`threads::describe`]) with every latency figure.
//!
//! # Measured performance
//!
//! `cargo bench -p adaptivenet-kernels --bench ops` on the dev box: 2 vCPUs (AMD EPYC Zen 3,
//! AVX2+FMA, KVM), candle 0.11.1 CPU backend with its default 2 threads, f32, median of
//! repeated runs, our 1-thread / 2-thread runs interleaved run by run. The box is shared with
//! other engineers' builds (load average 4-6 during this run): absolute numbers are noisy,
//! compare within a row. Inference rows use [`conv2d_fused`] (bias + ReLU) vs candle
//! `conv2d` + bias + `relu`; training rows are forward + backward (x, w, bias grads).
//!
//! | op (batch) | GFLOP | ours 1 thread | ours 2 threads | candle (2 threads) | candle / ours 1t |
//! |---|---|---|---|---|---|
//! | ResNet-18 conv1 7x7/2 3→64 @224 (1) | 0.236 | 12.6 ms, 18.8 GF/s | 16.9 ms | 43.9 ms, 5.4 GF/s | 3.5x |
//! | ResNet-18 3x3 64→64 @56 (1) | 0.231 | 9.7 ms, 23.9 GF/s | 13.0 ms | 37.1 ms, 6.2 GF/s | 3.8x |
//! | ResNet-18 3x3/2 64→128 @56 (1) | 0.116 | 2.5 ms, 45.8 GF/s | 2.3 ms | 13.5 ms, 8.5 GF/s | 5.4x |
//! | ResNet-18 1x1/2 64→128 @56 (1) | 0.013 | 0.43 ms, 29.8 GF/s | 0.47 ms | 12.0 ms, 1.1 GF/s | 28x |
//! | ResNet-18 3x3 128→128 @28 (1) | 0.231 | 5.8 ms, 40.0 GF/s | 9.7 ms | 28.0 ms, 8.3 GF/s | 4.8x |
//! | ResNet-18 3x3 256→256 @14 (1) | 0.231 | 3.5 ms, 66.2 GF/s | 4.1 ms | 11.0 ms, 21.1 GF/s | 3.1x |
//! | ResNet-18 3x3 512→512 @7 (1) | 0.231 | 6.1 ms, 37.8 GF/s | 8.8 ms | 13.2 ms, 17.6 GF/s | 2.2x |
//! | edge 3x3 16→16 @28 (1) | 0.004 | 0.118 ms, 30.6 GF/s | 0.145 ms | 1.03 ms | 8.7x |
//! | edge 3x3 32→32 @28 (1) | 0.014 | 0.40 ms, 36.2 GF/s | 0.43 ms | 2.37 ms | 5.9x |
//! | edge 3x3 64→64 @28 (1) | 0.058 | 1.62 ms, 35.6 GF/s | 3.56 ms | 6.0 ms | 3.7x |
//! | edge 1x1 32→64 @28 (1) | 0.003 | 0.073 ms, 44.0 GF/s | 0.100 ms | 0.32 ms | 4.4x |
//! | edge depthwise 3x3 96 @28 (1) | 0.001 | 0.150 ms | 0.175 ms | 40.0 ms | 267x |
//! | ResNet-20 3x3 16→16 @32 (1) | 0.005 | 0.188 ms, 25.1 GF/s | 0.218 ms | 1.43 ms | 7.6x |
//! | ResNet-20 3x3 64→64 @8 (1) | 0.005 | 0.094 ms, 50.1 GF/s | 0.113 ms | 0.33 ms | 3.5x |
//! | ResNet-20 3x3 16→16 @32 (64) | 0.302 | 14.9 ms, 20.2 GF/s | 17.5 ms | 144 ms, 2.1 GF/s | 9.6x |
//! | ResNet-20 3x3 64→64 @8 (64) | 0.302 | 13.5 ms, 22.3 GF/s | 18.1 ms | 48.2 ms, 6.3 GF/s | 3.6x |
//! | ResNet-20 3x3 16→16 @32 fwd+bwd (64) | 0.906 | 121 ms | 126 ms | 765 ms | 6.3x |
//! | ResNet-20 3x3 32→32 @16 fwd+bwd (64) | 0.906 | 52 ms | 59 ms | 372 ms | 7.1x |
//! | ResNet-20 3x3 64→64 @8 fwd+bwd (64) | 0.906 | 34 ms | 38 ms | 165 ms | 4.9x |
//! | depthwise 3x3 96 @28 fwd+bwd (32) | 0.130 | 82 ms | 80 ms | 2445 ms | 30x |
//! | max-pool 3x3/2 pad 1, 64@112 (1) | - | 1.9 ms | 3.6 ms | 7.3 ms (unpadded) | 3.9x |
//! | max-pool 2x2/2 64@16 fwd+bwd (64) | - | 31 ms | 25 ms | 86 ms | 2.8x |
//! | global avg pool 64@8 fwd+bwd (64) | - | 0.48 ms | 0.50 ms | 0.27 ms | 0.6x |
//!
//! Threads: in this run 2 threads lost to 1 on 22 of 25 rows (up to 2.2x slower) and won at
//! most 1.2x. In an earlier, quieter run (load ~2, not interleaved) 2 threads won on some large
//! ops (ResNet-18 3x3 128→128 @28: 5.5 → 4.0 ms; batch-64 3x3/2 16→32: 15.6 → 7.4 ms; batch-64
//! 3x3 64→64 @8: 9.2 → 6.8 ms) and lost on others (3x3 64→64 @56: 6.3 → 9.8 ms). Hence the
//! default of 1 thread on <= 2 hardware threads. The depthwise fwd+bwd row alone measured
//! 28-46 ms (1-2 threads) with candle not running in between (`ADAPTIVENET_BENCH_NO_CANDLE=1`);
//! PyTorch's reference figure from the issue is 28 ms. A third run at load 5-8 reproduced the
//! candle ratios (2-36x on convs) but showed ±40% between two medians of the very same
//! configuration: treat single-row thread comparisons on this box as noise-level.
//!
//! Direct inference conv ([`conv_packed`]), AVX2 vs AVX-512 kernel: `cargo bench --bench
//! packed` on an Intel Xeon with AVX-512 (2 vCPUs, shared, load 6-7), one thread, CPU-time
//! medians, both kernels interleaved in one run ([`conv_packed_on`] forces AVX2):
//!
//! | conv (batch) | AVX2 | AVX-512 | ratio |
//! |---|---|---|---|
//! | ResNet-20 3x3 16→16 @28 +res (1 / 50) | 0.068 / 3.18 ms | 0.034 / 1.80 ms | 2.01 / 1.77x |
//! | ResNet-20 3x3/2 16→32 @28 (1 / 50) | 0.042 / 1.94 ms | 0.025 / 1.20 ms | 1.71 / 1.61x |
//! | ResNet-20 3x3 32→32 @14 +res (1 / 50) | 0.073 / 3.34 ms | 0.032 / 1.63 ms | 2.29 / 2.05x |
//! | ResNet-20 3x3/2 32→64 @14 (1 / 50) | 0.051 / 2.22 ms | 0.025 / 1.20 ms | 2.06 / 1.84x |
//! | ResNet-20 3x3 64→64 @7 +res (1 / 50) | 0.087 / 3.82 ms | 0.036 / 1.78 ms | 2.40 / 2.14x |
//! | ResNet-18 3x3 64→64 @56 +res (1) | 3.74 ms | 1.58 ms | 2.36x |
//! | ResNet-18 3x3 512→512 @7 +res (1) | 4.94 ms | 2.13 ms | 2.32x |
//!
//! Whole folded models (`adaptivenet-core` bench `kernels`, 1 thread, wall medians, two runs
//! each of `ADAPTIVENET_DIRECT_ISA=avx2` and the default): ResNet-18 224 70.7-71.5 → 30.3-31.1
//! ms, ResNet-20 oracle 28x28 1.09-1.10 → 0.49-0.53 ms.
//!
//! Winograd F(2x2, 3x3) on the stride-1 3x3 convs where [`winograd_wins`] (per layer: `cargo
//! bench --bench packed -- wino`), whole folded models in the same bench and binary, two
//! rounds each of `ADAPTIVENET_WINOGRAD=0` and the default (1 thread, AVX-512, wall
//! medians): ResNet-18 224 35.5-35.6 → 31.8-32.7 ms, ResNet-20 oracle 28x28 batch 1
//! 0.61-0.62 → 0.52-0.57 ms (its 16-channel convs stay direct at batch 1). The on-device
//! search (`adaptivenet-edge` bench `search`, quick configuration: population 32, 4
//! generations, 500 images, 2x20 elastification steps, same binary, two rounds each):
//! plain EA (700 module passes, batches of 50) 23.4 / 25.4 → 19.2 / 19.4 CPU s, the default
//! with racing 8.3 / 8.9 → 5.8 / 6.8 CPU s (246-261 passes; the budget follows the measured
//! latencies, so the subnets found differ).
//!
//! MBConv inference (the AVX-512 row-block / flat / in-place stride-2 depthwise, one
//! dispatch per run of planes, and [`expand_dw_packed`] on large maps): whole folded models,
//! `adaptivenet-core` bench `kernels`, 1 thread, process CPU time medians, the binaries
//! before and after run back to back with ONNX Runtime 1.32 in each: EfficientNet-Lite0 224
//! 8.05 → 6.52 ms (ORT 5.21-5.59), 64x64 1.80 → 1.49 ms (ORT 1.31-1.44), MobileNetV2 1.0
//! 224 6.94 → 5.13 ms (ORT 4.39-4.63), MobileNetV2 0.5 96x96 0.66 → 0.38 ms (ORT
//! 0.51-0.63).
//!
//! Notes on stock candle 0.11.1 found on the way: its max-pool backward scales gradients by
//! `1/(kh*kw)` (see `tests/parity.rs`; ours is checked against finite differences), and
//! `candle_core::utils::get_num_threads` reads `/proc/cpuinfo` on each call (per op) unless
//! `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS` is set.

pub mod alloc;
mod bn;
mod bn_train;
mod conv;
mod conv_bn;
mod cpu;
mod depthwise;
mod direct;
mod dw_direct;
mod dw_lanes;
mod eltwise;
mod expand_dw;
mod gemm_path;
mod geom;
mod infer;
mod optim;
mod pointwise;
mod pool;
mod pw_train;
mod spin;
mod storage;
pub mod threads;
mod winograd;

use candle_core::{DType, Tensor};

pub use bn::fold_bn;
pub use bn_train::{batch_norm_train, batch_norm_train_act};
pub use conv_bn::conv_bn_train;
pub use cpu::{isa, Isa};
pub use eltwise::{add_relu, relu, relu6};
pub use infer::{
    conv_packed, conv_packed_on, expand_dw_fuses, expand_dw_packed, pack_conv, pack_pointwise,
    pack_winograd, pack_winograd_tile, pointwise_packed, winograd4_channels, winograd_channels,
    winograd_packed, winograd_packed_on, winograd_tile, winograd_wins,
};
pub use optim::{sgd_update, SgdParams};

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
    let op = conv::ConvOp {
        p: *p,
        act,
        train: autograd,
    };
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
