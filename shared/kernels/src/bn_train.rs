//! Train-mode BatchNorm as one custom op with its own backward.
//!
//! Composed of candle ops (transpose, mean, sub, sqr, mean, mul, add, ...), train-mode BN is
//! about a dozen autograd nodes per layer, each backward step allocating a zero tensor and an
//! accumulator of the activation's size; here it is three passes forward (mean, variance,
//! output) and two backward (the two per-channel sums, then the input gradient), with the
//! standard closed form
//! `dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`,
//! `dgamma = sum(dy * xhat)`, `dbeta = sum(dy)` over `N, H, W`.
//! Sums accumulate per plane in f32 lanes and across planes in f64.
//!
//! [`batch_norm_train_act`] also applies the activation that follows BN in every conv block
//! (ReLU, ReLU6) in the same op: the forward writes only `act(bn(x))`, and the backward
//! recomputes the pre-activation `z = x * a + b` (the forward's arithmetic, so the same bits)
//! for the activation's gradient mask instead of reading a stored `z`. The BN output and its
//! gradient, each a full activation-sized tensor with candle's zero-fill and add of the
//! gradient, are gone; values and gradients are bit-identical to BN followed by [`relu`] /
//! [`relu6`] (the masks are theirs, sums are over the same values in the same order).
//!
//! [`relu`]: crate::relu
//! [`relu6`]: crate::relu6

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::eltwise::{relu6_grad, relu_grad};
use crate::pool::sum8;
use crate::storage::{dims4, f32_slice, filled};
use crate::{check_f32, threads, Activation, KernelError};

/// `sum((a - m) * b)` in f32 lanes.
#[inline(always)]
fn sum_centered_mul(a: &[f32], m: f32, b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let mut r = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        r += (x - m) * y;
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += (x[l] - m) * y[l];
        }
    }
    acc.iter().sum::<f32>() + r
}

#[inline(always)]
fn sum_sq_centered(a: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let mut r = 0f32;
    for x in ca.remainder() {
        r += (x - m) * (x - m);
    }
    for x in ca {
        for l in 0..8 {
            let d = x[l] - m;
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f32>() + r
}

fn threads_for(elems: usize) -> usize {
    // ~4 memory-bound FLOP per element and pass: stay on one thread for small maps.
    threads::for_flops(4 * elems as u64)
}

/// `x [N, C, H, W] -> [2, C]`: batch mean and biased variance per channel (two passes).
struct BnStats;

impl CustomOp1 for BnStats {
    fn name(&self) -> &'static str {
        "adaptivenet-bn-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "batch_norm_train", "x")?;
        let (n, c, h, w) = dims4(l, "batch_norm_train")?;
        let hw = h * w;
        let count = n * hw;
        if count == 0 {
            return Err(
                KernelError::Shape("batch_norm_train: no values per channel".into()).into(),
            );
        }
        let (mut out, var) = stats(x, (n, c, hw));
        out.extend(var);
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// Batch mean and biased variance per channel of `x [N, C, HW]` (`N * HW > 0`).
pub(crate) fn stats(x: &[f32], (n, c, hw): (usize, usize, usize)) -> (Vec<f32>, Vec<f32>) {
    let count = n * hw;
    let parts = threads::map_ranges(c, threads_for(x.len()), |r| {
        r.map(|ci| {
            let planes = (0..n).map(|ni| &x[(ni * c + ci) * hw..][..hw]);
            let mean = planes.clone().map(|p| sum8(p) as f64).sum::<f64>() / count as f64;
            let m = mean as f32;
            let var = planes.map(|p| sum_sq_centered(p, m) as f64).sum::<f64>() / count as f64;
            (m, var as f32)
        })
        .collect::<Vec<_>>()
    });
    parts.into_iter().flatten().unzip()
}

/// `1 / sqrt(var + eps)` per channel (computed in f64).
pub(crate) fn invstd(var: &[f32], eps: f64) -> Vec<f32> {
    var.iter()
        .map(|v| (1.0 / (*v as f64 + eps).sqrt()) as f32)
        .collect()
}

/// `(x, gamma, beta) -> act(gamma * (x - mean) * invstd + beta)`, the statistics fixed.
struct BnApply {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    act: Activation,
}

/// Per-channel `(a, b)` with `bn(x) = x * a + b`: one multiply and one add per element, the
/// same in the forward and in the backward's recomputation.
pub(crate) fn affine(gamma: &[f32], beta: &[f32], mean: &[f32], invstd: &[f32]) -> Vec<(f32, f32)> {
    (0..gamma.len())
        .map(|c| {
            let a = gamma[c] * invstd[c];
            (a, beta[c] - mean[c] * a)
        })
        .collect()
}

#[inline(always)]
fn activate(z: f32, act: Activation) -> f32 {
    match act {
        Activation::None => z,
        Activation::Relu => z.max(0.0),
        Activation::Relu6 => z.clamp(0.0, 6.0),
    }
}

/// The gradient at the pre-activation `z` of an upstream gradient `g` (the masks of
/// [`crate::relu`] and [`crate::relu6`]).
#[inline(always)]
fn act_grad(z: f32, g: f32, act: Activation) -> f32 {
    match act {
        Activation::None => g,
        Activation::Relu => relu_grad(z, g),
        Activation::Relu6 => relu6_grad(z, g),
    }
}

/// `act(x * a + b)` with the per-channel `(a, b)` of [`affine`], `x [N, C, HW]`.
pub(crate) fn apply(
    x: &[f32],
    (c, hw): (usize, usize),
    ab: &[(f32, f32)],
    act: Activation,
) -> Vec<f32> {
    // SAFETY: the items cover `y`, each loop writes its whole item (`x` is as long).
    unsafe {
        filled(x.len(), |y| {
            threads::for_each_item(y, hw, threads_for(x.len()), |pi, yp| {
                let (a, b) = ab[pi % c];
                for (o, v) in yp.iter_mut().zip(&x[pi * hw..][..hw]) {
                    o.write(activate(v * a + b, act));
                }
            })
        })
    }
}

fn vec_arg<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    c: usize,
    arg: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let v = f32_slice(s, l, "batch_norm_train", arg)?;
    if v.len() != c || l.shape().rank() != 1 {
        return Err(KernelError::Shape(format!(
            "batch_norm_train: {arg} shape {:?}, expected [{c}]",
            l.shape().dims()
        ))
        .into());
    }
    Ok(v)
}

impl CustomOp3 for BnApply {
    fn name(&self) -> &'static str {
        "adaptivenet-bn-train"
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
        let x = f32_slice(s1, l1, "batch_norm_train", "x")?;
        let (_, c, h, w) = dims4(l1, "batch_norm_train")?;
        let gamma = vec_arg(s2, l2, c, "gamma")?;
        let beta = vec_arg(s3, l3, c, "beta")?;
        let ab = affine(gamma, beta, &self.mean, &self.invstd);
        let y = apply(x, (c, h * w), &ab, self.act);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gv = gamma.to_vec1::<f32>()?;
        let ab = match self.act {
            Activation::None => Vec::new(),
            _ => affine(&gv, &beta.to_vec1::<f32>()?, &self.mean, &self.invstd),
        };
        let sums = x.apply_op2_no_bwd(
            &grad,
            &BnBwdSums {
                mean: self.mean.clone(),
                invstd: self.invstd.clone(),
                act: self.act,
                ab: ab.clone(),
            },
        )?;
        let gx = if x.track_op() {
            let s = sums.to_vec2::<f32>()?;
            Some(x.apply_op2_no_bwd(
                &grad,
                &BnBwdData {
                    mean: self.mean.clone(),
                    invstd: self.invstd.clone(),
                    gamma: gv,
                    sum_dy: s[0].clone(),
                    sum_dy_xhat: s[1].clone(),
                    act: self.act,
                    ab,
                },
            )?)
        } else {
            None
        };
        let gg = gamma.track_op().then(|| sums.get(1)).transpose()?;
        let gb = beta.track_op().then(|| sums.get(0)).transpose()?;
        Ok((gx, gg, gb))
    }
}

/// `(x, dy) -> [2, C]`: `sum(dz)` and `sum(dz * xhat)` per channel, `dz` the gradient at
/// the pre-activation (`dy` itself without an activation).
struct BnBwdSums {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    act: Activation,
    /// Per-channel `(a, b)` of the pre-activation (empty without an activation).
    ab: Vec<(f32, f32)>,
}

/// `dz` of one plane into `out` (the activation's mask at `z = x * a + b`).
#[inline(always)]
fn plane_dz(x: &[f32], dy: &[f32], (a, b): (f32, f32), act: Activation, out: &mut [f32]) {
    for ((o, xv), g) in out.iter_mut().zip(x).zip(dy) {
        *o = act_grad(xv * a + b, *g, act);
    }
}

impl CustomOp2 for BnBwdSums {
    fn name(&self) -> &'static str {
        "adaptivenet-bn-train-bwd-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "batch_norm_train backward", "x")?;
        let dy = f32_slice(s2, l2, "batch_norm_train backward", "grad")?;
        let (n, c, h, w) = dims4(l1, "batch_norm_train backward")?;
        if l2.shape() != l1.shape() {
            return Err(KernelError::Shape(
                "batch_norm_train backward: grad shape mismatch".into(),
            )
            .into());
        }
        let bn = BnBwd {
            mean: &self.mean,
            invstd: &self.invstd,
            act: self.act,
            ab: &self.ab,
        };
        let (mut out, sdyx) = bn.sums(x, dy, (n, c, h * w));
        out.extend(sdyx);
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// The saved state of a train-mode BN (+ activation) that its backward needs.
pub(crate) struct BnBwd<'a> {
    pub mean: &'a [f32],
    pub invstd: &'a [f32],
    pub act: Activation,
    /// Per-channel `(a, b)` of the pre-activation (empty without an activation).
    pub ab: &'a [(f32, f32)],
}

impl BnBwd<'_> {
    /// `(sum(dz), sum(dz * xhat))` per channel of `x, dy [N, C, HW]`, `dz` the gradient at
    /// the pre-activation (`dy` itself without an activation).
    pub(crate) fn sums(
        &self,
        x: &[f32],
        dy: &[f32],
        (n, c, hw): (usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>) {
        let parts = threads::map_ranges(c, threads_for(2 * x.len()), |r| {
            // The plane's `dz` (with an activation), summed exactly as `dy` is without one.
            let mut dz = vec![0f32; if self.act == Activation::None { 0 } else { hw }];
            r.map(|ci| {
                let (mut sdy, mut sdyx) = (0f64, 0f64);
                for ni in 0..n {
                    let off = (ni * c + ci) * hw;
                    let (xp, mut gp) = (&x[off..][..hw], &dy[off..][..hw]);
                    if self.act != Activation::None {
                        plane_dz(xp, gp, self.ab[ci], self.act, &mut dz);
                        gp = &dz;
                    }
                    sdy += sum8(gp) as f64;
                    sdyx += sum_centered_mul(xp, self.mean[ci], gp) as f64;
                }
                (sdy as f32, (sdyx * self.invstd[ci] as f64) as f32)
            })
            .collect::<Vec<_>>()
        });
        parts.into_iter().flatten().unzip()
    }

    /// `dx` of `x, dy [N, C, HW]` given `gamma` and the per-channel [`BnBwd::sums`].
    pub(crate) fn dx(
        &self,
        x: &[f32],
        dy: &[f32],
        (n, c, hw): (usize, usize, usize),
        gamma: &[f32],
        (sum_dy, sum_dy_xhat): (&[f32], &[f32]),
    ) -> Vec<f32> {
        let m = (n * hw) as f32;
        let act = self.act;
        // SAFETY: the items cover `dx`, each loop writes its whole item (`x` and `dy` are as
        // long).
        unsafe {
            filled(x.len(), |dx| {
                threads::for_each_item(dx, hw, threads_for(2 * x.len()), |pi, dxp| {
                    let ci = pi % c;
                    let inv = self.invstd[ci];
                    // dx = k * (dz - a - (x - mean) * inv * b), a = mean(dz), b = mean(dz * xhat)
                    let k = gamma[ci] * inv;
                    let a = sum_dy[ci] / m;
                    let b = sum_dy_xhat[ci] / m * inv;
                    let mean = self.mean[ci];
                    let off = pi * hw;
                    let (xs, gs) = (&x[off..][..hw], &dy[off..][..hw]);
                    if act == Activation::None {
                        for ((o, xv), g) in dxp.iter_mut().zip(xs).zip(gs) {
                            o.write(k * (g - a - (xv - mean) * b));
                        }
                    } else {
                        let (za, zb) = self.ab[ci];
                        for ((o, xv), g) in dxp.iter_mut().zip(xs).zip(gs) {
                            let dz = act_grad(xv * za + zb, *g, act);
                            o.write(k * (dz - a - (xv - mean) * b));
                        }
                    }
                })
            })
        }
    }
}

/// `(x, dy) -> dx` given the per-channel sums.
struct BnBwdData {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    gamma: Vec<f32>,
    sum_dy: Vec<f32>,
    sum_dy_xhat: Vec<f32>,
    act: Activation,
    ab: Vec<(f32, f32)>,
}

impl CustomOp2 for BnBwdData {
    fn name(&self) -> &'static str {
        "adaptivenet-bn-train-bwd-data"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "batch_norm_train backward", "x")?;
        let dy = f32_slice(s2, l2, "batch_norm_train backward", "grad")?;
        let (n, c, h, w) = dims4(l1, "batch_norm_train backward")?;
        let bn = BnBwd {
            mean: &self.mean,
            invstd: &self.invstd,
            act: self.act,
            ab: &self.ab,
        };
        let dx = bn.dx(
            x,
            dy,
            (n, c, h * w),
            &self.gamma,
            (&self.sum_dy, &self.sum_dy_xhat),
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Train-mode BatchNorm over `x [N, C, H, W]` (f32): normalises with the batch statistics,
/// differentiable w.r.t. `x`, `gamma` and `beta`. Returns `(y, batch_mean [C],
/// batch_var [C])`, the variance biased (divided by `N*H*W`); the two statistics do not
/// track gradients (they feed the running estimates only).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_act(x, gamma, beta, eps, Activation::None)
}

/// [`batch_norm_train`] followed by `act` in one op: `y = act(bn(x))`, differentiable
/// w.r.t. `x`, `gamma` and `beta`, bit-identical to [`batch_norm_train`] then [`crate::relu`]
/// or [`crate::relu6`] (see the module docs), one activation-sized tensor less each way.
pub fn batch_norm_train_act(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Activation,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    check_f32(x, "batch_norm_train", "x")?;
    check_f32(gamma, "batch_norm_train", "gamma")?;
    check_f32(beta, "batch_norm_train", "beta")?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(KernelError::Shape(format!("batch_norm_train: eps {eps} must be >= 0")).into());
    }
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&BnStats)?;
    let st = stats.to_vec2::<f32>()?;
    let op = BnApply {
        mean: st[0].clone(),
        invstd: invstd(&st[1], eps),
        act,
    };
    let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    Ok((y, stats.get(0)?, stats.get(1)?))
}
