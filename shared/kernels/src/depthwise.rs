//! Direct depthwise kernels (groups == C == O): no im2col, no per-group GEMM.
//!
//! Per plane `(n, c)` and per tap `(i, j)` the kernel runs an axpy over the valid part of each
//! output row (contiguous when stride_w == 1, so it vectorises). On x86_64 the plane kernels
//! are compiled twice and the AVX2+FMA copy is picked at run time.

use crate::geom::{valid_range, Geom};
use crate::{threads, Activation};

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

/// Taps loop shared by the three kernels: calls `f(i, j, oh, ih, lo, hi, s)` for every tap
/// `(i, j)` and output row `oh` with a non-empty valid column range `lo..hi`, where input row
/// `ih` and input column `s + (ow - lo) * sw` correspond to output column `ow`.
#[inline(always)]
fn for_taps(g: &Geom, mut f: impl FnMut(usize, usize, usize, usize, usize, usize, usize)) {
    for i in 0..g.kh {
        let offh = (i * g.dh) as isize - g.pt as isize;
        let (oh_lo, oh_hi) = valid_range(g.oh, g.h, g.sh, offh);
        for j in 0..g.kw {
            let offw = (j * g.dw) as isize - g.pl as isize;
            let (lo, hi) = valid_range(g.ow, g.w, g.sw, offw);
            if lo >= hi {
                continue;
            }
            let s = ((lo * g.sw) as isize + offw) as usize;
            for oh in oh_lo..oh_hi {
                let ih = ((oh * g.sh) as isize + offh) as usize;
                f(i, j, oh, ih, lo, hi, s);
            }
        }
    }
}

#[inline(always)]
fn fwd_plane_impl(x: &[f32], w: &[f32], b: f32, act: Activation, g: &Geom, out: &mut [f32]) {
    out.fill(b);
    for_taps(g, |i, j, oh, ih, lo, hi, s| {
        let wv = w[i * g.kw + j];
        let xr = &x[ih * g.w..][..g.w];
        let orow = &mut out[oh * g.ow..][..g.ow];
        if g.sw == 1 {
            axpy(&mut orow[lo..hi], wv, &xr[s..s + hi - lo]);
        } else {
            for (k, o) in orow[lo..hi].iter_mut().enumerate() {
                *o += wv * xr[s + k * g.sw];
            }
        }
    });
    match act {
        Activation::None => {}
        Activation::Relu => out.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Relu6 => out.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)),
    }
}

#[inline(always)]
fn bwd_data_plane_impl(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32]) {
    for_taps(g, |i, j, oh, ih, lo, hi, s| {
        let wv = w[i * g.kw + j];
        let gr = &go[oh * g.ow..][..g.ow];
        let xr = &mut gx[ih * g.w..][..g.w];
        if g.sw == 1 {
            axpy(&mut xr[s..s + hi - lo], wv, &gr[lo..hi]);
        } else {
            for (k, v) in gr[lo..hi].iter().enumerate() {
                xr[s + k * g.sw] += wv * *v;
            }
        }
    });
}

#[inline(always)]
fn bwd_filter_plane_impl(x: &[f32], go: &[f32], g: &Geom, gw: &mut [f32]) {
    for_taps(g, |i, j, oh, ih, lo, hi, s| {
        let gr = &go[oh * g.ow..][..g.ow];
        let xr = &x[ih * g.w..][..g.w];
        let acc = if g.sw == 1 {
            dot(&gr[lo..hi], &xr[s..s + hi - lo])
        } else {
            gr[lo..hi]
                .iter()
                .enumerate()
                .map(|(k, v)| *v * xr[s + k * g.sw])
                .sum()
        };
        gw[i * g.kw + j] += acc;
    });
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fwd_plane(x: &[f32], w: &[f32], b: f32, act: Activation, g: &Geom, out: &mut [f32]) {
        fwd_plane_impl(x, w, b, act, g, out)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bwd_data_plane(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32]) {
        bwd_data_plane_impl(go, w, g, gx)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bwd_filter_plane(x: &[f32], go: &[f32], g: &Geom, gw: &mut [f32]) {
        bwd_filter_plane_impl(x, go, g, gw)
    }
}

#[inline]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn fwd_plane(x: &[f32], w: &[f32], b: f32, act: Activation, g: &Geom, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2 and fma (checked at run time).
        return unsafe { avx::fwd_plane(x, w, b, act, g, out) };
    }
    fwd_plane_impl(x, w, b, act, g, out)
}

fn bwd_data_plane(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2 and fma (checked at run time).
        return unsafe { avx::bwd_data_plane(go, w, g, gx) };
    }
    bwd_data_plane_impl(go, w, g, gx)
}

fn bwd_filter_plane(x: &[f32], go: &[f32], g: &Geom, gw: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2 and fma (checked at run time).
        return unsafe { avx::bwd_filter_plane(x, go, g, gw) };
    }
    bwd_filter_plane_impl(x, go, g, gw)
}

fn plane_threads(g: &Geom) -> usize {
    threads::for_flops(g.flops())
}

/// Depthwise forward; `out` is `[N, C, OH, OW]`.
pub(crate) fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &Geom, act: Activation, out: &mut [f32]) {
    let (hw, kk) = (g.h * g.w, g.kh * g.kw);
    threads::for_each_item(out, g.p(), plane_threads(g), |pi, op| {
        let c = pi % g.c;
        let bv = b.map_or(0.0, |b| b[c]);
        fwd_plane(&x[pi * hw..][..hw], &w[c * kk..][..kk], bv, act, g, op);
    });
}

/// Depthwise gradient w.r.t. the input; `gx` must be zero on entry.
pub(crate) fn backward_data(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32]) {
    let (p, kk) = (g.p(), g.kh * g.kw);
    threads::for_each_item(gx, g.h * g.w, plane_threads(g), |pi, gxp| {
        let c = pi % g.c;
        bwd_data_plane(&go[pi * p..][..p], &w[c * kk..][..kk], g, gxp);
    });
}

/// Depthwise gradient w.r.t. the weight `[C, 1, KH, KW]` (parallel over channels).
pub(crate) fn backward_filter(x: &[f32], go: &[f32], g: &Geom) -> Vec<f32> {
    let (hw, p, kk) = (g.h * g.w, g.p(), g.kh * g.kw);
    let mut gw = vec![0f32; g.c * kk];
    threads::for_each_item(&mut gw, kk, plane_threads(g), |c, gwc| {
        for n in 0..g.n {
            let pi = n * g.c + c;
            bwd_filter_plane(&x[pi * hw..][..hw], &go[pi * p..][..p], g, gwc);
        }
    });
    gw
}
