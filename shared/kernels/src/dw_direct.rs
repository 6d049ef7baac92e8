//! Register-blocked depthwise forward for K×K kernels (K = 3 or 5), stride 1 or 2, no
//! dilation, any per-side padding (TF-SAME or symmetric), bias and activation fused.
//!
//! The approach of ONNX Runtime's direct depthwise kernels, on NCHW: each plane is copied
//! once into a zero-padded scratch (for stride 2 with its even and odd columns split into two
//! half rows, so every tap of every output lane is a contiguous load); then each output row is
//! computed 32 or 8 lanes at a time with all K*K taps accumulated in registers, and bias +
//! activation applied before the single store. The older path ran one axpy pass over the
//! whole output plane per tap (K*K reads and writes of the plane; a scalar gather for
//! stride 2).

use crate::cpu::has_avx2_fma;
use crate::geom::Geom;
use crate::Activation;

/// Output lanes per vector.
const L: usize = 8;

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
        let owr = g.ow.div_ceil(L) * L;
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
    assert!(supported(g) && buf.len() >= scratch_len(g) && out.len() >= g.p());
    let p = Pad::new(g);
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
