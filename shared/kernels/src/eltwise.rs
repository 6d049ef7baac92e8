//! Element-wise ReLU, ReLU6 and residual add + ReLU with one-pass backward.
//!
//! candle's ReLU backward is four passes and three temporaries (`zeros_like`, `ge`,
//! `to_dtype`, `mul`) before the gradient accumulation; here it is one pass. Semantics match
//! candle's: `relu(x) = x.max(0)` (NaN -> 0) and the gradient mask is `x >= 0`.
//!
//! ReLU6 (MobileNetV2 / EfficientNet-Lite) is `clamp(0, 6)` in candle: a `maximum` and a
//! `minimum` against full scalar tensors forward, and per side `eq`, `to_dtype`, `mul`, `div`
//! and `add` on the broadcast path backward. In a Lite0 fine-tuning step (1 thread) those
//! element-wise passes were about a third of the time; here it is one pass each way, with
//! candle's gradient exactly (1 inside, 1/2 at a tie with a bound, 0 outside).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use std::mem::MaybeUninit;

use crate::storage::{f32_slice, filled};
use crate::{check_f32, threads, KernelError};

const CHUNK: usize = 1 << 14;

fn threads_for(elems: usize) -> usize {
    threads::for_flops(2 * elems as u64)
}

/// A new `n`-element output, `f(offset, out_chunk)` writing it chunk by chunk on the
/// policy's threads (every `f` must write its whole chunk).
fn chunked(n: usize, f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let t = threads_for(n);
    // SAFETY: the items (of CHUNK elements, the last one possibly shorter) cover the output,
    // and every `f` of this file zips its whole chunk with inputs at least as long.
    unsafe {
        filled(n, |out| {
            threads::for_each_item(out, CHUNK, t, |i, o| f(i * CHUNK, o))
        })
    }
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "adaptivenet-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "relu", "x")?;
        let y = chunked(x.len(), |off, o| {
            for (o, v) in o.iter_mut().zip(&x[off..]) {
                o.write(v.max(0.0));
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&grad, &MaskGrad)?))
    }
}

/// `dy * (x >= 0)` of [`MaskGrad`] (`+0.0` where masked).
#[inline(always)]
pub(crate) fn relu_grad(v: f32, g: f32) -> f32 {
    if v >= 0.0 {
        g
    } else {
        0.0
    }
}

/// `(x, dy) -> dy * (x >= 0)`.
struct MaskGrad;

impl CustomOp2 for MaskGrad {
    fn name(&self) -> &'static str {
        "adaptivenet-relu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "relu backward", "x")?;
        let dy = f32_slice(s2, l2, "relu backward", "grad")?;
        if l1.shape() != l2.shape() {
            return Err(KernelError::Shape("relu backward: grad shape mismatch".into()).into());
        }
        let dx = chunked(x.len(), |off, o| {
            for ((o, v), g) in o.iter_mut().zip(&x[off..]).zip(&dy[off..]) {
                o.write(relu_grad(*v, *g));
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `(a, b) -> relu(a + b)`; backward `dy * (a + b >= 0)` to both.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "adaptivenet-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "add_relu", "a")?;
        let b = f32_slice(s2, l2, "add_relu", "b")?;
        if l1.shape() != l2.shape() {
            return Err(KernelError::Shape(format!(
                "add_relu: shapes {:?} and {:?} differ",
                l1.shape().dims(),
                l2.shape().dims()
            ))
            .into());
        }
        let y = chunked(a.len(), |off, o| {
            for ((o, x), z) in o.iter_mut().zip(&a[off..]).zip(&b[off..]) {
                o.write((x + z).max(0.0));
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The mask of `a + b >= 0` is recomputed from the inputs in the same pass (the
        // result is 0 for both `a + b == 0` and `a + b < 0`, so it cannot tell them apart).
        let g = a.apply_op3_no_bwd(b, &grad, &AddMaskGrad)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// `(a, b, dy) -> dy * (a + b >= 0)`: the backward of [`AddRelu`] in one pass.
struct AddMaskGrad;

impl CustomOp3 for AddMaskGrad {
    fn name(&self) -> &'static str {
        "adaptivenet-add-relu-bwd"
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
        let a = f32_slice(s1, l1, "add_relu backward", "a")?;
        let b = f32_slice(s2, l2, "add_relu backward", "b")?;
        let dy = f32_slice(s3, l3, "add_relu backward", "grad")?;
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            return Err(KernelError::Shape("add_relu backward: shape mismatch".into()).into());
        }
        let dx = chunked(a.len(), |off, o| {
            for (((o, x), z), g) in o.iter_mut().zip(&a[off..]).zip(&b[off..]).zip(&dy[off..]) {
                o.write(if x + z >= 0.0 { *g } else { 0.0 });
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

struct Relu6;

impl CustomOp1 for Relu6 {
    fn name(&self) -> &'static str {
        "adaptivenet-relu6"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "relu6", "x")?;
        let y = chunked(x.len(), |off, o| {
            for (o, v) in o.iter_mut().zip(&x[off..]) {
                o.write(v.clamp(0.0, 6.0));
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&grad, &Relu6Grad)?))
    }
}

/// `dy * m(x)` of [`Relu6Grad`], branch-free: ReLU6 inputs fall on either side of the bounds
/// at random, and the branchy form mispredicted about every other element (10 ns per element,
/// the largest item of a Lite0 training step). Bit-identical to the branchy form: `g * 0.5`
/// is `g / 2` exactly, and masking with bit operations keeps `+0.0` (not `g * 0.0`, which
/// would give `-0.0` or NaN) outside.
#[inline(always)]
pub(crate) fn relu6_grad(v: f32, g: f32) -> f32 {
    let inside = ((v > 0.0) & (v < 6.0)) as u32;
    let tie = ((v == 0.0) | (v == 6.0)) as u32;
    let bits = (inside.wrapping_neg() & g.to_bits()) | (tie.wrapping_neg() & (g * 0.5).to_bits());
    f32::from_bits(bits)
}

/// `(x, dy) -> dy * m(x)`: `m` is 1 on `(0, 6)`, 1/2 at `x == 0` or `x == 6` (candle splits
/// the gradient of `maximum` / `minimum` evenly at a tie) and 0 elsewhere.
struct Relu6Grad;

impl CustomOp2 for Relu6Grad {
    fn name(&self) -> &'static str {
        "adaptivenet-relu6-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "relu6 backward", "x")?;
        let dy = f32_slice(s2, l2, "relu6 backward", "grad")?;
        if l1.shape() != l2.shape() {
            return Err(KernelError::Shape("relu6 backward: grad shape mismatch".into()).into());
        }
        let dx = chunked(x.len(), |off, o| {
            for ((o, v), g) in o.iter_mut().zip(&x[off..]).zip(&dy[off..]) {
                o.write(relu6_grad(*v, *g));
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `min(max(x, 0), 6)` (f32, any shape), differentiable with a one-pass backward; same values
/// and gradients as candle's `clamp(0, 6)`.
pub fn relu6(x: &Tensor) -> candle_core::Result<Tensor> {
    check_f32(x, "relu6", "x")?;
    x.contiguous()?.apply_op1(Relu6)
}

/// `max(x, 0)` (f32, any shape), differentiable with a one-pass backward; same results as
/// candle's `relu` (gradient mask `x >= 0`).
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    check_f32(x, "relu", "x")?;
    x.contiguous()?.apply_op1(Relu)
}

/// `relu(a + b)` for same-shape f32 tensors (a residual join), differentiable; equals
/// candle's `(a + b).relu()` and its gradients.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    check_f32(a, "add_relu", "a")?;
    check_f32(b, "add_relu", "b")?;
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

#[cfg(test)]
mod tests {
    use super::relu6_grad;

    /// The branchy definition the branch-free form replaced.
    fn branchy(v: f32, g: f32) -> f32 {
        if v > 0.0 && v < 6.0 {
            g
        } else if v == 0.0 || v == 6.0 {
            g / 2.0
        } else {
            0.0
        }
    }

    #[test]
    fn branch_free_relu6_grad_is_bit_identical() {
        let special = [
            0.0,
            -0.0,
            6.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 4.0,
            -f32::MIN_POSITIVE / 4.0,
            f32::MAX,
            6.0 - f32::EPSILON * 4.0,
            6.0 + f32::EPSILON * 4.0,
        ];
        let mut vals: Vec<f32> = special.to_vec();
        vals.extend((-40..=40).map(|i| i as f32 * 0.25));
        for &v in &vals {
            for &g in &vals {
                let (a, b) = (relu6_grad(v, g), branchy(v, g));
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "x {v} dy {g}: {a} vs {b}"
                );
            }
        }
    }
}
