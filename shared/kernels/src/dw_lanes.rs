//! Depthwise conv with channels in SIMD lanes: forward, grad-input and grad-weight.
//!
//! A depthwise plane is small (Lite0 at 64x64 has 2x2 to 32x32 planes, with 3x3 and 5x5
//! kernels), so per-plane kernels that vectorise along a row spend most of their time on
//! row edges, partial vectors, padding copies and call overhead: a 2x2 plane under a 5x5
//! kernel has 16 valid multiply-adds, and the plane-wise kernels did several hundred
//! operations' worth of work for it. Here [`L`] consecutive channels of one image are copied
//! into a lane-major block (`[pixel][lane]`), every valid (output, input, tap) triple of
//! the geometry is one vector multiply-add over the `L` channels, and the result is copied
//! back. The triples come as runs (one tap, one output row, consecutive output columns),
//! computed once per call from the geometry alone, so the inner loops have no bounds tests,
//! no padding and no partial vectors, whatever the plane size, stride, padding or dilation.
//!
//! The grad-weight accumulates over the batch per channel block in a fixed order, so results
//! do not depend on the thread count. Summation orders differ from the plane-wise kernels:
//! results agree with them (and with candle) to f32 rounding, not bit for bit.

use crate::cpu::has_avx2_fma;
use crate::gemm_path::with_col;
use crate::geom::{valid_range, Geom};
use crate::{threads, Activation};

/// Channels per block (one AVX2 vector of f32).
pub(crate) const L: usize = 8;

/// One run of triples: for `k in 0..len`, output pixel `o0 + k` reads input pixel
/// `i0 + k * step` through tap `t` (pixel indices within a plane).
#[derive(Clone, Copy, Debug)]
struct Run {
    t: u32,
    o0: u32,
    i0: u32,
    len: u32,
}

/// Every valid triple of `g` as runs, grouped by tap (taps in order, rows in order).
fn runs(g: &Geom) -> Vec<Run> {
    let mut v = Vec::with_capacity(g.kh * g.kw * g.oh);
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
                v.push(Run {
                    t: (i * g.kw + j) as u32,
                    o0: (oh * g.ow + lo) as u32,
                    i0: (ih * g.w + s) as u32,
                    len: (hi - lo) as u32,
                });
            }
        }
    }
    // Every index a run touches lies in its plane: the kernels below rely on it.
    for r in &v {
        let last = r.len as usize - 1;
        assert!(r.o0 as usize + last < g.oh * g.ow);
        assert!(r.i0 as usize + last * g.sw < g.h * g.w);
        assert!((r.t as usize) < g.kh * g.kw);
    }
    v
}

/// `dst [p][L] = src [lanes][p]` (lanes past `lanes` set to zero).
#[inline(always)]
fn to_lanes(src: &[f32], lanes: usize, p: usize, dst: &mut [f32]) {
    let dst = &mut dst[..p * L];
    if lanes < L {
        dst.fill(0.0);
    }
    for l in 0..lanes {
        let s = &src[l * p..][..p];
        for (q, v) in s.iter().enumerate() {
            dst[q * L + l] = *v;
        }
    }
}

/// `dst [lanes][p] = act(src [p][L])` (the first `lanes` lanes).
#[inline(always)]
fn from_lanes(src: &[f32], lanes: usize, p: usize, dst: &mut [f32], act: Activation) {
    for l in 0..lanes {
        let d = &mut dst[l * p..][..p];
        for (q, v) in d.iter_mut().enumerate() {
            let x = src[q * L + l];
            *v = match act {
                Activation::None => x,
                Activation::Relu => x.max(0.0),
                Activation::Relu6 => x.clamp(0.0, 6.0),
            };
        }
    }
}

/// The vector operations the kernels are written in: one `L`-lane f32 vector.
trait Vector: Copy {
    /// # Safety
    /// `p` is valid for reading `L` floats.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p` is valid for writing `L` floats.
    unsafe fn store(self, p: *mut f32);
    fn zero() -> Self;
    /// `a * b + c`.
    fn mul_add(a: Self, b: Self, c: Self) -> Self;
    fn add(a: Self, b: Self) -> Self;
    fn act(self, act: Activation) -> Self;
    /// [`to_lanes`] (a vectorised copy where the type has one).
    #[inline(always)]
    fn to_lanes(src: &[f32], lanes: usize, p: usize, dst: &mut [f32]) {
        to_lanes(src, lanes, p, dst)
    }
    /// [`from_lanes`] with `act` applied to each value.
    #[inline(always)]
    fn from_lanes(src: &[f32], lanes: usize, p: usize, dst: &mut [f32], act: Activation) {
        from_lanes(src, lanes, p, dst, act)
    }
}

/// Portable lanes (CPUs without AVX2 + FMA): multiply then add, like the other portable
/// kernels of this crate.
#[derive(Clone, Copy)]
struct Portable([f32; L]);

impl Vector for Portable {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: caller's contract.
        Self(unsafe { std::ptr::read_unaligned(p.cast::<[f32; L]>()) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: caller's contract.
        unsafe { std::ptr::write_unaligned(p.cast::<[f32; L]>(), self.0) }
    }
    #[inline(always)]
    fn zero() -> Self {
        Self([0.0; L])
    }
    #[inline(always)]
    fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Self(std::array::from_fn(|l| a.0[l] * b.0[l] + c.0[l]))
    }
    #[inline(always)]
    fn add(a: Self, b: Self) -> Self {
        Self(std::array::from_fn(|l| a.0[l] + b.0[l]))
    }
    #[inline(always)]
    fn act(self, act: Activation) -> Self {
        match act {
            Activation::None => self,
            Activation::Relu => Self(self.0.map(|v| v.max(0.0))),
            Activation::Relu6 => Self(self.0.map(|v| v.clamp(0.0, 6.0))),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{Activation, Vector, L};

    /// Transposes the 8x8 block `r[l]` (row `l`) in registers.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: avx enabled by the caller.
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }

    /// [`super::to_lanes`] for a full block (`lanes == L`), 8x8 tiles in registers.
    ///
    /// # Safety
    /// avx enabled; `src` holds `L * p` floats, `dst` `p * L`.
    #[inline(always)]
    pub(super) unsafe fn to_lanes_full(src: &[f32], p: usize, dst: &mut [f32]) {
        assert!(src.len() >= L * p && dst.len() >= p * L);
        // SAFETY: every load and store below is inside the asserted lengths.
        unsafe {
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
            let mut q = 0;
            while q + 8 <= p {
                let r = std::array::from_fn(|l| _mm256_loadu_ps(s.add(l * p + q)));
                for (j, v) in transpose8(r).into_iter().enumerate() {
                    _mm256_storeu_ps(d.add((q + j) * L), v);
                }
                q += 8;
            }
            while q < p {
                for l in 0..L {
                    *d.add(q * L + l) = *s.add(l * p + q);
                }
                q += 1;
            }
        }
    }

    /// [`super::from_lanes`] for a full block (`lanes == L`), with the activation applied.
    ///
    /// # Safety
    /// avx enabled; `src` holds `p * L` floats, `dst` `L * p`.
    #[inline(always)]
    pub(super) unsafe fn from_lanes_full(src: &[f32], p: usize, dst: &mut [f32], act: Activation) {
        assert!(src.len() >= p * L && dst.len() >= L * p);
        // SAFETY: every load and store below is inside the asserted lengths.
        unsafe {
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
            let mut q = 0;
            while q + 8 <= p {
                let r =
                    std::array::from_fn(|j| Avx(_mm256_loadu_ps(s.add((q + j) * L))).act(act).0);
                for (l, v) in transpose8(r).into_iter().enumerate() {
                    _mm256_storeu_ps(d.add(l * p + q), v);
                }
                q += 8;
            }
            while q < p {
                let v = Avx(_mm256_loadu_ps(s.add(q * L))).act(act);
                let mut a = [0f32; L];
                _mm256_storeu_ps(a.as_mut_ptr(), v.0);
                for (l, x) in a.iter().enumerate() {
                    *d.add(l * p + q) = *x;
                }
                q += 1;
            }
        }
    }

    #[derive(Clone, Copy)]
    pub(super) struct Avx(__m256);

    // SAFETY (all methods): only instantiated inside `#[target_feature(enable = "avx2,fma")]`
    // functions, which run after `has_avx2_fma` returned true.
    impl Vector for Avx {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Self(_mm256_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        fn zero() -> Self {
            unsafe { Self(_mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn mul_add(a: Self, b: Self, c: Self) -> Self {
            unsafe { Self(_mm256_fmadd_ps(a.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn add(a: Self, b: Self) -> Self {
            unsafe { Self(_mm256_add_ps(a.0, b.0)) }
        }
        #[inline(always)]
        fn act(self, act: Activation) -> Self {
            unsafe {
                match act {
                    Activation::None => self,
                    Activation::Relu => Self(_mm256_max_ps(self.0, _mm256_setzero_ps())),
                    Activation::Relu6 => Self(_mm256_min_ps(
                        _mm256_max_ps(self.0, _mm256_setzero_ps()),
                        _mm256_set1_ps(6.0),
                    )),
                }
            }
        }
        #[inline(always)]
        fn to_lanes(src: &[f32], lanes: usize, p: usize, dst: &mut [f32]) {
            if lanes == L {
                unsafe { to_lanes_full(src, p, dst) }
            } else {
                super::to_lanes(src, lanes, p, dst)
            }
        }
        #[inline(always)]
        fn from_lanes(src: &[f32], lanes: usize, p: usize, dst: &mut [f32], act: Activation) {
            if lanes == L {
                unsafe { from_lanes_full(src, p, dst, act) }
            } else {
                super::from_lanes(src, lanes, p, dst, act)
            }
        }
    }
}

/// `out [P_out][L] = bias + sum over triples of w[t] * x[i]` for one channel block.
///
/// # Safety
/// `runs` come from [`runs`] for the geometry whose column stride is `step`; `x` holds the
/// block's input (`H*W*L`), `out` its output (`OH*OW*L`), `w` `KH*KW*L` and `bias` `L`
/// floats.
#[inline(always)]
unsafe fn fwd_block<V: Vector>(
    runs: &[Run],
    step: usize,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    // SAFETY: run indices are within the planes (asserted in `runs`), the slices hold whole
    // planes of `L`-lane pixels (caller's contract).
    unsafe {
        let (xp, wp, op) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        let b = V::load(bias.as_ptr());
        for q in 0..out.len() / L {
            b.store(op.add(q * L));
        }
        for r in runs {
            let wv = V::load(wp.add(r.t as usize * L));
            let mut o = op.add(r.o0 as usize * L);
            let mut i = xp.add(r.i0 as usize * L);
            for _ in 0..r.len {
                V::mul_add(wv, V::load(i), V::load(o)).store(o);
                o = o.add(L);
                i = i.add(step * L);
            }
        }
    }
}

/// `gx [H*W][L] = sum over triples of w[t] * go[o]` for one channel block.
///
/// # Safety
/// As [`fwd_block`], with `go` the block's output gradient and `gx` its input gradient.
#[inline(always)]
unsafe fn bwd_data_block<V: Vector>(
    runs: &[Run],
    step: usize,
    go: &[f32],
    w: &[f32],
    gx: &mut [f32],
) {
    // SAFETY: as in `fwd_block`.
    unsafe {
        let (gp, wp, xp) = (go.as_ptr(), w.as_ptr(), gx.as_mut_ptr());
        for q in 0..gx.len() / L {
            V::zero().store(xp.add(q * L));
        }
        for r in runs {
            let wv = V::load(wp.add(r.t as usize * L));
            let mut o = gp.add(r.o0 as usize * L);
            let mut i = xp.add(r.i0 as usize * L);
            for _ in 0..r.len {
                V::mul_add(wv, V::load(o), V::load(i)).store(i);
                o = o.add(L);
                i = i.add(step * L);
            }
        }
    }
}

/// `gw [KH*KW][L] += sum over triples of go[o] * x[i]` for one channel block of one image.
///
/// # Safety
/// As [`fwd_block`], with `go` the block's output gradient and `gw` `KH*KW*L` floats.
#[inline(always)]
unsafe fn bwd_filter_block<V: Vector>(
    runs: &[Run],
    step: usize,
    x: &[f32],
    go: &[f32],
    gw: &mut [f32],
) {
    // SAFETY: as in `fwd_block`.
    unsafe {
        let (xp, gp, wp) = (x.as_ptr(), go.as_ptr(), gw.as_mut_ptr());
        for r in runs {
            let o = gp.add(r.o0 as usize * L);
            let i = xp.add(r.i0 as usize * L);
            let (n, s) = (r.len as usize, step * L);
            // Four independent chains: one would wait on the multiply-add latency.
            let mut acc = [V::zero(); 4];
            let mut k = 0;
            while k + 4 <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    let kk = k + u;
                    *a = V::mul_add(V::load(o.add(kk * L)), V::load(i.add(kk * s)), *a);
                }
                k += 4;
            }
            while k < n {
                acc[0] = V::mul_add(V::load(o.add(k * L)), V::load(i.add(k * s)), acc[0]);
                k += 1;
            }
            let sum = V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3]));
            let d = wp.add(r.t as usize * L);
            V::add(V::load(d), sum).store(d);
        }
    }
}

/// The operands of one call: geometry, its runs and the scratch layout.
struct Plan<'a> {
    g: &'a Geom,
    runs: &'a [Run],
}

impl Plan<'_> {
    fn hw(&self) -> usize {
        self.g.h * self.g.w
    }
    fn kk(&self) -> usize {
        self.g.kh * self.g.kw
    }
}

/// Forward of one image: `out [C, P]` from `x [C, H*W]`. `buf` holds `(H*W + P + KK + 1) * L`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_image<V: Vector>(
    pl: &Plan<'_>,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    act: Activation,
    out: &mut [f32],
    buf: &mut [f32],
) {
    let (g, hw, kk, p) = (pl.g, pl.hw(), pl.kk(), pl.g.p());
    let (xb, rest) = buf.split_at_mut(hw * L);
    let (ob, rest) = rest.split_at_mut(p * L);
    let (wb, bb) = rest.split_at_mut(kk * L);
    for c0 in (0..g.c).step_by(L) {
        let lanes = L.min(g.c - c0);
        V::to_lanes(&x[c0 * hw..], lanes, hw, xb);
        V::to_lanes(&w[c0 * kk..], lanes, kk, wb);
        match b {
            Some(b) => V::to_lanes(&b[c0..], lanes, 1, bb),
            None => bb[..L].fill(0.0),
        }
        // SAFETY: runs of `g`; blocks sized for whole planes of `L` lanes.
        unsafe { fwd_block::<V>(pl.runs, g.sw, xb, wb, bb, ob) };
        V::from_lanes(ob, lanes, p, &mut out[c0 * p..], act);
    }
}

/// Grad-input of one image: `gx [C, H*W]` from `go [C, P]`. `buf` holds `(H*W + P + KK) * L`.
#[inline(always)]
fn bwd_data_image<V: Vector>(
    pl: &Plan<'_>,
    go: &[f32],
    w: &[f32],
    gx: &mut [f32],
    buf: &mut [f32],
) {
    let (g, hw, kk, p) = (pl.g, pl.hw(), pl.kk(), pl.g.p());
    let (xb, rest) = buf.split_at_mut(hw * L);
    let (gb, wb) = rest.split_at_mut(p * L);
    for c0 in (0..g.c).step_by(L) {
        let lanes = L.min(g.c - c0);
        V::to_lanes(&go[c0 * p..], lanes, p, gb);
        V::to_lanes(&w[c0 * kk..], lanes, kk, wb);
        // SAFETY: runs of `g`; blocks sized for whole planes of `L` lanes.
        unsafe { bwd_data_block::<V>(pl.runs, g.sw, gb, wb, xb) };
        V::from_lanes(xb, lanes, hw, &mut gx[c0 * hw..], Activation::None);
    }
}

/// Grad-weight of channels `c0..c0 + lanes` over the batch: `gw [lanes, KK]`. `buf` holds
/// `(H*W + P + KK) * L`.
#[inline(always)]
fn bwd_filter_channels<V: Vector>(
    pl: &Plan<'_>,
    x: &[f32],
    go: &[f32],
    c0: usize,
    gw: &mut [f32],
    buf: &mut [f32],
) {
    let (g, hw, kk, p) = (pl.g, pl.hw(), pl.kk(), pl.g.p());
    let lanes = L.min(g.c - c0);
    let (xb, rest) = buf.split_at_mut(hw * L);
    let (gb, acc) = rest.split_at_mut(p * L);
    let acc = &mut acc[..kk * L];
    acc.fill(0.0);
    for n in 0..g.n {
        V::to_lanes(&x[(n * g.c + c0) * hw..], lanes, hw, xb);
        V::to_lanes(&go[(n * g.c + c0) * p..], lanes, p, gb);
        // SAFETY: runs of `g`; blocks sized for whole planes of `L` lanes.
        unsafe { bwd_filter_block::<V>(pl.runs, g.sw, xb, gb, acc) };
    }
    V::from_lanes(acc, lanes, kk, gw, Activation::None);
}

/// The image-level kernels instantiated for one vector type (the AVX2 copy compiled with
/// its target features, so everything above inlines into it).
macro_rules! kernels {
    ($attr:meta, $v:ty) => {
        /// # Safety
        /// The CPU supports the vector type's instructions.
        #[$attr]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn fwd(
            pl: &Plan<'_>,
            x: &[f32],
            w: &[f32],
            b: Option<&[f32]>,
            act: Activation,
            out: &mut [f32],
            buf: &mut [f32],
        ) {
            fwd_image::<$v>(pl, x, w, b, act, out, buf)
        }
        /// # Safety
        /// The CPU supports the vector type's instructions.
        #[$attr]
        pub(super) unsafe fn bwd_data(
            pl: &Plan<'_>,
            go: &[f32],
            w: &[f32],
            gx: &mut [f32],
            buf: &mut [f32],
        ) {
            bwd_data_image::<$v>(pl, go, w, gx, buf)
        }
        /// # Safety
        /// The CPU supports the vector type's instructions.
        #[$attr]
        pub(super) unsafe fn bwd_filter(
            pl: &Plan<'_>,
            x: &[f32],
            go: &[f32],
            c0: usize,
            gw: &mut [f32],
            buf: &mut [f32],
        ) {
            bwd_filter_channels::<$v>(pl, x, go, c0, gw, buf)
        }
    };
}

mod portable {
    use super::*;
    kernels!(inline, Portable);
}

#[cfg(target_arch = "x86_64")]
mod fast {
    use super::avx::Avx;
    use super::*;
    kernels!(target_feature(enable = "avx2,fma"), Avx);
}

fn block_threads(g: &Geom) -> usize {
    threads::for_flops(g.flops())
}

/// Depthwise forward (+ bias + activation); `out` is `[N, C, OH, OW]`, every element written.
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    g: &Geom,
    act: Activation,
    out: &mut [f32],
) {
    let runs = runs(g);
    let pl = Plan { g, runs: &runs };
    let (hw, p, kk, c) = (pl.hw(), g.p(), pl.kk(), g.c);
    let fast = has_avx2_fma();
    let scratch = (hw + p + kk + 1) * L;
    threads::for_each_item(out, c * p, block_threads(g), |n, on| {
        let xn = &x[n * c * hw..][..c * hw];
        with_col(scratch, |buf| {
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: avx2 + fma checked at run time.
                return unsafe { fast::fwd(&pl, xn, w, b, act, on, buf) };
            }
            // SAFETY: the portable copy needs no CPU feature.
            unsafe { portable::fwd(&pl, xn, w, b, act, on, buf) }
        });
    });
}

/// Depthwise gradient w.r.t. the input; every element of `gx` (`[N, C, H, W]`) is written.
pub(crate) fn backward_data(go: &[f32], w: &[f32], g: &Geom, gx: &mut [f32]) {
    let runs = runs(g);
    let pl = Plan { g, runs: &runs };
    let (hw, p, kk, c) = (pl.hw(), g.p(), pl.kk(), g.c);
    let fast = has_avx2_fma();
    let scratch = (hw + p + kk) * L;
    threads::for_each_item(gx, c * hw, block_threads(g), |n, gxn| {
        let gon = &go[n * c * p..][..c * p];
        with_col(scratch, |buf| {
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: avx2 + fma checked at run time.
                return unsafe { fast::bwd_data(&pl, gon, w, gxn, buf) };
            }
            // SAFETY: the portable copy needs no CPU feature.
            unsafe { portable::bwd_data(&pl, gon, w, gxn, buf) }
        });
    });
}

/// Depthwise gradient w.r.t. the weight `[C, 1, KH, KW]`, summed over the batch in image
/// order per channel block (parallel over blocks).
pub(crate) fn backward_filter(x: &[f32], go: &[f32], g: &Geom) -> Vec<f32> {
    let runs = runs(g);
    let pl = Plan { g, runs: &runs };
    let (hw, p, kk) = (pl.hw(), g.p(), pl.kk());
    let fast = has_avx2_fma();
    let mut gw = vec![0f32; g.c * kk];
    let scratch = (hw + p + kk) * L;
    threads::for_each_item(&mut gw, L * kk, block_threads(g), |bi, gwb| {
        with_col(scratch, |buf| {
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: avx2 + fma checked at run time.
                return unsafe { fast::bwd_filter(&pl, x, go, bi * L, gwb, buf) };
            }
            // SAFETY: the portable copy needs no CPU feature.
            unsafe { portable::bwd_filter(&pl, x, go, bi * L, gwb, buf) }
        });
    });
    gw
}
