//! Register-blocked depthwise forward for K×K kernels (K = 3 or 5), stride 1 or 2, no
//! dilation, any per-side padding (TF-SAME or symmetric), bias and activation fused.
//!
//! The approach of ONNX Runtime's direct depthwise kernels, on NCHW: all K*K taps of an
//! output vector accumulate in registers, and bias + activation are applied before the
//! single store. The older path ran one axpy pass over the whole output plane per tap.
//!
//! AVX2 + FMA: each plane is copied once into a zero-padded scratch (for stride 2 with its
//! even and odd columns split into two half rows, so every tap of every output lane is a
//! contiguous load), then each output row is computed 32 or 8 lanes at a time.
//!
//! AVX-512F: blocks of 4 output rows × 32 (or 16) lanes, each input vector loaded once per
//! block and used by every output row it feeds, 4-8 independent accumulator chains (one row
//! of one vector was a chain of K*K dependent multiply-adds: latency-bound on every map
//! narrower than 64 columns, 1.5-2.4x slower on Lite0's 28x28 / 14x14 / 7x7 layers).
//! Both strides read the input rows in place (lane masks stand in for the zero padding:
//! masked-off lanes are neither loaded nor counted; at stride 2 a tap's 16 lanes are the even
//! lanes of two loads, one permute, where a de-interleaved copy of each plane cost as much as
//! the taps: Lite0's 14x14 5x5/2 0.137 -> 0.078 ms). Small stride-1 maps whose row vectors
//! would be mostly empty (7x7 and smaller) run as one flat run of pixels instead, 16 per
//! vector across rows, with per-tap lane masks computed once per call ([`Plan`]).

use std::mem::MaybeUninit;

use crate::cpu::{has_avx2_fma, isa, Isa};
use crate::geom::Geom;
use crate::Activation;

/// Output lanes per AVX2 vector.
const L: usize = 8;
/// Output lanes per AVX-512 vector: the scratch rows are padded to a multiple of this, so
/// both widths' loads stay inside it.
const L16: usize = 16;
/// Output rows per AVX-512 block (see `avx512::block`).
const RB: usize = 4;

/// Whether this kernel handles `g` on this CPU.
pub(crate) fn supported(g: &Geom) -> bool {
    g.kh == g.kw
        && matches!(g.kh, 3 | 5)
        && g.sh == g.sw
        && matches!(g.sh, 1 | 2)
        && (g.dh, g.dw) == (1, 1)
        && has_avx2_fma()
}

/// Scratch geometry of one plane.
#[derive(Clone, Copy)]
struct Pad {
    /// Padded rows: `(OH - 1) * S + K`.
    hp: usize,
    /// Scratch row pitch: `Wp` for stride 1, `2 * half` for stride 2.
    rp: usize,
    /// Stride 2: length of each of the even / odd half rows.
    half: usize,
}

impl Pad {
    fn new(g: &Geom) -> Self {
        let (k, s) = (g.kh, g.sh);
        let owr = g.ow.div_ceil(L16) * L16;
        let hp = (g.oh - 1) * s + k;
        if s == 1 {
            Self {
                hp,
                rp: owr + k - 1,
                half: 0,
            }
        } else {
            let half = owr + (k - 1) / 2;
            Self {
                hp,
                rp: 2 * half,
                half,
            }
        }
    }
}

/// Scratch elements one plane needs (padded plane plus, for stride 2, one padded row).
pub(crate) fn scratch_len(g: &Geom) -> usize {
    let p = Pad::new(g);
    p.hp * p.rp + if g.sh == 2 { p.rp } else { 0 }
}

/// Copies `x [H, W]` into the zero-padded scratch (stride 2: de-interleaved columns).
fn fill(x: &[f32], g: &Geom, p: &Pad, buf: &mut [f32]) {
    let (plane, tmp) = buf.split_at_mut(p.hp * p.rp);
    let pl = g.pl.min(p.rp);
    for r in 0..p.hp {
        let ih = r as isize - g.pt as isize;
        let dst: &mut [f32] = if g.sh == 1 {
            &mut plane[r * p.rp..][..p.rp]
        } else {
            &mut tmp[..p.rp]
        };
        if ih < 0 || ih >= g.h as isize {
            dst.fill(0.0);
        } else {
            let n = g.w.min(p.rp - pl);
            dst[..pl].fill(0.0);
            dst[pl..pl + n].copy_from_slice(&x[ih as usize * g.w..][..n]);
            dst[pl + n..].fill(0.0);
        }
        if g.sh == 2 {
            let (even, odd) = plane[r * p.rp..][..p.rp].split_at_mut(p.half);
            for ((e, o), pair) in even.iter_mut().zip(odd).zip(tmp.chunks_exact(2)) {
                *e = pair[0];
                *o = pair[1];
            }
        }
    }
}

/// What every plane of one depthwise call shares, computed once per call ([`Plan::new`]).
pub(crate) struct Plan {
    /// Small stride-1 "same" maps on AVX-512: per 16-pixel vector of the flattened plane, the
    /// lanes each tap loads (see `avx512::plane_flat`); empty: the row-blocked kernel.
    flat: Vec<[u16; 25]>,
    /// Flat form: tap `i * K + j`'s offset from the output pixel to its input pixel.
    flat_off: [isize; 25],
    /// Row-block form: the column blocks of an output row.
    cols: Vec<ColBlock>,
}

/// One column block of the AVX-512 row-block kernel: output columns `o .. o + 16 nv`, tap
/// column `j` read from its input row at `col[j]`; stride 1: lanes `m[j][q]` of vector `q`,
/// stride 2: lanes `m[j][2 q + h]` of the two loads (16 `h` apart) whose even lanes make
/// vector `q`.
#[derive(Clone, Copy)]
pub(crate) struct ColBlock {
    o: usize,
    nv: usize,
    col: [isize; 5],
    m: [[u16; 4]; 5],
}

/// Mask of lanes `lo..hi` (clamped to `0..16`).
fn range_mask(lo: isize, hi: isize) -> u16 {
    let (lo, hi) = (lo.clamp(0, 16) as u32, hi.clamp(0, 16) as u32);
    if hi <= lo {
        0
    } else {
        (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16
    }
}

/// The column blocks of `g`'s output rows: 32 lanes, the last 16 when at most 16 remain.
/// The input is read in place, lanes whose column lies outside `0..W` masked off (the zero
/// padding).
fn col_blocks(g: &Geom) -> Vec<ColBlock> {
    let mut out = Vec::new();
    let mut o = 0;
    while o < g.ow {
        let nv = if g.ow - o > L16 { 2 } else { 1 };
        let mut b = ColBlock {
            o,
            nv,
            col: [0; 5],
            m: [[0; 4]; 5],
        };
        for j in 0..g.kw {
            let s = (o * g.sw) as isize + j as isize - g.pl as isize;
            b.col[j] = s;
            // Stride 1: one load of 16 per vector; stride 2: two (32 columns, even lanes).
            let loads = if g.sw == 1 { nv } else { 2 * nv };
            for (l, ml) in b.m[j].iter_mut().enumerate().take(loads) {
                let s = s + (l * L16) as isize;
                *ml = range_mask(-s, g.w as isize - s);
            }
        }
        out.push(b);
        o += nv * L16;
    }
    out
}

impl Plan {
    pub(crate) fn new(g: &Geom) -> Self {
        let mut flat_off = [0isize; 25];
        for (t, o) in flat_off.iter_mut().enumerate().take(g.kh * g.kw) {
            let (i, j) = ((t / g.kw) as isize, (t % g.kw) as isize);
            *o = (i - g.pt as isize) * g.w as isize + j - g.pl as isize;
        }
        let flat = if flat_wins(g) {
            flat_masks(g)
        } else {
            Vec::new()
        };
        Self {
            flat,
            flat_off,
            cols: col_blocks(g),
        }
    }
}

/// Whether a plane runs as one flat run of pixels (16 per vector, rows back to back) instead
/// of row blocks (16 lanes of one row per vector): stride 1 with the output the input's size
/// (every tap one constant offset in the flattened plane), on AVX-512, when rows blocks would
/// run at least 1.5 times the vectors (7x7: 4 flat vectors instead of 8 of 7 lanes; 14x14:
/// 13 instead of 16, not worth the per-tap masks).
fn flat_wins(g: &Geom) -> bool {
    let blocked = g.oh.div_ceil(RB) * RB * g.ow.div_ceil(L16);
    isa() == Isa::Avx512
        && g.sh == 1
        && (g.oh, g.ow) == (g.h, g.w)
        && 3 * g.p().div_ceil(L16) <= 2 * blocked
}

/// Per flat vector `v` (pixels `16 v ..`) and tap `i * K + j`: the lanes whose output pixel
/// exists and whose input pixel lies inside the plane (the others are the zero padding).
fn flat_masks(g: &Geom) -> Vec<[u16; 25]> {
    let (h, w, k) = (g.h as isize, g.w as isize, g.kh);
    (0..g.p().div_ceil(L16))
        .map(|v| {
            let mut m = [0u16; 25];
            for (t, mt) in m.iter_mut().enumerate().take(k * k) {
                let (i, j) = ((t / k) as isize, (t % k) as isize);
                for l in 0..L16 {
                    let f = v * L16 + l;
                    let (oh, ow) = ((f / g.w) as isize, (f % g.w) as isize);
                    let (ih, iw) = (oh + i - g.pt as isize, ow + j - g.pl as isize);
                    if f < g.p() && (0..h).contains(&ih) && (0..w).contains(&iw) {
                        *mt |= 1 << l;
                    }
                }
            }
            m
        })
        .collect()
}

/// Forward of one plane: `out [OH, OW] = act(b + dwconv(x [H, W], w [K, K]))`, every element
/// written (`out` need not be initialised); `plan` is [`Plan::new`] of `g`, `buf` has
/// [`scratch_len`] elements. Only call when [`supported`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn fwd_plane(
    x: &[f32],
    w: &[f32],
    b: f32,
    act: Activation,
    g: &Geom,
    plan: &Plan,
    out: &mut [MaybeUninit<f32>],
    buf: &mut [f32],
) {
    fwd_plane_with(x, w, b, act, g, plan, out, buf, isa());
}

/// [`fwd_plane`] of planes `planes` (of `[N * C]`): `x` and `out` hold them back to back
/// from plane `planes.start`, whose channel is its index mod `C`. One call (one scratch, one
/// worker closure) per run of planes instead of per plane: on a 7x7 plane the taps take
/// tens of nanoseconds (Lite0's last depthwise, 1152 x 7x7 3x3: 0.049 -> 0.040 ms).
#[allow(clippy::too_many_arguments)]
pub(crate) fn fwd_planes(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    act: Activation,
    g: &Geom,
    plan: &Plan,
    planes: std::ops::Range<usize>,
    out: &mut [MaybeUninit<f32>],
    buf: &mut [f32],
) {
    let (hw, p, kk) = (g.h * g.w, g.p(), g.kh * g.kw);
    let n = planes.len();
    assert!(x.len() >= n * hw && out.len() >= n * p && w.len() >= g.c * kk);
    assert!(b.is_none_or(|b| b.len() >= g.c));
    for (k, pi) in planes.enumerate() {
        let c = pi % g.c;
        let bv = b.map_or(0.0, |b| b[c]);
        let (xp, wc) = (&x[k * hw..][..hw], &w[c * kk..][..kk]);
        fwd_plane(xp, wc, bv, act, g, plan, &mut out[k * p..][..p], buf);
    }
}

/// [`fwd_plane`] on the kernel of `level` (AVX2 or AVX-512, at most [`isa`]).
#[allow(clippy::too_many_arguments)]
fn fwd_plane_with(
    x: &[f32],
    w: &[f32],
    b: f32,
    act: Activation,
    g: &Geom,
    plan: &Plan,
    out: &mut [MaybeUninit<f32>],
    buf: &mut [f32],
    level: Isa,
) {
    assert!(supported(g) && buf.len() >= scratch_len(g) && out.len() >= g.p());
    assert!(level >= Isa::Avx2 && level <= isa());
    assert!(x.len() >= g.h * g.w);
    let p = Pad::new(g);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` checked avx512f; `plane` and `plane_flat` bound their loads by the
    // plan's masks.
    if level == Isa::Avx512 {
        unsafe {
            if !plan.flat.is_empty() {
                // The plan is `g`'s (its masks cover exactly the plane's vectors).
                assert!(plan.flat.len() == g.p().div_ceil(L16) && g.sh == 1);
                let (m, off) = (&plan.flat[..], &plan.flat_off);
                match g.kh {
                    3 => avx512::plane_flat::<3>(x, w, b, act, g, m, off, out),
                    _ => avx512::plane_flat::<5>(x, w, b, act, g, m, off, out),
                }
                return;
            }
            let cols = &plan.cols;
            match (g.kh, g.sh) {
                (3, 1) => avx512::plane::<3, 1>(x, w, b, act, g, cols, out),
                (5, 1) => avx512::plane::<5, 1>(x, w, b, act, g, cols, out),
                (3, _) => avx512::plane::<3, 2>(x, w, b, act, g, cols, out),
                _ => avx512::plane::<5, 2>(x, w, b, act, g, cols, out),
            }
        }
        return;
    }
    fill(x, g, &p, buf);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` checked avx2 + fma; the scratch bounds every load (see `Pad`).
    unsafe {
        match (g.kh, g.sh) {
            (3, 1) => avx::rows::<3, 1>(w, b, act, g, &p, out, buf),
            (3, 2) => avx::rows::<3, 2>(w, b, act, g, &p, out, buf),
            (5, 1) => avx::rows::<5, 1>(w, b, act, g, &p, out, buf),
            _ => avx::rows::<5, 2>(w, b, act, g, &p, out, buf),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use std::mem::MaybeUninit;

    use super::{Pad, L};
    use crate::geom::Geom;
    use crate::Activation;

    #[inline(always)]
    unsafe fn activate(v: __m256, act: Activation) -> __m256 {
        // SAFETY: callers run with avx2 enabled.
        unsafe {
            match act {
                Activation::None => v,
                Activation::Relu => _mm256_max_ps(v, _mm256_setzero_ps()),
                Activation::Relu6 => {
                    _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(6.0))
                }
            }
        }
    }

    /// `NV` vectors of output lanes starting at scratch pointer `base` (tap offsets `off`).
    #[inline(always)]
    unsafe fn lanes<const NV: usize, const KK: usize>(
        base: *const f32,
        off: &[usize; 25],
        wv: &[f32],
        b: __m256,
    ) -> [__m256; NV] {
        // SAFETY: callers run with avx2 + fma and keep every tap load inside the scratch.
        unsafe {
            let mut acc = [b; NV];
            for (&o, &w) in off[..KK].iter().zip(&wv[..KK]) {
                let wt = _mm256_set1_ps(w);
                let src = base.add(o);
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(src.add(q * L)), wt, *a);
                }
            }
            acc
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows<const K: usize, const S: usize>(
        w: &[f32],
        b: f32,
        act: Activation,
        g: &Geom,
        p: &Pad,
        out: &mut [MaybeUninit<f32>],
        buf: &[f32],
    ) {
        assert!(w.len() >= K * K);
        // SAFETY: loads stay inside the scratch (see `Pad`), stores inside `out` rows.
        unsafe {
            let mut off = [0usize; 25];
            for i in 0..K {
                for j in 0..K {
                    let col = if S == 1 { j } else { (j & 1) * p.half + j / 2 };
                    off[i * K + j] = i * p.rp + col;
                }
            }
            let bv = _mm256_set1_ps(b);
            let ow = g.ow;
            for oh in 0..g.oh {
                let row = buf.as_ptr().add(oh * S * p.rp);
                let dst = out.as_mut_ptr().cast::<f32>().add(oh * ow);
                let mut o = 0;
                while o + 4 * L <= ow {
                    let acc = if K == 3 {
                        lanes::<4, 9>(row.add(o), &off, w, bv)
                    } else {
                        lanes::<4, 25>(row.add(o), &off, w, bv)
                    };
                    for (q, a) in acc.iter().enumerate() {
                        _mm256_storeu_ps(dst.add(o + q * L), activate(*a, act));
                    }
                    o += 4 * L;
                }
                while o < ow {
                    let [a] = if K == 3 {
                        lanes::<1, 9>(row.add(o), &off, w, bv)
                    } else {
                        lanes::<1, 25>(row.add(o), &off, w, bv)
                    };
                    let a = activate(a, act);
                    if o + L <= ow {
                        _mm256_storeu_ps(dst.add(o), a);
                    } else {
                        let mut tmp = [0f32; L];
                        _mm256_storeu_ps(tmp.as_mut_ptr(), a);
                        std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst.add(o), ow - o);
                    }
                    o += L;
                }
            }
        }
    }
}

/// [`avx`] with 16-lane vectors: 64 output lanes per step, then one vector at a time, the
/// last under a lane mask (loads may run past `OW` inside the padded scratch row).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use std::mem::MaybeUninit;

    use super::{ColBlock, L16, RB};
    use crate::geom::Geom;
    use crate::Activation;

    #[inline(always)]
    unsafe fn activate(v: __m512, act: Activation) -> __m512 {
        // SAFETY: callers run with avx512f enabled.
        unsafe {
            match act {
                Activation::None => v,
                Activation::Relu => _mm512_max_ps(v, _mm512_setzero_ps()),
                Activation::Relu6 => {
                    _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), _mm512_set1_ps(6.0))
                }
            }
        }
    }

    /// Input rows one block of [`RB`] output rows reads: `(RB - 1) * S + K` (11 at most).
    const TR: usize = 11;

    /// Tap row `T` of a block: input row `rows[T]` (null: zero padding, skipped) feeds
    /// output row `r` of the block through kernel row `T - r * S`; each of its `K` column
    /// vectors (from `col[j]`, lanes `m[j]`, see `ColBlock`) is shared by those rows. At
    /// stride 2 a vector is the even lanes of two loads, one permute, so the input is read
    /// in place (a de-interleaved copy of each plane cost as much as the taps).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tap_row<const K: usize, const S: usize, const NV: usize, const T: usize>(
        rows: &[*const f32; TR],
        col: &[isize; 5],
        m: &[[__mmask16; 4]; 5],
        w: &[f32],
        acc: &mut [[__m512; NV]; RB],
    ) {
        // SAFETY: callers run with avx512f; non-null rows with masks `m` keep every loaded
        // lane inside its row; `w` has `K * K` taps.
        unsafe {
            if T >= (RB - 1) * S + K {
                return;
            }
            let rp = rows[T];
            if rp.is_null() {
                return;
            }
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            for j in 0..K {
                let mut v = [_mm512_setzero_ps(); NV];
                for q in 0..NV {
                    v[q] = if S == 1 {
                        let at = col[j] + (q * L16) as isize;
                        _mm512_maskz_loadu_ps(m[j][q], rp.wrapping_offset(at))
                    } else {
                        let at = col[j] + (2 * q * L16) as isize;
                        let a = _mm512_maskz_loadu_ps(m[j][2 * q], rp.wrapping_offset(at));
                        let at = at + L16 as isize;
                        let b = _mm512_maskz_loadu_ps(m[j][2 * q + 1], rp.wrapping_offset(at));
                        _mm512_permutex2var_ps(a, even, b)
                    };
                }
                for r in 0..RB {
                    if T >= r * S && T - r * S < K {
                        let wt = _mm512_set1_ps(*w.get_unchecked((T - r * S) * K + j));
                        for q in 0..NV {
                            acc[r][q] = _mm512_fmadd_ps(v[q], wt, acc[r][q]);
                        }
                    }
                }
            }
        }
    }

    /// [`RB`] output rows × `NV` vectors at one column block, every tap in registers: each
    /// input vector is loaded once per block and used by every output row it feeds (up to
    /// `K` for stride 1), and the `RB * NV` accumulators are independent chains (one row of
    /// one vector was a chain of `K * K` dependent multiply-adds).
    #[inline(always)]
    unsafe fn block<const K: usize, const S: usize, const NV: usize>(
        rows: &[*const f32; TR],
        col: &[isize; 5],
        m: &[[__mmask16; 4]; 5],
        w: &[f32],
        b: __m512,
    ) -> [[__m512; NV]; RB] {
        // SAFETY: see `tap_row`.
        unsafe {
            let mut acc = [[b; NV]; RB];
            macro_rules! taps {
                ($($t:literal)*) => {
                    $(tap_row::<K, S, NV, $t>(rows, col, m, w, &mut acc);)*
                };
            }
            taps!(0 1 2 3 4 5 6 7 8 9 10);
            acc
        }
    }

    /// `K×K` depthwise of one plane at stride `S` into `out [OH, OW]`: blocks of [`RB`]
    /// output rows (rows past `OH` computed from padding and not stored) by the column blocks
    /// `cols` (`super::col_blocks` of `g`, computed once per call), every store under the
    /// `OW` lane mask.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn plane<const K: usize, const S: usize>(
        x: &[f32],
        w: &[f32],
        b: f32,
        act: Activation,
        g: &Geom,
        cols: &[ColBlock],
        out: &mut [MaybeUninit<f32>],
    ) {
        assert!(w.len() >= K * K && out.len() >= g.oh * g.ow);
        assert!((RB - 1) * S + K <= TR);
        assert!(cols.last().is_some_and(|c| c.o + c.nv * L16 >= g.ow));
        assert!(x.len() >= g.h * g.w && g.sh == S);
        // The input row of tap row 0 of output row 0.
        let (base, n_rows, pitch, first) = (x.as_ptr(), g.h, g.w, -(g.pt as isize));
        let ow = g.ow;
        // SAFETY: row pointers are rows `0..n_rows` of the input; the column blocks' masks
        // keep loads inside them; stores lie in output rows `< OH`, masked to `OW`.
        unsafe {
            let bv = _mm512_set1_ps(b);
            let mut oh0 = 0;
            while oh0 < g.oh {
                let mut rows = [std::ptr::null::<f32>(); TR];
                for (t, r) in rows.iter_mut().enumerate().take((RB - 1) * S + K) {
                    let ih = (oh0 * S + t) as isize + first;
                    if ih >= 0 && (ih as usize) < n_rows {
                        *r = base.add(ih as usize * pitch);
                    }
                }
                let nr = RB.min(g.oh - oh0);
                for cb in cols {
                    let o = cb.o;
                    let mut store = |r: usize, q: usize, v: __m512| {
                        let at = (oh0 + r) * ow + o + q * L16;
                        let lanes = crate::pointwise::lane_mask(ow - o - q * L16);
                        let p = out.as_mut_ptr().cast::<f32>().add(at);
                        _mm512_mask_storeu_ps(p, lanes, activate(v, act));
                    };
                    if cb.nv == 2 {
                        let acc = block::<K, S, 2>(&rows, &cb.col, &cb.m, w, bv);
                        for (r, a) in acc.iter().enumerate().take(nr) {
                            store(r, 0, a[0]);
                            store(r, 1, a[1]);
                        }
                    } else {
                        let acc = block::<K, S, 1>(&rows, &cb.col, &cb.m, w, bv);
                        for (r, a) in acc.iter().enumerate().take(nr) {
                            store(r, 0, a[0]);
                        }
                    }
                }
                oh0 += RB;
            }
        }
    }

    /// `G` flat vectors (pixels `16 v0 ..` of the flattened plane): every tap is the input at
    /// one constant offset from the output pixel, its lanes `masks[v][tap]`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn flat_group<const K: usize, const G: usize>(
        x: *const f32,
        off: &[isize; 25],
        masks: &[[u16; 25]],
        v0: usize,
        w: &[f32],
        b: __m512,
    ) -> [__m512; G] {
        // SAFETY: callers run with avx512f; masked-off lanes are not accessed and the others
        // lie inside the plane (`flat_masks`); `masks` has `v0 + G` entries.
        unsafe {
            let mut acc = [b; G];
            for t in 0..K * K {
                let wt = _mm512_set1_ps(*w.get_unchecked(t));
                for (q, a) in acc.iter_mut().enumerate() {
                    let v = v0 + q;
                    let m = masks.get_unchecked(v)[t];
                    let src = x.wrapping_offset((v * L16) as isize + off[t]);
                    *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, src), wt, *a);
                }
            }
            acc
        }
    }

    /// Stride-1 `K×K` depthwise of a small "same" plane as one flat run of pixels (see
    /// `super::flat_wins`): up to 4 vectors at a time, stored under the plane's lane mask.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn plane_flat<const K: usize>(
        x: &[f32],
        w: &[f32],
        b: f32,
        act: Activation,
        g: &Geom,
        masks: &[[u16; 25]],
        off: &[isize; 25],
        out: &mut [MaybeUninit<f32>],
    ) {
        let p = g.p();
        assert!(w.len() >= K * K && x.len() >= p && out.len() >= p);
        assert!(masks.len() == p.div_ceil(L16));
        // SAFETY: see `flat_group`; stores lie in `out`'s first `p` elements (masked).
        unsafe {
            let bv = _mm512_set1_ps(b);
            let (xp, op) = (x.as_ptr(), out.as_mut_ptr().cast::<f32>());
            let store = |v: usize, a: __m512| {
                let m = crate::pointwise::lane_mask(p - v * L16);
                _mm512_mask_storeu_ps(op.add(v * L16), m, activate(a, act));
            };
            let mut v0 = 0;
            while v0 < masks.len() {
                let n = (masks.len() - v0).min(4);
                macro_rules! run {
                    ($g:literal) => {
                        for (q, a) in flat_group::<K, $g>(xp, off, masks, v0, w, bv)
                            .into_iter()
                            .enumerate()
                        {
                            store(v0 + q, a);
                        }
                    };
                }
                match n {
                    4 => run!(4),
                    3 => run!(3),
                    2 => run!(2),
                    _ => run!(1),
                }
                v0 += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Conv2dParams;

    /// The AVX-512 rows agree with the AVX2 rows (the tests against candle run only the
    /// widest this CPU has).
    #[test]
    fn levels_agree() {
        if isa() < Isa::Avx512 {
            return;
        }
        let mut seed = 9u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect()
        };
        for (h, w, k, s) in [
            (7, 7, 3, 1),
            (14, 14, 5, 2),
            (9, 70, 3, 2),
            (5, 33, 5, 1),
            (1, 1, 3, 1),
            (6, 100, 3, 1),
            (4, 90, 5, 1),
            (3, 112, 3, 2),
        ] {
            let pad = Conv2dParams::same((h, w), (k, k), (s, s)).padding;
            let p = Conv2dParams {
                stride: (s, s),
                padding: pad,
                dilation: (1, 1),
                groups: 1,
            };
            let g = Geom::new((1, 1, h, w), (1, 1, k, k), &p).unwrap();
            let (x, wt) = (rnd(h * w), rnd(k * k));
            let run = |level: Isa| {
                let mut out = vec![MaybeUninit::new(f32::NAN); g.p() + 16];
                let mut buf = vec![0f32; scratch_len(&g)];
                // AVX2 has no flat form: the AVX-512 run takes it where it applies.
                let plan = Plan::new(&g);
                fwd_plane_with(
                    &x,
                    &wt,
                    0.25,
                    Activation::Relu6,
                    &g,
                    &plan,
                    &mut out,
                    &mut buf,
                    level,
                );
                // SAFETY: initialised to NaN above.
                out.iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<f32>>()
            };
            let (a, b) = (run(Isa::Avx2), run(Isa::Avx512));
            assert!(a[..g.p()].iter().all(|v| v.is_finite()));
            assert!(
                b[g.p()..].iter().all(|v| v.is_nan()),
                "stored past the plane"
            );
            for (i, (p, q)) in a[..g.p()].iter().zip(&b).enumerate() {
                assert!((p - q).abs() <= 1e-5, "{h}x{w} k{k} s{s} [{i}] {p} vs {q}");
            }
        }
    }
}
