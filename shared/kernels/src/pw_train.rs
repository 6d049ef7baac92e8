//! Weight gradient of a 1x1 conv (stride 1, unpadded, one group) as direct dot products on
//! NCHW: `gw [O, C] = sum over images n and pixels p of go[n, o, p] * x[n, c, p]`.
//!
//! Both operands are contiguous along the reduction (a channel's pixels), so a register tile
//! of 4 output x 3 input channels (12 AVX2 accumulators) takes 4 + 3 vector loads per 12
//! multiply-adds, straight from the tensors: no transposed copy of `x` (the GEMM path built
//! one per image, `im2col_t`). Maps of fewer than 16 pixels (a MobileNet's 2x2 maps) are
//! first packed per block of images into contiguous channel rows, so that tiles read whole
//! cache lines. The reduction runs in blocks of images small enough for a tile's rows to stay
//! in L1 and the block's `x` in L2; every `gw` element is summed in the same order whatever
//! the thread count (threads split the output channels).

use crate::cpu::has_avx2_fma;
use crate::gemm_path::with_col;
use crate::geom::Geom;
use crate::threads;

/// Output channels per register tile.
const MO: usize = 4;
/// Input channels per register tile.
const MC: usize = 3;
/// Target pixels per image block (a tile's `MO` rows of `go` and `MC` of `x`: 28 KB of L1).
const KC: usize = 1024;
/// Upper bound on one block of `x` (f32 elements, 1 MB): it is re-read by every tile.
const X_BLOCK: usize = 1 << 18;

/// Whether [`backward_filter`] handles `g` on this CPU.
pub(crate) fn supported(g: &Geom) -> bool {
    g.identity_1x1 && g.groups == 1 && has_avx2_fma()
}

/// Images per reduction block.
fn images_per_block(g: &Geom) -> usize {
    let p = g.p().max(1);
    let by_l1 = KC / p;
    let by_l2 = X_BLOCK / (g.c * p).max(1);
    by_l1.min(by_l2).clamp(1, g.n.max(1))
}

/// A strided operand: row `r` of image `n` at `ptr + n * img + r * row`.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    img: usize,
    row: usize,
}

impl Operand {
    #[inline(always)]
    fn at(self, n: usize, r: usize) -> *const f32 {
        self.ptr.wrapping_add(n * self.img + r * self.row)
    }
    #[inline(always)]
    fn offset_rows(self, r: usize) -> Self {
        Self {
            ptr: self.ptr.wrapping_add(r * self.row),
            ..self
        }
    }
}

/// Maps with fewer pixels than this are packed per image block into contiguous channel rows
/// (`[rows][images * P]`) first: a 2x2 map's 4 pixels are 16 bytes of a 64-byte line, and
/// unpacked tiles fetched 4x the lines they used (320 -> 1280 channels at batch 32: 4.4 ms).
const PACK_BELOW: usize = 16;

/// `dst = src` for the few floats of a small map's row: inline moves (a 4-float
/// `copy_from_slice` is a `memmove` call, 12 % of the packed path's time).
#[inline(always)]
fn short_copy(src: &[f32], dst: &mut [f32]) {
    if let (Ok(s), Ok(d)) = (
        <&[f32; 4]>::try_from(src),
        <&mut [f32; 4]>::try_from(&mut *dst),
    ) {
        *d = *s;
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
    }
}

/// `gw [O, C]` of a 1x1 conv (see the module docs); requires [`supported`].
pub(crate) fn backward_filter(x: &[f32], go: &[f32], g: &Geom) -> Vec<f32> {
    assert!(supported(g));
    let (c, o, p, n) = (g.c, g.o, g.p(), g.n);
    assert!(x.len() >= n * c * p && go.len() >= n * o * p);
    let nb = images_per_block(g);
    let t = threads::for_flops(g.flops());
    let pack = p < PACK_BELOW;
    // Whole tiles of output channels per worker; a worker runs the image blocks outermost
    // so that one block of `x` serves all of its tiles from L2.
    let parts = threads::map_ranges(o.div_ceil(MO), t, |tiles| {
        let o_lo = tiles.start * MO;
        let o_hi = (tiles.end * MO).min(o);
        let mut part = vec![0f32; (o_hi - o_lo) * c];
        let scratch = if pack { (o_hi - o_lo + c) * nb * p } else { 0 };
        with_col(scratch, |buf| {
            let mut n0 = 0;
            while n0 < n {
                let n1 = (n0 + nb).min(n);
                let (a, b, pp, images) = if pack {
                    // Channel rows of `images * P` pixels: one "image" per block.
                    let kc = (n1 - n0) * p;
                    let (ga, xb) = buf.split_at_mut((o_hi - o_lo) * nb * p);
                    for (j, ni) in (n0..n1).enumerate() {
                        for r in 0..o_hi - o_lo {
                            short_copy(
                                &go[(ni * o + o_lo + r) * p..][..p],
                                &mut ga[r * kc + j * p..][..p],
                            );
                        }
                        for r in 0..c {
                            short_copy(&x[(ni * c + r) * p..][..p], &mut xb[r * kc + j * p..][..p]);
                        }
                    }
                    let a = Operand {
                        ptr: ga.as_ptr().wrapping_sub(o_lo * kc),
                        img: 0,
                        row: kc,
                    };
                    let b = Operand {
                        ptr: xb.as_ptr(),
                        img: 0,
                        row: kc,
                    };
                    (a, b, kc, 0..1)
                } else {
                    let a = Operand {
                        ptr: go.as_ptr(),
                        img: o * p,
                        row: p,
                    };
                    let b = Operand {
                        ptr: x.as_ptr(),
                        img: c * p,
                        row: p,
                    };
                    (a, b, p, n0..n1)
                };
                for o0 in (o_lo..o_hi).step_by(MO) {
                    let mo = MO.min(o_hi - o0);
                    let rows = &mut part[(o0 - o_lo) * c..][..mo * c];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: avx2 + fma checked in `supported`; rows `o_lo..o_hi` of `a`
                    // (`go` or its packed block) and `0..C` of `b` hold `pp` floats for every
                    // image of `images` (lengths asserted above, or packed just now).
                    unsafe {
                        avx::rows(a, b, c, pp, o0, mo, images.clone(), rows)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (a, b, pp, &images, rows);
                }
                n0 = n1;
            }
        });
        part
    });
    parts.concat()
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Operand, MC, MO};

    /// Horizontal sum of 8 lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: avx enabled by the caller.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// Lane mask of the first `n` (0..=8) lanes.
    #[inline(always)]
    unsafe fn mask(n: usize) -> __m256i {
        // SAFETY: avx2 enabled by the caller.
        unsafe {
            let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
        }
    }

    /// `acc[r][s] += av[r] * bv[s]`.
    #[inline(always)]
    unsafe fn step<const R: usize, const S: usize>(
        acc: &mut [[__m256; S]; R],
        av: [__m256; R],
        bv: [__m256; S],
    ) {
        // SAFETY: fma enabled by the caller.
        unsafe {
            for (ar, a) in acc.iter_mut().zip(av) {
                for (v, b) in ar.iter_mut().zip(bv) {
                    *v = _mm256_fmadd_ps(a, b, *v);
                }
            }
        }
    }

    /// One `R x S` tile: `out[r][s] = sum over images `images` and pixels `0..p` of
    /// `a_r . b_s`, where row `r` of image `n` starts at `a.at(n, r)` (and likewise `b`).
    /// Pixels go 8 at a time, the tail masked.
    ///
    /// # Safety
    /// avx2 + fma enabled; every row of every image of `images` holds `p` readable floats.
    #[inline(always)]
    unsafe fn tile<const R: usize, const S: usize>(
        a: Operand,
        b: Operand,
        p: usize,
        images: Range<usize>,
    ) -> [[f32; S]; R] {
        // SAFETY: every load is inside a row of an image of `images` (caller's contract);
        // masked loads read only the valid lanes.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); S]; R];
            let full = p / 8 * 8;
            let tail = p - full;
            let m = mask(tail);
            for n in images {
                let ar: [*const f32; R] = std::array::from_fn(|r| a.at(n, r));
                let br: [*const f32; S] = std::array::from_fn(|s| b.at(n, s));
                let mut q = 0;
                while q < full {
                    let av = ar.map(|x| _mm256_loadu_ps(x.add(q)));
                    let bv = br.map(|x| _mm256_loadu_ps(x.add(q)));
                    step(&mut acc, av, bv);
                    q += 8;
                }
                if tail > 0 {
                    let av = ar.map(|x| _mm256_maskload_ps(x.add(full), m));
                    let bv = br.map(|x| _mm256_maskload_ps(x.add(full), m));
                    step(&mut acc, av, bv);
                }
            }
            let mut out = [[0f32; S]; R];
            for (o, a) in out.iter_mut().zip(&acc) {
                for (v, x) in o.iter_mut().zip(a) {
                    *v = hsum(*x);
                }
            }
            out
        }
    }

    /// Rows `o0..o0 + mo` of `gw` (`rows`, `[mo, C]`) += the images `images` of `go` (`a`,
    /// rows `o0..`) and `x` (`b`, rows `0..C`), `p` pixels per row.
    ///
    /// # Safety
    /// avx2 + fma available; the operands hold `p` floats at every row `o0..o0 + mo` of `a`
    /// and `0..C` of `b` of every image of `images`; `mo <= MO`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows(
        a: Operand,
        b: Operand,
        c: usize,
        p: usize,
        o0: usize,
        mo: usize,
        images: Range<usize>,
        rows: &mut [f32],
    ) {
        assert!(mo <= MO && rows.len() >= mo * c);
        let a = a.offset_rows(o0);
        let mut c0 = 0;
        // SAFETY: the rows read exist for every image of `images` (caller's contract).
        unsafe {
            macro_rules! run {
                ($r:literal, $s:literal) => {{
                    let t = tile::<$r, $s>(a, b.offset_rows(c0), p, images.clone());
                    for (r, tr) in t.iter().enumerate() {
                        for (s, v) in tr.iter().enumerate() {
                            rows[r * c + c0 + s] += *v;
                        }
                    }
                }};
            }
            while c0 < c {
                let s = MC.min(c - c0);
                match (mo, s) {
                    (4, 3) => run!(4, 3),
                    (4, 2) => run!(4, 2),
                    (4, 1) => run!(4, 1),
                    (3, 3) => run!(3, 3),
                    (3, 2) => run!(3, 2),
                    (3, 1) => run!(3, 1),
                    (2, 3) => run!(2, 3),
                    (2, 2) => run!(2, 2),
                    (2, 1) => run!(2, 1),
                    (1, 3) => run!(1, 3),
                    (1, 2) => run!(1, 2),
                    (1, 1) => run!(1, 1),
                    _ => unreachable!("tile {mo}x{s}"),
                }
                c0 += s;
            }
        }
    }
}
