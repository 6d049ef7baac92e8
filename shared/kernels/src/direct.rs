//! Direct convolution for inference (any KH×KW, any stride, any per-side padding, no
//! dilation, one group) on NCHW with a pre-packed weight:
//! `out[n] = act(conv(x[n], W) + bias + residual[n])`, no im2col.
//!
//! Each image is copied once into a zero-padded scratch, split into its stride phases (for
//! stride 2 the even and odd rows and columns of the padded image are four planes), so the
//! input of kernel tap `(i, j)` for output pixel `(oh, ow)` sits at a constant offset from
//! position `oh * Wq + ow` of one plane (`Wq` the plane's row pitch). The output is computed
//! on that flattened "pitch-`Wq`" domain, [`NR`] positions at a time: every tap of every lane
//! is one contiguous load, whatever the image width (a 7×7 map fills whole tiles instead of
//! masking half of each). The `Wq - OW` positions at the end of each row are computed and
//! dropped: the epilogue stores each row's lanes with a mask at that row's offset.
//!
//! The reduction runs over `C * KH * KW` (input channel, tap) steps against the weight packed
//! like [`crate::pointwise`]'s (panels of [`MR`] output channels, `[O/MR][C*KH*KW][MR]`; a
//! 1×1 weight packs identically), so the 6×16 micro-kernel (in passes of 6, 6 and 4 rows of a 16-row panel) and its epilogue (bias, residual
//! add, activation on the tile in registers, one store) are the pointwise GEMM's. Compared
//! with im2col + GEMM, the only copy is the padded input (1× the input instead of KH*KW×),
//! and nothing is zero-filled, copied back or re-read for the epilogue.
//!
//! On AVX2 without AVX-512 the conv runs as bands of output rows im2col'ed into an
//! L2-sized scratch and multiplied by the pointwise GEMM ([`crate::pointwise::gemm_avx2`]):
//! measured on Zen 3 it beat the stride-phase loop on every shape, 1.2-1.7x (8-lane
//! vectors make the loop's scattered tap rows cost more than one contiguous copy).
//!
//! Where the CPU has AVX-512F the same loop runs on 16-lane vectors: tiles of [`NR512`] (32)
//! positions × 8 panel rows (two passes per panel, 16 accumulators), the row segments of
//! the epilogue as lane masks. Vectors over the 16 output channels of a panel (broadcast
//! input, no dropped lanes, the pointwise small-map kernel's form) were measured too and
//! lost on every ResNet-20 shape, 7×7 included (1.4-1.9x slower than position vectors:
//! one broadcast load per PX multiply-adds and a scattered store per output vector).

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::cpu::{isa, Isa};
use crate::gemm_path::with_col;
use crate::geom::Geom;
use crate::pointwise::MR;
use crate::{threads, Activation};

/// Output positions per micro-kernel tile (two 8-lane vectors).
const NR: usize = 16;
/// Packed weight per panel block: the panels of a block stay in L2 while every tile of the
/// image passes over them, and each tile's input (a few rows per channel) stays in L1 while
/// the block's panels pass over it.
const BLOCK_BYTES: usize = 96 << 10;
/// Output positions per tile of the AVX-512 path (two 16-lane vectors).
const NR512: usize = 32;
/// Row segments one tile can span: a tile of `nr` lanes covers at most `nr / 2 + 1` rows
/// when rows carry dropped positions (`Wq >= OW + 1 >= 2`), and one segment otherwise.
const MAX_SEGS: usize = NR512 / 2 + 2;

/// The scratch layout of one conv geometry.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Plane rows / row pitch (the flattened domain's pitch).
    hq: usize,
    wq: usize,
    sh: usize,
    sw: usize,
    /// Padded extents actually read: `(OH-1)*SH + KH` and `(OW-1)*SW + KW`.
    hp: usize,
    wp: usize,
    /// Stride phases `(row parity, column parity)` that some tap reads, one plane each.
    phases: Vec<(usize, usize)>,
    /// Elements per channel (all its phase planes).
    cs: usize,
    /// Offset of each tap `i * KW + j` inside a channel's planes.
    taps: Vec<usize>,
    /// Flattened output domain `OH * Wq` and its tiles.
    d: usize,
    tiles: usize,
    /// Scratch length: every tap load of every tile stays inside.
    len: usize,
}

impl Plan {
    pub(crate) fn new(g: &Geom) -> Self {
        let (sh, sw) = (g.sh, g.sw);
        let hp = (g.oh - 1) * sh + g.kh;
        let wp = (g.ow - 1) * sw + g.kw;
        let (hq, wq) = (hp.div_ceil(sh), wp.div_ceil(sw));
        let plane = hq * wq;
        let mut phases: Vec<(usize, usize)> = Vec::new();
        let mut taps = Vec::with_capacity(g.kh * g.kw);
        for i in 0..g.kh {
            for j in 0..g.kw {
                let ph = (i % sh, j % sw);
                let slot = match phases.iter().position(|&p| p == ph) {
                    Some(s) => s,
                    None => {
                        phases.push(ph);
                        phases.len() - 1
                    }
                };
                taps.push(slot * plane + (i / sh) * wq + j / sw);
            }
        }
        let cs = phases.len() * plane;
        let d = g.oh * wq;
        let tiles = d.div_ceil(NR);
        let max_tap = taps.iter().copied().max().unwrap_or(0);
        // Room for the loads of either tile width past the domain's end.
        let len = (g.c * cs).max((g.c - 1) * cs + max_tap + d.div_ceil(NR512) * NR512);
        Self {
            hq,
            wq,
            sh,
            sw,
            hp,
            wp,
            phases,
            cs,
            taps,
            d,
            tiles,
            len,
        }
    }
}

/// Copies one image `x [C, H, W]` into the phase planes of `buf` (zero padding included;
/// the tail past the last plane zeroed, so dropped lanes read finite values).
fn fill(x: &[f32], g: &Geom, pl: &Plan, buf: &mut [f32]) {
    let plane = pl.hq * pl.wq;
    let hw = g.h * g.w;
    let sw = pl.sw;
    // Per phase: the plane columns `lo..hi` that hold image columns (`xx = q * sw + pc`
    // inside the read extent and `pl <= xx < pl + W`), from image column `first`; the rest
    // of a row is padding. Computed once, not per row (two divisions per row cost as much
    // as the copy of a 15-column row).
    let cols: Vec<(usize, usize, usize)> = pl
        .phases
        .iter()
        .map(|&(_, pc)| {
            let lo = g.pl.saturating_sub(pc).div_ceil(sw).min(pl.wq);
            let hi = (pl.wp - pc)
                .div_ceil(sw)
                .min((g.w + g.pl).saturating_sub(pc).div_ceil(sw))
                .clamp(lo, pl.wq);
            let first = if lo < hi { lo * sw + pc - g.pl } else { 0 };
            (lo, hi, first)
        })
        .collect();
    for c in 0..g.c {
        let xc = &x[c * hw..][..hw];
        for (si, &(pr, _)) in pl.phases.iter().enumerate() {
            let (lo, hi, first) = cols[si];
            let dstp = &mut buf[c * pl.cs + si * plane..][..plane];
            for (r, dst) in dstp.chunks_exact_mut(pl.wq).enumerate() {
                let y = r * pl.sh + pr;
                let ih = y as isize - g.pt as isize;
                if y >= pl.hp || ih < 0 || ih >= g.h as isize {
                    dst.fill(0.0);
                    continue;
                }
                let row = &xc[ih as usize * g.w..][..g.w];
                dst[..lo].fill(0.0);
                if sw == 1 {
                    dst[lo..hi].copy_from_slice(&row[first..first + hi - lo]);
                } else if sw == 2 {
                    // Every other column (a loop LLVM vectorises with shuffles).
                    for (v, pair) in dst[lo..hi].iter_mut().zip(row[first..].chunks(2)) {
                        *v = pair[0];
                    }
                } else if lo < hi {
                    let src = &row[first..first + (hi - lo - 1) * sw + 1];
                    for (t, v) in dst[lo..hi].iter_mut().enumerate() {
                        *v = src[t * sw];
                    }
                }
                dst[hi..].fill(0.0);
            }
        }
    }
    buf[g.c * pl.cs..pl.len].fill(0.0);
}

/// A run of a tile's lanes `lo..hi` that lands in one output row: lane `l` goes to output
/// element `q0 + l - shift` of the channel's `[OH * OW]` plane.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Seg {
    lo: usize,
    hi: usize,
    shift: usize,
}

/// The output segments of the tile of `nr` lanes (at most [`NR512`]) starting at domain
/// position `q0`.
fn segments(q0: usize, nr: usize, g: &Geom, pl: &Plan) -> ([Seg; MAX_SEGS], usize) {
    let mut segs = [Seg::default(); MAX_SEGS];
    let end = (q0 + nr).min(pl.d);
    if pl.wq == g.ow {
        segs[0] = Seg {
            lo: 0,
            hi: end - q0,
            shift: 0,
        };
        return (segs, 1);
    }
    let mut n = 0;
    let mut r = q0 / pl.wq;
    while r * pl.wq < end {
        let start = r * pl.wq;
        let lo = start.max(q0) - q0;
        let row_end = (start + g.ow).min(end);
        if row_end > q0 + lo {
            segs[n] = Seg {
                lo,
                hi: row_end - q0,
                shift: r * (pl.wq - g.ow),
            };
            n += 1;
        }
        r += 1;
    }
    (segs, n)
}

/// The operands of one direct conv call.
pub(crate) struct Direct<'a> {
    pub x: &'a [f32],
    /// Weight packed by [`crate::pointwise::pack`] as `[O, C*KH*KW]`.
    pub w: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
}

/// A raw output pointer handed to workers that write disjoint rows or images.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes inside one scoped parallel call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Dimensions of one image's work.
#[derive(Clone, Copy)]
struct Dims {
    c: usize,
    o: usize,
    /// Output pixels per channel, `OH * OW`.
    p: usize,
    /// Reduction length `C * KH * KW`.
    k: usize,
}

/// Runs the conv of geometry `g` (`groups == 1`, no dilation) into `out [N, O, OH, OW]`;
/// every element of `out` is written. The widest kernel this CPU runs ([`level`]).
pub(crate) fn forward(op: &Direct<'_>, g: &Geom, out: &mut [MaybeUninit<f32>]) {
    forward_with(op, g, out, level());
}

/// The level [`forward`] runs: [`isa`], capped by env `ADAPTIVENET_DIRECT_ISA`
/// (`portable`, `avx2` or `avx512`, read once) so a whole-model bench can time the older
/// paths in the same binary.
pub(crate) fn level() -> Isa {
    static CAP: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    let cap = *CAP.get_or_init(
        || match std::env::var("ADAPTIVENET_DIRECT_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        },
    );
    isa().min(cap)
}

/// [`forward`] on the kernel of `level` (at most [`isa`]; tests and benches compare them).
pub(crate) fn forward_with(op: &Direct<'_>, g: &Geom, out: &mut [MaybeUninit<f32>], level: Isa) {
    assert!(g.groups == 1 && (g.dh, g.dw) == (1, 1));
    assert!(level <= isa(), "direct: {level:?} not available");
    #[cfg(target_arch = "x86_64")]
    if level == Isa::Avx2 && im2col_on_avx2() {
        return forward_im2col_avx2(op, g, out);
    }
    let pl = Plan::new(g);
    let dims = Dims {
        c: g.c,
        o: g.o,
        p: g.p(),
        k: g.k(),
    };
    let (in_img, out_img) = (g.in_img(), g.out_img());
    assert!(op.x.len() >= g.n * in_img && out.len() >= g.n * out_img);
    assert!(op.w.len() >= crate::pointwise::packed_len(g.o, dims.k));
    assert!(op.bias.is_none_or(|b| b.len() >= g.o));
    assert!(op.residual.is_none_or(|r| r.len() >= g.n * out_img));
    let t = threads::for_flops(g.flops());
    let np = g.o.div_ceil(MR);
    let outp = SendPtr(out.as_mut_ptr().cast::<f32>());
    // Image `i`, output rows of `panels`, from the filled scratch `buf`. Workers write
    // disjoint rows (or images) through the raw pointer; every element they store lies in
    // `out` (lengths asserted above).
    let image = |i: usize, panels: Range<usize>, buf: &[f32]| {
        let ri = op.residual.map(|r| &r[i * out_img..][..out_img]);
        let dst = outp.get().wrapping_add(i * out_img);
        let w = Work {
            buf,
            w: op.w,
            bias: op.bias,
            residual: ri,
            act: op.act,
            dims,
        };
        match level {
            // SAFETY: operand lengths asserted above; rows of `panels` only.
            Isa::Portable => unsafe { image_portable(&w, g, &pl, dst, panels) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` checked avx2 + fma; operand lengths asserted above; the scratch
            // holds `pl.len` elements, which bounds every tap load.
            Isa::Avx2 => unsafe { avx::image(&w, g, &pl, dst, panels) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` checked avx512f; as above.
            Isa::Avx512 => unsafe { avx512::image(&w, g, &pl, dst, panels) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("SIMD level on a non-x86 CPU"),
        }
    };
    let one = |i: usize, buf: &mut [f32]| {
        fill(&op.x[i * in_img..][..in_img], g, &pl, buf);
        image(i, 0..np, buf);
    };
    if t <= 1 || (g.n < t && np == 1) {
        with_col(pl.len, |buf| (0..g.n).for_each(|i| one(i, buf)));
    } else if g.n >= t {
        threads::map_ranges(g.n, t, |r| {
            with_col(pl.len, |buf| r.for_each(|i| one(i, buf)))
        });
    } else {
        // Few images: one scratch, each image's output channels (whole panels) split.
        with_col(pl.len, |buf| {
            for i in 0..g.n {
                fill(&op.x[i * in_img..][..in_img], g, &pl, buf);
                let buf = &*buf;
                threads::map_ranges(np, t, |panels| image(i, panels, buf));
            }
        });
    }
}

/// Whether the AVX2 level runs [`forward_im2col_avx2`]; env `ADAPTIVENET_DIRECT_IM2COL=0`
/// (read once) runs the stride-phase loop instead, for whole-model A/B runs.
fn im2col_on_avx2() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ADAPTIVENET_DIRECT_IM2COL").as_deref() != Ok("0"))
}

/// im2col columns per band: a band's `[C*KH*KW, rows * OW]` block stays within this (in L2
/// while every panel passes over it), unless one band must hold [`BAND_MIN_COLS`].
const BAND_BYTES: usize = 192 << 10;
/// Fewest output pixels per band (whole rows): narrower bands leave the 16-pixel tiles of
/// the GEMM mostly empty (a 7x7 map runs whole).
const BAND_MIN_COLS: usize = 128;

/// Output rows per im2col band of `g` (see [`BAND_BYTES`]).
fn band_rows(g: &Geom) -> usize {
    let per_row = g.k() * g.ow * 4;
    let by_bytes = BAND_BYTES / per_row.max(1);
    by_bytes.max(BAND_MIN_COLS.div_ceil(g.ow)).clamp(1, g.oh)
}

/// The AVX2 form: bands of output rows im2col'ed into a scratch `[C*KH*KW, rows * OW]` and
/// multiplied by the pointwise GEMM's micro-kernel ([`crate::pointwise::gemm_avx2`], the
/// same packed weight and fused epilogue). On AVX2 (Zen 3) this beat the stride-phase direct
/// loop on every conv shape measured, 1.2-2x (ResNet-18's 3x3 convs 7.5-9.1 -> 4-4.5 ms,
/// its 7x7/2 stem 10.7 -> 6.6 ms with the `gemm` crate behind the im2col): with 8-lane
/// vectors the direct loop's scattered tap rows (one per reduction step) cost more than one
/// contiguous copy of the taps.
#[cfg(target_arch = "x86_64")]
fn forward_im2col_avx2(op: &Direct<'_>, g: &Geom, out: &mut [MaybeUninit<f32>]) {
    let (k, p) = (g.k(), g.p());
    let (in_img, out_img) = (g.in_img(), g.out_img());
    assert!(op.x.len() >= g.n * in_img && out.len() >= g.n * out_img);
    assert!(op.w.len() >= crate::pointwise::packed_len(g.o, k));
    assert!(op.bias.is_none_or(|b| b.len() >= g.o));
    assert!(op.residual.is_none_or(|r| r.len() >= g.n * out_img));
    let rows = band_rows(g);
    let col_len = k * rows * g.ow;
    let t = threads::for_flops(g.flops());
    let np = g.o.div_ceil(MR);
    let outp = SendPtr(out.as_mut_ptr().cast::<f32>());
    // Band `r0..r1` of image `i` from its filled columns `col` (pitch `ld`), output rows of
    // `panels`. Workers write disjoint rows (or images) through the raw pointer.
    let band = |i: usize, r0: usize, r1: usize, col: &[f32], ld: usize, panels: Range<usize>| {
        let j0 = r0 * g.ow;
        let n = (r1 - r0) * g.ow;
        let res = op.residual.map(|r| r[i * out_img + j0..].as_ptr());
        let dst = outp
            .get()
            .wrapping_add(i * out_img + panels.start * MR * p + j0);
        // SAFETY: `isa` is at least AVX2 (callers' level); `col` holds `K` rows of `n` at
        // pitch `ld`; output and residual rows of `panels` hold `n` elements from column
        // `j0` at pitch `P` (lengths asserted above); workers write disjoint rows.
        unsafe {
            crate::pointwise::gemm_avx2(
                col.as_ptr(),
                ld,
                op.w,
                op.bias,
                res,
                op.act,
                (k, g.o, n),
                dst,
                p,
                panels,
            )
        };
    };
    let image = |i: usize, col: &mut [f32], split: bool| {
        let x = &op.x[i * in_img..][..in_img];
        let mut r0 = 0;
        while r0 < g.oh {
            let r1 = (r0 + rows).min(g.oh);
            let ld = (r1 - r0) * g.ow;
            crate::gemm_path::im2col_rows(x, g, col, ld, r0..r1);
            let col = &*col;
            if split {
                threads::map_ranges(np, t, |panels| band(i, r0, r1, col, ld, panels));
            } else {
                band(i, r0, r1, col, ld, 0..np);
            }
            r0 = r1;
        }
    };
    if t <= 1 || (g.n < t && np == 1) {
        with_col(col_len, |col| (0..g.n).for_each(|i| image(i, col, false)));
    } else if g.n >= t {
        threads::map_ranges(g.n, t, |r| {
            with_col(col_len, |col| r.for_each(|i| image(i, col, false)))
        });
    } else {
        with_col(col_len, |col| (0..g.n).for_each(|i| image(i, col, true)));
    }
}

/// One image's operands: the filled scratch, the packed weight and the epilogue's inputs.
struct Work<'a> {
    buf: &'a [f32],
    w: &'a [f32],
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
    act: Activation,
    dims: Dims,
}

/// Panels per block (see [`BLOCK_BYTES`]).
fn panels_per_block(k: usize) -> usize {
    (BLOCK_BYTES / (k * MR * 4).max(1)).max(1)
}

/// [`forward`]'s image without SIMD (CPUs without AVX2 + FMA).
///
/// # Safety
/// `out` must hold `O * OH * OW` writable elements not accessed elsewhere for the rows of
/// `panels`.
unsafe fn image_portable(w: &Work<'_>, g: &Geom, pl: &Plan, out: *mut f32, panels: Range<usize>) {
    let Dims { c, o, p, k } = w.dims;
    let taps = pl.taps.len();
    for pi in panels {
        for row in pi * MR..(pi * MR + MR).min(o) {
            let b = w.bias.map_or(0.0, |b| b[row]);
            for tile in 0..pl.tiles {
                let q0 = tile * NR;
                let mut acc = [0f32; NR];
                for ci in 0..c {
                    for (t, off) in pl.taps.iter().enumerate() {
                        let a = w.w[pi * MR * k + (ci * taps + t) * MR + row - pi * MR];
                        let src = &w.buf[ci * pl.cs + off + q0..][..NR];
                        for (d, v) in acc.iter_mut().zip(src) {
                            *d += a * *v;
                        }
                    }
                }
                let (segs, n) = segments(q0, NR, g, pl);
                for s in &segs[..n] {
                    for (l, v) in acc.iter().enumerate().take(s.hi).skip(s.lo) {
                        let e = row * p + q0 + l - s.shift;
                        let mut v = *v + b;
                        if let Some(r) = w.residual {
                            v += r[e];
                        }
                        v = match w.act {
                            Activation::None => v,
                            Activation::Relu => v.max(0.0),
                            Activation::Relu6 => v.clamp(0.0, 6.0),
                        };
                        // SAFETY: `e < O * P` (a valid output pixel of row `row`).
                        unsafe { out.add(e).write(v) };
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{panels_per_block, segments, Dims, Plan, Seg, Work, MR, NR};
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

    /// Masks of one segment: lanes `lo..hi` of the two vectors, and whether all 16 are set.
    #[derive(Clone, Copy)]
    struct SegMask {
        m: [__m256i; 2],
        full: bool,
        shift: usize,
    }

    #[inline(always)]
    unsafe fn seg_mask(s: &Seg) -> SegMask {
        // SAFETY: callers run with avx2 enabled.
        unsafe {
            let i0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let i1 = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
            let (lo, hi) = (
                _mm256_set1_epi32(s.lo as i32),
                _mm256_set1_epi32(s.hi as i32),
            );
            // Lanes with lo <= i < hi.
            let m0 = _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, i0), _mm256_cmpgt_epi32(hi, i0));
            let m1 = _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, i1), _mm256_cmpgt_epi32(hi, i1));
            SegMask {
                m: [m0, m1],
                full: s.lo == 0 && s.hi == NR,
                shift: s.shift,
            }
        }
    }

    /// The reduction of one `R × 16` tile: `a` the panel at its first step (`[k][MR]`),
    /// `b` the scratch at the tile's first position; `T` taps per channel (`0`: `taps.len()`).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn reduce<const R: usize, const T: usize>(
        c: usize,
        cs: usize,
        taps: &[usize],
        a: *const f32,
        b: *const f32,
    ) -> [[__m256; 2]; R] {
        // SAFETY: callers pass a panel of `c * taps.len()` steps and a scratch whose every
        // tap load (16 lanes from `b + ci * cs + tap`) is in bounds; avx2 + fma enabled.
        unsafe {
            let nt = if T == 0 { taps.len() } else { T };
            let taps = &taps[..nt];
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let mut ap = a;
            for ci in 0..c {
                let bc = b.add(ci * cs);
                for &off in taps {
                    let bp = bc.add(off);
                    let b0 = _mm256_loadu_ps(bp);
                    let b1 = _mm256_loadu_ps(bp.add(8));
                    for r in 0..R {
                        let av = _mm256_broadcast_ss(&*ap.add(r));
                        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
                    }
                    ap = ap.add(MR);
                }
            }
            acc
        }
    }

    /// Bias, residual, activation and the stores of `rows` rows of a tile: one unmasked
    /// load / store per vector when the tile lies in one output row (`segs` is one full
    /// segment), else one masked load / store per row segment.
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn store<const R: usize>(
        acc: [[__m256; 2]; R],
        rows: usize,
        row0: usize,
        q0: usize,
        w: &Work<'_>,
        segs: &[SegMask],
        out: *mut f32,
    ) {
        let p = w.dims.p;
        let whole = segs.len() == 1 && segs[0].full;
        let shift = if whole { segs[0].shift } else { 0 };
        // SAFETY: segment lanes map to valid pixels of rows `row0..row0 + rows` (see
        // `segments`); masked-off lanes are neither read nor written.
        unsafe {
            // `r < R` unrolls with constant indices, keeping `acc` in registers.
            for r in 0..R {
                if r >= rows {
                    break;
                }
                let row = row0 + r;
                let bias = _mm256_set1_ps(w.bias.map_or(0.0, |b| b[row]));
                let mut v0 = _mm256_add_ps(acc[r][0], bias);
                let mut v1 = _mm256_add_ps(acc[r][1], bias);
                if let Some(res) = w.residual {
                    let rp = res.as_ptr().wrapping_add(row * p + q0);
                    if whole {
                        let rp = rp.wrapping_sub(shift);
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(rp));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(rp.add(8)));
                    } else {
                        for s in segs {
                            let base = rp.wrapping_sub(s.shift);
                            v0 = _mm256_add_ps(v0, _mm256_maskload_ps(base, s.m[0]));
                            let b1 = base.wrapping_add(8);
                            v1 = _mm256_add_ps(v1, _mm256_maskload_ps(b1, s.m[1]));
                        }
                    }
                }
                let (v0, v1) = (activate(v0, w.act), activate(v1, w.act));
                let op = out.wrapping_add(row * p + q0);
                if whole {
                    let op = op.wrapping_sub(shift);
                    _mm256_storeu_ps(op, v0);
                    _mm256_storeu_ps(op.add(8), v1);
                } else {
                    for s in segs {
                        let base = op.wrapping_sub(s.shift);
                        _mm256_maskstore_ps(base, s.m[0], v0);
                        _mm256_maskstore_ps(base.wrapping_add(8), s.m[1], v1);
                    }
                }
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const T: usize>(
        w: &Work<'_>,
        pl: &Plan,
        a: *const f32,
        q0: usize,
        rows: usize,
        row0: usize,
        segs: &[SegMask],
        out: *mut f32,
    ) {
        // SAFETY: as `reduce` and `store`.
        unsafe {
            let acc = reduce::<R, T>(w.dims.c, pl.cs, &pl.taps, a, w.buf.as_ptr().add(q0));
            store::<R>(acc, rows, row0, q0, w, segs, out);
        }
    }

    #[inline(always)]
    unsafe fn image_taps<const T: usize>(
        w: &Work<'_>,
        g: &Geom,
        pl: &Plan,
        out: *mut f32,
        panels: Range<usize>,
    ) {
        let Dims { o, k, .. } = w.dims;
        let pb = panels_per_block(k);
        // SAFETY: see `image`.
        unsafe {
            let mut p0 = panels.start;
            while p0 < panels.end {
                let p1 = (p0 + pb).min(panels.end);
                for ti in 0..pl.tiles {
                    let q0 = ti * NR;
                    let (raw, n) = segments(q0, NR, g, pl);
                    let mut segs = [seg_mask(&raw[0]); NR / 2 + 2];
                    for (m, s) in segs.iter_mut().zip(&raw[..n]).skip(1) {
                        *m = seg_mask(s);
                    }
                    let segs = &segs[..n];
                    for pi in p0..p1 {
                        // Passes of at most 6 panel rows (12 accumulators: 16 registers);
                        // a pass at row `sub` reads rows `sub..sub + R <= MR` of each step.
                        for sub in [0, 6, 12] {
                            let row0 = pi * MR + sub;
                            if row0 >= o {
                                break;
                            }
                            let rows = (MR - sub).min(6).min(o - row0);
                            let a = w.w.as_ptr().add(pi * MR * k + sub);
                            match rows {
                                5 | 6 => tile::<6, T>(w, pl, a, q0, rows, row0, segs, out),
                                3 | 4 => tile::<4, T>(w, pl, a, q0, rows, row0, segs, out),
                                _ => tile::<2, T>(w, pl, a, q0, rows, row0, segs, out),
                            }
                        }
                    }
                }
                p0 = p1;
            }
        }
    }

    /// One image: `out [O, OH*OW]` rows of `panels` only.
    ///
    /// # Safety
    /// avx2 + fma available; `w.buf` filled for this geometry (`pl.len` elements), the
    /// packed weight, bias and residual of the asserted lengths, `out` writable for
    /// `O * OH * OW` elements whose rows of `panels` nobody else accesses.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn image(
        w: &Work<'_>,
        g: &Geom,
        pl: &Plan,
        out: *mut f32,
        panels: Range<usize>,
    ) {
        assert!(w.buf.len() >= pl.len);
        // SAFETY: forwarded contract.
        unsafe {
            match pl.taps.len() {
                9 => image_taps::<9>(w, g, pl, out, panels),
                1 => image_taps::<1>(w, g, pl, out, panels),
                _ => image_taps::<0>(w, g, pl, out, panels),
            }
        }
    }
}

/// The AVX-512F form of [`avx`]: tiles of [`NR512`] positions (two 16-lane vectors) × 8
/// panel rows (two passes per panel, 16 accumulators), the row segments of the epilogue as
/// lane masks.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{panels_per_block, segments, Dims, Plan, Work, MAX_SEGS, MR, NR512};
    use crate::geom::Geom;
    use crate::Activation;

    /// Panel rows per pass.
    const RP: usize = 8;
    /// Vectors per tile.
    const NV: usize = NR512 / 16;

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

    /// One row segment of a tile as lane masks (one per vector) and its shift (see `Seg`).
    #[derive(Clone, Copy, Default)]
    struct SegMask {
        m: [u16; NV],
        shift: usize,
    }

    /// The reduction of one `R × NR512` tile: `a` the panel at its first step and first row
    /// of the pass (`[k][MR]`), `b` the scratch at the tile's first position; `T` taps per
    /// channel (`0`: `taps.len()`).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn reduce<const R: usize, const T: usize>(
        c: usize,
        cs: usize,
        taps: &[usize],
        a: *const f32,
        b: *const f32,
    ) -> [[__m512; NV]; R] {
        // SAFETY: callers pass a panel of `c * taps.len()` steps and a scratch whose every
        // tap load (`NR512` lanes from `b + ci * cs + tap`) is in bounds; avx512f enabled.
        unsafe {
            let nt = if T == 0 { taps.len() } else { T };
            let taps = &taps[..nt];
            let mut acc = [[_mm512_setzero_ps(); NV]; R];
            let mut ap = a;
            for ci in 0..c {
                let bc = b.add(ci * cs);
                for &off in taps {
                    let bp = bc.add(off);
                    let mut bv = [_mm512_setzero_ps(); NV];
                    for (q, v) in bv.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(bp.add(16 * q));
                    }
                    for r in 0..R {
                        let av = _mm512_set1_ps(*ap.add(r));
                        for q in 0..NV {
                            acc[r][q] = _mm512_fmadd_ps(av, bv[q], acc[r][q]);
                        }
                    }
                    ap = ap.add(MR);
                }
            }
            acc
        }
    }

    /// Bias, residual, activation and the stores of `rows` rows of a tile: plain loads and
    /// stores when the tile is one whole segment, else the residual gathered by one masked
    /// load per segment and one masked store per segment.
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn store<const R: usize>(
        acc: [[__m512; NV]; R],
        rows: usize,
        row0: usize,
        q0: usize,
        w: &Work<'_>,
        segs: &[SegMask],
        whole: bool,
        out: *mut f32,
    ) {
        let p = w.dims.p;
        // SAFETY: segment lanes map to valid pixels of rows `row0..row0 + rows` (see
        // `segments`); masked-off lanes are neither read nor written.
        unsafe {
            for r in 0..R {
                if r >= rows {
                    break;
                }
                let row = row0 + r;
                let bias = _mm512_set1_ps(w.bias.map_or(0.0, |b| b[row]));
                let mut v = [_mm512_setzero_ps(); NV];
                for q in 0..NV {
                    v[q] = _mm512_add_ps(acc[r][q], bias);
                }
                if let Some(res) = w.residual {
                    let rp = res.as_ptr().wrapping_add(row * p + q0);
                    for q in 0..NV {
                        let rv = if whole {
                            _mm512_loadu_ps(rp.wrapping_sub(segs[0].shift).add(16 * q))
                        } else {
                            let mut rv = _mm512_setzero_ps();
                            for s in segs {
                                let base = rp.wrapping_sub(s.shift).wrapping_add(16 * q);
                                rv = _mm512_mask_loadu_ps(rv, s.m[q], base);
                            }
                            rv
                        };
                        v[q] = _mm512_add_ps(v[q], rv);
                    }
                }
                let op = out.wrapping_add(row * p + q0);
                for q in 0..NV {
                    let vq = activate(v[q], w.act);
                    if whole {
                        _mm512_storeu_ps(op.wrapping_sub(segs[0].shift).add(16 * q), vq);
                    } else {
                        for s in segs {
                            let base = op.wrapping_sub(s.shift).wrapping_add(16 * q);
                            _mm512_mask_storeu_ps(base, s.m[q], vq);
                        }
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn image_taps<const T: usize>(
        w: &Work<'_>,
        g: &Geom,
        pl: &Plan,
        out: *mut f32,
        panels: Range<usize>,
    ) {
        let Dims { c, o, k, .. } = w.dims;
        let pb = panels_per_block(k);
        let tiles = pl.d.div_ceil(NR512);
        // SAFETY: see `image`.
        unsafe {
            let mut p0 = panels.start;
            while p0 < panels.end {
                let p1 = (p0 + pb).min(panels.end);
                for ti in 0..tiles {
                    let q0 = ti * NR512;
                    let (raw, n) = segments(q0, NR512, g, pl);
                    let mut segs = [SegMask::default(); MAX_SEGS];
                    for (m, s) in segs.iter_mut().zip(&raw[..n]) {
                        let bits = ((1u64 << s.hi) - (1u64 << s.lo)) as u32;
                        for (q, mq) in m.m.iter_mut().enumerate() {
                            *mq = (bits >> (16 * q)) as u16;
                        }
                        m.shift = s.shift;
                    }
                    let whole = n == 1 && raw[0].lo == 0 && raw[0].hi == NR512;
                    let segs = &segs[..n];
                    let b = w.buf.as_ptr().add(q0);
                    for pi in p0..p1 {
                        for sub in (0..MR).step_by(RP) {
                            let row0 = pi * MR + sub;
                            if row0 >= o {
                                break;
                            }
                            let rows = RP.min(o - row0);
                            let a = w.w.as_ptr().add(pi * MR * k + sub);
                            if rows > 4 {
                                let acc = reduce::<RP, T>(c, pl.cs, &pl.taps, a, b);
                                store::<RP>(acc, rows, row0, q0, w, segs, whole, out);
                            } else {
                                let acc = reduce::<4, T>(c, pl.cs, &pl.taps, a, b);
                                store::<4>(acc, rows, row0, q0, w, segs, whole, out);
                            }
                        }
                    }
                }
                p0 = p1;
            }
        }
    }

    /// One image: `out [O, OH*OW]` rows of `panels` only.
    ///
    /// # Safety
    /// avx512f available; otherwise as [`super::avx::image`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn image(
        w: &Work<'_>,
        g: &Geom,
        pl: &Plan,
        out: *mut f32,
        panels: Range<usize>,
    ) {
        assert!(w.buf.len() >= pl.len);
        // SAFETY: forwarded contract.
        unsafe {
            match pl.taps.len() {
                9 => image_taps::<9>(w, g, pl, out, panels),
                1 => image_taps::<1>(w, g, pl, out, panels),
                _ => image_taps::<0>(w, g, pl, out, panels),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Conv2dParams;

    fn geom(n: usize, c: usize, hw: (usize, usize), o: usize, k: usize, p: &Conv2dParams) -> Geom {
        Geom::new((n, c, hw.0, hw.1), (o, c, k, k), p).unwrap()
    }

    /// Every valid output pixel is covered by exactly one lane of one tile, at its own
    /// element; no dropped position is stored.
    #[test]
    fn segments_cover_each_pixel_once() {
        for (h, w, k, s, pad) in [
            (28, 28, 3, 1, 1),
            (28, 28, 3, 2, 1),
            (7, 7, 3, 1, 1),
            (1, 1, 3, 1, 1),
            (5, 40, 3, 2, 0),
            (9, 2, 1, 2, 0),
            (16, 16, 1, 1, 0),
            (13, 6, 7, 2, 3),
        ] {
            let g = geom(1, 2, (h, w), 3, k, &Conv2dParams::new(s, pad));
            let pl = Plan::new(&g);
            for nr in [NR, NR512] {
                let mut hits = vec![0u32; g.p()];
                for tile in 0..pl.d.div_ceil(nr) {
                    let q0 = tile * nr;
                    let (segs, n) = segments(q0, nr, &g, &pl);
                    for sg in &segs[..n] {
                        assert!(sg.lo < sg.hi && sg.hi <= nr);
                        for l in sg.lo..sg.hi {
                            let q = q0 + l;
                            assert!(q < pl.d && q % pl.wq < g.ow, "{h}x{w} k{k} s{s}: lane {q}");
                            let e = q - sg.shift;
                            assert_eq!(e, (q / pl.wq) * g.ow + q % pl.wq);
                            hits[e] += 1;
                        }
                    }
                }
                assert!(hits.iter().all(|&n| n == 1), "{h}x{w} k{k} s{s}: {hits:?}");
            }
        }
    }

    /// Every level this CPU runs agrees with the portable loop (the tests against candle
    /// run the widest).
    #[test]
    fn levels_agree() {
        let levels: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&l| l <= isa())
            .collect();
        let mut seed = 7u64;
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
        for (n, c, o, h, w, k, s, pad) in [
            (2, 5, 13, 9, 11, 3, 1, 1),
            (1, 3, 8, 12, 7, 3, 2, 1),
            (3, 4, 6, 5, 5, 1, 2, 0),
            (1, 2, 4, 10, 9, 5, 2, 2),
            (1, 6, 37, 7, 7, 3, 1, 1),
            (2, 3, 20, 1, 1, 3, 1, 1),
            (1, 4, 16, 3, 40, 3, 1, 1),
        ] {
            let g = geom(n, c, (h, w), o, k, &Conv2dParams::new(s, pad));
            let x = rnd(g.n * g.in_img());
            let wt = crate::pointwise::pack(&rnd(o * g.k()), o, g.k());
            let bias = rnd(o);
            let res = rnd(g.n * g.out_img());
            let op = Direct {
                x: &x,
                w: &wt,
                bias: Some(&bias),
                residual: Some(&res),
                act: Activation::Relu,
            };
            let run = |level: Isa| {
                let mut out = vec![MaybeUninit::new(f32::NAN); g.n * g.out_img()];
                forward_with(&op, &g, &mut out, level);
                // SAFETY: initialised above.
                out.iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<f32>>()
            };
            let want = run(Isa::Portable);
            assert!(want.iter().all(|v| v.is_finite()));
            for &l in &levels {
                let got = run(l);
                for (i, (p, q)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-5,
                        "{l:?} {n}x{c}x{h}x{w} k{k} s{s}: [{i}] {p} vs {q}"
                    );
                }
            }
        }
    }
}
