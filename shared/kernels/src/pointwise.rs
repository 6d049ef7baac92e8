//! 1×1 convolution (stride 1, no padding) as a direct GEMM on NCHW with a pre-packed weight:
//! `out[n] [O, P] = act(W [O, C] · x[n] [C, P] + bias + residual[n])`.
//!
//! The weight is packed once ([`pack`], when a module is installed) into panels of [`MR`]
//! (16) output channels, channel-major inside a panel, so a micro-kernel reads it as one
//! contiguous stream. The input needs no packing: in NCHW each input channel is a contiguous
//! row of `P` pixels, and the AVX2 micro-kernel (6×16, 12 accumulators; the shape of MLAS's
//! SGEMM kernels) loads 16 pixels of a row and broadcasts 6 weights of a panel per reduction
//! step, in passes of 6, 6 and 4 rows over a panel. Bias, activation and the residual add are
//! applied to the tile in registers before its only store: no zero-fill, no second pass over
//! the output.
//!
//! On AVX2 the small maps where 16-pixel tiles would leave lanes idle (3×3, 1×1: the
//! classifier) run with vectors over output channels when the reduction is long enough
//! (see [`Kernel::for_level`]).
//!
//! Where the CPU has AVX-512F: 8×32 tiles of 16-lane vectors (two passes per panel; lane
//! masks for the last pixels of a row) while a row fills most of its vectors; on small maps
//! (7×7, 2×2, and the classifier's single pixel) the roles swap ([`vector_over_o`]): a vector
//! holds the 16 output channels of one panel, the input pixel is broadcast, and each output
//! vector is scattered into its channels' rows, so no lane computes a pixel that is not
//! there.

use std::mem::MaybeUninit;

use crate::cpu::{isa, Isa};
use crate::geom::Geom;
use crate::{threads, Activation};

/// Output channels per weight panel: one 16-lane vector for the small-map kernel, two or
/// three row passes for the others.
pub const MR: usize = 16;
/// Pixels per micro-kernel tile.
const NR: usize = 16;
/// Reduction block: at most this many input channels per pass over a tile, so the input
/// block (`KC` rows of `NR` pixels) stays in L1 while all panels of `W` pass over it.
const KC: usize = 256;

/// Length of the packed form of an `[O, C]` weight.
pub fn packed_len(o: usize, c: usize) -> usize {
    o.div_ceil(MR) * MR * c
}

/// Packs `w [O, C]` (row-major) into panels `[O/MR][C][MR]`, the last panel zero-padded.
pub fn pack(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    assert_eq!(w.len(), o * c, "pointwise pack: weight length");
    let mut out = vec![0f32; packed_len(o, c)];
    for (pi, panel) in out.chunks_exact_mut(MR * c).enumerate() {
        for r in 0..MR.min(o - pi * MR) {
            let row = &w[(pi * MR + r) * c..][..c];
            for (k, v) in row.iter().enumerate() {
                panel[k * MR + r] = *v;
            }
        }
    }
    out
}

/// The operands of one pointwise conv call.
pub(crate) struct Pointwise<'a> {
    pub x: &'a [f32],
    /// [`pack`]ed weight.
    pub w: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
}

/// The loop that runs a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    Avx2,
    /// AVX2, vectors over output channels (see [`vector_over_o`]).
    Avx2Small,
    Avx512,
    /// AVX-512, vectors over output channels (see [`vector_over_o`]).
    Avx512Small,
}

impl Kernel {
    /// The widest loop of `level` for maps of `p` pixels and `c` input channels. On AVX2 the
    /// small-map loop stores lane by lane, so it pays only with a reduction long enough to
    /// hide that (Zen 3: a 1x1 1280 -> 1000 on one pixel 0.54 -> 0.13 ms, 480 -> 80 on 3x3
    /// 0.024 -> 0.015 ms, 16 -> 96 on 6x6 1.4x slower), and it streams each panel's whole
    /// reduction once per tile of 6 pixels, so not beyond 768 KB of weights per panel (a
    /// 3x3 512 -> 512 on 7x7 as im2col, 4608 steps x 9 tiles: 1.8x slower).
    pub(crate) fn for_level(level: Isa, p: usize, c: usize) -> Self {
        match level {
            Isa::Portable => Kernel::Portable,
            Isa::Avx2 if c >= 48 && vector_over_o(p) && c * p.div_ceil(6) <= 12_288 => {
                Kernel::Avx2Small
            }
            Isa::Avx2 => Kernel::Avx2,
            Isa::Avx512 if vector_over_o(p) => Kernel::Avx512Small,
            Isa::Avx512 => Kernel::Avx512,
        }
    }

    fn level(self) -> Isa {
        match self {
            Kernel::Portable => Isa::Portable,
            Kernel::Avx2 | Kernel::Avx2Small => Isa::Avx2,
            Kernel::Avx512 | Kernel::Avx512Small => Isa::Avx512,
        }
    }
}

/// Whether the GEMM loops prefetch their weight stream [`W_AHEAD`] reduction steps ahead.
/// Within a model each conv's weights arrive cold (the layers between evict them), and the
/// hardware prefetcher alone left the small-map loop waiting on them: Lite0 224 and
/// MobileNetV2 224 ran 5 % faster with it (Xeon, AVX-512, 1 thread). Env
/// `ADAPTIVENET_PW_PREFETCH=0` turns it off (read once), for A/B runs.
fn prefetch_w() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ADAPTIVENET_PW_PREFETCH").as_deref() != Ok("0"))
}

/// Reduction steps the GEMM loops prefetch their weight stream ahead: one 64-byte line per
/// panel and step, so 2 KB per panel (16 measured slower; 32 and 64 alike).
const W_AHEAD: usize = 32;

/// Whether a map of `p` pixels runs with vectors over output channels: when pixel vectors
/// would leave more than a tenth of their lanes empty (`p` = 49: 64 lanes, 23 % idle; 4:
/// 75 %; 196: 208 lanes, 6 %).
pub(crate) fn vector_over_o(p: usize) -> bool {
    10 * p < 9 * p.div_ceil(16) * 16
}

/// Runs the conv of geometry `g` (1×1, stride 1, unpadded, one group) into `out [N, O, P]`,
/// writing every element, with the widest kernel this CPU runs (see [`isa`]).
pub(crate) fn forward(op: &Pointwise<'_>, g: &Geom, out: &mut [MaybeUninit<f32>]) {
    forward_with(op, g, out, Kernel::for_level(isa(), g.p(), g.c));
}

/// [`forward`] on `kernel` (of a level at most [`isa`]; tests compare the kernels).
pub(crate) fn forward_with(
    op: &Pointwise<'_>,
    g: &Geom,
    out: &mut [MaybeUninit<f32>],
    kernel: Kernel,
) {
    let (c, o, p) = (g.c, g.o, g.p());
    assert!(g.identity_1x1 && g.groups == 1);
    assert!(
        kernel.level() <= isa(),
        "pointwise: {kernel:?} not available"
    );
    assert!(op.x.len() >= g.n * c * p && out.len() >= g.n * o * p);
    assert!(op.w.len() >= packed_len(o, c));
    assert!(op.bias.is_none_or(|b| b.len() >= o));
    assert!(op.residual.is_none_or(|r| r.len() >= g.n * o * p));
    let t = threads::for_flops(g.flops());
    let np = o.div_ceil(MR);
    let outp = SendPtr(out.as_mut_ptr().cast::<f32>());
    // Image `i`, output rows of `panels`. Workers write disjoint rows (or images) through
    // the raw pointer; every row they store lies in `out` (lengths asserted above).
    let image = |i: usize, panels: std::ops::Range<usize>| {
        let xi = &op.x[i * c * p..][..c * p];
        let ri = op.residual.map(|r| &r[i * o * p..][..o * p]);
        let dims = (c, o, p);
        // Output row `panels.start * MR` of image `i`: each image loop stores rows relative to
        // its first panel (see `panel_into`, which writes one panel into a scratch).
        let dst = outp.get().wrapping_add(i * o * p + panels.start * MR * p);
        match kernel {
            // SAFETY: operand lengths asserted above; rows of `panels` only.
            Kernel::Portable => unsafe {
                image_portable(xi, op.w, op.bias, ri, op.act, dims, dst, panels)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` checked avx2 + fma; operand lengths asserted above.
            Kernel::Avx2 => unsafe { avx::image(xi, op.w, op.bias, ri, op.act, dims, dst, panels) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` checked avx2 + fma; operand lengths asserted above.
            Kernel::Avx2Small => unsafe {
                let rp = ri.map(|r| r.as_ptr());
                avx::gemm_small(
                    xi.as_ptr(),
                    p,
                    op.w,
                    op.bias,
                    rp,
                    op.act,
                    dims,
                    dst,
                    p,
                    panels,
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` checked avx512f; operand lengths asserted above.
            Kernel::Avx512 => unsafe {
                avx512::image(xi, op.w, op.bias, ri, op.act, dims, dst, panels)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` checked avx512f; operand lengths asserted above.
            Kernel::Avx512Small => unsafe {
                avx512::image_small(xi, op.w, op.bias, ri, op.act, dims, dst, panels)
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("SIMD level on a non-x86 CPU"),
        }
    };
    if t <= 1 || (g.n == 1 && np == 1) {
        (0..g.n).for_each(|i| image(i, 0..np));
    } else if g.n >= t {
        threads::map_ranges(g.n, t, |r| r.for_each(|i| image(i, 0..np)));
    } else {
        // Few images: split each image's output channels (whole panels) across workers.
        for i in 0..g.n {
            threads::map_ranges(np, t, |panels| image(i, panels));
        }
    }
}

/// Output channels `pi * MR ..` (one panel, at most [`MR`] rows) of image `i` into `dst
/// [rows, P]`, on the kernel [`forward`] picks; one thread. The fused expand + depthwise of
/// an MBConv block ([`crate::expand_dw`]) computes its hidden map one panel at a time.
pub(crate) fn panel_into(
    op: &Pointwise<'_>,
    g: &Geom,
    i: usize,
    pi: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    let (c, o, p) = (g.c, g.o, g.p());
    assert!(g.identity_1x1 && g.groups == 1 && op.residual.is_none());
    assert!(i < g.n && pi < o.div_ceil(MR));
    assert!(op.x.len() >= g.n * c * p && op.w.len() >= packed_len(o, c));
    assert!(op.bias.is_none_or(|b| b.len() >= o));
    assert!(dst.len() >= MR.min(o - pi * MR) * p);
    let xi = &op.x[i * c * p..][..c * p];
    let d = dst.as_mut_ptr().cast::<f32>();
    let (w, b, act) = (op.w, op.bias, op.act);
    let panels = pi..pi + 1;
    match Kernel::for_level(isa(), p, c) {
        // SAFETY: lengths asserted above; the one panel's rows lie in `dst`.
        Kernel::Portable => unsafe { image_portable(xi, w, b, None, act, (c, o, p), d, panels) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` checked avx2 + fma; lengths asserted above.
        Kernel::Avx2 => unsafe { avx::image(xi, w, b, None, act, (c, o, p), d, panels) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` checked avx2 + fma; lengths asserted above.
        Kernel::Avx2Small => unsafe {
            avx::gemm_small(xi.as_ptr(), p, w, b, None, act, (c, o, p), d, p, panels)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` checked avx512f; lengths asserted above.
        Kernel::Avx512 => unsafe { avx512::image(xi, w, b, None, act, (c, o, p), d, panels) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` checked avx512f; lengths asserted above.
        Kernel::Avx512Small => unsafe {
            avx512::image_small(xi, w, b, None, act, (c, o, p), d, panels)
        },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("SIMD level on a non-x86 CPU"),
    }
}

/// `out [O rows at pitch ldo] = act(W · b + bias + residual)` for the `n` columns of `b [K
/// rows at pitch ldb]` (`W` [`pack`]ed `[O, K]`), output rows of `panels` only (`out` at row
/// `panels.start * MR`), `residual` (row 0, pitch `ldo`) added before the activation; on
/// the AVX2 micro-kernel. The direct conv's AVX2 form runs it on bands of im2col columns.
///
/// # Safety
/// The CPU has AVX2 + FMA; `b` holds `K` rows of `n` readable elements at pitch `ldb`; `out`
/// and `residual` hold the rows of `panels` (`n` elements each at pitch `ldo`), `out`'s not
/// accessed elsewhere.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_avx2(
    b: *const f32,
    ldb: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    residual: Option<*const f32>,
    act: Activation,
    (k, o, n): (usize, usize, usize),
    out: *mut f32,
    ldo: usize,
    panels: std::ops::Range<usize>,
) {
    assert!(w.len() >= packed_len(o, k) && bias.is_none_or(|b| b.len() >= o));
    assert!(panels.end <= o.div_ceil(MR) && n <= ldb.min(ldo));
    // SAFETY: the caller's contract.
    unsafe {
        if Kernel::for_level(Isa::Avx2, n, k) == Kernel::Avx2Small {
            avx::gemm_small(b, ldb, w, bias, residual, act, (k, o, n), out, ldo, panels)
        } else {
            avx::gemm(b, ldb, w, bias, residual, act, (k, o, n), out, ldo, panels)
        }
    }
}

/// [`forward`]'s image without SIMD (CPUs without AVX2 + FMA).
///
/// # Safety
/// `out` (output row `panels.start * MR`) must hold the rows of `panels` (`P` writable
/// elements each, not accessed elsewhere).
#[allow(clippy::too_many_arguments)]
unsafe fn image_portable(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Activation,
    (c, o, p): (usize, usize, usize),
    out: *mut f32,
    panels: std::ops::Range<usize>,
) {
    let first = panels.start;
    for pi in panels {
        for row in pi * MR..(pi * MR + MR).min(o) {
            let mut dst = vec![bias.map_or(0.0, |b| b[row]); p];
            for k in 0..c {
                let a = w[pi * MR * c + k * MR + row - pi * MR];
                for (d, v) in dst.iter_mut().zip(&x[k * p..][..p]) {
                    *d += a * *v;
                }
            }
            if let Some(r) = residual {
                for (d, v) in dst.iter_mut().zip(&r[row * p..][..p]) {
                    *d += *v;
                }
            }
            match act {
                Activation::None => {}
                Activation::Relu => dst.iter_mut().for_each(|v| *v = v.max(0.0)),
                Activation::Relu6 => dst.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)),
            }
            // SAFETY: row `row` of the `O x P` output (caller's contract).
            let at = (row - first * MR) * p;
            unsafe { std::ptr::copy_nonoverlapping(dst.as_ptr(), out.add(at), p) };
        }
    }
}

/// A raw output pointer handed to workers that write disjoint rows.
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

/// The epilogue of one tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Tail<'a> {
    bias: Option<&'a [f32]>,
    residual: Option<*const f32>,
    act: Activation,
    /// Whether this k-block is the first (start from zero) and the last (finish).
    first: bool,
    last: bool,
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Tail, KC, MR, NR};
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

    /// Lane mask of the first `n` (0..=8) lanes.
    #[inline(always)]
    unsafe fn mask(n: usize) -> __m256i {
        // SAFETY: callers run with avx2 enabled.
        unsafe {
            let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
        }
    }

    /// One `R × (NV*8)` tile over `kc` reduction steps: `a` the panel at this pass's first
    /// row (step pitch [`MR`]), `b` the input at row pitch `ldb`, `dst` the output at pitch
    /// `ldd`; `rows` valid output rows, `cols` valid columns (masked when < NV*8).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const NV: usize, const R: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        dst: *mut f32,
        ldd: usize,
        rows: usize,
        cols: usize,
        t: &Tail<'_>,
        row0: usize,
    ) {
        // SAFETY: callers pass pointers valid for `rows` x `cols` (masked past `cols`) and
        // `kc` reduction steps, with avx2 + fma enabled.
        unsafe {
            let full = cols == NV * 8;
            let m = [mask(cols.min(8)), mask(cols.saturating_sub(8))];
            let pf = super::prefetch_w();
            let ahead = super::W_AHEAD * MR;
            let mut acc = [[_mm256_setzero_ps(); NV]; R];
            if !t.first {
                for (r, ar) in acc.iter_mut().enumerate().take(rows) {
                    for (q, v) in ar.iter_mut().enumerate() {
                        let p = dst.add(r * ldd + q * 8);
                        *v = if full {
                            _mm256_loadu_ps(p)
                        } else {
                            _mm256_maskload_ps(p, m[q])
                        };
                    }
                }
            }
            for k in 0..kc {
                let bp = b.add(k * ldb);
                let mut bv = [_mm256_setzero_ps(); NV];
                for (q, v) in bv.iter_mut().enumerate() {
                    *v = if full {
                        _mm256_loadu_ps(bp.add(q * 8))
                    } else {
                        _mm256_maskload_ps(bp.add(q * 8), m[q])
                    };
                }
                let ap = a.add(k * MR);
                if pf {
                    _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(ahead).cast::<i8>());
                }
                for (r, ar) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*ap.add(r));
                    for (q, v) in ar.iter_mut().enumerate() {
                        *v = _mm256_fmadd_ps(av, bv[q], *v);
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate().take(rows) {
                let bias = if t.last {
                    _mm256_set1_ps(t.bias.map_or(0.0, |b| b[row0 + r]))
                } else {
                    _mm256_setzero_ps()
                };
                for (q, v) in ar.iter().enumerate() {
                    let mut v = *v;
                    if t.last {
                        v = _mm256_add_ps(v, bias);
                        if let Some(res) = t.residual {
                            let p = res.add(r * ldd + q * 8);
                            let rv = if full {
                                _mm256_loadu_ps(p)
                            } else {
                                _mm256_maskload_ps(p, m[q])
                            };
                            v = _mm256_add_ps(v, rv);
                        }
                        v = activate(v, t.act);
                    }
                    let p = dst.add(r * ldd + q * 8);
                    if full {
                        _mm256_storeu_ps(p, v);
                    } else {
                        _mm256_maskstore_ps(p, m[q], v);
                    }
                }
            }
        }
    }

    /// One image: rows of `panels` only, `op` at output row `panels.start * MR`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn image(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        act: Activation,
        (c, o, p): (usize, usize, usize),
        op: *mut f32,
        panels: Range<usize>,
    ) {
        // SAFETY: the caller's contract, with both pitches `p`.
        unsafe {
            let rp = residual.map(|r| r.as_ptr());
            gemm(x.as_ptr(), p, w, bias, rp, act, (c, o, p), op, p, panels)
        }
    }

    /// [`image`] on operands of any row pitch: `b [C rows at pitch ldb, n columns]`, the
    /// output (and `residual`, row 0) at pitch `ldo`, `op` at output row `panels.start * MR`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        xp: *const f32,
        ldb: usize,
        w: &[f32],
        bias: Option<&[f32]>,
        rp: Option<*const f32>,
        act: Activation,
        (c, o, p): (usize, usize, usize),
        op: *mut f32,
        ldo: usize,
        panels: Range<usize>,
    ) {
        // SAFETY: every tile lies inside `b`, `w`, `residual` and the output rows (caller's
        // contract); a pass of `R` rows at panel row `sub` reads rows `sub..sub + R <= MR`
        // of each step.
        unsafe {
            let wp = w.as_ptr();
            let mut k0 = 0;
            while k0 < c {
                let kc = KC.min(c - k0);
                let step = |pi: usize, j: usize| {
                    let cols = NR.min(p - j);
                    // Passes of 6, 6 and 4 rows (12 accumulators at most: 16 registers).
                    for sub in [0, 6, 12] {
                        let row0 = pi * MR + sub;
                        if row0 >= o {
                            break;
                        }
                        let rows = (MR - sub).min(6).min(o - row0);
                        let t = Tail {
                            bias,
                            residual: rp.map(|r| r.add(row0 * ldo + j)),
                            act,
                            first: k0 == 0,
                            last: k0 + kc == c,
                        };
                        let a = wp.add(pi * MR * c + k0 * MR + sub);
                        let b = xp.add(k0 * ldb + j);
                        let d = op.add((row0 - panels.start * MR) * ldo + j);
                        match (cols > 8, sub < 12) {
                            (true, true) => {
                                tile::<2, 6>(kc, a, b, ldb, d, ldo, rows, cols, &t, row0)
                            }
                            (true, false) => {
                                tile::<2, 4>(kc, a, b, ldb, d, ldo, rows, cols, &t, row0)
                            }
                            (false, true) => {
                                tile::<1, 6>(kc, a, b, ldb, d, ldo, rows, cols, &t, row0)
                            }
                            (false, false) => {
                                tile::<1, 4>(kc, a, b, ldb, d, ldo, rows, cols, &t, row0)
                            }
                        }
                    }
                };
                for j in (0..p).step_by(NR) {
                    for pi in panels.clone() {
                        step(pi, j);
                    }
                }
                k0 += kc;
            }
        }
    }

    /// `PX` pixels × `NP` panels with vectors over output channels (two 8-lane vectors per
    /// panel): `a` the first panel (panels `lda` apart, `[c][MR]` each), `x` the input at the
    /// first pixel (row pitch `ldb`); output vector `(px, v)` holds channels `o0 + 8 v ..` of
    /// pixel `px`, stored lane by lane into their rows (`dst`: row `o0` at the tile's first
    /// pixel, pitch `ldo`; lanes past `o` dropped). No k-blocking: a panel's `c` steps stream
    /// from L2 once per pixel tile.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_small<const NP: usize, const PX: usize>(
        c: usize,
        a: *const f32,
        lda: usize,
        x: *const f32,
        ldb: usize,
        o0: usize,
        o: usize,
        bias: Option<&[f32]>,
        residual: Option<*const f32>,
        act: Activation,
        dst: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: `NP` panels of `c` steps at `a`, `PX` pixels at `x` for every channel, the
        // output (and residual) rows of channels `o0..o` at pixels `0..PX` from `dst`; lanes
        // past `o` are neither loaded nor stored; avx2 + fma enabled.
        unsafe {
            let pf = super::prefetch_w();
            let ahead = super::W_AHEAD * MR;
            let mut acc = [[[_mm256_setzero_ps(); 2]; NP]; PX];
            for k in 0..c {
                let mut wv = [[_mm256_setzero_ps(); 2]; NP];
                for (j, v) in wv.iter_mut().enumerate() {
                    let ap = a.add(j * lda + k * MR);
                    if pf {
                        _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(ahead).cast::<i8>());
                    }
                    *v = [_mm256_loadu_ps(ap), _mm256_loadu_ps(ap.add(8))];
                }
                let xk = x.add(k * ldb);
                for (px, ap) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xk.add(px));
                    for (j, v) in ap.iter_mut().enumerate() {
                        v[0] = _mm256_fmadd_ps(xv, wv[j][0], v[0]);
                        v[1] = _mm256_fmadd_ps(xv, wv[j][1], v[1]);
                    }
                }
            }
            for j in 0..NP {
                for h in 0..2 {
                    let oj = o0 + 16 * j + 8 * h;
                    if oj >= o {
                        break;
                    }
                    let lanes = (o - oj).min(8);
                    let b = match bias {
                        Some(b) => _mm256_maskload_ps(b.as_ptr().add(oj), mask(lanes)),
                        None => _mm256_setzero_ps(),
                    };
                    for (px, ap) in acc.iter().enumerate() {
                        let mut t = [0f32; 8];
                        _mm256_storeu_ps(t.as_mut_ptr(), _mm256_add_ps(ap[j][h], b));
                        let row = (oj - o0) * ldo + px;
                        for (l, v) in t.iter().enumerate().take(lanes) {
                            let mut v = *v;
                            if let Some(r) = residual {
                                v += *r.add(row + l * ldo);
                            }
                            v = match act {
                                Activation::None => v,
                                Activation::Relu => v.max(0.0),
                                Activation::Relu6 => v.clamp(0.0, 6.0),
                            };
                            *dst.add(row + l * ldo) = v;
                        }
                    }
                }
            }
        }
    }

    /// [`gemm`] on a small map (see [`super::vector_over_o`]): vectors over output channels,
    /// pixels in near-equal tiles of at most 6 (49: 6, 6, 6, 6, 5, 5, 5, 5, 5), one panel
    /// per tile (12 accumulators); two panels for two pixels and four for one, so the
    /// reduction keeps 8 independent accumulators. `rp` and `op` as in [`gemm`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_small(
        xp: *const f32,
        ldb: usize,
        w: &[f32],
        bias: Option<&[f32]>,
        rp: Option<*const f32>,
        act: Activation,
        (c, o, p): (usize, usize, usize),
        op: *mut f32,
        ldo: usize,
        panels: Range<usize>,
    ) {
        // SAFETY: every tile lies inside `b`, `w`, `residual` and the output rows (caller's
        // contract).
        unsafe {
            let wp = w.as_ptr();
            let lda = MR * c;
            let mut tiles = p.div_ceil(6);
            let mut p0 = 0;
            while p0 < p {
                let px = (p - p0).div_ceil(tiles);
                tiles -= 1;
                let np = match px {
                    1 => 4,
                    2 => 2,
                    _ => 1,
                };
                let mut pi = panels.start;
                while pi < panels.end {
                    let n = np.min(panels.end - pi);
                    let a = wp.add(pi * lda);
                    let xs = xp.add(p0);
                    let o0 = pi * MR;
                    let r = rp.map(|r| r.add(o0 * ldo + p0));
                    let d = op.add((o0 - panels.start * MR) * ldo + p0);
                    macro_rules! run {
                        ($np:literal, $px:literal) => {
                            tile_small::<$np, $px>(c, a, lda, xs, ldb, o0, o, bias, r, act, d, ldo)
                        };
                    }
                    match (n, px) {
                        (_, 6) => run!(1, 6),
                        (_, 5) => run!(1, 5),
                        (_, 4) => run!(1, 4),
                        (_, 3) => run!(1, 3),
                        (2, 2) => run!(2, 2),
                        (_, 2) => run!(1, 2),
                        (4, _) => run!(4, 1),
                        (3, _) => run!(3, 1),
                        (2, _) => run!(2, 1),
                        _ => run!(1, 1),
                    }
                    pi += n;
                }
                p0 += px;
            }
        }
    }
}

/// AVX-512 mask of the first `n` lanes (all 16 for `n >= 16`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lane_mask(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// The AVX-512F forms: [`avx`]'s loop with 16-lane vectors (tiles of 8 panel rows × 32
/// pixels, lane masks for the last columns of a row), and the small-map loop with vectors
/// over output channels.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{lane_mask as mask, Tail, KC, MR};
    use crate::Activation;

    /// Pixels per tile (two 16-lane vectors).
    const NR: usize = 32;
    /// Panel rows per pass (two passes per panel; 16 accumulators).
    const RP: usize = 8;

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

    /// One `RP × (NV*16)` tile over `kc` reduction steps (see [`super::avx`]'s `tile`);
    /// `cols` valid columns, the rest masked off in every load and store.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const NV: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        dst: *mut f32,
        ldd: usize,
        rows: usize,
        cols: usize,
        t: &Tail<'_>,
        row0: usize,
    ) {
        // SAFETY: callers pass pointers valid for `rows` x `cols` and `kc` reduction steps
        // (masked lanes are not accessed), with avx512f enabled.
        unsafe {
            let m = [mask(cols.min(16)), mask(cols.saturating_sub(16))];
            let pf = super::prefetch_w();
            let ahead = super::W_AHEAD * MR;
            let mut acc = [[_mm512_setzero_ps(); NV]; RP];
            if !t.first {
                for (r, ar) in acc.iter_mut().enumerate().take(rows) {
                    for (q, v) in ar.iter_mut().enumerate() {
                        *v = _mm512_maskz_loadu_ps(m[q], dst.add(r * ldd + q * 16));
                    }
                }
            }
            for k in 0..kc {
                let bp = b.add(k * ldb);
                let mut bv = [_mm512_setzero_ps(); NV];
                for (q, v) in bv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(m[q], bp.add(q * 16));
                }
                let ap = a.add(k * MR);
                if pf {
                    _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(ahead).cast::<i8>());
                }
                for (r, ar) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(r));
                    for (q, v) in ar.iter_mut().enumerate() {
                        *v = _mm512_fmadd_ps(av, bv[q], *v);
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate().take(rows) {
                let bias = if t.last {
                    _mm512_set1_ps(t.bias.map_or(0.0, |b| b[row0 + r]))
                } else {
                    _mm512_setzero_ps()
                };
                for (q, v) in ar.iter().enumerate() {
                    let mut v = *v;
                    if t.last {
                        v = _mm512_add_ps(v, bias);
                        if let Some(res) = t.residual {
                            let rv = _mm512_maskz_loadu_ps(m[q], res.add(r * ldd + q * 16));
                            v = _mm512_add_ps(v, rv);
                        }
                        v = activate(v, t.act);
                    }
                    _mm512_mask_storeu_ps(dst.add(r * ldd + q * 16), m[q], v);
                }
            }
        }
    }

    /// One image: rows of `panels` only, `op` at output row `panels.start * MR`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn image(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        act: Activation,
        (c, o, p): (usize, usize, usize),
        op: *mut f32,
        panels: Range<usize>,
    ) {
        // SAFETY: every tile lies inside `x`, `w`, `residual` and the `O x P` output; a
        // pass reads panel rows `sub..sub + RP <= MR` of each step.
        unsafe {
            let (xp, wp) = (x.as_ptr(), w.as_ptr());
            let rp = residual.map(|r| r.as_ptr());
            let mut k0 = 0;
            while k0 < c {
                let kc = KC.min(c - k0);
                let mut j = 0;
                while j < p {
                    let cols = NR.min(p - j);
                    for pi in panels.clone() {
                        for sub in (0..MR).step_by(RP) {
                            let row0 = pi * MR + sub;
                            if row0 >= o {
                                break;
                            }
                            let rows = RP.min(o - row0);
                            let t = Tail {
                                bias,
                                residual: rp.map(|r| r.add(row0 * p + j)),
                                act,
                                first: k0 == 0,
                                last: k0 + kc == c,
                            };
                            let a = wp.add(pi * MR * c + k0 * MR + sub);
                            let b = xp.add(k0 * p + j);
                            let d = op.add((row0 - panels.start * MR) * p + j);
                            if cols > 16 {
                                tile::<2>(kc, a, b, p, d, p, rows, cols, &t, row0);
                            } else {
                                tile::<1>(kc, a, b, p, d, p, rows, cols, &t, row0);
                            }
                        }
                    }
                    j += NR;
                }
                k0 += kc;
            }
        }
    }

    /// `PX` pixels × `NP` panels with vectors over output channels: `a` the first panel
    /// (panels `lda` apart, `[c][MR]` each), `x` the input at the first pixel (channel
    /// pitch `p`); output vector `(px, j)` holds channels `o0 + 16 j ..` of pixel `px` and is
    /// scattered into their rows (`dst`: row `o0` at the tile's first pixel; lanes past `o`
    /// masked off).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_small<const NP: usize, const PX: usize>(
        c: usize,
        a: *const f32,
        lda: usize,
        x: *const f32,
        p: usize,
        o0: usize,
        o: usize,
        bias: Option<&[f32]>,
        residual: Option<*const f32>,
        act: Activation,
        dst: *mut f32,
    ) {
        // SAFETY: `NP` panels of `c` steps at `a`, `PX` pixels at `x` for every channel, the
        // output (and residual) rows of channels `o0..o` at pixels `0..PX` from `dst`; lanes
        // past `o` are masked off; avx512f enabled.
        unsafe {
            let pf = super::prefetch_w();
            let ahead = super::W_AHEAD * MR;
            let mut acc = [[_mm512_setzero_ps(); NP]; PX];
            for k in 0..c {
                let mut wv = [_mm512_setzero_ps(); NP];
                for (j, v) in wv.iter_mut().enumerate() {
                    if pf {
                        _mm_prefetch::<_MM_HINT_T0>(
                            a.wrapping_add(j * lda + k * MR + ahead).cast::<i8>(),
                        );
                    }
                    *v = _mm512_loadu_ps(a.add(j * lda + k * MR));
                }
                let xk = x.add(k * p);
                for (px, ap) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xk.add(px));
                    for (j, v) in ap.iter_mut().enumerate() {
                        *v = _mm512_fmadd_ps(xv, wv[j], *v);
                    }
                }
            }
            // Lane `l` of panel `j` is channel `o0 + 16 j + l`, at `(16 j + l) * p` from
            // the channel-`o0` row.
            let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(p as i32));
            for j in 0..NP {
                let oj = o0 + 16 * j;
                let m = mask(o.saturating_sub(oj));
                if m == 0 {
                    break;
                }
                let b = match bias {
                    Some(b) => _mm512_maskz_loadu_ps(m, b.as_ptr().add(oj)),
                    None => _mm512_setzero_ps(),
                };
                for (px, ap) in acc.iter().enumerate() {
                    let mut v = _mm512_add_ps(ap[j], b);
                    let at = oj * p + px;
                    if let Some(r) = residual {
                        let rv =
                            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, idx, r.add(at));
                        v = _mm512_add_ps(v, rv);
                    }
                    let d = dst.add((oj - o0) * p + px);
                    _mm512_mask_i32scatter_ps::<4>(d, m, idx, activate(v, act));
                }
            }
        }
    }

    /// One image on a small map: rows of `panels` only (`op` at output row `panels.start *
    /// MR`), vectors over output
    /// channels (see [`super::vector_over_o`]). Pixels in tiles of at most 12, panels two at
    /// a time (up to 24 accumulators; four panels for a single pixel, so the reduction has
    /// enough independent accumulators).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn image_small(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        act: Activation,
        (c, o, p): (usize, usize, usize),
        op: *mut f32,
        panels: Range<usize>,
    ) {
        // SAFETY: every tile lies inside `x`, `w`, `residual` and the `O x P` output.
        unsafe {
            let (xp, wp) = (x.as_ptr(), w.as_ptr());
            let lda = MR * c;
            // Pixel tiles of near-equal size, at most 12 (49 pixels: 10, 10, 10, 10, 9), so no
            // tile of one or two pixels streams the weights again for a few multiply-adds.
            let mut tiles = p.div_ceil(12);
            let mut p0 = 0;
            while p0 < p {
                let px = (p - p0).div_ceil(tiles);
                tiles -= 1;
                let np = if px == 1 { 4 } else { 2 };
                let mut pi = panels.start;
                while pi < panels.end {
                    let n = np.min(panels.end - pi);
                    let a = wp.add(pi * lda);
                    let xs = xp.add(p0);
                    let o0 = pi * MR;
                    let r = residual.map(|r| r.as_ptr().add(p0));
                    let d = op.add((o0 - panels.start * MR) * p + p0);
                    macro_rules! run {
                        ($np:literal, $px:literal) => {
                            tile_small::<$np, $px>(c, a, lda, xs, p, o0, o, bias, r, act, d)
                        };
                    }
                    macro_rules! by_px {
                        ($np:literal) => {
                            match px {
                                12 => run!($np, 12),
                                11 => run!($np, 11),
                                10 => run!($np, 10),
                                9 => run!($np, 9),
                                8 => run!($np, 8),
                                7 => run!($np, 7),
                                6 => run!($np, 6),
                                5 => run!($np, 5),
                                4 => run!($np, 4),
                                3 => run!($np, 3),
                                _ => run!($np, 2),
                            }
                        };
                    }
                    match (n, px) {
                        (4, 1) => run!(4, 1),
                        (3, 1) => run!(3, 1),
                        (2, 1) => run!(2, 1),
                        (_, 1) => run!(1, 1),
                        (2, _) => by_px!(2),
                        _ => by_px!(1),
                    }
                    pi += n;
                }
                p0 += px;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Conv2dParams;

    /// Every kernel this CPU runs agrees with the portable loop (the tests against candle
    /// run only the one each map size picks).
    #[test]
    fn levels_agree() {
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
        let kernels: Vec<Kernel> = [
            Kernel::Portable,
            Kernel::Avx2,
            Kernel::Avx2Small,
            Kernel::Avx512,
            Kernel::Avx512Small,
        ]
        .into_iter()
        .filter(|k| k.level() <= isa())
        .collect();
        // Maps of one pixel to 14x14, output channels in one, two and three panels (the
        // last partial), reductions shorter and longer than one k-block.
        for (n, c, o, h, w) in [
            (1, 3, 5, 7, 7),
            (2, 300, 13, 4, 5),
            (1, 17, 6, 14, 14),
            (1, 8, 7, 1, 33),
            (1, 40, 40, 6, 8),
            (1, 64, 37, 1, 1),
            (2, 9, 100, 2, 2),
            (1, 5, 16, 3, 1),
            (1, 20, 70, 1, 1),
            (1, 7, 40, 1, 2),
            (1, 600, 24, 7, 7),
        ] {
            let g = Geom::new((n, c, h, w), (o, c, 1, 1), &Conv2dParams::default()).unwrap();
            let x = rnd(n * c * h * w);
            let wt = pack(&rnd(o * c), o, c);
            let bias = rnd(o);
            let res = rnd(n * o * h * w);
            let op = Pointwise {
                x: &x,
                w: &wt,
                bias: Some(&bias),
                residual: Some(&res),
                act: Activation::Relu6,
            };
            let run = |kernel: Kernel| {
                let mut out = vec![MaybeUninit::new(f32::NAN); n * o * h * w];
                forward_with(&op, &g, &mut out, kernel);
                // SAFETY: every element written (checked finite below).
                out.iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<f32>>()
            };
            let want = run(Kernel::Portable);
            assert!(want.iter().all(|v| v.is_finite()));
            for &l in &kernels[1..] {
                let got = run(l);
                for (i, (p, q)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-5,
                        "{l:?} {n}x{c}x{h}x{w}->{o} [{i}] {p} vs {q}"
                    );
                }
            }
        }
    }
}
