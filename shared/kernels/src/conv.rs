//! conv2d as candle custom ops: forward (GEMM or depthwise path) and the two backward ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::geom::Geom;
use crate::storage::{dims4, f32_slice, filled};
use crate::{depthwise, dw_lanes, gemm_path, pw_train, Activation, Conv2dParams, KernelError};

type Dims4 = (usize, usize, usize, usize);

/// Forward conv (+ bias + activation). Differentiable only with `act == None`.
pub(crate) struct ConvOp {
    pub p: Conv2dParams,
    pub act: Activation,
    /// The forward of a training step (it may pick other kernels than inference).
    pub train: bool,
}

impl ConvOp {
    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = f32_slice(x.0, x.1, "conv2d", "x")?;
        let ws = f32_slice(w.0, w.1, "conv2d", "weight")?;
        let g = Geom::new(dims4(x.1, "conv2d")?, dims4(w.1, "conv2d weight")?, &self.p)?;
        let bs = match b {
            Some((s, l)) => {
                let b = f32_slice(s, l, "conv2d", "bias")?;
                if b.len() != g.o || l.shape().rank() != 1 {
                    return Err(KernelError::Shape(format!(
                        "conv2d: bias shape {:?}, expected [{}]",
                        l.shape().dims(),
                        g.o
                    ))
                    .into());
                }
                Some(b)
            }
            None => None,
        };
        let out = forward(xs, ws, bs, &g, self.act, self.train);
        Ok((CpuStorage::F32(out), Shape::from(g.out_dims())))
    }
}

/// The conv of `g` (+ bias + activation) into a new `[N, O, OH, OW]`. `train`: the forward
/// of a training step (or any differentiable call), which takes the training kernels.
pub(crate) fn forward(
    xs: &[f32],
    ws: &[f32],
    bs: Option<&[f32]>,
    g: &Geom,
    act: Activation,
    train: bool,
) -> Vec<f32> {
    if train && direct_1x1(g) {
        return pointwise_1x1(xs, ws, bs, g, act);
    }
    if g.is_depthwise() && (train || depthwise::lanes_infer(g)) && depthwise::lanes_forward(g) {
        // SAFETY: `dw_lanes::forward` writes every element of `[N, C, OH, OW]`.
        return unsafe {
            filled(g.n * g.out_img(), |o| {
                dw_lanes::forward(xs, ws, bs, g, act, o)
            })
        };
    }
    if g.is_depthwise() {
        // SAFETY: `depthwise::forward` writes every element of `[N, C, OH, OW]`.
        return unsafe {
            filled(g.n * g.out_img(), |o| {
                depthwise::forward(xs, ws, bs, g, act, o)
            })
        };
    }
    let mut out = vec![0f32; g.n * g.out_img()];
    gemm_path::forward(xs, ws, bs, g, act, &mut out);
    out
}

fn conv_grads(
    p: &Conv2dParams,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    // Inputs that do not track gradients (e.g. the image batch) get no gradient computed.
    let gx = if x.track_op() {
        Some(grad.apply_op2_no_bwd(
            w,
            &ConvBwdData {
                p: *p,
                x_dims: x.dims4()?,
            },
        )?)
    } else {
        None
    };
    let gw = if w.track_op() {
        Some(x.apply_op2_no_bwd(
            grad,
            &ConvBwdFilter {
                p: *p,
                w_dims: w.dims4()?,
            },
        )?)
    } else {
        None
    };
    Ok((gx, gw))
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "adaptivenet-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.act != Activation::None {
            candle_core::bail!("adaptivenet-kernels: fused conv2d activation has no backward")
        }
        let grad = grad.contiguous()?;
        conv_grads(&self.p, x, w, &grad)
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "adaptivenet-conv2d-bias"
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
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.act != Activation::None {
            candle_core::bail!("adaptivenet-kernels: fused conv2d activation has no backward")
        }
        let grad = grad.contiguous()?;
        let (gx, gw) = conv_grads(&self.p, x, w, &grad)?;
        let gb = if b.track_op() {
            Some(grad.apply_op1_no_bwd(&BiasGrad)?)
        } else {
            None
        };
        Ok((gx, gw, gb))
    }
}

/// Whether a 1x1 conv (stride 1, unpadded, one group) of training runs on the direct
/// pointwise kernels of inference (weight packed per call): on Lite0's training shapes at
/// batch 32 they took 18 ms per step for the forwards against 44 ms with im2col-free GEMMs
/// (`gemm` crate, small maps stacked), and 37 against 56 ms for the grad-inputs.
fn direct_1x1(g: &Geom) -> bool {
    g.identity_1x1 && g.groups == 1 && crate::cpu::isa() >= crate::cpu::Isa::Avx2
}

/// `act(W x + b)` of a 1x1 conv on [`crate::pointwise`]'s direct kernels: `W` packed for
/// this call (`O * C` copies against `N * O * C * P` multiply-adds), the output written once
/// with no zero-fill and no stacking copy of small maps.
fn pointwise_1x1(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &Geom, act: Activation) -> Vec<f32> {
    pointwise_packed_1x1(x, &crate::pointwise::pack(w, g.o, g.c), b, g, act)
}

/// The packed form ([`crate::pointwise::pack`]) of `W^T [C, O]` for `w [O, C]`: a panel's
/// row `r` at reduction step `k` is `w[k][panel * MR + r]`, so each step copies a contiguous
/// run of `w`'s row `k` (no transposed copy of `w` first).
fn pack_transposed(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    use crate::pointwise::{packed_len, MR};
    assert_eq!(w.len(), o * c, "pack_transposed: weight length");
    let mut out = vec![0f32; packed_len(c, o)];
    for (pi, panel) in out.chunks_exact_mut(MR * o).enumerate() {
        let (c0, rows) = (pi * MR, MR.min(c - pi * MR));
        for (k, step) in panel.chunks_exact_mut(MR).enumerate() {
            step[..rows].copy_from_slice(&w[k * c + c0..][..rows]);
        }
    }
    out
}

/// [`pointwise_1x1`] on a weight already packed for `g`.
fn pointwise_packed_1x1(
    x: &[f32],
    packed: &[f32],
    b: Option<&[f32]>,
    g: &Geom,
    act: Activation,
) -> Vec<f32> {
    let op = crate::pointwise::Pointwise {
        x,
        w: packed,
        bias: b,
        residual: None,
        act,
    };
    let n = g.n * g.out_img();
    let mut out: Vec<f32> = Vec::with_capacity(n);
    crate::pointwise::forward(&op, g, &mut out.spare_capacity_mut()[..n]);
    // SAFETY: `pointwise::forward` writes every element of `[N, O, P]`.
    unsafe { out.set_len(n) };
    out
}

/// `(grad_out, w) -> grad_x`.
struct ConvBwdData {
    p: Conv2dParams,
    x_dims: Dims4,
}

impl CustomOp2 for ConvBwdData {
    fn name(&self) -> &'static str {
        "adaptivenet-conv2d-bwd-data"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let go = f32_slice(s1, l1, "conv2d backward", "grad")?;
        let w = f32_slice(s2, l2, "conv2d backward", "weight")?;
        let g = Geom::new(self.x_dims, dims4(l2, "conv2d backward")?, &self.p)?;
        if dims4(l1, "conv2d backward")? != g.out_dims() {
            return Err(KernelError::Shape("conv2d backward: grad shape mismatch".into()).into());
        }
        let gx = backward_data(go, w, &g)?;
        Ok((CpuStorage::F32(gx), Shape::from(self.x_dims)))
    }
}

/// The gradient w.r.t. the input `[N, C, H, W]` of the conv of `g`, from `go`
/// (`[N, O, OH, OW]`).
pub(crate) fn backward_data(go: &[f32], w: &[f32], g: &Geom) -> candle_core::Result<Vec<f32>> {
    if direct_1x1(g) {
        // The forward with `W^T` (see `transposed_as_forward`), packed from `W` directly.
        let gt = Geom::new(
            (g.n, g.o, g.oh, g.ow),
            (g.c, g.o, 1, 1),
            &Conv2dParams::default(),
        )?;
        let packed = pack_transposed(w, g.o, g.c);
        return Ok(pointwise_packed_1x1(
            go,
            &packed,
            None,
            &gt,
            Activation::None,
        ));
    }
    if g.is_depthwise() {
        // SAFETY: `dw_lanes::backward_data` writes every element of `[N, C, H, W]`.
        return Ok(unsafe { filled(g.n * g.in_img(), |gx| dw_lanes::backward_data(go, w, g, gx)) });
    }
    let mut gx = vec![0f32; g.n * g.in_img()];
    if let Some((gt, wt)) = transposed_as_forward(g, w) {
        gemm_path::forward(go, &wt, None, &gt, Activation::None, &mut gx);
    } else {
        gemm_path::backward_data(go, w, g, &mut gx);
    }
    Ok(gx)
}

/// For a stride-1, undilated, ungrouped conv, the input gradient is itself a stride-1 conv
/// of the output gradient with the spatially flipped, in/out-transposed kernel and padding
/// `k - 1 - pad` per side: that runs the forward GEMM (reduction over `O*KH*KW`, no
/// scatter-add) instead of `W^T x grad` (reduction over `O` only) followed by col2im. For a
/// 1x1 conv it is the forward with `W^T`, which stacks small images into one GEMM: one GEMM
/// per image with 4 or 16 columns (Lite0's 2x2 and 4x4 maps) ran 2-3x slower than the
/// forward of the same size.
/// Returns the geometry and weight of that conv, or `None` when it does not apply.
fn transposed_as_forward(g: &Geom, w: &[f32]) -> Option<(Geom, Vec<f32>)> {
    if g.groups != 1 || (g.sh, g.sw, g.dh, g.dw) != (1, 1, 1, 1) {
        return None;
    }
    let pb = (g.oh + g.kh - 1).checked_sub(g.h + g.pt)?;
    let pr = (g.ow + g.kw - 1).checked_sub(g.w + g.pl)?;
    let pad = (
        (g.kh - 1).checked_sub(g.pt)?,
        (g.kh - 1).checked_sub(pb)?,
        (g.kw - 1).checked_sub(g.pl)?,
        (g.kw - 1).checked_sub(pr)?,
    );
    let p = Conv2dParams {
        padding: pad,
        ..Conv2dParams::default()
    };
    let gt = Geom::new((g.n, g.o, g.oh, g.ow), (g.c, g.o, g.kh, g.kw), &p).ok()?;
    if (gt.oh, gt.ow) != (g.h, g.w) {
        return None;
    }
    let (kk, khw) = (g.kh * g.kw, g.kh * g.kw - 1);
    let mut wt = vec![0f32; w.len()];
    if kk == 1 {
        // A plain transpose `[O, C] -> [C, O]` (per-element slices cost 15 % of a 1x1
        // grad-input at 320 x 1280 channels).
        for (c, row) in wt.chunks_exact_mut(g.o).enumerate() {
            for (o, d) in row.iter_mut().enumerate() {
                *d = w[o * g.c + c];
            }
        }
        return Some((gt, wt));
    }
    for o in 0..g.o {
        for c in 0..g.c {
            let src = &w[(o * g.c + c) * kk..][..kk];
            let dst = &mut wt[(c * g.o + o) * kk..][..kk];
            for (t, d) in dst.iter_mut().enumerate() {
                *d = src[khw - t];
            }
        }
    }
    Some((gt, wt))
}

/// `(x, grad_out) -> grad_w`.
struct ConvBwdFilter {
    p: Conv2dParams,
    w_dims: Dims4,
}

impl CustomOp2 for ConvBwdFilter {
    fn name(&self) -> &'static str {
        "adaptivenet-conv2d-bwd-filter"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "conv2d backward", "x")?;
        let go = f32_slice(s2, l2, "conv2d backward", "grad")?;
        let g = Geom::new(dims4(l1, "conv2d backward")?, self.w_dims, &self.p)?;
        if dims4(l2, "conv2d backward")? != g.out_dims() {
            return Err(KernelError::Shape("conv2d backward: grad shape mismatch".into()).into());
        }
        Ok((
            CpuStorage::F32(backward_filter(x, go, &g)),
            Shape::from(self.w_dims),
        ))
    }
}

/// The gradient w.r.t. the weight `[O, C/groups, KH, KW]` of the conv of `g`.
pub(crate) fn backward_filter(x: &[f32], go: &[f32], g: &Geom) -> Vec<f32> {
    if g.is_depthwise() {
        dw_lanes::backward_filter(x, go, g)
    } else if pw_train::supported(g) {
        pw_train::backward_filter(x, go, g)
    } else {
        gemm_path::backward_filter(x, go, g)
    }
}

/// `grad_out [N, O, OH, OW] -> grad_b [O]`.
struct BiasGrad;

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "adaptivenet-conv2d-bwd-bias"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let go = f32_slice(s, l, "conv2d backward", "grad")?;
        let (n, o, h, w) = dims4(l, "conv2d backward")?;
        let p = h * w;
        let mut gb = vec![0f64; o];
        for i in 0..n {
            for (oc, acc) in gb.iter_mut().enumerate() {
                *acc += crate::pool::sum8(&go[(i * o + oc) * p..][..p]) as f64;
            }
        }
        let gb: Vec<f32> = gb.into_iter().map(|v| v as f32).collect();
        Ok((CpuStorage::F32(gb), Shape::from(o)))
    }
}

#[cfg(test)]
mod tests {
    use super::pack_transposed;

    /// Packing `W^T` straight from `W` is the pack of the transposed matrix.
    #[test]
    fn pack_transposed_is_the_pack_of_the_transpose() {
        for (o, c) in [(3, 5), (16, 16), (20, 33), (1, 17), (40, 1)] {
            let w: Vec<f32> = (0..o * c).map(|i| i as f32 * 0.5 - 7.0).collect();
            let mut wt = vec![0f32; o * c];
            for oi in 0..o {
                for ci in 0..c {
                    wt[ci * o + oi] = w[oi * c + ci];
                }
            }
            assert_eq!(
                pack_transposed(&w, o, c),
                crate::pointwise::pack(&wt, c, o),
                "{o}x{c}"
            );
        }
    }
}
