//! Max pooling (with `-inf` padding, any kernel/stride) and global average pooling.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use crate::geom::valid_range;
use crate::storage::{dims4, f32_slice};
use crate::{threads, KernelError};

/// Max-pool geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    pub fn new(
        x: (usize, usize, usize, usize),
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self, KernelError> {
        let (n, c, h, w) = x;
        if kernel.0 == 0 || kernel.1 == 0 || stride.0 == 0 || stride.1 == 0 {
            return Err(KernelError::Shape(
                "max_pool2d: kernel and stride must be >= 1".into(),
            ));
        }
        if 2 * padding.0 > kernel.0 || 2 * padding.1 > kernel.1 {
            return Err(KernelError::Shape(format!(
                "max_pool2d: padding {padding:?} must be at most half of kernel {kernel:?}"
            )));
        }
        if h + 2 * padding.0 < kernel.0 || w + 2 * padding.1 < kernel.1 {
            return Err(KernelError::Shape(format!(
                "max_pool2d: kernel {kernel:?} larger than padded input {}x{}",
                h + 2 * padding.0,
                w + 2 * padding.1
            )));
        }
        Ok(Self {
            n,
            c,
            h,
            w,
            kh: kernel.0,
            kw: kernel.1,
            sh: stride.0,
            sw: stride.1,
            ph: padding.0,
            pw: padding.1,
            oh: (h + 2 * padding.0 - kernel.0) / stride.0 + 1,
            ow: (w + 2 * padding.1 - kernel.1) / stride.1 + 1,
        })
    }

    fn window(&self, oh: usize, ow: usize) -> (usize, usize, usize, usize) {
        let h0 = (oh * self.sh) as isize - self.ph as isize;
        let w0 = (ow * self.sw) as isize - self.pw as isize;
        let hs = h0.max(0) as usize;
        let he = ((h0 + self.kh as isize).max(0) as usize).min(self.h);
        let ws = w0.max(0) as usize;
        let we = ((w0 + self.kw as isize).max(0) as usize).min(self.w);
        (hs, he, ws, we)
    }

    /// Index (in the plane) and value of the window maximum; first maximum wins, NaN
    /// propagates (PyTorch semantics).
    #[inline]
    fn argmax(&self, x: &[f32], oh: usize, ow: usize) -> (usize, f32) {
        let (hs, he, ws, we) = self.window(oh, ow);
        let mut best = (hs * self.w + ws, f32::NEG_INFINITY);
        for ih in hs..he {
            let row = &x[ih * self.w..][..we];
            for (iw, &v) in row.iter().enumerate().skip(ws) {
                if v > best.1 || v.is_nan() {
                    best = (ih * self.w + iw, v);
                    if v.is_nan() {
                        return best;
                    }
                }
            }
        }
        best
    }

    /// Forward on one plane: a pass per tap over the valid part of each output row
    /// (contiguous when the stride is 1); NaN propagates.
    #[inline(never)]
    fn fwd_plane(&self, x: &[f32], out: &mut [f32]) {
        // Branch-free max on NaN-free planes; a plane holding a NaN takes the exact PyTorch
        // path (NaN wins) instead.
        if x.iter().fold(false, |acc, v| acc | v.is_nan()) {
            for oh in 0..self.oh {
                for ow in 0..self.ow {
                    out[oh * self.ow + ow] = self.argmax(x, oh, ow).1;
                }
            }
            return;
        }
        #[inline(always)]
        fn nanmax(m: f32, v: f32) -> f32 {
            // No NaN here: a plain compare-select (one `maxss`/`vmaxps`).
            if v > m {
                v
            } else {
                m
            }
        }
        out.fill(f32::NEG_INFINITY);
        for i in 0..self.kh {
            let offh = i as isize - self.ph as isize;
            let (oh_lo, oh_hi) = valid_range(self.oh, self.h, self.sh, offh);
            for j in 0..self.kw {
                let offw = j as isize - self.pw as isize;
                let (lo, hi) = valid_range(self.ow, self.w, self.sw, offw);
                if lo >= hi {
                    continue;
                }
                let s = ((lo * self.sw) as isize + offw) as usize;
                for oh in oh_lo..oh_hi {
                    let ih = ((oh * self.sh) as isize + offh) as usize;
                    let xr = &x[ih * self.w..][..self.w];
                    let orow = &mut out[oh * self.ow..][lo..hi];
                    if self.sw == 1 {
                        for (o, v) in orow.iter_mut().zip(&xr[s..s + hi - lo]) {
                            *o = nanmax(*o, *v);
                        }
                    } else {
                        for (k, o) in orow.iter_mut().enumerate() {
                            *o = nanmax(*o, xr[s + k * self.sw]);
                        }
                    }
                }
            }
        }
    }

    fn threads(&self) -> usize {
        threads::for_flops((self.n * self.c * self.oh * self.ow * self.kh * self.kw) as u64)
    }
}

pub(crate) struct MaxPool(pub (usize, usize), pub (usize, usize), pub (usize, usize));

impl MaxPool {
    fn geom(&self, dims: (usize, usize, usize, usize)) -> candle_core::Result<PoolGeom> {
        Ok(PoolGeom::new(dims, self.0, self.1, self.2)?)
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "adaptivenet-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "max_pool2d", "x")?;
        let g = self.geom(dims4(l, "max_pool2d")?)?;
        let (hw, op) = (g.h * g.w, g.oh * g.ow);
        let mut out = vec![0f32; g.n * g.c * op];
        threads::for_each_item(&mut out, op, g.threads(), |pi, o| {
            g.fwd_plane(&x[pi * hw..][..hw], o);
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(
            &grad,
            &MaxPoolBwd(self.0, self.1, self.2),
        )?))
    }
}

/// `(x, grad_out) -> grad_x`.
struct MaxPoolBwd((usize, usize), (usize, usize), (usize, usize));

impl CustomOp2 for MaxPoolBwd {
    fn name(&self) -> &'static str {
        "adaptivenet-max-pool2d-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "max_pool2d backward", "x")?;
        let go = f32_slice(s2, l2, "max_pool2d backward", "grad")?;
        let g = PoolGeom::new(dims4(l1, "max_pool2d backward")?, self.0, self.1, self.2)?;
        if dims4(l2, "max_pool2d backward")? != (g.n, g.c, g.oh, g.ow) {
            return Err(
                KernelError::Shape("max_pool2d backward: grad shape mismatch".into()).into(),
            );
        }
        let (hw, op) = (g.h * g.w, g.oh * g.ow);
        let mut gx = vec![0f32; g.n * g.c * hw];
        threads::for_each_item(&mut gx, hw, g.threads(), |pi, gxp| {
            let xp = &x[pi * hw..][..hw];
            let gop = &go[pi * op..][..op];
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    gxp[g.argmax(xp, oh, ow).0] += gop[oh * g.ow + ow];
                }
            }
        });
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

#[inline(always)]
pub(crate) fn sum8(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = a.chunks_exact(8);
    let r: f32 = c.remainder().iter().sum();
    for x in c {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + r
}

pub(crate) struct GlobalAvgPool;

impl CustomOp1 for GlobalAvgPool {
    fn name(&self) -> &'static str {
        "adaptivenet-global-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "global_avg_pool", "x")?;
        let (n, c, h, w) = dims4(l, "global_avg_pool")?;
        let hw = h * w;
        if hw == 0 {
            return Err(KernelError::Shape("global_avg_pool: empty spatial dims".into()).into());
        }
        let inv = 1.0 / hw as f32;
        let out: Vec<f32> = x.chunks_exact(hw).map(|p| sum8(p) * inv).collect();
        debug_assert_eq!(out.len(), n * c);
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let grad = grad.contiguous()?;
        Ok(Some(grad.apply_op1_no_bwd(&GlobalAvgPoolBwd(h, w))?))
    }
}

/// `grad [N, C] -> grad_x [N, C, H, W]`.
struct GlobalAvgPoolBwd(usize, usize);

impl CustomOp1 for GlobalAvgPoolBwd {
    fn name(&self) -> &'static str {
        "adaptivenet-global-avg-pool-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let go = f32_slice(s, l, "global_avg_pool backward", "grad")?;
        let (n, c) = l.shape().dims2()?;
        let hw = self.0 * self.1;
        let inv = 1.0 / hw as f32;
        let mut gx = vec![0f32; n * c * hw];
        for (plane, g) in gx.chunks_exact_mut(hw).zip(go) {
            plane.fill(*g * inv);
        }
        Ok((CpuStorage::F32(gx), Shape::from((n, c, self.0, self.1))))
    }
}
