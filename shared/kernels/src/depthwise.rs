//! Direct depthwise kernels (groups == C == O): no im2col, no per-group GEMM.
//!
//! Per plane `(n, c)` and per tap `(i, j)` the kernel runs an axpy over the valid part of each
//! output row. Stride 1 (the common case) instead works on a zero-padded copy of the plane
//! with the output at the padded row pitch, so that every tap is one long contiguous
//! axpy (forward, grad-input) or dot product (grad-weight). On x86_64 the plane kernels are
//! compiled twice and the AVX2+FMA copy is picked at run time.

use crate::cpu::has_avx2_fma;
use crate::gemm_path::with_col;
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

/// Stride-1 kernels on a zero-padded copy of the plane: with the output computed at the padded
/// row pitch `Wp` ("wide" rows, the `Wp - OW` extra columns are scratch), every tap is one long
/// contiguous axpy/dot with a constant offset `i*dh*Wp + j*dw`.
struct Wide {
    hp: usize,
    wp: usize,
    /// Length of the padded plane buffer (with slack for the last row's scratch columns).
    pad_len: usize,
    /// Length of the wide output: `OH * Wp`.
    out_len: usize,
}

impl Wide {
    fn new(g: &Geom) -> Self {
        let hp = g.oh + g.dh * (g.kh - 1);
        let wp = g.ow + g.dw * (g.kw - 1);
        Self {
            hp,
            wp,
            pad_len: hp * wp + g.dw * (g.kw - 1),
            out_len: g.oh * wp,
        }
    }

    #[inline(always)]
    fn off(&self, g: &Geom, i: usize, j: usize) -> usize {
        i * g.dh * self.wp + j * g.dw
    }

    /// Zero-padded copy of `x [H, W]` into `xpad [pad_len]` (rows/cols beyond Hp/Wp of the
    /// padded input are dropped: they never reach a valid output).
    #[inline(always)]
    fn pad(&self, g: &Geom, x: &[f32], xpad: &mut [f32]) {
        xpad.fill(0.0);
        let rows = g.h.min(self.hp.saturating_sub(g.pt));
        let cols = g.w.min(self.wp.saturating_sub(g.pl));
        for ih in 0..rows {
            xpad[(ih + g.pt) * self.wp + g.pl..][..cols].copy_from_slice(&x[ih * g.w..][..cols]);
        }
    }

    /// `go [OH, OW]` into the wide layout with zero scratch columns.
    #[inline(always)]
    fn widen(&self, g: &Geom, go: &[f32], wide: &mut [f32]) {
        for oh in 0..g.oh {
            let row = &mut wide[oh * self.wp..][..self.wp];
            row[..g.ow].copy_from_slice(&go[oh * g.ow..][..g.ow]);
            row[g.ow..].fill(0.0);
        }
    }
}

#[inline(always)]
fn fwd_plane_wide_impl(
    x: &[f32],
    w: &[f32],
    b: f32,
    act: Activation,
    g: &Geom,
    out: &mut [f32],
    buf: &mut [f32],
) {
    let wd = Wide::new(g);
    let (xpad, wide) = buf.split_at_mut(wd.pad_len);
    let wide = &mut wide[..wd.out_len];
    wd.pad(g, x, xpad);
    wide.fill(b);
    for i in 0..g.kh {
        for j in 0..g.kw {
            let off = wd.off(g, i, j);
            axpy(wide, w[i * g.kw + j], &xpad[off..off + wd.out_len]);
        }
    }
    for oh in 0..g.oh {
        let src = &wide[oh * wd.wp..][..g.ow];
        let dst = &mut out[oh * g.ow..][..g.ow];
        match act {
            Activation::None => dst.copy_from_slice(src),
            Activation::Relu => dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.max(0.0)),
            Activation::Relu6 => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = s.clamp(0.0, 6.0)),
        }
    }
}

#[inline(always)]
fn bwd_data_plane_wide_impl(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32], buf: &mut [f32]) {
    let wd = Wide::new(g);
    let (gxpad, wide) = buf.split_at_mut(wd.pad_len);
    let wide = &mut wide[..wd.out_len];
    wd.widen(g, go, wide);
    gxpad.fill(0.0);
    for i in 0..g.kh {
        for j in 0..g.kw {
            let off = wd.off(g, i, j);
            axpy(&mut gxpad[off..off + wd.out_len], w[i * g.kw + j], wide);
        }
    }
    let rows = g.h.min(wd.hp.saturating_sub(g.pt));
    let cols = g.w.min(wd.wp.saturating_sub(g.pl));
    for ih in 0..rows {
        gx[ih * g.w..][..cols].copy_from_slice(&gxpad[(ih + g.pt) * wd.wp + g.pl..][..cols]);
    }
}

#[inline(always)]
fn bwd_filter_plane_wide_impl(x: &[f32], go: &[f32], g: &Geom, gw: &mut [f32], buf: &mut [f32]) {
    let wd = Wide::new(g);
    let (xpad, wide) = buf.split_at_mut(wd.pad_len);
    let wide = &mut wide[..wd.out_len];
    wd.pad(g, x, xpad);
    wd.widen(g, go, wide);
    for i in 0..g.kh {
        for j in 0..g.kw {
            let off = wd.off(g, i, j);
            gw[i * g.kw + j] += dot(wide, &xpad[off..off + wd.out_len]);
        }
    }
}

fn use_wide(g: &Geom) -> bool {
    g.sh == 1 && g.sw == 1
}

fn wide_buf_len(g: &Geom) -> usize {
    if use_wide(g) {
        let wd = Wide::new(g);
        wd.pad_len + wd.out_len
    } else {
        0
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fwd_plane(
        x: &[f32],
        w: &[f32],
        b: f32,
        act: Activation,
        g: &Geom,
        out: &mut [f32],
    ) {
        fwd_plane_impl(x, w, b, act, g, out)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bwd_data_plane(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32]) {
        bwd_data_plane_impl(go, w, g, gx)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fwd_plane_wide(
        x: &[f32],
        w: &[f32],
        b: f32,
        act: Activation,
        g: &Geom,
        out: &mut [f32],
        buf: &mut [f32],
    ) {
        fwd_plane_wide_impl(x, w, b, act, g, out, buf)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bwd_data_plane_wide(
        go: &[f32],
        w: &[f32],
        g: &Geom,
        gx: &mut [f32],
        buf: &mut [f32],
    ) {
        bwd_data_plane_wide_impl(go, w, g, gx, buf)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bwd_filter_plane_wide(
        x: &[f32],
        go: &[f32],
        g: &Geom,
        gw: &mut [f32],
        buf: &mut [f32],
    ) {
        bwd_filter_plane_wide_impl(x, go, g, gw, buf)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bwd_filter_plane(x: &[f32], go: &[f32], g: &Geom, gw: &mut [f32]) {
        bwd_filter_plane_impl(x, go, g, gw)
    }
}

fn fwd_plane(
    x: &[f32],
    w: &[f32],
    b: f32,
    act: Activation,
    g: &Geom,
    out: &mut [f32],
    buf: &mut [f32],
) {
    if use_wide(g) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports avx2 and fma (checked at run time).
            return unsafe { avx::fwd_plane_wide(x, w, b, act, g, out, buf) };
        }
        return fwd_plane_wide_impl(x, w, b, act, g, out, buf);
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2 and fma (checked at run time).
        return unsafe { avx::fwd_plane(x, w, b, act, g, out) };
    }
    fwd_plane_impl(x, w, b, act, g, out)
}

fn bwd_data_plane(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32], buf: &mut [f32]) {
    if use_wide(g) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports avx2 and fma (checked at run time).
            return unsafe { avx::bwd_data_plane_wide(go, w, g, gx, buf) };
        }
        return bwd_data_plane_wide_impl(go, w, g, gx, buf);
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2 and fma (checked at run time).
        return unsafe { avx::bwd_data_plane(go, w, g, gx) };
    }
    bwd_data_plane_impl(go, w, g, gx)
}

fn bwd_filter_plane(x: &[f32], go: &[f32], g: &Geom, gw: &mut [f32], buf: &mut [f32]) {
    if use_wide(g) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports avx2 and fma (checked at run time).
            return unsafe { avx::bwd_filter_plane_wide(x, go, g, gw, buf) };
        }
        return bwd_filter_plane_wide_impl(x, go, g, gw, buf);
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2 and fma (checked at run time).
        return unsafe { avx::bwd_filter_plane(x, go, g, gw) };
    }
    bwd_filter_plane_impl(x, go, g, gw)
}

fn plane_threads(g: &Geom) -> usize {
    threads::for_flops(g.flops())
}

/// Depthwise forward; `out` is `[N, C, OH, OW]`.
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    g: &Geom,
    act: Activation,
    out: &mut [f32],
) {
    let (hw, kk) = (g.h * g.w, g.kh * g.kw);
    let direct = crate::dw_direct::supported(g);
    let blen = if direct {
        crate::dw_direct::scratch_len(g)
    } else {
        wide_buf_len(g)
    };
    threads::for_each_item(out, g.p(), plane_threads(g), |pi, op| {
        let c = pi % g.c;
        let bv = b.map_or(0.0, |b| b[c]);
        let (xp, wc) = (&x[pi * hw..][..hw], &w[c * kk..][..kk]);
        with_col(blen, |buf| {
            if direct {
                crate::dw_direct::fwd_plane(xp, wc, bv, act, g, op, buf)
            } else {
                fwd_plane(xp, wc, bv, act, g, op, buf)
            }
        });
    });
}

/// Depthwise gradient w.r.t. the input; `gx` must be zero on entry.
pub(crate) fn backward_data(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32]) {
    let (p, kk, blen) = (g.p(), g.kh * g.kw, wide_buf_len(g));
    threads::for_each_item(gx, g.h * g.w, plane_threads(g), |pi, gxp| {
        let c = pi % g.c;
        with_col(blen, |buf| {
            bwd_data_plane(&go[pi * p..][..p], &w[c * kk..][..kk], g, gxp, buf)
        });
    });
}

/// Depthwise gradient w.r.t. the weight `[C, 1, KH, KW]` (parallel over channels).
pub(crate) fn backward_filter(x: &[f32], go: &[f32], g: &Geom) -> Vec<f32> {
    let (hw, p, kk, blen) = (g.h * g.w, g.p(), g.kh * g.kw, wide_buf_len(g));
    let mut gw = vec![0f32; g.c * kk];
    threads::for_each_item(&mut gw, kk, plane_threads(g), |c, gwc| {
        with_col(blen, |buf| {
            for n in 0..g.n {
                let pi = n * g.c + c;
                bwd_filter_plane(&x[pi * hw..][..hw], &go[pi * p..][..p], g, gwc, buf);
            }
        });
    });
    gw
}
