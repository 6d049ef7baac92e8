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

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::pool::sum8;
use crate::storage::{dims4, f32_slice};
use crate::{check_f32, threads, KernelError};

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
        let st: Vec<(f32, f32)> = parts.into_iter().flatten().collect();
        let mut out: Vec<f32> = st.iter().map(|s| s.0).collect();
        out.extend(st.iter().map(|s| s.1));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// `(x, gamma, beta) -> gamma * (x - mean) * invstd + beta`, the statistics fixed.
struct BnApply {
    mean: Vec<f32>,
    invstd: Vec<f32>,
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
        let hw = h * w;
        let mut y = vec![0f32; x.len()];
        threads::for_each_item(&mut y, hw, threads_for(x.len()), |pi, yp| {
            let ci = pi % c;
            let a = gamma[ci] * self.invstd[ci];
            let b = beta[ci] - self.mean[ci] * a;
            for (o, v) in yp.iter_mut().zip(&x[pi * hw..][..hw]) {
                *o = v * a + b;
            }
        });
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
        let sums = x.apply_op2_no_bwd(
            &grad,
            &BnBwdSums {
                mean: self.mean.clone(),
                invstd: self.invstd.clone(),
            },
        )?;
        let gx = if x.track_op() {
            let s = sums.to_vec2::<f32>()?;
            Some(x.apply_op2_no_bwd(
                &grad,
                &BnBwdData {
                    mean: self.mean.clone(),
                    invstd: self.invstd.clone(),
                    gamma: gamma.to_vec1::<f32>()?,
                    sum_dy: s[0].clone(),
                    sum_dy_xhat: s[1].clone(),
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

/// `(x, dy) -> [2, C]`: `sum(dy)` and `sum(dy * xhat)` per channel.
struct BnBwdSums {
    mean: Vec<f32>,
    invstd: Vec<f32>,
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
        let hw = h * w;
        let parts = threads::map_ranges(c, threads_for(2 * x.len()), |r| {
            r.map(|ci| {
                let (mut sdy, mut sdyx) = (0f64, 0f64);
                for ni in 0..n {
                    let off = (ni * c + ci) * hw;
                    let (xp, gp) = (&x[off..][..hw], &dy[off..][..hw]);
                    sdy += sum8(gp) as f64;
                    sdyx += sum_centered_mul(xp, self.mean[ci], gp) as f64;
                }
                (sdy as f32, (sdyx * self.invstd[ci] as f64) as f32)
            })
            .collect::<Vec<_>>()
        });
        let st: Vec<(f32, f32)> = parts.into_iter().flatten().collect();
        let mut out: Vec<f32> = st.iter().map(|s| s.0).collect();
        out.extend(st.iter().map(|s| s.1));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// `(x, dy) -> dx` given the per-channel sums.
struct BnBwdData {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    gamma: Vec<f32>,
    sum_dy: Vec<f32>,
    sum_dy_xhat: Vec<f32>,
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
        let hw = h * w;
        let m = (n * hw) as f32;
        let mut dx = vec![0f32; x.len()];
        threads::for_each_item(&mut dx, hw, threads_for(2 * x.len()), |pi, dxp| {
            let ci = pi % c;
            let inv = self.invstd[ci];
            // dx = k * (dy - a - (x - mean) * inv * b), a = mean(dy), b = mean(dy * xhat)
            let k = self.gamma[ci] * inv;
            let a = self.sum_dy[ci] / m;
            let b = self.sum_dy_xhat[ci] / m * inv;
            let mean = self.mean[ci];
            let off = pi * hw;
            for ((o, xv), g) in dxp.iter_mut().zip(&x[off..][..hw]).zip(&dy[off..][..hw]) {
                *o = k * (g - a - (xv - mean) * b);
            }
        });
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
    check_f32(x, "batch_norm_train", "x")?;
    check_f32(gamma, "batch_norm_train", "gamma")?;
    check_f32(beta, "batch_norm_train", "beta")?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(KernelError::Shape(format!("batch_norm_train: eps {eps} must be >= 0")).into());
    }
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&BnStats)?;
    let st = stats.to_vec2::<f32>()?;
    let invstd: Vec<f32> = st[1]
        .iter()
        .map(|v| (1.0 / (*v as f64 + eps).sqrt()) as f32)
        .collect();
    let op = BnApply {
        mean: st[0].clone(),
        invstd,
    };
    let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    Ok((y, stats.get(0)?, stats.get(1)?))
}
