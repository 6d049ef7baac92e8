//! Direct depthwise kernels (groups == C == O): no im2col, no per-group GEMM.
//!
//! Forward: [`crate::dw_direct`] (register-blocked 3x3 / 5x5) where it applies; otherwise, per
//! plane `(n, c)` and per tap `(i, j)`, an axpy over the valid part of each output row
//! (stride 1: on a zero-padded copy of the plane with the output at the padded row pitch, so
//! that every tap is one long contiguous axpy). Training (the autograd forward) takes the
//! channel-lane kernels of [`crate::dw_lanes`] instead except on large stride-1 planes, and
//! both gradients always do: on the small planes of a MobileNet-style network they are
//! several times faster than any per-plane kernel. On x86_64 the plane kernels are compiled
//! twice and the AVX2+FMA copy is picked at run time.

use std::mem::MaybeUninit;

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

/// Taps loop of the plane forward: calls `f(i, j, oh, ih, lo, hi, s)` for every tap
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

/// Stride-1 forward on a zero-padded copy of the plane: with the output computed at the padded
/// row pitch `Wp` ("wide" rows, the `Wp - OW` extra columns are scratch), every tap is one long
/// contiguous axpy with a constant offset `i*dh*Wp + j*dw`.
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

fn plane_threads(g: &Geom) -> usize {
    threads::for_flops(g.flops())
}

/// Whether a training forward takes the channel-lane kernel ([`crate::dw_lanes`]):
/// everywhere but on planes whose output rows are long enough for the register-blocked
/// kernel's row vectors at stride 1 (measured on Lite0's layers at batch 32: 32x32 and 16x16
/// planes at stride 1 ran faster there, every strided or smaller plane 1.5-8x faster in
/// lanes).
pub(crate) fn lanes_forward(g: &Geom) -> bool {
    !(crate::dw_direct::supported(g) && g.sh == 1 && g.sw == 1 && g.ow >= 16)
}

/// Whether an inference forward takes the channel-lane kernel too: on outputs of at most 4
/// pixels, where the plane kernels pay their per-plane setup for a few multiply-adds
/// (EfficientNet-Lite0 at 64x64 ends in 2x2 planes of 1152 channels under 5x5 kernels:
/// the whole model 1.30 -> 1.20 ms at 1 thread, Xeon AVX-512; routing 4x4 outputs as well
/// gained nothing, 8x8 lost).
pub(crate) fn lanes_infer(g: &Geom) -> bool {
    g.oh * g.ow <= 4
}

/// Depthwise forward of the plane kernels into `out [N, C, OH, OW]`, every element written
/// (`out` need not be initialised: no zero-fill of a map the kernel overwrites).
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    g: &Geom,
    act: Activation,
    out: &mut [MaybeUninit<f32>],
) {
    let (hw, kk) = (g.h * g.w, g.kh * g.kw);
    let direct = crate::dw_direct::supported(g);
    if direct {
        // Runs of planes per worker, one dispatch per run.
        let plan = crate::dw_direct::Plan::new(g);
        let (planes, p) = (g.n * g.c, g.p());
        let outp = SendPtr(out.as_mut_ptr());
        threads::map_ranges(planes, plane_threads(g), |r| {
            // SAFETY: planes `r` of `out`, written by this worker only.
            let o =
                unsafe { std::slice::from_raw_parts_mut(outp.get().add(r.start * p), r.len() * p) };
            let xs = &x[r.start * hw..r.end * hw];
            crate::dw_direct::fwd_planes(xs, w, b, act, g, &plan, r, o);
        });
        return;
    }
    let blen = wide_buf_len(g);
    threads::for_each_item(out, g.p(), plane_threads(g), |pi, op| {
        let c = pi % g.c;
        let bv = b.map_or(0.0, |b| b[c]);
        let (xp, wc) = (&x[pi * hw..][..hw], &w[c * kk..][..kk]);
        with_col(blen, |buf| {
            op.fill(MaybeUninit::new(0.0));
            // SAFETY: every element initialised on the line above.
            let op = unsafe { &mut *(op as *mut [MaybeUninit<f32>] as *mut [f32]) };
            fwd_plane(xp, wc, bv, act, g, op, buf)
        });
    });
}

/// A raw output pointer handed to workers that write disjoint planes.
#[derive(Clone, Copy)]
struct SendPtr(*mut MaybeUninit<f32>);
// SAFETY: only used for disjoint writes inside one scoped parallel call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut MaybeUninit<f32> {
        self.0
    }
}
