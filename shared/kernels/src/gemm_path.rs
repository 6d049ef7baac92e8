//! groups != depthwise: im2col (into a reused per-thread buffer) + `gemm`, per image and group.
//!
//! Per image `n` and group `g`: `out[n,g] [Og, P] = W[g] [Og, K] x col [K, P]` with
//! `K = Cg*KH*KW`, `P = OH*OW`. For 1x1 / stride 1 / no padding the input plane block
//! `[Cg, H*W]` already is `col`, and no copy is made.

use std::cell::Cell;
use std::ops::Range;

use gemm::Parallelism;

use crate::geom::{valid_range, Geom};
use crate::{threads, Activation};

thread_local! {
    static COL: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with a per-thread scratch buffer of `len` elements (contents unspecified).
pub(crate) fn with_col<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = COL.with(|c| c.take());
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let r = f(&mut v[..len]);
    COL.with(|c| {
        let other = c.take();
        c.set(if other.len() > v.len() { other } else { v });
    });
    r
}

/// A strided read-only matrix view.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// `dst [m x n]` (row-major, contiguous) `= (acc ? dst : 0) + lhs [m x k] * rhs [k x n]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    acc: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    par: Parallelism,
) {
    gemm_f32_ld(m, n, k, dst, n, acc, lhs, rhs, par)
}

/// [`gemm_f32`] with `dst` rows at pitch `ldd >= n`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32_ld(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ldd: usize,
    acc: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldd >= n && dst.len() >= (m - 1) * ldd + n,
        "gemm dst too small"
    );
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[r * ldd..][..n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        (m - 1) * lhs.rs + (k - 1) * lhs.cs < lhs.data.len(),
        "gemm lhs out of bounds"
    );
    assert!(
        (k - 1) * rhs.rs + (n - 1) * rhs.cs < rhs.data.len(),
        "gemm rhs out of bounds"
    );
    // SAFETY: bounds checked above; dst does not alias lhs/rhs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            acc,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

pub(crate) fn gemm_par(t: usize) -> Parallelism {
    if t > 1 {
        Parallelism::Rayon(t)
    } else {
        Parallelism::None
    }
}

/// Thread plan: (threads, parallelise over the batch instead of inside each GEMM).
pub(crate) fn plan(g: &Geom) -> (usize, bool) {
    // Inside the GEMM the split runs on rayon (the `gemm` crate's), not the spinning workers.
    let t = threads::for_flops(g.flops() / threads::RAYON_FLOP_FACTOR);
    if t <= 1 {
        (1, false)
    } else {
        (t, g.n >= t && (g.n.is_multiple_of(t) || g.n >= 4 * t))
    }
}

/// im2col of one group block `x [Cg, H, W]` into `col [Cg*KH*KW, OH*OW]`.
pub(crate) fn im2col(x: &[f32], g: &Geom, col: &mut [f32]) {
    im2col_ld(x, g, col, g.p());
}

/// [`im2col`] into rows of pitch `ld >= OH*OW` (a column block of a wider matrix).
pub(crate) fn im2col_ld(x: &[f32], g: &Geom, col: &mut [f32], ld: usize) {
    im2col_rows(x, g, col, ld, 0..g.oh);
}

/// The columns of output rows `rows` only: `col [Cg*KH*KW, rows.len()*OW]` at pitch `ld`.
pub(crate) fn im2col_rows(x: &[f32], g: &Geom, col: &mut [f32], ld: usize, rows: Range<usize>) {
    let hw = g.h * g.w;
    let (r0, r1) = (rows.start, rows.end);
    for c in 0..g.cg() {
        let xp = &x[c * hw..][..hw];
        for i in 0..g.kh {
            let offh = (i * g.dh) as isize - g.pt as isize;
            let (oh_lo, oh_hi) = valid_range(g.oh, g.h, g.sh, offh);
            let (v0, v1) = (oh_lo.clamp(r0, r1), oh_hi.clamp(r0, r1));
            for j in 0..g.kw {
                let offw = (j * g.dw) as isize - g.pl as isize;
                let (lo, hi) = valid_range(g.ow, g.w, g.sw, offw);
                let row = &mut col[((c * g.kh + i) * g.kw + j) * ld..][..(r1 - r0) * g.ow];
                row[..(v0 - r0) * g.ow].fill(0.0);
                row[(v1.max(v0) - r0) * g.ow..].fill(0.0);
                for oh in v0..v1 {
                    let ih = ((oh * g.sh) as isize + offh) as usize;
                    let xr = &xp[ih * g.w..][..g.w];
                    let dst = &mut row[(oh - r0) * g.ow..][..g.ow];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if g.sw == 1 {
                        let s = (lo as isize + offw) as usize;
                        dst[lo..hi].copy_from_slice(&xr[s..s + hi - lo]);
                    } else {
                        for (ow, d) in dst[lo..hi].iter_mut().enumerate() {
                            *d = xr[(((ow + lo) * g.sw) as isize + offw) as usize];
                        }
                    }
                }
            }
        }
    }
}

/// Pixel-major im2col of one group block `x [Cg, H, W]`: `colt [OH*OW, Cg*KH*KW]`, rows of
/// pitch `K`. The filter gradient reduces over pixels; with this layout both of its GEMM
/// operands are contiguous along the reduction, which `gemm` reads without a transposing
/// pack. (Packing the row-major `[K, P]` layout transposed cost 2.2 ns per element here,
/// 16% of a ResNet-20 training step.)
pub(crate) fn im2col_t(x: &[f32], g: &Geom, colt: &mut [f32]) {
    match (g.kw, g.dw) {
        (1, _) => im2col_t_fixed::<1>(x, g, colt),
        (3, 1) => im2col_t_fixed::<3>(x, g, colt),
        _ => im2col_t_generic(x, g, colt),
    }
}

/// Output columns `lo..hi` whose `kw` taps all fall inside an input row.
fn interior_cols(g: &Geom) -> (usize, usize) {
    let offw0 = -(g.pl as isize);
    let (a, _) = valid_range(g.ow, g.w, g.sw, offw0);
    let (_, b) = valid_range(g.ow, g.w, g.sw, ((g.kw - 1) * g.dw) as isize + offw0);
    (a, b.max(a))
}

/// The taps of output column `ow` (kernel row already chosen) with bounds checks.
#[inline(always)]
fn taps_checked(xr: &[f32], g: &Geom, ow: usize, dst: &mut [f32]) {
    let iw0 = (ow * g.sw) as isize - g.pl as isize;
    for (j, d) in dst.iter_mut().enumerate() {
        let iw = iw0 + (j * g.dw) as isize;
        *d = if iw >= 0 && iw < g.w as isize {
            xr[iw as usize]
        } else {
            0.0
        };
    }
}

/// [`im2col_t`] for kernel width `KW` with undilated columns (any stride, padding, height):
/// the interior taps are fixed-size copies the compiler unrolls.
fn im2col_t_fixed<const KW: usize>(x: &[f32], g: &Geom, colt: &mut [f32]) {
    let (k, hw, cg) = (g.k(), g.h * g.w, g.cg());
    debug_assert!(g.kw == KW && (KW == 1 || g.dw == 1));
    let (lo, hi) = interior_cols(g);
    for oh in 0..g.oh {
        let ih0 = (oh * g.sh) as isize - g.pt as isize;
        let rows = &mut colt[oh * g.ow * k..][..g.ow * k];
        for c in 0..cg {
            for i in 0..g.kh {
                let col0 = (c * g.kh + i) * KW;
                let ih = ih0 + (i * g.dh) as isize;
                if ih < 0 || ih >= g.h as isize {
                    for row in rows.chunks_exact_mut(k) {
                        row[col0..col0 + KW].fill(0.0);
                    }
                    continue;
                }
                let xr = &x[c * hw + ih as usize * g.w..][..g.w];
                for (ow, row) in rows.chunks_exact_mut(k).enumerate() {
                    let dst: &mut [f32; KW] =
                        (&mut row[col0..col0 + KW]).try_into().expect("KW taps");
                    if ow >= lo && ow < hi {
                        let s = ow * g.sw - g.pl;
                        let src: &[f32; KW] = xr[s..s + KW].try_into().expect("KW taps");
                        *dst = *src;
                    } else {
                        taps_checked(xr, g, ow, dst);
                    }
                }
            }
        }
    }
}

fn im2col_t_generic(x: &[f32], g: &Geom, colt: &mut [f32]) {
    let (k, hw, cg) = (g.k(), g.h * g.w, g.cg());
    for oh in 0..g.oh {
        let ih0 = (oh * g.sh) as isize - g.pt as isize;
        for ow in 0..g.ow {
            let row = &mut colt[(oh * g.ow + ow) * k..][..k];
            for c in 0..cg {
                let xp = &x[c * hw..][..hw];
                for i in 0..g.kh {
                    let dst = &mut row[(c * g.kh + i) * g.kw..][..g.kw];
                    let ih = ih0 + (i * g.dh) as isize;
                    if ih < 0 || ih >= g.h as isize {
                        dst.fill(0.0);
                    } else {
                        taps_checked(&xp[ih as usize * g.w..][..g.w], g, ow, dst);
                    }
                }
            }
        }
    }
}

/// Adjoint of [`im2col`]: `x [Cg, H, W] += col2im(col)`.
pub(crate) fn col2im_add(col: &[f32], g: &Geom, x: &mut [f32]) {
    let (hw, p) = (g.h * g.w, g.p());
    for c in 0..g.cg() {
        let xp = &mut x[c * hw..][..hw];
        for i in 0..g.kh {
            let offh = (i * g.dh) as isize - g.pt as isize;
            let (oh_lo, oh_hi) = valid_range(g.oh, g.h, g.sh, offh);
            for j in 0..g.kw {
                let offw = (j * g.dw) as isize - g.pl as isize;
                let (lo, hi) = valid_range(g.ow, g.w, g.sw, offw);
                let row = &col[((c * g.kh + i) * g.kw + j) * p..][..p];
                for oh in oh_lo..oh_hi {
                    let ih = ((oh * g.sh) as isize + offh) as usize;
                    let xr = &mut xp[ih * g.w..][..g.w];
                    let src = &row[oh * g.ow..][..g.ow];
                    if g.sw == 1 {
                        let s = (lo as isize + offw) as usize;
                        for (d, v) in xr[s..s + hi - lo].iter_mut().zip(&src[lo..hi]) {
                            *d += *v;
                        }
                    } else {
                        for (ow, v) in src[lo..hi].iter().enumerate() {
                            xr[(((ow + lo) * g.sw) as isize + offw) as usize] += *v;
                        }
                    }
                }
            }
        }
    }
}

/// Adds the bias and applies the activation on one image's output `[O, P]`.
pub(crate) fn epilogue(out: &mut [f32], bias: Option<&[f32]>, act: Activation, p: usize) {
    if bias.is_none() && act == Activation::None {
        return;
    }
    for (o, row) in out.chunks_exact_mut(p).enumerate() {
        let b = bias.map_or(0.0, |b| b[o]);
        match act {
            Activation::None => row.iter_mut().for_each(|v| *v += b),
            Activation::Relu => row.iter_mut().for_each(|v| *v = (*v + b).max(0.0)),
            Activation::Relu6 => row.iter_mut().for_each(|v| *v = (*v + b).clamp(0.0, 6.0)),
        }
    }
}

/// im2col matrices larger than this (f32 elements, 4 MB) are built and multiplied in bands
/// of output rows of about [`BAND_ELEMS`], so the band stays in L2 between the copy and the
/// GEMM instead of streaming through memory twice (ResNet-18's stem and 56x56 layers).
const BAND_THRESHOLD: usize = 1 << 20;
const BAND_ELEMS: usize = 1 << 18;

/// Output rows per im2col band, or `None` to build the whole matrix at once.
pub(crate) fn band_rows(g: &Geom) -> Option<usize> {
    let (k, p) = (g.k(), g.p());
    if g.groups != 1 || g.identity_1x1 || k * p <= BAND_THRESHOLD {
        return None;
    }
    let rows = (BAND_ELEMS / (k * g.ow).max(1)).max(1);
    (rows < g.oh).then_some(rows)
}

/// Col buffer length of one image's forward.
pub(crate) fn fwd_col_len(g: &Geom) -> usize {
    match band_rows(g) {
        _ if g.identity_1x1 => 0,
        Some(r) => g.k() * r * g.ow,
        None => g.k() * g.p(),
    }
}

fn fwd_image(x: &[f32], w: &[f32], out: &mut [f32], g: &Geom, par: Parallelism, col: &mut [f32]) {
    let (cg, og, k, p, hw) = (g.cg(), g.og(), g.k(), g.p(), g.h * g.w);
    if let Some(rows) = band_rows(g) {
        let mut r0 = 0;
        while r0 < g.oh {
            let r1 = (r0 + rows).min(g.oh);
            let cols = (r1 - r0) * g.ow;
            im2col_rows(x, g, col, cols, r0..r1);
            gemm_f32_ld(
                g.o,
                cols,
                k,
                &mut out[r0 * g.ow..],
                p,
                false,
                Mat {
                    data: w,
                    rs: k,
                    cs: 1,
                },
                Mat {
                    data: col,
                    rs: cols,
                    cs: 1,
                },
                par,
            );
            r0 = r1;
        }
        return;
    }
    for gi in 0..g.groups {
        let xg = &x[gi * cg * hw..][..cg * hw];
        let wg = &w[gi * og * k..][..og * k];
        let outg = &mut out[gi * og * p..][..og * p];
        let rhs: &[f32] = if g.identity_1x1 {
            xg
        } else {
            im2col(xg, g, col);
            &*col
        };
        gemm_f32(
            og,
            p,
            k,
            outg,
            false,
            Mat {
                data: wg,
                rs: k,
                cs: 1,
            },
            Mat {
                data: rhs,
                rs: p,
                cs: 1,
            },
            par,
        );
    }
}

fn bwd_data_image(
    go: &[f32],
    w: &[f32],
    gx: &mut [f32],
    g: &Geom,
    par: Parallelism,
    col: &mut [f32],
) {
    let (cg, og, k, p, hw) = (g.cg(), g.og(), g.k(), g.p(), g.h * g.w);
    for gi in 0..g.groups {
        let gog = &go[gi * og * p..][..og * p];
        let wg = &w[gi * og * k..][..og * k];
        let gxg = &mut gx[gi * cg * hw..][..cg * hw];
        // W_g^T [K, Og]
        let lhs = Mat {
            data: wg,
            rs: 1,
            cs: k,
        };
        let rhs = Mat {
            data: gog,
            rs: p,
            cs: 1,
        };
        if g.identity_1x1 {
            gemm_f32(k, p, og, gxg, false, lhs, rhs, par);
        } else {
            gemm_f32(k, p, og, col, false, lhs, rhs, par);
            col2im_add(col, g, gxg);
        }
    }
}

/// Grad-weight over `imgs`, `nb` images per GEMM (`groups == 1`):
/// `gw [O, K] += go_blk [O, nb*P] x colt_blk [nb*P, K]` (pixel-major im2col, see
/// [`im2col_t`]).
fn bwd_filter_blocks(
    x: &[f32],
    go: &[f32],
    imgs: Range<usize>,
    nb: usize,
    g: &Geom,
    par: Parallelism,
) -> Vec<f32> {
    let (k, p, in_img, out_img) = (g.k(), g.p(), g.in_img(), g.out_img());
    let mut gw = vec![0f32; g.o * k];
    let ld = pitch(nb * p);
    with_col(k * nb * p + g.o * ld, |buf| {
        let (colt, gob) = buf.split_at_mut(k * nb * p);
        let mut first = true;
        let mut i0 = imgs.start;
        while i0 < imgs.end {
            let m = nb.min(imgs.end - i0);
            let cols = m * p;
            for j in 0..m {
                let xi = &x[(i0 + j) * in_img..][..in_img];
                im2col_t(xi, g, &mut colt[j * p * k..][..p * k]);
                let goi = &go[(i0 + j) * out_img..][..out_img];
                for o in 0..g.o {
                    gob[o * ld + j * p..][..p].copy_from_slice(&goi[o * p..][..p]);
                }
            }
            gemm_f32(
                g.o,
                k,
                cols,
                &mut gw,
                !first,
                Mat {
                    data: gob,
                    rs: ld,
                    cs: 1,
                },
                Mat {
                    data: colt,
                    rs: k,
                    cs: 1,
                },
                par,
            );
            first = false;
            i0 += m;
        }
    });
    gw
}

fn bwd_filter_range(
    x: &[f32],
    go: &[f32],
    imgs: Range<usize>,
    g: &Geom,
    par: Parallelism,
) -> Vec<f32> {
    let nb = images_per_gemm(g, imgs.len());
    if nb > 1 {
        return bwd_filter_blocks(x, go, imgs, nb, g, par);
    }
    let (cg, og, k, p, hw) = (g.cg(), g.og(), g.k(), g.p(), g.h * g.w);
    let mut gw = vec![0f32; g.o * k];
    with_col(k * p, |colt| {
        for (j, i) in imgs.enumerate() {
            let xi = &x[i * g.in_img()..][..g.in_img()];
            let goi = &go[i * g.out_img()..][..g.out_img()];
            for gi in 0..g.groups {
                let xg = &xi[gi * cg * hw..][..cg * hw];
                let gog = &goi[gi * og * p..][..og * p];
                let gwg = &mut gw[gi * og * k..][..og * k];
                im2col_t(xg, g, colt);
                // gw_g [Og, K] += go_g [Og, P] x colt [P, K]
                gemm_f32(
                    og,
                    k,
                    p,
                    gwg,
                    j > 0,
                    Mat {
                        data: gog,
                        rs: p,
                        cs: 1,
                    },
                    Mat {
                        data: colt,
                        rs: k,
                        cs: 1,
                    },
                    par,
                );
            }
        }
    });
    gw
}

/// Row pitch (f32 elements) for a matrix of `cols` columns that `gemm` walks down: an odd
/// multiple of 16 floats (64 bytes). Pitches at or near a multiple of 4 KiB put every row
/// in the same few L1 sets; stacking 28x28 images (1,024 columns) or 7x7 ones (1,029)
/// did exactly that and the GEMM ran from L2.
fn pitch(cols: usize) -> usize {
    let lines = cols.div_ceil(16);
    16 * (lines | 1)
}

/// GEMM columns aimed at when several small images share one GEMM.
const TARGET_COLS: usize = 1024;
/// Upper bound on the shared im2col block (f32 elements, 512 KB): it must stay in L2 between
/// the copy and the GEMM, else stacking costs more memory traffic than it saves (measured:
/// 3 stacked 28x28 images, 1.35 MB, made a ResNet-20 training step slower).
const MAX_COL: usize = 1 << 17;

/// A 1x1 conv's input is its GEMM operand as it stands; stacking copies it. From this many
/// pixels per image on, one GEMM per image ran faster: Lite0's 4x4 maps (16 columns) at
/// batch 32, forward and grad-input, 0.9 -> 0.46 ms (480 -> 80 channels) and 1.8 -> 0.95 ms
/// (112 -> 672) per layer; 2x2 maps (4 columns) stay stacked.
const MIN_STACKED_1X1: usize = 16;

/// Images per GEMM: small feature maps (few output pixels) are stacked side by side into one
/// `[K, nb*P]` operand, so the GEMM has enough columns to fill its microkernel tiles and the
/// per-call overhead is paid once per block. `1` keeps one GEMM per image.
pub(crate) fn images_per_gemm(g: &Geom, per_worker: usize) -> usize {
    if g.groups != 1 || per_worker <= 1 || g.p() >= TARGET_COLS {
        return 1;
    }
    if g.identity_1x1 && g.p() >= MIN_STACKED_1X1 {
        return 1;
    }
    let by_cols = TARGET_COLS.div_ceil(g.p());
    let by_mem = (MAX_COL / (g.k() * g.p()).max(1)).max(1);
    by_cols.min(by_mem).min(per_worker).max(1)
}

/// Forward of `nb = out.len() / out_img` consecutive images in one GEMM.
fn fwd_block(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    g: &Geom,
    act: Activation,
    out: &mut [f32],
    par: Parallelism,
) {
    let (in_img, out_img, p, k) = (g.in_img(), g.out_img(), g.p(), g.k());
    let nb = out.len() / out_img;
    let cols = nb * p;
    let ld = pitch(cols);
    with_col(k * ld + g.o * ld, |buf| {
        let (col, tmp) = buf.split_at_mut(k * ld);
        for j in 0..nb {
            let xi = &x[j * in_img..][..in_img];
            if g.identity_1x1 {
                for c in 0..k {
                    col[c * ld + j * p..][..p].copy_from_slice(&xi[c * p..][..p]);
                }
            } else {
                im2col_ld(xi, g, &mut col[j * p..], ld);
            }
        }
        gemm_f32_ld(
            g.o,
            cols,
            k,
            tmp,
            ld,
            false,
            Mat {
                data: w,
                rs: k,
                cs: 1,
            },
            Mat {
                data: col,
                rs: ld,
                cs: 1,
            },
            par,
        );
        for (j, oi) in out.chunks_exact_mut(out_img).enumerate() {
            for (o, row) in oi.chunks_exact_mut(p).enumerate() {
                row.copy_from_slice(&tmp[o * ld + j * p..][..p]);
            }
            epilogue(oi, b, act, p);
        }
    });
}

/// Forward conv for groups that are not depthwise; `out` is `[N, O, OH, OW]`.
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    g: &Geom,
    act: Activation,
    out: &mut [f32],
) {
    let (t, batch_par) = plan(g);
    let per_worker = if batch_par { g.n.div_ceil(t) } else { g.n };
    let nb = images_per_gemm(g, per_worker);
    if nb > 1 {
        let (in_img, out_img) = (g.in_img(), g.out_img());
        let blk = |bi: usize, ob: &mut [f32], par: Parallelism| {
            fwd_block(&x[bi * nb * in_img..], w, b, g, act, ob, par);
        };
        if batch_par {
            // Whole blocks per worker (`for_each_item` hands out contiguous items).
            threads::for_each_item(out, nb * out_img, t, |bi, ob| {
                blk(bi, ob, Parallelism::None)
            });
        } else {
            let par = gemm_par(t);
            for (bi, ob) in out.chunks_mut(nb * out_img).enumerate() {
                blk(bi, ob, par);
            }
        }
        return;
    }
    let col_len = fwd_col_len(g);
    let (in_img, out_img, p) = (g.in_img(), g.out_img(), g.p());
    let work = |i: usize, oi: &mut [f32], par: Parallelism| {
        with_col(col_len, |col| {
            fwd_image(&x[i * in_img..][..in_img], w, oi, g, par, col)
        });
        epilogue(oi, b, act, p);
    };
    if batch_par {
        threads::for_each_item(out, out_img, t, |i, oi| work(i, oi, Parallelism::None));
    } else {
        let par = gemm_par(t);
        for (i, oi) in out.chunks_exact_mut(out_img).enumerate() {
            work(i, oi, par);
        }
    }
}

/// Gradient w.r.t. the input; `gx` (`[N, C, H, W]`) must be zero on entry.
pub(crate) fn backward_data(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32]) {
    let (t, batch_par) = plan(g);
    let col_len = if g.identity_1x1 { 0 } else { g.k() * g.p() };
    let (in_img, out_img) = (g.in_img(), g.out_img());
    let work = |i: usize, gxi: &mut [f32], par: Parallelism| {
        with_col(col_len, |col| {
            bwd_data_image(&go[i * out_img..][..out_img], w, gxi, g, par, col)
        });
    };
    if batch_par {
        threads::for_each_item(gx, in_img, t, |i, gxi| work(i, gxi, Parallelism::None));
    } else {
        let par = gemm_par(t);
        for (i, gxi) in gx.chunks_exact_mut(in_img).enumerate() {
            work(i, gxi, par);
        }
    }
}

/// Gradient w.r.t. the weight, `[O, Cg, KH, KW]`.
pub(crate) fn backward_filter(x: &[f32], go: &[f32], g: &Geom) -> Vec<f32> {
    let (t, batch_par) = plan(g);
    if batch_par {
        let mut parts =
            threads::map_ranges(g.n, t, |r| bwd_filter_range(x, go, r, g, Parallelism::None));
        let mut acc = parts.swap_remove(0);
        for part in parts {
            acc.iter_mut().zip(&part).for_each(|(a, b)| *a += *b);
        }
        acc
    } else {
        bwd_filter_range(x, go, 0..g.n, g, gemm_par(t))
    }
}
