//! Conv + train-mode BN (+ activation) as one differentiable op: the conv's output `z`
//! stays inside the op instead of being a tensor of the autograd graph.
//!
//! candle's backward adds every gradient an op returns into a fresh zero tensor of the
//! argument's size (`zeros_like` + `add`: a fill and a three-stream pass); with conv and BN
//! as two ops, the conv output's gradient paid that on every conv of a training step. Here
//! the BN backward's `dz` goes straight into the conv's two backward kernels. The kernels are
//! the ones the separate ops run ([`crate::conv`], [`crate::bn_train`]), on the same values
//! in the same order: outputs and gradients are those of `conv2d` then
//! `batch_norm_train_act` (bit for bit, up to the sign of exact-zero gradients: candle's
//! `0.0 + -0.0` is `+0.0`).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::bn_train::{affine, apply, invstd, stats, BnBwd};
use crate::geom::Geom;
use crate::storage::{dims4, f32_slice};
use crate::{check_f32, conv, Activation, Conv2dParams, KernelError};

/// What the forward keeps for the backward (and the batch statistics for the caller).
struct Saved {
    z: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    invstd: Vec<f32>,
}

/// `(x, w, [gamma; beta]) -> act(bn(conv(x, w)))` with batch statistics.
struct ConvBnOp {
    p: Conv2dParams,
    eps: f64,
    act: Activation,
    saved: Arc<Mutex<Option<Arc<Saved>>>>,
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_f32<R>(
    t: &Tensor,
    arg: &'static str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(cs) => f(f32_slice(cs, l, "conv_bn_train", arg)?),
        _ => Err(KernelError::Shape(format!("conv_bn_train: {arg} is not on the CPU")).into()),
    }
}

impl ConvBnOp {
    fn geom(&self, x: &Layout, w: &Layout) -> candle_core::Result<Geom> {
        Ok(Geom::new(
            dims4(x, "conv_bn_train")?,
            dims4(w, "conv_bn_train weight")?,
            &self.p,
        )?)
    }

    fn saved(&self) -> candle_core::Result<Arc<Saved>> {
        self.saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("conv_bn_train: backward before forward".into()))
    }
}

impl CustomOp3 for ConvBnOp {
    fn name(&self) -> &'static str {
        "adaptivenet-conv-bn-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = f32_slice(s1, l1, "conv_bn_train", "x")?;
        let ws = f32_slice(s2, l2, "conv_bn_train", "weight")?;
        let gb = f32_slice(s3, l3, "conv_bn_train", "gamma and beta")?;
        let g = self.geom(l1, l2)?;
        if gb.len() != 2 * g.o {
            return Err(KernelError::Shape(format!(
                "conv_bn_train: gamma and beta have {} values, expected 2 x {}",
                gb.len(),
                g.o
            ))
            .into());
        }
        let (p, o) = (g.p(), g.o);
        if g.n * p == 0 {
            return Err(KernelError::Shape("conv_bn_train: no values per channel".into()).into());
        }
        let z = conv::forward(xs, ws, None, &g, Activation::None, true);
        let (mean, var) = stats(&z, (g.n, o, p));
        let invstd = invstd(&var, self.eps);
        let ab = affine(&gb[..o], &gb[o..], &mean, &invstd);
        let y = apply(&z, (o, p), &ab, self.act);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Saved {
            z,
            mean,
            var,
            invstd,
        }));
        Ok((CpuStorage::F32(y), Shape::from(g.out_dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.saved()?;
        let grad = grad.contiguous()?;
        let g = self.geom(x.layout(), w.layout())?;
        let (o, dims) = (g.o, (g.n, g.o, g.p()));
        let gbv = gb.flatten_all()?.to_vec1::<f32>()?;
        let (gamma, beta) = gbv.split_at(o);
        let ab = match self.act {
            Activation::None => Vec::new(),
            _ => affine(gamma, beta, &s.mean, &s.invstd),
        };
        let bn = BnBwd {
            mean: &s.mean,
            invstd: &s.invstd,
            act: self.act,
            ab: &ab,
        };
        let (dz, sums) = with_f32(&grad, "grad", |dy| {
            let (sdy, sdyx) = bn.sums(&s.z, dy, dims);
            let dz =
                (x.track_op() || w.track_op()).then(|| bn.dx(&s.z, dy, dims, gamma, (&sdy, &sdyx)));
            Ok((dz, (sdy, sdyx)))
        })?;
        let dev = x.device();
        let gx = match (&dz, x.track_op()) {
            (Some(dz), true) => {
                let gx = with_f32(w, "weight", |ws| conv::backward_data(dz, ws, &g))?;
                Some(Tensor::from_vec(gx, x.shape(), dev)?)
            }
            _ => None,
        };
        let gw = match (&dz, w.track_op()) {
            (Some(dz), true) => {
                let gw = with_f32(x, "x", |xs| Ok(conv::backward_filter(xs, dz, &g)))?;
                Some(Tensor::from_vec(gw, w.shape(), dev)?)
            }
            _ => None,
        };
        let dgb = if gb.track_op() {
            // d gamma = sum(dz * xhat), d beta = sum(dz), as the BN op's.
            let (sdy, sdyx) = sums;
            let v: Vec<f32> = sdyx.into_iter().chain(sdy).collect();
            Some(Tensor::from_vec(v, gb.shape(), dev)?)
        } else {
            None
        };
        Ok((gx, gw, dgb))
    }
}

/// Conv (no bias) then train-mode BatchNorm with batch statistics then `act`, in one op:
/// `x [N, C, H, W]`, `w [O, C/groups, KH, KW]`, `gamma`, `beta [O]` (f32, CPU).
/// Differentiable w.r.t. `x`, `w`, `gamma` and `beta`; returns `(y, batch_mean [O],
/// batch_var [O])`, the variance biased, the statistics without gradient. Same values and
/// gradients as [`crate::conv2d`] then [`crate::batch_norm_train_act`] (see the module docs),
/// with one activation-sized tensor less in the autograd graph.
pub fn conv_bn_train(
    x: &Tensor,
    w: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    p: &Conv2dParams,
    eps: f64,
    act: Activation,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    for (t, arg) in [(x, "x"), (w, "weight"), (gamma, "gamma"), (beta, "beta")] {
        check_f32(t, "conv_bn_train", arg)?;
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(KernelError::Shape(format!("conv_bn_train: eps {eps} must be >= 0")).into());
    }
    let o = w.dim(0)?;
    if gamma.dims() != [o] || beta.dims() != [o] {
        return Err(KernelError::Shape(format!(
            "conv_bn_train: gamma {:?} and beta {:?}, expected [{o}]",
            gamma.dims(),
            beta.dims()
        ))
        .into());
    }
    let gb = Tensor::stack(&[gamma, beta], 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnOp {
        p: *p,
        eps,
        act,
        saved: saved.clone(),
    };
    let y = x.contiguous()?.apply_op3(&w.contiguous()?, &gb, op)?;
    let s = saved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("conv_bn_train: forward did not run".into()))?;
    let dev = x.device();
    Ok((
        y,
        Tensor::from_slice(&s.mean, o, dev)?,
        Tensor::from_slice(&s.var, o, dev)?,
    ))
}
