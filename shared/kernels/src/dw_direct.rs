//! Register-blocked depthwise forward for K×K kernels (K = 3 or 5), stride 1 or 2, no
//! dilation, any per-side padding (TF-SAME or symmetric), bias and activation fused.
//!
//! The approach of ONNX Runtime's direct depthwise kernels, on NCHW: all K*K taps of an
//! output vector accumulate in registers, and bias + activation are applied before the
//! single store. The older path ran one axpy pass over the whole output plane per tap.
//!
//! AVX2 + FMA: blocks of up to 4 output rows × 2 vectors of 8 lanes, read in place like the
//! AVX-512 form below: each input vector loaded once per block and used by every output row it
//! feeds, 8 independent accumulator chains. Plain loads in interior column blocks; blocks
//! whose loads would leave the input row use `maskload` (masked lanes are not accessed: the
//! zero padding). A partial last vector is moved left to end at `OW` (no masked store);
//! stride 2 takes a tap's 8 lanes as the even (the next tap: odd) lanes of two loads, one
//! `shuffle_ps`, the lane order restored once per output vector at the store. This replaced
//! one output row of 32 lanes at a time on a zero-padded copy of every plane (stride 2:
//! de-interleaved by a scalar loop that cost more than the taps); Lite0's shapes at 1 thread
//! on Zen 3, GMAC/s before -> after: 112x112 3x3/1 9.3 -> 13, 3x3/2 1.3 -> 6.5; 56x56 3x3/1
//! 7.0 -> 12, 5x5/2 3.4 -> 10; 28x28 5x5/1 6.5 -> 14, 3x3/2 1.1 -> 6.3; 14x14 3x3/1 3.2 ->
//! 9.6, 5x5/1 4.6 -> 14, 5x5/2 1.1 -> 6.4; 7x7 5x5/1 4.1 -> 9.3, 3x3/1 2.7 -> 5.5.
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
/// Output lanes per AVX-512 vector.
const L16: usize = 16;
/// Output rows per block (see `avx512::block`, `avx::block`).
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

/// Most 8-lane vectors in one AVX2 column block.
const NVX: usize = 2;
/// Most loads one AVX2 output vector makes per input row: `K` at stride 1, `2 ceil(K / 2)`
/// at stride 2.
const LOADS: usize = 6;

/// One column block of the AVX2 kernel: `nv` output vectors of 8 lanes, vector `q` at output
/// column `o[q]` and reading input columns from `c[q] = o[q] * S - pl`. Stride 1: tap column
/// `j` is one load at `c[q] + j`; stride 2: tap columns `jj` and `jj + 1` (`jj` even) are
/// the even and odd lanes of two loads at `c[q] + jj` and `c[q] + jj + 8`. `masked`: some
/// load would leave the input row, so every load of the block runs under `m[q][l]` (lanes
/// whose column lies outside `0..W` are not accessed: the zero padding); else plain loads.
#[derive(Clone, Copy)]
pub(crate) struct AvxBlock {
    nv: usize,
    o: [usize; NVX],
    c: [isize; NVX],
    masked: bool,
    m: [[[i32; L]; LOADS]; NVX],
}

/// One AVX2 output vector: its column, input column, whether it needs masks, and its masks.
type AvxVec = (usize, isize, bool, [[i32; L]; LOADS]);

/// The column blocks of `g`'s output rows on AVX2. Vectors start every 8 columns; a last
/// partial vector is moved left to end at `OW` (it recomputes a few columns and stores them
/// again: no masked store, slow on AMD), and maps narrower than 8 have one vector whose
/// extra lanes spill into the next rows before those are written. Vectors that need masks are
/// grouped apart from those that do not, so interior blocks use plain loads.
fn avx_blocks(g: &Geom) -> Vec<AvxBlock> {
    let (k, s, w) = (g.kw, g.sw, g.w as isize);
    let mut starts: Vec<usize> = (0..g.ow / L).map(|v| v * L).collect();
    if !g.ow.is_multiple_of(L) {
        starts.push(g.ow.saturating_sub(L));
    }
    let loads: Vec<isize> = if s == 1 {
        (0..k as isize).collect()
    } else {
        (0..k.div_ceil(2) as isize)
            .flat_map(|p| [2 * p, 2 * p + L as isize])
            .collect()
    };
    let vecs: Vec<AvxVec> = starts
        .into_iter()
        .map(|o| {
            let c = (o * s) as isize - g.pl as isize;
            let mut m = [[0i32; L]; LOADS];
            let mut masked = false;
            for (ml, &d) in m.iter_mut().zip(&loads) {
                for (lane, v) in ml.iter_mut().enumerate() {
                    let col = c + d + lane as isize;
                    let inside = (0..w).contains(&col);
                    *v = if inside { -1 } else { 0 };
                    masked |= !inside;
                }
            }
            (o, c, masked, m)
        })
        .collect();
    let mut out = Vec::new();
    for want in [true, false] {
        let group: Vec<&AvxVec> = vecs.iter().filter(|v| v.2 == want).collect();
        for chunk in group.chunks(NVX) {
            let mut b = AvxBlock {
                nv: chunk.len(),
                o: [0; NVX],
                c: [0; NVX],
                masked: want,
                m: [[[0; L]; LOADS]; NVX],
            };
            for (q, v) in chunk.iter().enumerate() {
                (b.o[q], b.c[q], b.m[q]) = (v.0, v.1, v.3);
            }
            out.push(b);
        }
    }
    out
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
    /// AVX2: the column blocks of an output row.
    avx: Vec<AvxBlock>,
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
            avx: avx_blocks(g),
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
/// written (`out` need not be initialised); `plan` is [`Plan::new`] of `g`. Only call when
/// [`supported`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn fwd_plane(
    x: &[f32],
    w: &[f32],
    b: f32,
    act: Activation,
    g: &Geom,
    plan: &Plan,
    out: &mut [MaybeUninit<f32>],
) {
    fwd_plane_with(x, w, b, act, g, plan, out, isa());
}

/// [`fwd_plane`] of planes `planes` (of `[N * C]`): `x` and `out` hold them back to back
/// from plane `planes.start`, whose channel is its index mod `C`. One call (one worker
/// closure) per run of planes instead of per plane: on a 7x7 plane the taps take tens of
/// nanoseconds (Lite0's last depthwise, 1152 x 7x7 3x3: 0.049 -> 0.040 ms).
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
) {
    let (hw, p, kk) = (g.h * g.w, g.p(), g.kh * g.kw);
    let n = planes.len();
    assert!(x.len() >= n * hw && out.len() >= n * p && w.len() >= g.c * kk);
    assert!(b.is_none_or(|b| b.len() >= g.c));
    for (k, pi) in planes.enumerate() {
        let c = pi % g.c;
        let bv = b.map_or(0.0, |b| b[c]);
        let (xp, wc) = (&x[k * hw..][..hw], &w[c * kk..][..kk]);
        fwd_plane(xp, wc, bv, act, g, plan, &mut out[k * p..][..p]);
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
    level: Isa,
) {
    assert!(supported(g) && out.len() >= g.p());
    assert!(level >= Isa::Avx2 && level <= isa());
    assert!(x.len() >= g.h * g.w);
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
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` checked avx2 + fma; the plan's blocks bound every load (plain loads
    // only where the whole vector lies inside the row, see `avx_blocks`).
    unsafe {
        let blocks = &plan.avx;
        match (g.kh, g.sh) {
            (3, 1) => avx::plane::<3, 1>(x, w, b, act, g, blocks, out),
            (3, _) => avx::plane::<3, 2>(x, w, b, act, g, blocks, out),
            (5, 1) => avx::plane::<5, 1>(x, w, b, act, g, blocks, out),
            _ => avx::plane::<5, 2>(x, w, b, act, g, blocks, out),
        }
    };
}

/// AVX2 + FMA: blocks of up to [`RB`] output rows × 2 vectors of 8 lanes, read in place.
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use std::mem::MaybeUninit;

    use super::{AvxBlock, L, RB};
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

    /// Input rows one block of [`RB`] output rows reads: `(RB - 1) * S + K` (11 at most).
    const TR: usize = 11;

    /// 8 floats at `p`: under the lane mask `m` when `M` (masked-off lanes are not accessed),
    /// else a plain load.
    #[inline(always)]
    unsafe fn load<const M: bool>(p: *const f32, m: &[i32; L]) -> __m256 {
        // SAFETY: callers run with avx2 and keep the accessed lanes inside the input.
        unsafe {
            if M {
                _mm256_maskload_ps(p, _mm256_loadu_si256(m.as_ptr().cast()))
            } else {
                _mm256_loadu_ps(p)
            }
        }
    }

    /// Whether input row `T` of a block feeds its output row `r`.
    #[inline(always)]
    fn feeds<const K: usize, const S: usize, const T: usize>(r: usize) -> bool {
        T >= r * S && T - r * S < K
    }

    /// The weight input row `T` of a block applies to output row `r` at tap column `j`,
    /// broadcast (a plain function: a closure would not inherit the target features).
    #[inline(always)]
    unsafe fn wt<const K: usize, const S: usize, const T: usize>(
        w: &[f32],
        r: usize,
        j: usize,
    ) -> __m256 {
        // SAFETY: callers run with avx; `w` has `K * K` taps and `feeds(r)` holds.
        unsafe { _mm256_set1_ps(*w.get_unchecked((T - r * S) * K + j)) }
    }

    /// Tap row `T` of a block of `R` output rows: input row `rows[T]` (null: zero padding,
    /// skipped) feeds output row `r` through kernel row `T - r * S`; each of its input vectors
    /// is loaded (stride 2: de-interleaved) once and used by every output row it feeds. At
    /// stride 2 the even lanes of two loads are one `shuffle_ps`, which leaves the lanes in
    /// the order 0 1 4 5 2 3 6 7 (every tap alike; the store puts them back), and the odd
    /// lanes of the same two loads are the next tap column.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tap_row<
        const K: usize,
        const S: usize,
        const NV: usize,
        const R: usize,
        const M: bool,
        const T: usize,
    >(
        rows: &[*const f32; TR],
        b: &AvxBlock,
        w: &[f32],
        acc: &mut [[__m256; NV]; R],
    ) {
        // SAFETY: callers run with avx2 + fma; non-null rows with the block's masks (or,
        // unmasked, its columns) keep every loaded lane inside its row; `w` has `K * K` taps.
        unsafe {
            if T >= (R - 1) * S + K {
                return;
            }
            let rp = rows[T];
            if rp.is_null() {
                return;
            }
            if S == 1 {
                for j in 0..K {
                    let mut v = [_mm256_setzero_ps(); NV];
                    for q in 0..NV {
                        v[q] = load::<M>(rp.wrapping_offset(b.c[q] + j as isize), &b.m[q][j]);
                    }
                    for r in 0..R {
                        if feeds::<K, S, T>(r) {
                            let wv = wt::<K, S, T>(w, r, j);
                            for q in 0..NV {
                                acc[r][q] = _mm256_fmadd_ps(v[q], wv, acc[r][q]);
                            }
                        }
                    }
                }
            } else {
                for jp in 0..K.div_ceil(2) {
                    let jj = 2 * jp;
                    let mut ev = [_mm256_setzero_ps(); NV];
                    let mut od = [_mm256_setzero_ps(); NV];
                    for q in 0..NV {
                        let at = b.c[q] + jj as isize;
                        let lo = load::<M>(rp.wrapping_offset(at), &b.m[q][2 * jp]);
                        let hi =
                            load::<M>(rp.wrapping_offset(at + L as isize), &b.m[q][2 * jp + 1]);
                        ev[q] = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
                        if jj + 1 < K {
                            od[q] = _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi);
                        }
                    }
                    for r in 0..R {
                        if feeds::<K, S, T>(r) {
                            let wv = wt::<K, S, T>(w, r, jj);
                            for q in 0..NV {
                                acc[r][q] = _mm256_fmadd_ps(ev[q], wv, acc[r][q]);
                            }
                            if jj + 1 < K {
                                let wv = wt::<K, S, T>(w, r, jj + 1);
                                for q in 0..NV {
                                    acc[r][q] = _mm256_fmadd_ps(od[q], wv, acc[r][q]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// `R` output rows × `NV` vectors of one column block, every tap in registers: each input
    /// vector is loaded once per block and used by every output row it feeds, and the
    /// `R * NV` accumulators are independent chains.
    #[inline(always)]
    unsafe fn block<
        const K: usize,
        const S: usize,
        const NV: usize,
        const R: usize,
        const M: bool,
    >(
        rows: &[*const f32; TR],
        b: &AvxBlock,
        w: &[f32],
        bias: __m256,
    ) -> [[__m256; NV]; R] {
        // SAFETY: see `tap_row`.
        unsafe {
            let mut acc = [[bias; NV]; R];
            macro_rules! taps {
                ($($t:literal)*) => {
                    $(tap_row::<K, S, NV, R, M, $t>(rows, b, w, &mut acc);)*
                };
            }
            taps!(0 1 2 3 4 5 6 7 8 9 10);
            acc
        }
    }

    /// Stores output vector `v` at `out + at`: whole where it fits in the plane's `p`
    /// elements, else under the mask of what is left; at stride 2 its lanes put back in order
    /// (see `tap_row`).
    #[inline(always)]
    unsafe fn store<const S: usize>(out: *mut f32, at: usize, p: usize, v: __m256) {
        // SAFETY: callers run with avx2; `at < p` and `out` has `p` elements.
        unsafe {
            let v = if S == 1 {
                v
            } else {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            if at + L <= p {
                _mm256_storeu_ps(out.add(at), v);
            } else {
                let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let m = _mm256_cmpgt_epi32(_mm256_set1_epi32((p - at) as i32), idx);
                _mm256_maskstore_ps(out.add(at), m, v);
            }
        }
    }

    /// Output rows `oh0 .. oh0 + R` of one plane over all column blocks.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_block<const K: usize, const S: usize, const R: usize>(
        rows: &[*const f32; TR],
        blocks: &[AvxBlock],
        w: &[f32],
        bias: __m256,
        act: Activation,
        out: *mut f32,
        oh0: usize,
        ow: usize,
        p: usize,
    ) {
        // SAFETY: see `tap_row`; stores lie in `out`'s first `p` elements: full vectors
        // where they fit, else under the lane mask of what is left of the plane.
        unsafe {
            for cb in blocks {
                macro_rules! run {
                    ($nv:literal, $m:literal) => {{
                        let acc = block::<K, S, $nv, R, $m>(rows, cb, w, bias);
                        for (r, a) in acc.iter().enumerate() {
                            for (q, v) in a.iter().enumerate() {
                                let at = (oh0 + r) * ow + cb.o[q];
                                store::<S>(out, at, p, activate(*v, act));
                            }
                        }
                    }};
                }
                match (cb.nv, cb.masked) {
                    (2, false) => run!(2, false),
                    (2, true) => run!(2, true),
                    (_, false) => run!(1, false),
                    _ => run!(1, true),
                }
            }
        }
    }

    /// `K×K` depthwise of one plane at stride `S` into `out [OH, OW]`: blocks of [`RB`]
    /// output rows (the last of `OH mod RB`) by the column blocks `blocks`
    /// (`super::avx_blocks` of `g`, computed once per call).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn plane<const K: usize, const S: usize>(
        x: &[f32],
        w: &[f32],
        b: f32,
        act: Activation,
        g: &Geom,
        blocks: &[AvxBlock],
        out: &mut [MaybeUninit<f32>],
    ) {
        let p = g.oh * g.ow;
        assert!(w.len() >= K * K && out.len() >= p);
        assert!((RB - 1) * S + K <= TR);
        assert!(x.len() >= g.h * g.w && g.sh == S && g.sw == S && g.kw == K);
        assert!(blocks
            .iter()
            .all(|b| b.nv >= 1 && b.o[..b.nv].iter().all(|&o| o < g.ow.max(1))));
        let (base, first) = (x.as_ptr(), -(g.pt as isize));
        let op = out.as_mut_ptr().cast::<f32>();
        // SAFETY: row pointers are rows `0..H` of the input; the blocks' masks (or columns)
        // keep loads inside them; stores lie in the plane (see `row_block`).
        unsafe {
            let bias = _mm256_set1_ps(b);
            let mut oh0 = 0;
            while oh0 < g.oh {
                let mut rows = [std::ptr::null::<f32>(); TR];
                for (t, r) in rows.iter_mut().enumerate().take((RB - 1) * S + K) {
                    let ih = (oh0 * S + t) as isize + first;
                    if ih >= 0 && (ih as usize) < g.h {
                        *r = base.add(ih as usize * g.w);
                    }
                }
                let (rs, ow) = (&rows, g.ow);
                match g.oh - oh0 {
                    1 => row_block::<K, S, 1>(rs, blocks, w, bias, act, op, oh0, ow, p),
                    2 => row_block::<K, S, 2>(rs, blocks, w, bias, act, op, oh0, ow, p),
                    3 => row_block::<K, S, 3>(rs, blocks, w, bias, act, op, oh0, ow, p),
                    _ => row_block::<K, S, RB>(rs, blocks, w, bias, act, op, oh0, ow, p),
                }
                oh0 += RB;
            }
        }
    }
}

/// AVX-512F: blocks of [`RB`] output rows × 32 or 16 lanes read in place under lane masks,
/// and the flat form for small stride-1 maps (see the module doc).
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
                // AVX2 has no flat form: the AVX-512 run takes it where it applies.
                let plan = Plan::new(&g);
                fwd_plane_with(&x, &wt, 0.25, Activation::Relu6, &g, &plan, &mut out, level);
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

    /// The AVX2 kernel (forced, so it runs on AVX-512 hosts too) against a direct f64
    /// summation, on every column layout it has: widths 1-40 (narrower than one vector, with a
    /// partial last vector moved left, masked and plain blocks, one and two vectors per block),
    /// 56 and 112; heights giving every count of rows in the last row block; both kernel sizes
    /// and strides; TF-SAME, symmetric, no and lopsided padding. Planes are run back to back
    /// in reverse order, so a store past a plane's end would corrupt the plane after it
    /// (already checked), and past the last plane the NaN guard.
    #[test]
    fn avx2_matches_reference() {
        if isa() < Isa::Avx2 {
            return;
        }
        let mut seed = 5u64;
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
        let mut cases = 0;
        let widths = (1..=40).chain([56, 112]);
        for (wi, w) in widths.enumerate() {
            for k in [3usize, 5] {
                for s in [1usize, 2] {
                    let hs = [w.min(30), 1 + wi % 9, 2 + (wi + k + s) % 7];
                    for (hi, &h) in hs.iter().enumerate() {
                        let pads = [
                            Conv2dParams::same((h, w), (k, k), (s, s)).padding,
                            (k / 2, k / 2, k / 2, k / 2),
                            (0, 0, 0, 0),
                            (k - 1, 0, 1, k - 1),
                        ];
                        let pad = pads[(wi + hi + k) % 4];
                        if h + pad.0 + pad.1 < k || w + pad.2 + pad.3 < k {
                            continue;
                        }
                        let act =
                            [Activation::None, Activation::Relu, Activation::Relu6][cases % 3];
                        check_avx2(&mut rnd, h, w, k, s, pad, act);
                        cases += 1;
                    }
                }
            }
        }
        assert!(cases > 400, "{cases} cases");
    }

    fn check_avx2(
        rnd: &mut impl FnMut(usize) -> Vec<f32>,
        h: usize,
        w: usize,
        k: usize,
        s: usize,
        pad: (usize, usize, usize, usize),
        act: Activation,
    ) {
        let p = Conv2dParams {
            stride: (s, s),
            padding: pad,
            dilation: (1, 1),
            groups: 1,
        };
        let g = Geom::new((1, 1, h, w), (1, 1, k, k), &p).unwrap();
        let (np, pl) = (3, g.p());
        let (x, wt, b) = (rnd(np * h * w), rnd(np * k * k), rnd(np));
        let plan = Plan::new(&g);
        let mut out = vec![MaybeUninit::new(f32::NAN); np * pl + 16];
        for i in (0..np).rev() {
            let (xi, wi) = (&x[i * h * w..][..h * w], &wt[i * k * k..][..k * k]);
            let o = &mut out[i * pl..][..pl];
            fwd_plane_with(xi, wi, b[i], act, &g, &plan, o, Isa::Avx2);
        }
        // SAFETY: initialised to NaN above.
        let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert!(
            out[np * pl..].iter().all(|v| v.is_nan()),
            "stored past the planes"
        );
        for i in 0..np {
            for (oy, ox) in (0..g.oh).flat_map(|y| (0..g.ow).map(move |x| (y, x))) {
                let mut acc = b[i] as f64;
                for (ky, kx) in (0..k).flat_map(|a| (0..k).map(move |c| (a, c))) {
                    let iy = (oy * s + ky) as isize - pad.0 as isize;
                    let ix = (ox * s + kx) as isize - pad.2 as isize;
                    if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                        let xv = x[i * h * w + iy as usize * w + ix as usize] as f64;
                        acc += xv * wt[i * k * k + ky * k + kx] as f64;
                    }
                }
                let want = match act {
                    Activation::None => acc,
                    Activation::Relu => acc.max(0.0),
                    Activation::Relu6 => acc.clamp(0.0, 6.0),
                } as f32;
                let got = out[i * pl + oy * g.ow + ox];
                assert!(
                    (got - want).abs() <= 1e-5,
                    "{h}x{w} k{k} s{s} pad {pad:?} {act:?} plane {i} ({oy}, {ox}): {got} vs {want}"
                );
            }
        }
    }
}
