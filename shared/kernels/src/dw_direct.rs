//! Register-blocked depthwise forward for K×K kernels (K = 3 or 5), stride 1 or 2, no
//! dilation, any per-side padding (TF-SAME or symmetric), bias and activation fused.
//!
//! The approach of ONNX Runtime's direct depthwise kernels, on NCHW: each plane is copied
//! once into a zero-padded scratch (for stride 2 with its even and odd columns split into two
//! half rows, so every tap of every output lane is a contiguous load); then each output row is
//! computed 32 or 8 lanes at a time with all K*K taps accumulated in registers, and bias +
//! activation applied before the single store. The older path ran one axpy pass over the
//! whole output plane per tap (K*K reads and writes of the plane; a scalar gather for
//! stride 2). Where the CPU has AVX-512F the rows run 16 lanes per vector (the last vector of
//! a row stored under a lane mask), and the copy goes: stride 1 reads the input rows in
//! place (lane masks stand in for the zero padding: masked-off lanes are neither loaded nor
//! counted), stride 2 de-interleaves each padded row with two permutes per 16 outputs. The
//! per-row `memset` / `memcpy` calls of the copy cost as much as the taps on a 112×112 map.

use crate::cpu::{has_avx2_fma, isa, Isa};
use crate::geom::Geom;
use crate::Activation;

/// Output lanes per AVX2 vector.
const L: usize = 8;
/// Output lanes per AVX-512 vector: the scratch rows are padded to a multiple of this, so
/// both widths' loads stay inside it.
const L16: usize = 16;

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

/// Forward of one plane: `out [OH, OW] = act(b + dwconv(x [H, W], w [K, K]))`; `buf` has
/// [`scratch_len`] elements. Only call when [`supported`].
pub(crate) fn fwd_plane(
    x: &[f32],
    w: &[f32],
    b: f32,
    act: Activation,
    g: &Geom,
    out: &mut [f32],
    buf: &mut [f32],
) {
    fwd_plane_with(x, w, b, act, g, out, buf, isa());
}

/// [`fwd_plane`] on the kernel of `level` (AVX2 or AVX-512, at most [`isa`]).
#[allow(clippy::too_many_arguments)]
fn fwd_plane_with(
    x: &[f32],
    w: &[f32],
    b: f32,
    act: Activation,
    g: &Geom,
    out: &mut [f32],
    buf: &mut [f32],
    level: Isa,
) {
    assert!(supported(g) && buf.len() >= scratch_len(g) && out.len() >= g.p());
    assert!(level >= Isa::Avx2 && level <= isa());
    assert!(x.len() >= g.h * g.w);
    let p = Pad::new(g);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` checked avx512f; `plane_s1` bounds its loads by masks, `fill_s2` its
    // stores by `Pad`, and the scratch bounds every load of `rows`.
    if level == Isa::Avx512 {
        unsafe {
            match (g.kh, g.sh) {
                (3, 1) => avx512::plane_s1::<3>(x, w, b, act, g, out),
                (5, 1) => avx512::plane_s1::<5>(x, w, b, act, g, out),
                (3, 2) => {
                    avx512::fill_s2(x, g, &p, buf);
                    avx512::rows::<3, 2>(w, b, act, g, &p, out, buf)
                }
                _ => {
                    avx512::fill_s2(x, g, &p, buf);
                    avx512::rows::<5, 2>(w, b, act, g, &p, out, buf)
                }
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
        out: &mut [f32],
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
                let dst = out.as_mut_ptr().add(oh * ow);
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

    use super::{Pad, L16};
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

    #[inline(always)]
    unsafe fn lanes<const NV: usize, const KK: usize>(
        base: *const f32,
        off: &[usize; 25],
        wv: &[f32],
        b: __m512,
    ) -> [__m512; NV] {
        // SAFETY: callers run with avx512f and keep every tap load inside the scratch.
        unsafe {
            let mut acc = [b; NV];
            for (&o, &w) in off[..KK].iter().zip(&wv[..KK]) {
                let wt = _mm512_set1_ps(w);
                let src = base.add(o);
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(src.add(q * L16)), wt, *a);
                }
            }
            acc
        }
    }

    /// Mask of lanes `lo..hi` (clamped to `0..16`).
    #[inline(always)]
    fn range_mask(lo: isize, hi: isize) -> __mmask16 {
        let (lo, hi) = (lo.clamp(0, 16) as u32, hi.clamp(0, 16) as u32);
        if hi <= lo {
            0
        } else {
            (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as __mmask16
        }
    }

    /// `NV` vectors of stride-1 outputs at column `o` of one output row, read in place:
    /// `rows[i]` is input row `oh + i - pt` (`None` in the padding). `MASKED`: lanes whose
    /// input column lies outside `0..wd` are masked off (zero padding), else every load is
    /// inside its row.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn lanes_s1<const K: usize, const NV: usize, const MASKED: bool>(
        rows: &[Option<*const f32>; 5],
        o: usize,
        pl: usize,
        wd: usize,
        wv: &[f32],
        b: __m512,
    ) -> [__m512; NV] {
        // SAFETY: callers run with avx512f; unmasked loads lie inside the row (caller's
        // check), masked ones only touch lanes inside it.
        unsafe {
            let mut m = [0 as __mmask16; 5];
            if MASKED {
                for (j, mj) in m.iter_mut().enumerate().take(K) {
                    let s = o as isize + j as isize - pl as isize;
                    *mj = range_mask(-s, wd as isize - s);
                }
            }
            let mut acc = [b; NV];
            for (i, row) in rows.iter().enumerate().take(K) {
                let Some(rp) = *row else { continue };
                for j in 0..K {
                    let wt = _mm512_set1_ps(wv[i * K + j]);
                    let s = o as isize + j as isize - pl as isize;
                    for (q, a) in acc.iter_mut().enumerate() {
                        let src = rp.wrapping_offset(s + (q * L16) as isize);
                        let v = if MASKED {
                            _mm512_maskz_loadu_ps(m[j], src)
                        } else {
                            _mm512_loadu_ps(src)
                        };
                        *a = _mm512_fmadd_ps(v, wt, *a);
                    }
                }
            }
            acc
        }
    }

    /// Stride-1 `K×K` depthwise of one plane straight from `x [H, W]` (no scratch): blocks
    /// of 4 or 1 unmasked vectors where every tap is inside the row, masked vectors at the
    /// borders; the last vector of a row stored under a mask.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane_s1<const K: usize>(
        x: &[f32],
        w: &[f32],
        b: f32,
        act: Activation,
        g: &Geom,
        out: &mut [f32],
    ) {
        assert!(w.len() >= K * K && x.len() >= g.h * g.w && out.len() >= g.oh * g.ow);
        let (wd, ow, pl) = (g.w, g.ow, g.pl);
        // Whether `nv` vectors at `o` read and write inside their rows.
        let inside = |o: usize, nv: usize| o >= pl && o + nv * L16 + K - 1 <= wd + pl;
        // SAFETY: row pointers are rows of `x`; see `lanes_s1` for the loads; stores lie in
        // output row `oh` (the last one masked to `OW`).
        unsafe {
            let bv = _mm512_set1_ps(b);
            for oh in 0..g.oh {
                let mut rows = [None; 5];
                for (i, r) in rows.iter_mut().enumerate().take(K) {
                    let ih = (oh + i) as isize - g.pt as isize;
                    if ih >= 0 && (ih as usize) < g.h {
                        *r = Some(x.as_ptr().add(ih as usize * wd));
                    }
                }
                let dst = out.as_mut_ptr().add(oh * ow);
                let mut o = 0;
                while o < ow {
                    if o + 4 * L16 <= ow && inside(o, 4) {
                        let acc = lanes_s1::<K, 4, false>(&rows, o, pl, wd, w, bv);
                        for (q, a) in acc.iter().enumerate() {
                            _mm512_storeu_ps(dst.add(o + q * L16), activate(*a, act));
                        }
                        o += 4 * L16;
                        continue;
                    }
                    let [a] = if inside(o, 1) {
                        lanes_s1::<K, 1, false>(&rows, o, pl, wd, w, bv)
                    } else {
                        lanes_s1::<K, 1, true>(&rows, o, pl, wd, w, bv)
                    };
                    let m = crate::pointwise::lane_mask(ow - o);
                    _mm512_mask_storeu_ps(dst.add(o), m, activate(a, act));
                    o += L16;
                }
            }
        }
    }

    /// The stride-2 scratch of one plane (as `super::fill`): each padded row's even and odd
    /// columns, 16 at a time from two masked loads and two permutes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fill_s2(x: &[f32], g: &Geom, p: &Pad, buf: &mut [f32]) {
        assert!(buf.len() >= p.hp * p.rp && x.len() >= g.h * g.w);
        // SAFETY: loads lie in columns `0..W` of a row of `x` (checked, or masked to them);
        // stores in the first `half` elements of each half row (the last masked), inside
        // the scratch.
        unsafe {
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            let (wd, pl) = (g.w as isize, g.pl as isize);
            for r in 0..p.hp {
                let ih = r as isize - g.pt as isize;
                let dst = buf.as_mut_ptr().add(r * p.rp);
                let valid = ih >= 0 && ih < g.h as isize;
                let row = x.as_ptr().wrapping_offset(ih * wd);
                let mut q = 0;
                while q < p.half {
                    let c0 = 2 * q as isize - pl;
                    if valid && q + L16 <= p.half && c0 >= 0 && c0 + 2 * L16 as isize <= wd {
                        // Interior: both loads inside the row, both stores inside the half
                        // rows; no masks.
                        let a = _mm512_loadu_ps(row.offset(c0));
                        let b = _mm512_loadu_ps(row.offset(c0 + L16 as isize));
                        _mm512_storeu_ps(dst.add(q), _mm512_permutex2var_ps(a, even, b));
                        _mm512_storeu_ps(dst.add(p.half + q), _mm512_permutex2var_ps(a, odd, b));
                        q += L16;
                        continue;
                    }
                    let m = crate::pointwise::lane_mask(p.half - q);
                    let (e, o) = if valid {
                        let a = _mm512_maskz_loadu_ps(
                            range_mask(-c0, wd - c0),
                            row.wrapping_offset(c0),
                        );
                        let c1 = c0 + L16 as isize;
                        let b = _mm512_maskz_loadu_ps(
                            range_mask(-c1, wd - c1),
                            row.wrapping_offset(c1),
                        );
                        (
                            _mm512_permutex2var_ps(a, even, b),
                            _mm512_permutex2var_ps(a, odd, b),
                        )
                    } else {
                        (_mm512_setzero_ps(), _mm512_setzero_ps())
                    };
                    _mm512_mask_storeu_ps(dst.add(q), m, e);
                    _mm512_mask_storeu_ps(dst.add(p.half + q), m, o);
                    q += L16;
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows<const K: usize, const S: usize>(
        w: &[f32],
        b: f32,
        act: Activation,
        g: &Geom,
        p: &Pad,
        out: &mut [f32],
        buf: &[f32],
    ) {
        assert!(w.len() >= K * K);
        // SAFETY: loads stay inside the scratch (rows padded to 16 lanes, see `Pad`),
        // stores inside `out` rows (the last vector masked to `OW`).
        unsafe {
            let mut off = [0usize; 25];
            for i in 0..K {
                for j in 0..K {
                    let col = if S == 1 { j } else { (j & 1) * p.half + j / 2 };
                    off[i * K + j] = i * p.rp + col;
                }
            }
            let bv = _mm512_set1_ps(b);
            let ow = g.ow;
            for oh in 0..g.oh {
                let row = buf.as_ptr().add(oh * S * p.rp);
                let dst = out.as_mut_ptr().add(oh * ow);
                let mut o = 0;
                while o + 4 * L16 <= ow {
                    let acc = if K == 3 {
                        lanes::<4, 9>(row.add(o), &off, w, bv)
                    } else {
                        lanes::<4, 25>(row.add(o), &off, w, bv)
                    };
                    for (q, a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(dst.add(o + q * L16), activate(*a, act));
                    }
                    o += 4 * L16;
                }
                while o < ow {
                    let [a] = if K == 3 {
                        lanes::<1, 9>(row.add(o), &off, w, bv)
                    } else {
                        lanes::<1, 25>(row.add(o), &off, w, bv)
                    };
                    let m = crate::pointwise::lane_mask(ow - o);
                    _mm512_mask_storeu_ps(dst.add(o), m, activate(a, act));
                    o += L16;
                }
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
                let mut out = vec![f32::NAN; g.p() + 16];
                let mut buf = vec![0f32; scratch_len(&g)];
                fwd_plane_with(
                    &x,
                    &wt,
                    0.25,
                    Activation::Relu6,
                    &g,
                    &mut out,
                    &mut buf,
                    level,
                );
                out
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
