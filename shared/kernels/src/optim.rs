//! In-place SGD update (momentum, Nesterov, L2 weight decay; PyTorch semantics, dampening 0).
//!
//! Composed of candle ops, one parameter's update is eight element-wise ops, each allocating
//! a tensor, plus a copy into the variable; here it is two passes that write into the
//! momentum buffer and the parameter. The arithmetic is the composition's, operation for
//! operation in f32 (`v * mul + add` for candle's `affine`), so both give bit-identical
//! parameters and checkpoints stay interchangeable.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor};

use crate::{check_f32, KernelError};

/// The hyper-parameters of one update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdParams {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

fn slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    arg: &'static str,
) -> candle_core::Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or(KernelError::NotContiguous { op: "sgd", arg })?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => Err(KernelError::Shape(format!("sgd: {arg} is not f32")).into()),
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, arg: &'static str) -> candle_core::Result<&'a [f32]> {
    Ok(crate::storage::f32_slice(s, l, "sgd", arg)?)
}

/// `g' = g + p * wd` as candle computes `g + p.affine(wd, 0)`.
#[inline(always)]
fn decayed(g: f32, p: f32, wd: f32, decay: bool) -> f32 {
    if decay {
        g + (p * wd + 0.0)
    } else {
        g
    }
}

/// `buf <- buf * mu + g'` (sources: param, grad).
struct BufUpdate {
    mu: f32,
    wd: f32,
    decay: bool,
}

impl InplaceOp3 for BufUpdate {
    fn name(&self) -> &'static str {
        "adaptivenet-sgd-buf"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (p, g) = (slice(ps, pl, "param")?, slice(gs, gl, "grad")?);
        let buf = slice_mut(dst, dst_l, "momentum_buffer")?;
        for ((b, &p), &g) in buf.iter_mut().zip(p).zip(g) {
            *b = (*b * self.mu + 0.0) + decayed(g, p, self.wd, self.decay);
        }
        Ok(())
    }
}

/// `p <- p - d * lr` with `d` = `g' + buf * mu` (Nesterov), `buf`, or `g'` (no momentum).
struct ParamUpdate {
    sgd: SgdParams,
}

impl ParamUpdate {
    fn run(&self, p: &mut [f32], g: &[f32], buf: Option<&[f32]>) {
        let s = &self.sgd;
        let (lr, mu, wd) = (s.lr as f32, s.momentum as f32, s.weight_decay as f32);
        let decay = s.weight_decay != 0.0;
        match buf {
            Some(buf) => {
                for ((p, &g), &b) in p.iter_mut().zip(g).zip(buf) {
                    let d = if s.nesterov {
                        decayed(g, *p, wd, decay) + (b * mu + 0.0)
                    } else {
                        b
                    };
                    *p -= d * lr + 0.0;
                }
            }
            None => {
                for (p, &g) in p.iter_mut().zip(g) {
                    let d = decayed(g, *p, wd, decay);
                    *p -= d * lr + 0.0;
                }
            }
        }
    }
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adaptivenet-sgd-param"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let (g, b) = (slice(gs, gl, "grad")?, slice(bs, bl, "momentum_buffer")?);
        self.run(slice_mut(dst, dst_l, "param")?, g, Some(b));
        Ok(())
    }
}

struct ParamUpdatePlain {
    sgd: SgdParams,
}

impl InplaceOp2 for ParamUpdatePlain {
    fn name(&self) -> &'static str {
        "adaptivenet-sgd-param"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let g = slice(gs, gl, "grad")?;
        ParamUpdate { sgd: self.sgd }.run(slice_mut(dst, dst_l, "param")?, g, None);
        Ok(())
    }
}

/// One SGD step for one parameter, in place: updates `buf` (the momentum buffer, when
/// `momentum != 0` and a buffer exists) and then `param`. Without a buffer and with momentum,
/// returns the new buffer (`g + wd * p`, PyTorch's first step), else `None`.
///
/// `param`, `grad` and `buf` must be contiguous f32 tensors of one shape that do not share
/// storage; `param` must not be needed by a live autograd graph (call after `backward`).
pub fn sgd_update(
    param: &Tensor,
    grad: &Tensor,
    buf: Option<&Tensor>,
    p: &SgdParams,
) -> candle_core::Result<Option<Tensor>> {
    check_f32(param, "sgd", "param")?;
    check_f32(grad, "sgd", "grad")?;
    if param.shape() != grad.shape() {
        return Err(KernelError::Shape(format!(
            "sgd: grad shape {:?} differs from param shape {:?}",
            grad.dims(),
            param.dims()
        ))
        .into());
    }
    let grad = grad.contiguous()?;
    if p.momentum == 0.0 {
        param.inplace_op2(&grad, &ParamUpdatePlain { sgd: *p })?;
        return Ok(None);
    }
    let (new, buf) = match buf {
        Some(b) => {
            if b.shape() != param.shape() {
                return Err(
                    KernelError::Shape("sgd: momentum buffer shape mismatch".into()).into(),
                );
            }
            b.inplace_op3(
                param,
                &grad,
                &BufUpdate {
                    mu: p.momentum as f32,
                    wd: p.weight_decay as f32,
                    decay: p.weight_decay != 0.0,
                },
            )?;
            (None, b.clone())
        }
        None => {
            let g = if p.weight_decay != 0.0 {
                (&grad + param.affine(p.weight_decay, 0.0)?)?
            } else {
                grad.copy()?
            };
            (Some(g.clone()), g)
        }
    };
    param.inplace_op3(&grad, &buf, &ParamUpdate { sgd: *p })?;
    Ok(new)
}
