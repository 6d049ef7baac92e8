//! Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution for inference: 3x3, stride 1, any
//! per-side padding, no dilation, one group, NCHW, with a weight transformed once at pack
//! time: `out[n] = act(conv(x[n], W) + bias + residual[n])`. The packed weight's first
//! dimension (16 or 36 transform positions) says which.
//!
//! Each 2x2 output tile costs 16 multiply-adds per (output, input) channel pair instead of
//! the direct conv's 36, each 4x4 tile 36 instead of 144. Per chunk of tile rows (whole rows
//! of tiles, across images, so a 7x7 map's short tile rows fill the vector lanes):
//!
//! 1. input transform `V = B^T d B` of every `(m+2)^2` input patch `d` (zero outside the
//!    padded image), stored as `(m+2)^2` matrices `V[xi] [C x tiles]` (tiles in the lanes);
//! 2. `(m+2)^2` GEMMs `M[xi] [O x tiles] = U[xi] [O x C] * V[xi]`, `U = G g G^T` packed at
//!    pack time in panels of 16 output channels (like [`crate::pointwise`]'s), on an 8x32
//!    (AVX-512) or 6x16 (AVX2 + FMA) register-tile micro-kernel;
//! 3. output transform `Y = A^T M A` per tile, with bias, residual add and activation applied
//!    before the one store of each output row.
//!
//! `V` and `M` of a chunk stay in L2 (see [`CHUNK_BYTES`]). With AVX-512 the transforms run
//! 16 tiles of the chunk per vector whatever the row length (masked loads gather each tile
//! row's run of patches straight from `x`, lane permutes deinterleave the columns and
//! interleave the outputs'); elsewhere F(2x2)'s are plain loops over a tile row that the
//! compiler vectorises (short rows leave them largely scalar: 16 channels then lose to the
//! direct conv, see [`crate::winograd_wins`]) and F(4x4)'s go one tile at a time (routing
//! keeps F(4x4) to AVX-512, see [`crate::winograd_tile`]). In f32 F(2x2)'s transforms (sums
//! of up to 9 terms) cost about one extra rounding step over the direct conv (tests: within
//! 1e-5 of the outputs' largest magnitude); F(4x4)'s interpolation points 0, +-1, +-2 scale
//! terms by up to 25 in, 8 out (tests: about 1e-5 relative to candle on ResNet shapes).

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::cpu::{isa, Isa};
use crate::gemm_path::with_col;
use crate::geom::Geom;
use crate::{threads, Activation};

/// Output channels per packed panel of `U`.
pub(crate) const PANEL: usize = 16;
/// Tiles per micro-kernel column unit: `V` and `M` rows are padded to a multiple of it.
const LANES: usize = 16;
/// Bytes of `V` + `M` per chunk: both stay in L2 between the transforms and the GEMMs.
const CHUNK_BYTES: usize = 256 << 10;

/// Output tile side of F(2x2, 3x3) and F(4x4, 3x3).
pub(crate) const TILES: [usize; 2] = [2, 4];

/// Transform positions `(m + 2)^2` of output tile side `m`.
pub(crate) fn positions(m: usize) -> usize {
    (m + 2) * (m + 2)
}

/// Length of the packed weight of `o` outputs and `c` inputs for tile side `m`:
/// `[(m+2)^2][ceil(O/16)][C][16]`.
pub(crate) fn packed_len(o: usize, c: usize, m: usize) -> usize {
    positions(m) * o.div_ceil(PANEL) * c * PANEL
}

/// Whether [`forward`] runs geometry `g`.
pub(crate) fn supports(g: &Geom) -> bool {
    (g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.groups) == (3, 3, 1, 1, 1, 1, 1)
}

/// The weight transform `G` (`(m + 2) x 3`) of tile side `m` (2 or 4): interpolation points
/// 0, 1, -1 (and 2, -2 for 4), and infinity.
fn g_matrix(m: usize) -> Vec<[f64; 3]> {
    match m {
        2 => vec![
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0],
        ],
        4 => vec![
            [0.25, 0.0, 0.0],
            [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
            [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
            [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
            [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
            [0.0, 0.0, 1.0],
        ],
        _ => panic!("winograd: tile side {m}, expected 2 or 4"),
    }
}

/// Transforms a 3x3 weight `w [O, C, 3, 3]` into `U = G g G^T` per (output, input) pair
/// for output tiles of side `m` (2 or 4; in f64, rounded once), packed as
/// `[(m+2)^2][ceil(O/16)][C][16]` (zero-padded rows): for each transform position `xi`, the
/// `[O x C]` matrix in 16-row panels, input-channel-major.
pub(crate) fn pack(w: &[f32], o: usize, c: usize, m: usize) -> Vec<f32> {
    assert!(w.len() >= o * c * 9);
    let gm = g_matrix(m);
    let a = m + 2;
    let op = o.div_ceil(PANEL);
    let mut u = vec![0f32; packed_len(o, c, m)];
    for oi in 0..o {
        for ci in 0..c {
            let g = &w[(oi * c + ci) * 9..][..9];
            // t = G g (a x 3), then U = t G^T (a x a).
            for (i, gi) in gm.iter().enumerate() {
                let t: [f64; 3] =
                    std::array::from_fn(|j| (0..3).map(|k| gi[k] * f64::from(g[k * 3 + j])).sum());
                for (j, gj) in gm.iter().enumerate() {
                    let v: f64 = (0..3).map(|k| t[k] * gj[k]).sum();
                    let xi = i * a + j;
                    u[((xi * op + oi / PANEL) * c + ci) * PANEL + oi % PANEL] = v as f32;
                }
            }
        }
    }
    u
}

/// The tiling of one geometry.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Output tile side (2 or 4) and transform positions `(m + 2)^2`.
    m: usize,
    np: usize,
    /// Tile rows per image and tiles per tile row.
    th: usize,
    tw: usize,
    /// Tile rows over the batch (`N * th`).
    rows: usize,
    /// Tile rows per chunk.
    r: usize,
    /// Lanes per `V` / `M` row (`r * tw` rounded up to [`LANES`]).
    pitch: usize,
    /// Panels of output channels.
    op: usize,
}

impl Plan {
    /// Chunks as large as [`CHUNK_BYTES`] allows, at least `threads` of them where there are
    /// enough rows, with the fewest padded lanes over the whole batch (larger on ties).
    fn new(g: &Geom, threads: usize, m: usize) -> Self {
        let np = positions(m);
        let (th, tw) = (g.oh.div_ceil(m), g.ow.div_ceil(m));
        let rows = g.n * th;
        let op = g.o.div_ceil(PANEL);
        let per_tile = np * (g.c + op * PANEL) * 4;
        let max_tiles = (CHUNK_BYTES / per_tile / LANES * LANES).max(LANES);
        let rmax = (max_tiles / tw)
            .max(1)
            .min(rows.div_ceil(threads.max(1)))
            .max(1);
        let lanes = |r: usize| (r * tw).next_multiple_of(LANES);
        let cost = |r: usize| {
            (rows / r) * lanes(r)
                + if rows.is_multiple_of(r) {
                    0
                } else {
                    lanes(rows % r)
                }
        };
        let r = (1..=rmax)
            .min_by_key(|&r| (cost(r), std::cmp::Reverse(r)))
            .unwrap_or(1);
        Self {
            m,
            np,
            th,
            tw,
            rows,
            r,
            pitch: lanes(r),
            op,
        }
    }

    /// Lanes of `V` / `M` a chunk of `rows` tile rows uses.
    fn width(&self, rows: usize) -> usize {
        (rows * self.tw).next_multiple_of(LANES)
    }

    fn chunks(&self) -> usize {
        self.rows.div_ceil(self.r)
    }

    fn v_len(&self, c: usize) -> usize {
        self.np * c * self.pitch
    }

    fn m_len(&self) -> usize {
        self.np * self.op * PANEL * self.pitch
    }

    /// Padded input row of the portable / AVX2 F(2x2) transform: the last tile's 4x4 patch
    /// ends at column `2 * (tw + 1)`.
    fn lp(&self) -> usize {
        2 * (self.tw + 1)
    }

    /// `V`, `M`, and for F(2x2) a padded row, 8 deinterleaved rows (even / odd columns of
    /// the patch's 4 rows) and 2 output rows.
    fn scratch_len(&self, c: usize) -> usize {
        let rows = if self.m == 2 {
            self.lp() + 8 * (self.tw + 1) + 4 * self.tw
        } else {
            0
        };
        self.v_len(c) + self.m_len() + rows
    }
}

/// The operands of one Winograd conv call.
pub(crate) struct Winograd<'a> {
    pub x: &'a [f32],
    /// Weight packed by [`pack`] for output tiles of side `m`.
    pub u: &'a [f32],
    pub m: usize,
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
}

/// A raw output pointer handed to workers that write disjoint output rows.
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

/// Runs the conv of geometry `g` ([`supports`]) into `out [N, O, OH, OW]` on the kernels of
/// `level` (at most [`isa`]); every element is written.
pub(crate) fn forward_with(op: &Winograd<'_>, g: &Geom, out: &mut [MaybeUninit<f32>], level: Isa) {
    assert!(supports(g) && level <= isa() && TILES.contains(&op.m));
    let (in_img, out_img) = (g.in_img(), g.out_img());
    assert!(op.x.len() >= g.n * in_img && out.len() >= g.n * out_img);
    assert!(op.u.len() >= packed_len(g.o, g.c, op.m));
    assert!(op.bias.is_none_or(|b| b.len() >= g.o));
    assert!(op.residual.is_none_or(|r| r.len() >= g.n * out_img));
    if g.n * out_img == 0 {
        return;
    }
    let t = threads::for_flops(g.flops());
    let pl = Plan::new(g, t, op.m);
    let outp = SendPtr(out.as_mut_ptr());
    let run = |chunks: Range<usize>| {
        with_col(pl.scratch_len(g.c), |buf| {
            for ci in chunks {
                let rows = ci * pl.r..((ci + 1) * pl.r).min(pl.rows);
                // SAFETY: lengths asserted above; chunks write disjoint output rows.
                unsafe { chunk(level, op, g, &pl, rows, buf, outp.get()) };
            }
        })
    };
    let n = pl.chunks();
    if t <= 1 || n <= 1 {
        run(0..n);
    } else {
        threads::map_ranges(n, t, run);
    }
}

/// One chunk on the widest kernels `level` allows.
///
/// # Safety
/// Operand lengths as asserted by [`forward_with`], `level <= isa()`; `out` writable for
/// the output rows of tile rows `rows`, which nobody else accesses.
unsafe fn chunk(
    level: Isa,
    op: &Winograd<'_>,
    g: &Geom,
    pl: &Plan,
    rows: Range<usize>,
    buf: &mut [f32],
    out: *mut MaybeUninit<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `level <= isa()` (caller) enables the instruction sets; forwarded contract.
    unsafe {
        match level {
            Isa::Avx512 => return x86::chunk_avx512(op, g, pl, rows, buf, out),
            Isa::Avx2 => return x86::chunk_avx2(op, g, pl, rows, buf, out),
            Isa::Portable => {}
        }
    }
    // SAFETY: forwarded contract.
    unsafe { chunk_body::<0>(op, g, pl, rows, buf, out) }
}

/// The three steps of one chunk; `L` picks the GEMM kernel (0 portable, 1 AVX2 + FMA,
/// 2 AVX-512), the transforms take the instruction set of the function this is inlined in.
///
/// # Safety
/// As [`chunk`], and the instruction set of `L` enabled.
#[inline(always)]
unsafe fn chunk_body<const L: u8>(
    op: &Winograd<'_>,
    g: &Geom,
    pl: &Plan,
    rows: Range<usize>,
    buf: &mut [f32],
    out: *mut MaybeUninit<f32>,
) {
    let (v, rest) = buf.split_at_mut(pl.v_len(g.c));
    let (m, rest) = rest.split_at_mut(pl.m_len());
    match (L, pl.m) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f enabled (caller).
        (2, 2) => unsafe { x86::transform_in512(op.x, g, pl, rows.clone(), v) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f enabled (caller).
        (2, _) => unsafe { x86::transform_in512_4(op.x, g, pl, rows.clone(), v) },
        (_, 2) => {
            let (prow, rest) = rest.split_at_mut(pl.lp());
            let eo = &mut rest[..8 * (pl.tw + 1)];
            transform_in(op.x, g, pl, rows.clone(), v, prow, eo)
        }
        _ => transform_in4(op.x, g, pl, rows.clone(), v),
    }
    // Lanes the GEMMs run: the last chunk may hold fewer tile rows than the others.
    let (c, pitch, width) = (g.c, pl.pitch, pl.width(rows.len()));
    for xi in 0..pl.np {
        let b = &v[xi * c * pitch..][..c * pitch];
        for p in 0..pl.op {
            let a = &op.u[((xi * pl.op + p) * c) * PANEL..][..c * PANEL];
            let mp = &mut m[(xi * pl.op + p) * PANEL * pitch..][..PANEL * pitch];
            let live = (g.o - p * PANEL).min(PANEL);
            match L {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: avx512f enabled (caller); slice lengths checked inside.
                2 => unsafe { x86::gemm512(a, b, mp, c, pitch, width, live) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: avx2 + fma enabled (caller); slice lengths checked inside.
                1 => unsafe { x86::gemm256(a, b, mp, c, pitch, width, live) },
                _ => gemm_portable(a, b, mp, c, pitch, width, live),
            }
        }
    }
    match (L, pl.m) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f enabled (caller); forwarded contract.
        (2, 2) => unsafe { x86::transform_out512(op, g, pl, rows, m, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f enabled (caller); forwarded contract.
        (2, _) => unsafe { x86::transform_out512_4(op, g, pl, rows, m, out) },
        (_, 2) => {
            let orow = &mut rest[pl.lp() + 8 * (pl.tw + 1)..][..4 * pl.tw];
            // SAFETY: forwarded contract.
            unsafe { transform_out(op, g, pl, rows, m, orow, out) }
        }
        // SAFETY: forwarded contract.
        _ => unsafe { transform_out4(op, g, pl, rows, m, out) },
    }
}

/// `B^T d` of F(4x4, 3x3) on one column (or row) of 6 values.
#[inline(always)]
fn bt4(d: [f32; 6]) -> [f32; 6] {
    let (t1, t2) = (d[4] - 4.0 * d[2], d[3] - 4.0 * d[1]);
    let (t3, t4) = (d[4] - d[2], d[3] - d[1]);
    [
        4.0 * (d[0] - d[2]) + t3,
        t1 + t2,
        t1 - t2,
        t3 + 2.0 * t4,
        t3 - 2.0 * t4,
        4.0 * (d[1] - d[3]) + (d[5] - d[3]),
    ]
}

/// `A^T m` of F(4x4, 3x3) on one column (or row) of 6 values.
#[inline(always)]
fn at4(m: [f32; 6]) -> [f32; 4] {
    let (a, b) = (m[1] + m[2], m[1] - m[2]);
    let (c, d) = (m[3] + m[4], m[3] - m[4]);
    [m[0] + a + c, b + 2.0 * d, a + 4.0 * c, b + 8.0 * d + m[5]]
}

/// [`transform_in`] for F(4x4, 3x3), one 6x6 patch at a time (the portable / AVX2 path:
/// routing keeps F(4x4) to AVX-512, so this only has to be right).
fn transform_in4(x: &[f32], g: &Geom, pl: &Plan, rows: Range<usize>, v: &mut [f32]) {
    let (tw, pitch) = (pl.tw, pl.pitch);
    let hw = g.h * g.w;
    let (live, width) = (rows.len() * tw, pl.width(rows.len()));
    if live < width {
        for r in v.chunks_exact_mut(pitch) {
            r[live..width].fill(0.0);
        }
    }
    for c in 0..g.c {
        for (lr, gr) in rows.clone().enumerate() {
            let (n, ty) = (gr / pl.th, gr % pl.th);
            let xc = &x[(n * g.c + c) * hw..][..hw];
            for tx in 0..tw {
                let mut d = [[0f32; 6]; 6];
                for (i, di) in d.iter_mut().enumerate() {
                    let iy = (4 * ty + i) as isize - g.pt as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    for (j, dij) in di.iter_mut().enumerate() {
                        let ix = (4 * tx + j) as isize - g.pl as isize;
                        if ix >= 0 && ix < g.w as isize {
                            *dij = xc[iy as usize * g.w + ix as usize];
                        }
                    }
                }
                let mut t = [[0f32; 6]; 6];
                for j in 0..6 {
                    let col = bt4(std::array::from_fn(|i| d[i][j]));
                    for (i, ti) in t.iter_mut().enumerate() {
                        ti[j] = col[i];
                    }
                }
                for (i, ti) in t.iter().enumerate() {
                    for (j, vj) in bt4(*ti).into_iter().enumerate() {
                        v[((i * 6 + j) * g.c + c) * pitch + lr * tw + tx] = vj;
                    }
                }
            }
        }
    }
}

/// [`transform_out`] for F(4x4, 3x3), one tile at a time.
///
/// # Safety
/// As [`transform_out`].
unsafe fn transform_out4(
    op: &Winograd<'_>,
    g: &Geom,
    pl: &Plan,
    rows: Range<usize>,
    m: &[f32],
    out: *mut MaybeUninit<f32>,
) {
    let (tw, pitch) = (pl.tw, pl.pitch);
    for o in 0..g.o {
        let bias = op.bias.map_or(0.0, |b| b[o]);
        for (lr, gr) in rows.clone().enumerate() {
            let (n, ty) = (gr / pl.th, gr % pl.th);
            for tx in 0..tw {
                let lane = lr * tw + tx;
                let q = |xi: usize| m[(xi * pl.op * PANEL + o) * pitch + lane];
                let mut t = [[0f32; 6]; 4];
                for j in 0..6 {
                    let col = at4(std::array::from_fn(|i| q(i * 6 + j)));
                    for (r, tr) in t.iter_mut().enumerate() {
                        tr[j] = col[r];
                    }
                }
                for (r, tr) in t.iter().enumerate() {
                    let oy = 4 * ty + r;
                    if oy >= g.oh {
                        break;
                    }
                    for (cc, y) in at4(*tr).into_iter().enumerate() {
                        let ox = 4 * tx + cc;
                        if ox >= g.ow {
                            break;
                        }
                        let off = ((n * g.o + o) * g.oh + oy) * g.ow + ox;
                        let y = y + bias + op.residual.map_or(0.0, |r| r[off]);
                        // SAFETY: element `off` of plane `(n, o)` lies in `out` and belongs
                        // to this chunk's output rows.
                        unsafe { (*out.add(off)).write(activate(y, op.act)) };
                    }
                }
            }
        }
    }
}

/// `V[xi][c][lane]` for the tile rows `rows` (lanes `lr * tw + tx`); lanes past the last
/// tile are zeroed.
#[inline(always)]
fn transform_in(
    x: &[f32],
    g: &Geom,
    pl: &Plan,
    rows: Range<usize>,
    v: &mut [f32],
    prow: &mut [f32],
    eo: &mut [f32],
) {
    let (tw, k, pitch) = (pl.tw, pl.tw + 1, pl.pitch);
    let hw = g.h * g.w;
    let (live, width) = (rows.len() * tw, pl.width(rows.len()));
    if live < width {
        for r in v.chunks_exact_mut(pitch) {
            r[live..width].fill(0.0);
        }
    }
    // Columns outside `pl..pl + W` stay zero: the left and right padding (and the columns
    // past the right padding that only dropped outputs read).
    prow.fill(0.0);
    let (ev, ov) = eo.split_at_mut(4 * k);
    for c in 0..g.c {
        for (lr, gr) in rows.clone().enumerate() {
            let (n, ty) = (gr / pl.th, gr % pl.th);
            let xc = &x[(n * g.c + c) * hw..][..hw];
            for i in 0..4 {
                let (e, o) = (&mut ev[i * k..][..k], &mut ov[i * k..][..k]);
                let iy = (2 * ty + i) as isize - g.pt as isize;
                if iy < 0 || iy >= g.h as isize {
                    e.fill(0.0);
                    o.fill(0.0);
                    continue;
                }
                prow[g.pl..g.pl + g.w].copy_from_slice(&xc[iy as usize * g.w..][..g.w]);
                for (kk, pair) in prow[..2 * k].chunks_exact(2).enumerate() {
                    e[kk] = pair[0];
                    o[kk] = pair[1];
                }
            }
            bt_rows(ev, k);
            bt_rows(ov, k);
            let base = lr * tw;
            for i in 0..4 {
                let (e, o) = (&ev[i * k..][..k], &ov[i * k..][..k]);
                let at = |j: usize| ((i * 4 + j) * g.c + c) * pitch + base;
                let (v0, rest) = v[at(0)..].split_at_mut(at(1) - at(0));
                let (v1, rest) = rest.split_at_mut(at(2) - at(1));
                let (v2, v3) = rest.split_at_mut(at(3) - at(2));
                let (v0, v1, v2, v3) = (&mut v0[..tw], &mut v1[..tw], &mut v2[..tw], &mut v3[..tw]);
                for tx in 0..tw {
                    let (e0, o0, e1, o1) = (e[tx], o[tx], e[tx + 1], o[tx + 1]);
                    v0[tx] = e0 - e1;
                    v1[tx] = o0 + e1;
                    v2[tx] = e1 - o0;
                    v3[tx] = o0 - o1;
                }
            }
        }
    }
}

/// `B^T d` down the columns of 4 rows of `k` values, in place.
#[inline(always)]
fn bt_rows(d: &mut [f32], k: usize) {
    let (r0, rest) = d.split_at_mut(k);
    let (r1, rest) = rest.split_at_mut(k);
    let (r2, r3) = rest.split_at_mut(k);
    let r3 = &mut r3[..k];
    for i in 0..k {
        let (a, b, c, d) = (r0[i], r1[i], r2[i], r3[i]);
        r0[i] = a - c;
        r1[i] = b + c;
        r2[i] = c - b;
        r3[i] = b - d;
    }
}

/// `Y = A^T M A` per tile of `rows`, plus bias and residual, activated, into `out`.
///
/// # Safety
/// `out` holds the `[N, O, OH, OW]` output; the rows of tile rows `rows` are this caller's.
#[inline(always)]
unsafe fn transform_out(
    op: &Winograd<'_>,
    g: &Geom,
    pl: &Plan,
    rows: Range<usize>,
    m: &[f32],
    orow: &mut [f32],
    out: *mut MaybeUninit<f32>,
) {
    let (tw, pitch) = (pl.tw, pl.pitch);
    let (r0, r1) = orow.split_at_mut(2 * tw);
    for o in 0..g.o {
        let bias = op.bias.map_or(0.0, |b| b[o]);
        let mrow = |xi: usize| (xi * pl.op * PANEL + o) * pitch;
        for (lr, gr) in rows.clone().enumerate() {
            let (n, ty) = (gr / pl.th, gr % pl.th);
            let base = lr * tw;
            let q: [&[f32]; 16] = std::array::from_fn(|xi| &m[mrow(xi) + base..][..tw]);
            for tx in 0..tw {
                let s = |j: usize| q[j][tx] + q[4 + j][tx] + q[8 + j][tx];
                let d = |j: usize| q[4 + j][tx] - q[8 + j][tx] - q[12 + j][tx];
                let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
                let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                r0[2 * tx] = s0 + s1 + s2;
                r0[2 * tx + 1] = s1 - s2 - s3;
                r1[2 * tx] = d0 + d1 + d2;
                r1[2 * tx + 1] = d1 - d2 - d3;
            }
            for (a, src) in [&*r0, &*r1].into_iter().enumerate() {
                let oy = 2 * ty + a;
                if oy >= g.oh {
                    break;
                }
                let off = ((n * g.o + o) * g.oh + oy) * g.ow;
                // SAFETY: row `oy` of plane `(n, o)` lies in `out` and belongs to this chunk.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.add(off), g.ow) };
                let src = &src[..g.ow];
                match op.residual {
                    Some(res) => {
                        let res = &res[off..][..g.ow];
                        for ((d, &s), &r) in dst.iter_mut().zip(src).zip(res) {
                            d.write(activate(s + bias + r, op.act));
                        }
                    }
                    None => {
                        for (d, &s) in dst.iter_mut().zip(src) {
                            d.write(activate(s + bias, op.act));
                        }
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn activate(v: f32, act: Activation) -> f32 {
    match act {
        Activation::None => v,
        Activation::Relu => v.max(0.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
    }
}

/// `m[r][t] = sum_c a[c][r] * b[c][t]` for rows `r < live` and lanes `t < width` of one panel.
fn gemm_portable(
    a: &[f32],
    b: &[f32],
    m: &mut [f32],
    c: usize,
    pitch: usize,
    width: usize,
    live: usize,
) {
    for r in 0..live {
        let mr = &mut m[r * pitch..][..width];
        mr.fill(0.0);
        for ci in 0..c {
            let av = a[ci * PANEL + r];
            for (d, &bv) in mr.iter_mut().zip(&b[ci * pitch..][..width]) {
                *d += av * bv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;
    use std::ops::Range;

    use super::{chunk_body, Plan, Winograd, LANES, PANEL};
    use crate::geom::Geom;
    use crate::Activation;

    /// Lanes `0..n` (`n` clamped to 0..=16).
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    #[inline(always)]
    unsafe fn idx(v: [i32; 16]) -> __m512i {
        // SAFETY: reads 64 bytes of `v`; avx512f enabled by callers.
        unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
    }

    /// The tiles of one part of a 16-tile group (`16 / m` tiles of `m` lanes each: 8 in a
    /// "pair" vector for F(2x2), 4 in a "quad" vector for F(4x4)) that lie in one tile row:
    /// lanes `lo..hi` hold that row's tiles from `tx` on.
    #[derive(Clone, Copy, Default)]
    struct Run {
        lo: usize,
        hi: usize,
        /// Image offset `n * C * H * W` (input) and tile row `ty` in the image.
        n: usize,
        ty: usize,
        tx: usize,
    }

    /// Runs of the `P` parts (`P = m`) of the group of 16 tiles at chunk lane `t0` (tiles
    /// `< live` only; lanes of no run stay zero / unstored).
    fn runs<const P: usize>(
        t0: usize,
        live: usize,
        pl: &Plan,
        row0: usize,
    ) -> [([Run; 8], usize); P] {
        let per = 16 / P;
        let mut out = [([Run::default(); 8], 0); P];
        for (h, (rs, n)) in out.iter_mut().enumerate() {
            let start = t0 + per * h;
            let end = (start + per).min(live);
            let mut t = start;
            while t < end {
                let (lr, tx) = (t / pl.tw, t % pl.tw);
                let stop = ((lr + 1) * pl.tw).min(end);
                let gr = row0 + lr;
                rs[*n] = Run {
                    lo: P * (t - start),
                    hi: P * (stop - start),
                    n: gr / pl.th,
                    ty: gr % pl.th,
                    tx,
                };
                *n += 1;
                t = stop;
            }
        }
        out
    }

    /// Mask of lanes `lo..hi` (empty when `hi <= lo`).
    #[inline(always)]
    fn span(lo: isize, hi: isize) -> __mmask16 {
        let (lo, hi) = (lo.clamp(0, 16) as usize, hi.clamp(0, 16) as usize);
        lanes(hi) & !lanes(lo)
    }

    /// `V` of the tile rows `rows` with AVX-512, 16 tiles of the chunk (across tile rows) per
    /// vector: per (channel, patch row, group) each half's "pair" vectors (columns `2tx,
    /// 2tx+1` and `2tx+2, 2tx+3` of 8 tiles) are assembled by masked loads straight from
    /// `x` (the masks drop the padding), deinterleaved by lane permutes and transformed in
    /// registers. No padded copy: a copy's narrow stores followed by wide loads of the same
    /// bytes stalled store forwarding (40 % of the kernel's time at 16 channels, 14x14).
    ///
    /// # Safety
    /// avx512f enabled; `v` as laid out by [`Plan`].
    #[inline(always)]
    pub(super) unsafe fn transform_in512(
        x: &[f32],
        g: &Geom,
        pl: &Plan,
        rows: Range<usize>,
        v: &mut [f32],
    ) {
        let (pitch, hw) = (pl.pitch, g.h * g.w);
        assert!(v.len() >= 16 * g.c * pitch && x.len() >= g.n * g.c * hw);
        let live = rows.len() * pl.tw;
        let vp = v.as_mut_ptr();
        // SAFETY: every masked load reads only lanes whose column lies in `0..W` of an
        // input row that exists (row checked); stores stay inside `v` (`t0 + 16 <= pitch`);
        // avx512f enabled.
        unsafe {
            let even = idx([0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]);
            let odd = idx([1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31]);
            for t0 in (0..pl.width(rows.len())).step_by(16) {
                let rs = runs::<2>(t0, live, pl, rows.start);
                // Per patch row and half, the loads of each run whose input row exists: the
                // lanes of shift 0 (columns 2tx, 2tx+1) and 1 (2tx+2, 2tx+3), and the offset
                // in channel 0 of lane 0 at shift 0 (shift 1 reads 2 further).
                let mut ld = [[[(0 as __mmask16, 0 as __mmask16, 0isize); 8]; 2]; 4];
                let mut nld = [[0usize; 2]; 4];
                for (h, (r, n)) in rs.iter().enumerate() {
                    for run in &r[..*n] {
                        // Input column of lane 0 at shift 0.
                        let c0 = (2 * run.tx) as isize - g.pl as isize - run.lo as isize;
                        let lanes = span(run.lo as isize, run.hi as isize);
                        let m0 = lanes & span(-c0, g.w as isize - c0);
                        let m1 = lanes & span(-c0 - 2, g.w as isize - c0 - 2);
                        for i in 0..4 {
                            let iy = (2 * run.ty + i) as isize - g.pt as isize;
                            if iy < 0 || iy >= g.h as isize {
                                continue;
                            }
                            let off = (run.n * g.c * hw) as isize + iy * g.w as isize + c0;
                            ld[i][h][nld[i][h]] = (m0, m1, off);
                            nld[i][h] += 1;
                        }
                    }
                }
                for c in 0..g.c {
                    let xc = x.as_ptr().add(c * hw);
                    let mut d = [[_mm512_setzero_ps(); 4]; 4];
                    for (i, di) in d.iter_mut().enumerate() {
                        let mut pv = [[_mm512_setzero_ps(); 2]; 2];
                        for (h, p) in pv.iter_mut().enumerate() {
                            for &(m0, m1, off) in &ld[i][h][..nld[i][h]] {
                                let src = xc.wrapping_offset(off);
                                p[0] = _mm512_mask_loadu_ps(p[0], m0, src);
                                p[1] = _mm512_mask_loadu_ps(p[1], m1, src.wrapping_add(2));
                            }
                        }
                        *di = [
                            _mm512_permutex2var_ps(pv[0][0], even, pv[1][0]),
                            _mm512_permutex2var_ps(pv[0][0], odd, pv[1][0]),
                            _mm512_permutex2var_ps(pv[0][1], even, pv[1][1]),
                            _mm512_permutex2var_ps(pv[0][1], odd, pv[1][1]),
                        ];
                    }
                    // B^T d: down the columns.
                    let mut t = [[_mm512_setzero_ps(); 4]; 4];
                    for j in 0..4 {
                        t[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
                        t[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
                        t[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
                        t[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
                    }
                    // (B^T d) B: along the rows, stored per transform position.
                    for (i, ti) in t.iter().enumerate() {
                        let r = [
                            _mm512_sub_ps(ti[0], ti[2]),
                            _mm512_add_ps(ti[1], ti[2]),
                            _mm512_sub_ps(ti[2], ti[1]),
                            _mm512_sub_ps(ti[1], ti[3]),
                        ];
                        for (j, rj) in r.into_iter().enumerate() {
                            let at = ((i * 4 + j) * g.c + c) * pitch + t0;
                            _mm512_storeu_ps(vp.add(at), rj);
                        }
                    }
                }
            }
        }
    }

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

    /// `Y = A^T M A` of the tile rows `rows` with AVX-512, 16 tiles of the chunk per vector:
    /// each output row's even and odd columns are interleaved by lane permutes into two
    /// vectors of 8 tiles, then bias, residual and activation, one masked store per run of
    /// tiles in one tile row.
    ///
    /// # Safety
    /// avx512f enabled; `m` as laid out by [`Plan`]; `out` as [`super::transform_out`].
    #[inline(always)]
    pub(super) unsafe fn transform_out512(
        op: &Winograd<'_>,
        g: &Geom,
        pl: &Plan,
        rows: Range<usize>,
        m: &[f32],
        out: *mut MaybeUninit<f32>,
    ) {
        let pitch = pl.pitch;
        assert!(m.len() >= pl.m_len());
        let live = rows.len() * pl.tw;
        let out = out.cast::<f32>();
        let plane = g.oh * g.ow;
        // SAFETY: loads of `m` stay in its rows (`t0 + 16 <= pitch`); output and residual
        // accesses are masked to the run's columns `< OW` of an existing output row;
        // avx512f enabled.
        unsafe {
            let lo = idx([0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23]);
            let hi = idx([8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31]);
            for t0 in (0..live).step_by(16) {
                let rs = runs::<2>(t0, live, pl, rows.start);
                // Per output row of the tiles and half, the stores of each run whose output
                // row exists: masked lanes and the offset in output channel 0 of lane 0.
                let mut st = [[[(0 as __mmask16, 0isize); 8]; 2]; 2];
                let mut nst = [[0usize; 2]; 2];
                for (h, (r, n)) in rs.iter().enumerate() {
                    for run in &r[..*n] {
                        let c0 = (2 * run.tx) as isize - run.lo as isize;
                        let mask =
                            span(run.lo as isize, run.hi as isize) & span(-c0, g.ow as isize - c0);
                        for a in 0..2 {
                            let oy = 2 * run.ty + a;
                            if oy < g.oh {
                                let off = (run.n * g.o * plane + oy * g.ow) as isize + c0;
                                st[a][h][nst[a][h]] = (mask, off);
                                nst[a][h] += 1;
                            }
                        }
                    }
                }
                for o in 0..g.o {
                    let bias = _mm512_set1_ps(op.bias.map_or(0.0, |b| b[o]));
                    let q: [__m512; 16] = std::array::from_fn(|xi| {
                        _mm512_loadu_ps(m.as_ptr().add((xi * pl.op * PANEL + o) * pitch + t0))
                    });
                    let s = |j: usize| _mm512_add_ps(_mm512_add_ps(q[j], q[4 + j]), q[8 + j]);
                    let d = |j: usize| _mm512_sub_ps(_mm512_sub_ps(q[4 + j], q[8 + j]), q[12 + j]);
                    let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
                    let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                    let y = [
                        (
                            _mm512_add_ps(_mm512_add_ps(s0, s1), s2),
                            _mm512_sub_ps(_mm512_sub_ps(s1, s2), s3),
                        ),
                        (
                            _mm512_add_ps(_mm512_add_ps(d0, d1), d2),
                            _mm512_sub_ps(_mm512_sub_ps(d1, d2), d3),
                        ),
                    ];
                    for (a, (ye, yo)) in y.into_iter().enumerate() {
                        let halves = [
                            _mm512_add_ps(_mm512_permutex2var_ps(ye, lo, yo), bias),
                            _mm512_add_ps(_mm512_permutex2var_ps(ye, hi, yo), bias),
                        ];
                        for (h, &v) in halves.iter().enumerate() {
                            for &(mask, off) in &st[a][h][..nst[a][h]] {
                                let at = off + (o * plane) as isize;
                                let mut v = v;
                                if let Some(res) = op.residual {
                                    let rp = res.as_ptr().wrapping_offset(at);
                                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, rp));
                                }
                                let dst = out.wrapping_offset(at);
                                _mm512_mask_storeu_ps(dst, mask, activate(v, op.act));
                            }
                        }
                    }
                }
            }
        }
    }

    /// `B^T d` of F(4x4, 3x3) on 6 vectors (as [`super::bt4`]).
    #[inline(always)]
    unsafe fn bt4(d: [__m512; 6]) -> [__m512; 6] {
        // SAFETY: avx512f enabled by callers.
        unsafe {
            let (two, four) = (_mm512_set1_ps(2.0), _mm512_set1_ps(4.0));
            let t1 = _mm512_fnmadd_ps(four, d[2], d[4]);
            let t2 = _mm512_fnmadd_ps(four, d[1], d[3]);
            let t3 = _mm512_sub_ps(d[4], d[2]);
            let t4 = _mm512_sub_ps(d[3], d[1]);
            [
                _mm512_fmadd_ps(four, _mm512_sub_ps(d[0], d[2]), t3),
                _mm512_add_ps(t1, t2),
                _mm512_sub_ps(t1, t2),
                _mm512_fmadd_ps(two, t4, t3),
                _mm512_fnmadd_ps(two, t4, t3),
                _mm512_fmadd_ps(four, _mm512_sub_ps(d[1], d[3]), _mm512_sub_ps(d[5], d[3])),
            ]
        }
    }

    /// `A^T m` of F(4x4, 3x3) on 6 vectors (as [`super::at4`]).
    #[inline(always)]
    unsafe fn at4(m: [__m512; 6]) -> [__m512; 4] {
        // SAFETY: avx512f enabled by callers.
        unsafe {
            let a = _mm512_add_ps(m[1], m[2]);
            let b = _mm512_sub_ps(m[1], m[2]);
            let c = _mm512_add_ps(m[3], m[4]);
            let d = _mm512_sub_ps(m[3], m[4]);
            [
                _mm512_add_ps(_mm512_add_ps(m[0], a), c),
                _mm512_fmadd_ps(_mm512_set1_ps(2.0), d, b),
                _mm512_fmadd_ps(_mm512_set1_ps(4.0), c, a),
                _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.0), d, b), m[5]),
            ]
        }
    }

    /// `V` of F(4x4, 3x3) for the tile rows `rows` with AVX-512, 16 tiles per vector as
    /// [`transform_in512`]: per (channel, patch row) each quarter's "quad" vectors (columns
    /// `4tx..4tx+4` and `4tx+4..4tx+8` of 4 tiles) come from masked loads straight from `x`,
    /// and two rounds of permutes (within pairs of quads, then 128-bit blocks) turn them into
    /// the patch row's 6 columns of 16 tiles.
    ///
    /// # Safety
    /// avx512f enabled; `v` as laid out by [`Plan`].
    #[inline(always)]
    pub(super) unsafe fn transform_in512_4(
        x: &[f32],
        g: &Geom,
        pl: &Plan,
        rows: Range<usize>,
        v: &mut [f32],
    ) {
        let (pitch, hw) = (pl.pitch, g.h * g.w);
        assert!(v.len() >= 36 * g.c * pitch && x.len() >= g.n * g.c * hw);
        let live = rows.len() * pl.tw;
        let vp = v.as_mut_ptr();
        // SAFETY: every masked load reads only lanes whose column lies in `0..W` of an
        // input row that exists (row checked); stores stay inside `v` (`t0 + 16 <= pitch`);
        // avx512f enabled.
        unsafe {
            // Columns {0, 1} (`s01`) or {2, 3} (`s23`) of the 4 tiles of quad `a` and of quad
            // `b`: [a's first, b's first, a's second, b's second].
            let s01 = idx([0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29]);
            let s23 = idx([2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31]);
            for t0 in (0..pl.width(rows.len())).step_by(16) {
                let rs = runs::<4>(t0, live, pl, rows.start);
                // Per patch row and quarter, the loads of each run whose input row exists:
                // the lanes of shift 0 (columns 4tx..4tx+4) and 1 (4tx+4..4tx+8), and the
                // offset in channel 0 of lane 0 at shift 0 (shift 1 reads 4 further).
                let mut ld = [[[(0 as __mmask16, 0 as __mmask16, 0isize); 4]; 4]; 6];
                let mut nld = [[0usize; 4]; 6];
                for (q, (r, n)) in rs.iter().enumerate() {
                    for run in &r[..*n] {
                        let c0 = (4 * run.tx) as isize - g.pl as isize - run.lo as isize;
                        let lanes = span(run.lo as isize, run.hi as isize);
                        let m0 = lanes & span(-c0, g.w as isize - c0);
                        let m1 = lanes & span(-c0 - 4, g.w as isize - c0 - 4);
                        for i in 0..6 {
                            let iy = (4 * run.ty + i) as isize - g.pt as isize;
                            if iy < 0 || iy >= g.h as isize {
                                continue;
                            }
                            let off = (run.n * g.c * hw) as isize + iy * g.w as isize + c0;
                            ld[i][q][nld[i][q]] = (m0, m1, off);
                            nld[i][q] += 1;
                        }
                    }
                }
                for c in 0..g.c {
                    let xc = x.as_ptr().add(c * hw);
                    let mut d = [[_mm512_setzero_ps(); 6]; 6];
                    for (i, di) in d.iter_mut().enumerate() {
                        let mut pv = [[_mm512_setzero_ps(); 2]; 4];
                        for (q, p) in pv.iter_mut().enumerate() {
                            for &(m0, m1, off) in &ld[i][q][..nld[i][q]] {
                                let src = xc.wrapping_offset(off);
                                p[0] = _mm512_mask_loadu_ps(p[0], m0, src);
                                p[1] = _mm512_mask_loadu_ps(p[1], m1, src.wrapping_add(4));
                            }
                        }
                        let e01 = _mm512_permutex2var_ps(pv[0][0], s01, pv[1][0]);
                        let e23 = _mm512_permutex2var_ps(pv[2][0], s01, pv[3][0]);
                        let f01 = _mm512_permutex2var_ps(pv[0][0], s23, pv[1][0]);
                        let f23 = _mm512_permutex2var_ps(pv[2][0], s23, pv[3][0]);
                        let g01 = _mm512_permutex2var_ps(pv[0][1], s01, pv[1][1]);
                        let g23 = _mm512_permutex2var_ps(pv[2][1], s01, pv[3][1]);
                        *di = [
                            _mm512_shuffle_f32x4::<0x44>(e01, e23),
                            _mm512_shuffle_f32x4::<0xee>(e01, e23),
                            _mm512_shuffle_f32x4::<0x44>(f01, f23),
                            _mm512_shuffle_f32x4::<0xee>(f01, f23),
                            _mm512_shuffle_f32x4::<0x44>(g01, g23),
                            _mm512_shuffle_f32x4::<0xee>(g01, g23),
                        ];
                    }
                    // B^T d: down the columns, then along the rows.
                    let mut t = [[_mm512_setzero_ps(); 6]; 6];
                    for j in 0..6 {
                        let col = bt4(std::array::from_fn(|i| d[i][j]));
                        for (i, ti) in t.iter_mut().enumerate() {
                            ti[j] = col[i];
                        }
                    }
                    for (i, ti) in t.iter().enumerate() {
                        for (j, r) in bt4(*ti).into_iter().enumerate() {
                            let at = ((i * 6 + j) * g.c + c) * pitch + t0;
                            _mm512_storeu_ps(vp.add(at), r);
                        }
                    }
                }
            }
        }
    }

    /// `Y = A^T M A` of F(4x4, 3x3) for the tile rows `rows` with AVX-512, 16 tiles per
    /// vector: each output row's 4 column vectors are interleaved back into quads (the
    /// inverse of [`transform_in512_4`]'s permutes), then bias, residual and activation, one
    /// masked store per run of tiles in one tile row.
    ///
    /// # Safety
    /// avx512f enabled; `m` as laid out by [`Plan`]; `out` as [`super::transform_out`].
    #[inline(always)]
    pub(super) unsafe fn transform_out512_4(
        op: &Winograd<'_>,
        g: &Geom,
        pl: &Plan,
        rows: Range<usize>,
        m: &[f32],
        out: *mut MaybeUninit<f32>,
    ) {
        let pitch = pl.pitch;
        assert!(m.len() >= pl.m_len() && pl.np == 36);
        let live = rows.len() * pl.tw;
        let out = out.cast::<f32>();
        let plane = g.oh * g.ow;
        let xs = pl.op * PANEL * pitch;
        // SAFETY: loads of `m` stay in its rows (`t0 + 16 <= pitch`); output and residual
        // accesses are masked to the run's columns `< OW` of an existing output row;
        // avx512f enabled.
        unsafe {
            // Quad of tiles 0..4 (`q0`) or 4..8 (`q1`) of [col 0 | col 1] and [col 2 | col 3]
            // halves: lane `4k + cc` is column `cc` of tile `k`.
            let q0 = idx([0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27]);
            let q1 = idx([4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31]);
            for t0 in (0..live).step_by(16) {
                let rs = runs::<4>(t0, live, pl, rows.start);
                // Per output row of the tiles and quarter, the stores of each run whose
                // output row exists: masked lanes and the offset in output channel 0 of lane 0.
                let mut st = [[[(0 as __mmask16, 0isize); 4]; 4]; 4];
                let mut nst = [[0usize; 4]; 4];
                for (q, (r, n)) in rs.iter().enumerate() {
                    for run in &r[..*n] {
                        let c0 = (4 * run.tx) as isize - run.lo as isize;
                        let mask =
                            span(run.lo as isize, run.hi as isize) & span(-c0, g.ow as isize - c0);
                        for a in 0..4 {
                            let oy = 4 * run.ty + a;
                            if oy < g.oh {
                                let off = (run.n * g.o * plane + oy * g.ow) as isize + c0;
                                st[a][q][nst[a][q]] = (mask, off);
                                nst[a][q] += 1;
                            }
                        }
                    }
                }
                let rows_out = (0..4).filter(|&a| nst[a].iter().any(|&k| k > 0)).count();
                for o in 0..g.o {
                    let bias = _mm512_set1_ps(op.bias.map_or(0.0, |b| b[o]));
                    let base = m.as_ptr().add(o * pitch + t0);
                    // A^T M: down the columns.
                    let mut t = [[_mm512_setzero_ps(); 6]; 4];
                    for j in 0..6 {
                        let col = at4(std::array::from_fn(|i| {
                            _mm512_loadu_ps(base.add((i * 6 + j) * xs))
                        }));
                        for (a, ta) in t.iter_mut().enumerate() {
                            ta[j] = col[a];
                        }
                    }
                    for (a, ta) in t.iter().enumerate().take(rows_out) {
                        let y = at4(*ta);
                        let u01 = _mm512_shuffle_f32x4::<0x44>(y[0], y[1]);
                        let u23 = _mm512_shuffle_f32x4::<0x44>(y[2], y[3]);
                        let w01 = _mm512_shuffle_f32x4::<0xee>(y[0], y[1]);
                        let w23 = _mm512_shuffle_f32x4::<0xee>(y[2], y[3]);
                        let quads = [
                            _mm512_permutex2var_ps(u01, q0, u23),
                            _mm512_permutex2var_ps(u01, q1, u23),
                            _mm512_permutex2var_ps(w01, q0, w23),
                            _mm512_permutex2var_ps(w01, q1, w23),
                        ];
                        for (q, &v) in quads.iter().enumerate() {
                            let v = _mm512_add_ps(v, bias);
                            for &(mask, off) in &st[a][q][..nst[a][q]] {
                                let at = off + (o * plane) as isize;
                                let mut v = v;
                                if let Some(res) = op.residual {
                                    let rp = res.as_ptr().wrapping_offset(at);
                                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, rp));
                                }
                                let dst = out.wrapping_offset(at);
                                _mm512_mask_storeu_ps(dst, mask, activate(v, op.act));
                            }
                        }
                    }
                }
            }
        }
    }

    /// # Safety
    /// avx512f available; as [`super::chunk`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn chunk_avx512(
        op: &Winograd<'_>,
        g: &Geom,
        pl: &Plan,
        rows: Range<usize>,
        buf: &mut [f32],
        out: *mut MaybeUninit<f32>,
    ) {
        // SAFETY: forwarded contract.
        unsafe { chunk_body::<2>(op, g, pl, rows, buf, out) }
    }

    /// # Safety
    /// avx2 + fma available; as [`super::chunk`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chunk_avx2(
        op: &Winograd<'_>,
        g: &Geom,
        pl: &Plan,
        rows: Range<usize>,
        buf: &mut [f32],
        out: *mut MaybeUninit<f32>,
    ) {
        // SAFETY: forwarded contract.
        unsafe { chunk_body::<1>(op, g, pl, rows, buf, out) }
    }

    fn check(a: &[f32], b: &[f32], m: &[f32], c: usize, pitch: usize, width: usize) {
        assert!(a.len() >= c * PANEL && b.len() >= c * pitch && m.len() >= PANEL * pitch);
        assert!(pitch.is_multiple_of(LANES) && width.is_multiple_of(LANES) && width <= pitch);
    }

    /// `R` rows x 16 lanes (two 8-lane vectors) of one panel.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile256<const R: usize>(
        a: *const f32,
        b: *const f32,
        m: *mut f32,
        c: usize,
        pitch: usize,
    ) {
        // SAFETY: callers pass a panel of `c` steps at row offset `<= PANEL - R`, `b` a
        // column unit of `c` rows of `pitch`, `m` rows `R` of `pitch`; avx2 + fma enabled.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for ci in 0..c {
                let bp = b.add(ci * pitch);
                let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
                let ap = a.add(ci * PANEL);
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*ap.add(r));
                    acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(m.add(r * pitch), acc[r][0]);
                _mm256_storeu_ps(m.add(r * pitch + 8), acc[r][1]);
            }
        }
    }

    /// One panel's GEMM (rows `< live`, lanes `< width`, in passes of 6, 6 and 4) with AVX2 + FMA.
    ///
    /// # Safety
    /// avx2 + fma enabled.
    #[inline(always)]
    pub(super) unsafe fn gemm256(
        a: &[f32],
        b: &[f32],
        m: &mut [f32],
        c: usize,
        pitch: usize,
        width: usize,
        live: usize,
    ) {
        check(a, b, m, c, pitch, width);
        let (a, b, m) = (a.as_ptr(), b.as_ptr(), m.as_mut_ptr());
        // SAFETY: lengths checked above; passes stay inside the 16-row panel.
        unsafe {
            for u in (0..width).step_by(LANES) {
                tile256::<6>(a, b.add(u), m.add(u), c, pitch);
                if live > 6 {
                    tile256::<6>(a.add(6), b.add(u), m.add(6 * pitch + u), c, pitch);
                }
                if live > 12 {
                    tile256::<4>(a.add(12), b.add(u), m.add(12 * pitch + u), c, pitch);
                }
            }
        }
    }

    /// 8 rows x `V` 16-lane vectors of one panel.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile512<const V: usize>(
        a: *const f32,
        b: *const f32,
        m: *mut f32,
        c: usize,
        pitch: usize,
    ) {
        // SAFETY: as `tile256`, with avx512f enabled.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; 8];
            for ci in 0..c {
                let bp = b.add(ci * pitch);
                let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
                let ap = a.add(ci * PANEL);
                for r in 0..8 {
                    let av = _mm512_set1_ps(*ap.add(r));
                    for v in 0..V {
                        acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
                    }
                }
            }
            for r in 0..8 {
                for v in 0..V {
                    _mm512_storeu_ps(m.add(r * pitch + 16 * v), acc[r][v]);
                }
            }
        }
    }

    /// One panel's GEMM (rows `< live`, lanes `< width`, in passes of 8) with AVX-512: 8x32 tiles, an 8x16
    /// one for an odd unit.
    ///
    /// # Safety
    /// avx512f enabled.
    #[inline(always)]
    pub(super) unsafe fn gemm512(
        a: &[f32],
        b: &[f32],
        m: &mut [f32],
        c: usize,
        pitch: usize,
        width: usize,
        live: usize,
    ) {
        check(a, b, m, c, pitch, width);
        let (a, b, m) = (a.as_ptr(), b.as_ptr(), m.as_mut_ptr());
        // SAFETY: lengths checked above; passes stay inside the 16-row panel.
        unsafe {
            for sub in [0, 8] {
                if sub >= live {
                    break;
                }
                let (a, m) = (a.add(sub), m.add(sub * pitch));
                let mut u = 0;
                while u + 2 * LANES <= width {
                    tile512::<2>(a, b.add(u), m.add(u), c, pitch);
                    u += 2 * LANES;
                }
                if u < width {
                    tile512::<1>(a, b.add(u), m.add(u), c, pitch);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Conv2dParams;

    fn rnd(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// f64 direct conv with bias, residual and activation.
    fn reference(
        g: &Geom,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        res: &[f32],
        act: Activation,
    ) -> Vec<f64> {
        let mut out = vec![0f64; g.n * g.out_img()];
        for n in 0..g.n {
            for o in 0..g.o {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut s = f64::from(b[o]);
                        for c in 0..g.c {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let iy = (oy + i) as isize - g.pt as isize;
                                    let ix = (ox + j) as isize - g.pl as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xv =
                                        x[((n * g.c + c) * g.h + iy as usize) * g.w + ix as usize];
                                    s += f64::from(xv)
                                        * f64::from(w[((o * g.c + c) * 3 + i) * 3 + j]);
                                }
                            }
                        }
                        let e = ((n * g.o + o) * g.oh + oy) * g.ow + ox;
                        s += f64::from(res[e]);
                        out[e] = match act {
                            Activation::None => s,
                            Activation::Relu => s.max(0.0),
                            Activation::Relu6 => s.clamp(0.0, 6.0),
                        };
                    }
                }
            }
        }
        out
    }

    /// Both tile sides on every instruction set this CPU has (and the portable one) against
    /// an f64 direct conv, on odd sizes, asymmetric padding, channel counts off the panel and
    /// lane multiples: within 1e-5 of the output's largest magnitude (values of O(1)).
    #[test]
    fn every_isa_matches_f64() {
        let mut seed = 11u64;
        for (n, c, o, h, w, pad) in [
            (2, 5, 13, 9, 11, (1, 1, 1, 1)),
            (1, 3, 20, 7, 7, (1, 1, 1, 1)),
            (3, 4, 6, 5, 8, (0, 0, 0, 0)),
            (1, 17, 33, 6, 3, (2, 0, 1, 2)),
            (2, 16, 16, 1, 1, (1, 1, 1, 1)),
            (5, 8, 8, 4, 4, (1, 1, 1, 1)),
            (3, 16, 16, 13, 14, (1, 1, 1, 1)),
            (2, 7, 5, 10, 9, (0, 2, 2, 0)),
            (9, 16, 18, 3, 2, (1, 1, 1, 1)),
        ] {
            let p = Conv2dParams {
                padding: pad,
                ..Conv2dParams::default()
            };
            let g = Geom::new((n, c, h, w), (o, c, 3, 3), &p).unwrap();
            let x = rnd(&mut seed, g.n * g.in_img());
            let wt = rnd(&mut seed, o * c * 9);
            let b = rnd(&mut seed, o);
            let res = rnd(&mut seed, g.n * g.out_img());
            for (m, act) in TILES
                .into_iter()
                .flat_map(|m| [Activation::None, Activation::Relu6].map(|a| (m, a)))
            {
                let u = pack(&wt, o, c, m);
                let want = reference(&g, &x, &wt, &b, &res, act);
                let max = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1.0);
                let op = Winograd {
                    x: &x,
                    u: &u,
                    m,
                    bias: Some(&b),
                    residual: Some(&res),
                    act,
                };
                for level in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
                    if level > isa() {
                        continue;
                    }
                    let mut out = vec![MaybeUninit::new(f32::NAN); g.n * g.out_img()];
                    forward_with(&op, &g, &mut out, level);
                    for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                        // SAFETY: initialised above.
                        let got = f64::from(unsafe { got.assume_init() });
                        assert!(
                            (got - want).abs() <= 1e-5 * max,
                            "F{m} {level:?} {n}x{c}x{h}x{w}->{o} pad {pad:?}: [{i}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Chunks cover every tile row once, within the cache budget unless one lane unit exceeds it.
    #[test]
    fn plan_chunks() {
        for (n, c, o, hw, t, m) in [
            (50, 16, 16, 28, 1, 2),
            (1, 64, 64, 7, 2, 2),
            (50, 64, 64, 7, 1, 2),
            (1, 512, 512, 7, 1, 2),
            (3, 32, 32, 14, 2, 2),
            (50, 16, 16, 28, 1, 4),
            (50, 64, 64, 7, 2, 4),
            (1, 256, 256, 14, 1, 4),
        ] {
            let g = Geom::new((n, c, hw, hw), (o, c, 3, 3), &Conv2dParams::new(1, 1)).unwrap();
            let pl = Plan::new(&g, t, m);
            assert!(pl.pitch >= pl.r * pl.tw && pl.pitch.is_multiple_of(LANES));
            assert_eq!(pl.chunks(), pl.rows.div_ceil(pl.r));
            assert!(pl.chunks() >= t.min(pl.rows));
            if pl.pitch > LANES {
                assert!((pl.v_len(c) + pl.m_len()) * 4 <= CHUNK_BYTES);
            }
        }
    }
}
