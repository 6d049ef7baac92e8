//! Inference-only entry points on pre-packed weights (no autograd, no candle custom op: the
//! result is a plain tensor built from the output buffer).

use std::mem::MaybeUninit;

use candle_core::{Device, Storage, Tensor};

use crate::cpu::{isa, Isa};
use crate::direct::{self, Direct};
use crate::expand_dw::{self, ExpandDw};
use crate::geom::Geom;
use crate::pointwise::{self, Kernel, Pointwise, MR};
use crate::storage::f32_slice;
use crate::winograd::{self, Winograd};
use crate::{check_f32, Activation, Conv2dParams, KernelError};

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_f32<R>(
    t: &Tensor,
    op: &'static str,
    arg: &'static str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    check_f32(t, op, arg)?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(cs) => f(f32_slice(cs, l, op, arg)?),
        _ => Err(KernelError::Shape(format!("{op}: {arg} is not on the CPU")).into()),
    }
}

fn with_opt<R>(
    t: Option<&Tensor>,
    op: &'static str,
    arg: &'static str,
    f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match t {
        Some(t) => with_f32(t, op, arg, |s| f(Some(s))),
        None => f(None),
    }
}

/// Packs a 1×1 conv weight `[O, C, 1, 1]` (or a matrix `[O, C]`) for [`pointwise_packed`]:
/// panels of 16 output channels, channel-major (`[ceil(O/16), C, 16]`, zero-padded). Done once
/// per module when it is installed, not per call. Equal to [`pack_conv`] of the 1×1 weight.
pub fn pack_pointwise(w: &Tensor) -> candle_core::Result<Tensor> {
    match *w.dims() {
        [o, c] => pack_conv(&w.reshape((o, c, 1, 1))?),
        [_, _, 1, 1] => pack_conv(w),
        ref d => Err(KernelError::Shape(format!(
            "pack_pointwise: weight shape {d:?}, expected [O, C, 1, 1]"
        ))
        .into()),
    }
}

/// Packs a conv weight `[O, C, KH, KW]` (one group) for [`conv_packed`]: panels of 16 output
/// channels, (input channel, tap)-major (`[ceil(O/16), C*KH*KW, 16]`, zero-padded), the
/// layout the micro-kernels stream. Done once per module when it is installed.
pub fn pack_conv(w: &Tensor) -> candle_core::Result<Tensor> {
    let (o, c, kh, kw) = w.dims4()?;
    let k = c * kh * kw;
    let w = w.contiguous()?;
    let packed = with_f32(&w, "pack_conv", "weight", |s| Ok(pointwise::pack(s, o, k)))?;
    Tensor::from_vec(packed, (o.div_ceil(MR), k, MR), &Device::Cpu)
}

/// Packs a 3x3 conv weight `[O, C, 3, 3]` (one group) for [`winograd_packed`]: the
/// Winograd F(2x2, 3x3) transform `U = G g G^T` of every (output, input) pair, computed in
/// f64, as one `[O x C]` matrix per transform position in panels of 16 output channels
/// (`[16, ceil(O/16), C, 16]`, zero-padded). Done once per module when it is installed.
pub fn pack_winograd(w: &Tensor) -> candle_core::Result<Tensor> {
    pack_winograd_tile(w, 2)
}

/// [`pack_winograd`] for output tiles of side `tile`: 2 (F(2x2, 3x3), 16 transform
/// positions) or 4 (F(4x4, 3x3), 36 positions, `[36, ceil(O/16), C, 16]`). The packed
/// weight's first dimension tells [`winograd_packed`] which one it runs.
pub fn pack_winograd_tile(w: &Tensor, tile: usize) -> candle_core::Result<Tensor> {
    let (o, c, kh, kw) = w.dims4()?;
    if (kh, kw) != (3, 3) || !winograd::TILES.contains(&tile) {
        return Err(KernelError::Shape(format!(
            "pack_winograd: kernel {kh}x{kw}, tile {tile}; expected 3x3 and tile 2 or 4"
        ))
        .into());
    }
    let w = w.contiguous()?;
    let packed = with_f32(&w, "pack_winograd", "weight", |s| {
        Ok(winograd::pack(s, o, c, tile))
    })?;
    Tensor::from_vec(
        packed,
        (
            winograd::positions(tile),
            o.div_ceil(winograd::PANEL),
            c,
            winograd::PANEL,
        ),
        &Device::Cpu,
    )
}

/// Whether a 3x3 conv of `c` inputs and `o` outputs can gain from Winograd on some input
/// (the channel part of [`winograd_wins`], all that is known when a module is packed).
pub fn winograd_channels(c: usize, o: usize) -> bool {
    let least = if isa() == Isa::Avx512 { 16 } else { 32 };
    c.min(o) >= least
}

/// Whether a 3x3 conv of `c` inputs and `o` outputs can run F(4x4, 3x3) on some input
/// ([`winograd_tile`]; at pack time the map is not known): AVX-512 only (the other levels
/// run its transforms unvectorised), 16 to 256 channels (a 512x512 F(4x4) weight is 38 MB,
/// and it loses at 7x7 anyway).
pub fn winograd4_channels(c: usize, o: usize) -> bool {
    isa() == Isa::Avx512 && c.min(o) >= 16 && c.max(o) <= 256
}

/// Env `ADAPTIVENET_WINOGRAD` (read once): `0` no Winograd, `2` F(2x2, 3x3) only (the
/// routing before F(4x4)), anything else both; for whole-model A/B runs of one binary.
fn winograd_env() -> Option<&'static str> {
    static MODE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    MODE.get_or_init(|| std::env::var("ADAPTIVENET_WINOGRAD").ok())
        .as_deref()
}

/// Whether [`winograd_packed`] (F(2x2, 3x3)) beats [`conv_packed`]'s direct conv on a
/// stride-1 3x3 conv of `c` inputs and `o` outputs on `n` images of `h x w` (padded by 1).
/// Measured with `cargo bench --bench packed -- wino` (one thread, thread CPU time,
/// direct / Winograd, C = O, both on the same instruction set):
///
/// * AVX-512: 32 to 256 channels win on every map from 4x4 up (32@14 1.11 at batch 1,
///   1.34 at 50; 32@7 1.35; 64@7 1.39 / 1.63; 64@4 3.09; 128@28 1.38; 256@14 1.23); 512
///   at 7x7 loses at batch 1 (0.90: its 16 MB transformed weight streams from memory for 16
///   tiles). 16 channels win on batches (16@28 1.12-1.15 and 16@7 1.13 at 50; 16@28 1.11
///   and 16@14 1.22 at 16) but not on one image (0.88 at 28x28, 0.86 at 14x14); 8 lose
///   (0.77-0.88).
/// * AVX2 + FMA (against the banded im2col conv of AVX2-only CPUs, Zen 3): 64 channels and
///   more win from 4x4 up (64@7 1.03-1.10, 64@4 1.37, ResNet-18 1.31-1.47); 32 tie or lose
///   (32@14 0.89-1.00), 16 and 8 lose (0.61-0.92).
///
/// Env `ADAPTIVENET_WINOGRAD=0` makes it always false. [`winograd_tile`] is the routing.
pub fn winograd_wins(n: usize, c: usize, o: usize, h: usize, w: usize) -> bool {
    let (m, ch) = (h.min(w), c.min(o));
    if winograd_env() == Some("0") || !winograd_channels(c, o) || m < 4 {
        return false;
    }
    match isa() {
        Isa::Avx512 => (ch >= 32 || n >= 16) && (ch < 512 || m >= 14),
        _ => ch >= 64,
    }
}

/// The Winograd form a stride-1 3x3 conv (pad 1) runs: `Some(4)` F(4x4, 3x3)
/// ([`pack_winograd_tile`] with tile 4), `Some(2)` F(2x2, 3x3) ([`winograd_wins`]), `None`
/// the direct conv. F(4x4) multiplies 2.25 times per output against F(2x2)'s 4, but its
/// 4x4 tiles fill the 16 lanes of a vector only from 16 tiles per call (n * ceil(H/4) *
/// ceil(W/4)). Measured on AVX-512 (`cargo bench --bench packed -- wino`, one thread, thread
/// CPU time, F(2x2) / F(4x4)): batch 1 16@28 1.54-1.58 (and 1.24 over the direct conv
/// F(2x2) lost to), 32@14 1.39, 16@14 1.45, but 64@7 (4 tiles) 0.36; batch 50 32@14
/// 1.22-1.53, 16@28 1.06-1.09, 16@7 1.67, 32@7 1.21, 64@7 0.93-1.12, 128@7 1.26; ResNet-18
/// batch 1 64@56 1.07, 128@28 1.19, 256@14 1.20. `ADAPTIVENET_WINOGRAD=2` keeps F(2x2) only.
pub fn winograd_tile(n: usize, c: usize, o: usize, h: usize, w: usize) -> Option<usize> {
    let tiles = n * h.div_ceil(4) * w.div_ceil(4);
    let env = winograd_env();
    if env == Some("0") {
        return None;
    }
    if env != Some("2") && winograd4_channels(c, o) && h.min(w) >= 4 && tiles >= 16 {
        return Some(4);
    }
    winograd_wins(n, c, o, h, w).then_some(2)
}

/// Checks the bias and residual against the geometry.
fn check_epilogue(
    op: &'static str,
    g: &Geom,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> candle_core::Result<()> {
    let o = g.o;
    if let Some(b) = bias {
        if b.dims() != [o] {
            return Err(KernelError::Shape(format!(
                "{op}: bias shape {:?}, expected [{o}]",
                b.dims()
            ))
            .into());
        }
    }
    if let Some(r) = residual {
        let (n, o, oh, ow) = g.out_dims();
        if r.dims() != [n, o, oh, ow] {
            return Err(KernelError::Shape(format!(
                "{op}: residual shape {:?}, expected [{n}, {o}, {oh}, {ow}]",
                r.dims()
            ))
            .into());
        }
    }
    Ok(())
}

/// Checks the packed weight, bias and residual against the geometry.
fn check_packed(
    op: &'static str,
    g: &Geom,
    packed: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> candle_core::Result<()> {
    let (o, k) = (g.o, g.k());
    if packed.dims() != [o.div_ceil(MR), k, MR] {
        return Err(KernelError::Shape(format!(
            "{op}: packed weight shape {:?} does not fit {o} outputs x {k} inputs",
            packed.dims()
        ))
        .into());
    }
    check_epilogue(op, g, bias, residual)
}

/// Runs `f(x, packed, bias, residual, out)` on the f32 data of the operands into a new
/// `[N, O, OH, OW]` tensor; `f` must write every element of `out`.
fn run_packed(
    op: &'static str,
    g: &Geom,
    x: &Tensor,
    packed: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    f: impl FnOnce(&[f32], &[f32], Option<&[f32]>, Option<&[f32]>, &mut [MaybeUninit<f32>]),
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let len = g.n * g.out_img();
    let out = with_f32(&x, op, "x", |xs| {
        with_f32(packed, op, "packed weight", |ws| {
            with_opt(bias, op, "bias", |bs| {
                with_opt(residual.as_ref(), op, "residual", |rs| {
                    // No zero-fill: the kernel stores every element exactly once.
                    let mut out = Vec::with_capacity(len);
                    f(xs, ws, bs, rs, &mut out.spare_capacity_mut()[..len]);
                    // SAFETY: `f` initialised all `len` elements (its contract).
                    unsafe { out.set_len(len) };
                    Ok(out)
                })
            })
        })
    })?;
    Tensor::from_vec(out, g.out_dims(), &Device::Cpu)
}

/// Inference conv (one group, no dilation; any kernel, stride and per-side padding) on a
/// [`pack_conv`]ed weight: `act(conv(x) + bias + residual)`, `x [N, C, H, W]`, `residual`
/// shaped like the output, all fused in the micro-kernel's epilogue. A 1×1 stride-1
/// unpadded conv runs the pointwise GEMM ([`pointwise_packed`]), anything else the direct
/// conv (the input copied once into zero-padded stride phases, no im2col). `out_channels`
/// and `kernel` (KH, KW) are those of the unpacked weight.
#[allow(clippy::too_many_arguments)]
pub fn conv_packed(
    x: &Tensor,
    packed: &Tensor,
    out_channels: usize,
    kernel: (usize, usize),
    bias: Option<&Tensor>,
    p: &Conv2dParams,
    act: Activation,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    conv_packed_at(
        None,
        x,
        packed,
        out_channels,
        kernel,
        bias,
        p,
        act,
        residual,
    )
}

/// [`conv_packed`] on the kernels of instruction set `level` instead of the widest this CPU
/// runs, so tests and benches can compare the paths in one process. Errors when the CPU
/// lacks `level` (see [`isa`](crate::isa)).
#[allow(clippy::too_many_arguments)]
pub fn conv_packed_on(
    level: Isa,
    x: &Tensor,
    packed: &Tensor,
    out_channels: usize,
    kernel: (usize, usize),
    bias: Option<&Tensor>,
    p: &Conv2dParams,
    act: Activation,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if level > isa() {
        return Err(KernelError::Shape(format!(
            "conv_packed_on: this CPU lacks {level:?} (it runs {:?})",
            isa()
        ))
        .into());
    }
    conv_packed_at(
        Some(level),
        x,
        packed,
        out_channels,
        kernel,
        bias,
        p,
        act,
        residual,
    )
}

/// [`conv_packed`] at `level` (`None`: each kernel's default).
#[allow(clippy::too_many_arguments)]
fn conv_packed_at(
    level: Option<Isa>,
    x: &Tensor,
    packed: &Tensor,
    out_channels: usize,
    kernel: (usize, usize),
    bias: Option<&Tensor>,
    p: &Conv2dParams,
    act: Activation,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    const OP: &str = "conv_packed";
    if p.groups != 1 || p.dilation != (1, 1) {
        return Err(KernelError::Shape(format!(
            "{OP}: groups {} / dilation {:?}: only one group without dilation",
            p.groups, p.dilation
        ))
        .into());
    }
    let (n, c, h, w) = x.dims4()?;
    let g = Geom::new((n, c, h, w), (out_channels, c, kernel.0, kernel.1), p)?;
    check_packed(OP, &g, packed, bias, residual)?;
    run_packed(OP, &g, x, packed, bias, residual, |xs, ws, bs, rs, out| {
        if g.identity_1x1 {
            let op = Pointwise {
                x: xs,
                w: ws,
                bias: bs,
                residual: rs,
                act,
            };
            match level {
                Some(l) => pointwise::forward_with(&op, &g, out, Kernel::for_level(l, g.p(), g.c)),
                None => pointwise::forward(&op, &g, out),
            }
        } else {
            let op = Direct {
                x: xs,
                w: ws,
                bias: bs,
                residual: rs,
                act,
            };
            match level {
                Some(l) => direct::forward_with(&op, &g, out, l),
                None => direct::forward(&op, &g, out),
            }
        }
    })
}

/// Inference 1×1 conv (stride 1, no padding, one group) on a [`pack_pointwise`]ed weight:
/// `act(conv(x) + bias + residual)`, `x [N, C, H, W]`, `residual [N, O, H, W]`, all fused in
/// the GEMM's epilogue. `out_channels` is `O` of the packed weight.
pub fn pointwise_packed(
    x: &Tensor,
    packed: &Tensor,
    out_channels: usize,
    bias: Option<&Tensor>,
    act: Activation,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    const OP: &str = "pointwise_packed";
    let (n, c, h, w) = x.dims4()?;
    let g = Geom::new(
        (n, c, h, w),
        (out_channels, c, 1, 1),
        &Conv2dParams::default(),
    )?;
    check_packed(OP, &g, packed, bias, residual)?;
    run_packed(OP, &g, x, packed, bias, residual, |xs, ws, bs, rs, out| {
        let op = Pointwise {
            x: xs,
            w: ws,
            bias: bs,
            residual: rs,
            act,
        };
        pointwise::forward(&op, &g, out);
    })
}

/// Inference 3x3 stride-1 conv (one group, no dilation, any per-side padding) on a
/// [`pack_winograd`]ed weight, by Winograd F(2x2, 3x3): `act(conv(x) + bias + residual)`,
/// `x [N, C, H, W]`, `residual` shaped like the output, fused into the output transform.
/// Within about 1e-5 relative to the output's magnitude of [`conv_packed`] (the transforms
/// round differently). `out_channels` is `O` of the unpacked weight.
pub fn winograd_packed(
    x: &Tensor,
    packed: &Tensor,
    out_channels: usize,
    bias: Option<&Tensor>,
    p: &Conv2dParams,
    act: Activation,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    winograd_packed_on(isa(), x, packed, out_channels, bias, p, act, residual)
}

/// [`winograd_packed`] on the kernels of instruction set `level` instead of the widest this
/// CPU runs (tests and benches compare the paths in one process). Errors when the CPU lacks
/// `level`.
#[allow(clippy::too_many_arguments)]
pub fn winograd_packed_on(
    level: Isa,
    x: &Tensor,
    packed: &Tensor,
    out_channels: usize,
    bias: Option<&Tensor>,
    p: &Conv2dParams,
    act: Activation,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    const OP: &str = "winograd_packed";
    if level > isa() {
        return Err(KernelError::Shape(format!(
            "{OP}: this CPU lacks {level:?} (it runs {:?})",
            isa()
        ))
        .into());
    }
    let (n, c, h, w) = x.dims4()?;
    let g = Geom::new((n, c, h, w), (out_channels, c, 3, 3), p)?;
    if !winograd::supports(&g) {
        return Err(KernelError::Shape(format!(
            "{OP}: stride {:?} / groups {} / dilation {:?}: only stride 1, one group, no dilation",
            p.stride, p.groups, p.dilation
        ))
        .into());
    }
    let (o, pw) = (out_channels, winograd::PANEL);
    let m = winograd::TILES
        .into_iter()
        .find(|&m| packed.dim(0).ok() == Some(winograd::positions(m)));
    if m.is_none() || packed.dims().get(1..) != Some(&[o.div_ceil(pw), c, pw][..]) {
        return Err(KernelError::Shape(format!(
            "{OP}: packed weight shape {:?} does not fit {o} outputs x {c} inputs",
            packed.dims()
        ))
        .into());
    }
    check_epilogue(OP, &g, bias, residual)?;
    run_packed(OP, &g, x, packed, bias, residual, |xs, us, bs, rs, out| {
        let op = Winograd {
            x: xs,
            u: us,
            m: m.unwrap_or(2),
            bias: bs,
            residual: rs,
            act,
        };
        winograd::forward_with(&op, &g, out, level);
    })
}

/// Whether [`expand_dw_packed`] beats the expand conv ([`pointwise_packed`]) followed by the
/// depthwise ([`conv2d_fused`](crate::conv2d_fused)) for an expanded map of `hidden`
/// channels of `h x w` with a `k x k` depthwise at `stride`: where the register-blocked
/// depthwise runs and the expanded map is larger than L2 holds comfortably (1 MiB),
/// measured per block on EfficientNet-Lite0 and MobileNetV2 (see the crate docs).
pub fn expand_dw_fuses(hidden: usize, h: usize, w: usize, k: usize, stride: usize) -> bool {
    let shape_ok = matches!(k, 3 | 5) && matches!(stride, 1 | 2);
    shape_ok && crate::cpu::has_avx2_fma() && hidden * h * w >= expand_dw_min()
}

/// The smallest expanded map (elements) [`expand_dw_fuses`] fuses; env
/// `ADAPTIVENET_EXPAND_DW_MIN` (read once) overrides it for whole-model A/B runs (`0`: every
/// map, a huge value: none).
fn expand_dw_min() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("ADAPTIVENET_EXPAND_DW_MIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 18)
    })
}

/// Inference MBConv expand + depthwise, fused: `act(dw(act(conv1x1(x) + eb)) + db)` with
/// `x [N, C, H, W]`, the expand weight [`pack_pointwise`]ed (`hidden` outputs), the
/// depthwise weight `[hidden, 1, K, K]` (K = 3 or 5, stride 1 or 2, `dw` its parameters
/// with `groups == hidden`). The hidden map is computed 16 channels at a time and consumed
/// by the depthwise while in cache; it is never stored whole. Same numerics as the two ops
/// in sequence (the same kernels).
#[allow(clippy::too_many_arguments)]
pub fn expand_dw_packed(
    x: &Tensor,
    expand_packed: &Tensor,
    hidden: usize,
    expand_bias: Option<&Tensor>,
    dw_weight: &Tensor,
    dw_bias: Option<&Tensor>,
    dw: &Conv2dParams,
    act: Activation,
) -> candle_core::Result<Tensor> {
    const OP: &str = "expand_dw_packed";
    let (n, c, h, w) = x.dims4()?;
    let ge = Geom::new((n, c, h, w), (hidden, c, 1, 1), &Conv2dParams::default())?;
    check_packed(OP, &ge, expand_packed, expand_bias, None)?;
    let (wo, wc, kh, kw) = dw_weight.dims4()?;
    let gd = Geom::new((n, hidden, h, w), (wo, wc, kh, kw), dw)?;
    if !(gd.is_depthwise() && wo == hidden && expand_dw::supported(&gd)) {
        return Err(KernelError::Shape(format!(
            "{OP}: depthwise weight {:?} / {dw:?} on {hidden} channels: only depthwise 3x3 / \
             5x5 at stride 1 / 2 without dilation, on an AVX2 + FMA CPU",
            dw_weight.dims()
        ))
        .into());
    }
    check_epilogue(OP, &gd, dw_bias, None)?;
    let x = x.contiguous()?;
    let dw_weight = dw_weight.contiguous()?;
    let len = gd.n * gd.out_img();
    let out = with_f32(&x, OP, "x", |xs| {
        with_f32(expand_packed, OP, "packed weight", |ws| {
            with_opt(expand_bias, OP, "expand bias", |ebs| {
                with_f32(&dw_weight, OP, "depthwise weight", |dws| {
                    with_opt(dw_bias, OP, "depthwise bias", |dbs| {
                        let op = ExpandDw {
                            expand: Pointwise {
                                x: xs,
                                w: ws,
                                bias: ebs,
                                residual: None,
                                act,
                            },
                            dw_w: dws,
                            dw_b: dbs,
                            dw_act: act,
                        };
                        // No zero-fill: the kernel stores every element exactly once.
                        let mut out = Vec::with_capacity(len);
                        expand_dw::forward(&op, &ge, &gd, &mut out.spare_capacity_mut()[..len]);
                        // SAFETY: `forward` initialised all `len` elements.
                        unsafe { out.set_len(len) };
                        Ok(out)
                    })
                })
            })
        })
    })?;
    Tensor::from_vec(out, gd.out_dims(), &Device::Cpu)
}
