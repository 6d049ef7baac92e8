//! Inference-only entry points on pre-packed weights (no autograd, no candle custom op: the
//! result is a plain tensor built from the output buffer).

use candle_core::{Device, Storage, Tensor};

use crate::geom::Geom;
use crate::pointwise::{self, Pointwise, MR};
use crate::storage::f32_slice;
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
/// panels of 6 output channels, channel-major (`[ceil(O/6), C, 6]`, zero-padded). Done once
/// per module when it is installed, not per call.
pub fn pack_pointwise(w: &Tensor) -> candle_core::Result<Tensor> {
    let (o, c) = match *w.dims() {
        [o, c] | [o, c, 1, 1] => (o, c),
        ref d => {
            return Err(KernelError::Shape(format!(
                "pack_pointwise: weight shape {d:?}, expected [O, C, 1, 1]"
            ))
            .into())
        }
    };
    let w = w.contiguous()?;
    let packed = with_f32(&w, "pack_pointwise", "weight", |s| {
        Ok(pointwise::pack(s, o, c))
    })?;
    Tensor::from_vec(packed, (o.div_ceil(MR), c, MR), &Device::Cpu)
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
    let o = out_channels;
    if packed.dims() != [o.div_ceil(MR), c, MR] {
        return Err(KernelError::Shape(format!(
            "{OP}: packed weight shape {:?} does not fit {o} outputs x {c} inputs",
            packed.dims()
        ))
        .into());
    }
    if let Some(b) = bias {
        if b.dims() != [o] {
            return Err(KernelError::Shape(format!(
                "{OP}: bias shape {:?}, expected [{o}]",
                b.dims()
            ))
            .into());
        }
    }
    if let Some(r) = residual {
        if r.dims() != [n, o, h, w] {
            return Err(KernelError::Shape(format!(
                "{OP}: residual shape {:?}, expected [{n}, {o}, {h}, {w}]",
                r.dims()
            ))
            .into());
        }
    }
    let g = Geom::new((n, c, h, w), (o, c, 1, 1), &Conv2dParams::default())?;
    let x = x.contiguous()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let out = with_f32(&x, OP, "x", |xs| {
        with_f32(packed, OP, "packed weight", |ws| {
            with_opt(bias, OP, "bias", |bs| {
                with_opt(residual.as_ref(), OP, "residual", |rs| {
                    let mut out = vec![0f32; n * o * h * w];
                    let op = Pointwise {
                        x: xs,
                        w: ws,
                        bias: bs,
                        residual: rs,
                        act,
                    };
                    pointwise::forward(&op, &g, &mut out);
                    Ok(out)
                })
            })
        })
    })?;
    Tensor::from_vec(out, (n, o, h, w), &Device::Cpu)
}
