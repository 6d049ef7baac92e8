//! The training depthwise kernels (channel lanes: the autograd forward on small or strided
//! planes, both gradients everywhere) on the shapes MobileNet-style networks train with:
//! 1x1 to 32x32 planes, 3x3 and 5x5 kernels, stride 1 and 2, TF-SAME, symmetric, zero and
//! other asymmetric padding, channel counts that fill whole 8-lane blocks and ones that leave
//! a partial block, plus dilation and non-square strides.
//!
//! Forward against a naive f64 conv (<= 1e-4 absolute), gradients against their f64
//! definition (<= 1e-4 relative to the largest gradient; candle's own grouped-conv backward
//! fails on some of these strided shapes) and, on a sample, central finite differences
//! (<= 1e-3 as `tests/grads.rs`); 1 and 2 threads must agree bit for bit.

mod common;

use adaptivenet_kernels::{conv2d, threads, Conv2dParams};
use candle_core::{Tensor, Var};
use common::*;

const FWD_TOL: f32 = 1e-4;
const BWD_TOL: f32 = 1e-4;

#[derive(Clone, Copy, Debug)]
struct Case {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    p: Conv2dParams,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut i = 0usize;
    for &(h, w) in &[
        (1, 1),
        (2, 2),
        (4, 4),
        (3, 5),
        (8, 8),
        (9, 7),
        (16, 16),
        (32, 32),
    ] {
        for k in [3usize, 5] {
            for s in [1usize, 2] {
                let pads = [
                    Conv2dParams::same((h, w), (k, k), (s, s)).padding,
                    (k / 2, k / 2, k / 2, k / 2),
                    (0, 0, 0, 0),
                    (k - 1, 0, 1, k - 1),
                ];
                for pad in pads {
                    if h + pad.0 + pad.1 < k || w + pad.2 + pad.3 < k {
                        continue;
                    }
                    // Whole 8-lane blocks, a partial block, both; batch 1 and 3.
                    let c = [8, 13, 24, 5][i % 4];
                    let n = 1 + 2 * (i % 2);
                    i += 1;
                    out.push(Case {
                        n,
                        c,
                        h,
                        w,
                        k,
                        p: Conv2dParams {
                            stride: (s, s),
                            padding: pad,
                            dilation: (1, 1),
                            groups: c,
                        },
                    });
                }
            }
        }
    }
    out
}

fn inputs(rng: &mut Rng, cs: &Case) -> (Tensor, Tensor, Tensor) {
    let x = rng.tensor(&[cs.n, cs.c, cs.h, cs.w], 1.0);
    let w = rng.tensor(&[cs.c, 1, cs.k, cs.k], 1.7 / cs.k as f32);
    let b = rng.tensor(&[cs.c], 0.5);
    (x, w, b)
}

/// Forward, and the gradients of `sum(y * r)` w.r.t. x, w and b.
fn run(x: &Tensor, w: &Tensor, b: &Tensor, r: Option<&Tensor>, p: &Conv2dParams) -> [Tensor; 4] {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y = conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), p).unwrap();
    let loss = match r {
        Some(r) => (&y * r).unwrap().sum_all().unwrap(),
        None => y.sqr().unwrap().sum_all().unwrap(),
    };
    let g = loss.backward().unwrap();
    let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
    [y.clone(), get(&xv), get(&wv), get(&bv)]
}

/// The gradients of `sum(conv(x, w, b) * r)` for a depthwise conv, in f64 by their
/// definition (every valid output, tap pair), as f32 tensors `(gx, gw, gb)`.
fn naive_grads(x: &Tensor, w: &Tensor, r: &Tensor, p: &Conv2dParams) -> [Tensor; 3] {
    let v = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (n, c, h, wd) = x.dims4().unwrap();
    let (_, _, kh, kw) = w.dims4().unwrap();
    let (_, _, oh, ow) = r.dims4().unwrap();
    let (xv, wv, rv) = (v(x), v(w), v(r));
    let (mut gx, mut gw, mut gb) = (vec![0f64; xv.len()], vec![0f64; wv.len()], vec![0f64; c]);
    for ni in 0..n {
        for ci in 0..c {
            for y in 0..oh {
                for xx in 0..ow {
                    let g = rv[((ni * c + ci) * oh + y) * ow + xx];
                    gb[ci] += g;
                    for i in 0..kh {
                        let ih =
                            (y * p.stride.0 + i * p.dilation.0) as isize - p.padding.0 as isize;
                        for j in 0..kw {
                            let iw = (xx * p.stride.1 + j * p.dilation.1) as isize
                                - p.padding.2 as isize;
                            if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                continue;
                            }
                            let xi = ((ni * c + ci) * h + ih as usize) * wd + iw as usize;
                            let wi = (ci * kh + i) * kw + j;
                            gx[xi] += g * wv[wi];
                            gw[wi] += g * xv[xi];
                        }
                    }
                }
            }
        }
    }
    let t = |v: Vec<f64>, t: &Tensor| {
        Tensor::from_vec(
            v.into_iter().map(|x| x as f32).collect::<Vec<_>>(),
            t.dims(),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    [
        t(gx, x),
        t(gw, w),
        t(
            gb,
            &Tensor::zeros(c, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        ),
    ]
}

#[test]
fn depthwise_training_matches_naive_forward_and_gradients() {
    let mut rng = Rng::new(21);
    let cases = cases();
    assert!(cases.len() > 80, "{}", cases.len());
    for cs in &cases {
        let (x, w, b) = inputs(&mut rng, cs);
        let want = naive_conv(&x, &w, Some(&b), &cs.p);
        let r = rng.tensor(want.dims(), 1.0);
        let [y, gx, gw, gb] = run(&x, &w, &b, Some(&r), &cs.p);
        let d = max_abs_diff(&y, &want);
        assert!(d <= FWD_TOL, "{cs:?}: forward max diff {d}");
        let [ex, ew, eb] = naive_grads(&x, &w, &r, &cs.p);
        for (name, ours, e) in [("x", &gx, &ex), ("w", &gw, &ew), ("b", &gb, &eb)] {
            let d = rel_diff(ours, e);
            assert!(d <= BWD_TOL, "{cs:?}: grad {name} rel diff {d}");
        }
    }
}

#[test]
fn depthwise_gradients_match_finite_differences() {
    let mut rng = Rng::new(22);
    // Lite0's small-plane shapes, a strided TF-SAME case, dilation and a non-square stride.
    let p = |s: (usize, usize), pad, d: (usize, usize), g| Conv2dParams {
        stride: s,
        padding: pad,
        dilation: d,
        groups: g,
    };
    let cases = [
        ([2, 8, 2, 2], 5, p((1, 1), (2, 2, 2, 2), (1, 1), 8)),
        ([2, 16, 4, 4], 5, p((2, 2), (1, 2, 1, 2), (1, 1), 16)),
        ([1, 13, 8, 8], 3, p((2, 2), (0, 1, 0, 1), (1, 1), 13)),
        ([1, 9, 9, 11], 3, p((1, 2), (2, 2, 1, 3), (2, 1), 9)),
        ([1, 8, 7, 7], 5, p((1, 1), (4, 4, 4, 4), (2, 2), 8)),
    ];
    for (xd, k, p) in cases {
        let x = rng.tensor(&xd, 1.0);
        let w = rng.tensor(&[xd[1], 1, k, k], 0.4);
        let b = rng.tensor(&[xd[1]], 0.5);
        let y = conv2d(&x, &w, Some(&b), &p).unwrap();
        let want = naive_conv(&x, &w, Some(&b), &p);
        assert!(max_abs_diff(&y, &want) <= FWD_TOL, "{p:?}: forward");
        let r = rng.tensor(y.dims(), 1.0);
        let [_, gx, gw, gb] = run(&x, &w, &b, Some(&r), &p);
        let fx = |t: &Tensor| conv2d(t, &w, Some(&b), &p);
        let fw = |t: &Tensor| conv2d(&x, t, Some(&b), &p);
        let fb = |t: &Tensor| conv2d(&x, &w, Some(t), &p);
        let ex = fd_check(&fx, &x, &gx, &r, 0.5, &sample_idx(x.elem_count(), 150));
        let ew = fd_check(&fw, &w, &gw, &r, 0.5, &sample_idx(w.elem_count(), 150));
        let eb = fd_check(&fb, &b, &gb, &r, 0.5, &sample_idx(b.elem_count(), 150));
        assert!(
            ex <= 1e-3 && ew <= 1e-3 && eb <= 1e-3,
            "{p:?} x{xd:?}: errors x {ex} w {ew} b {eb}"
        );
    }
}

#[test]
fn depthwise_training_is_the_same_on_one_and_two_threads() {
    let mut rng = Rng::new(23);
    for (n, c, hw, k, s) in [(4, 24, 8, 5, 1), (3, 13, 16, 3, 2), (2, 40, 4, 5, 2)] {
        let x = rng.tensor(&[n, c, hw, hw], 1.0);
        let w = rng.tensor(&[c, 1, k, k], 0.4);
        let b = rng.tensor(&[c], 0.5);
        let p = Conv2dParams::same((hw, hw), (k, k), (s, s)).with_groups(c);
        threads::set_flop_threshold(u64::MAX);
        let single = run(&x, &w, &b, None, &p);
        threads::set_max_threads(2);
        threads::set_flop_threshold(0);
        let multi = run(&x, &w, &b, None, &p);
        threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
        threads::set_max_threads(0);
        for (a, e) in multi.iter().zip(&single) {
            assert_eq!(max_abs_diff(a, e), 0.0, "n{n} c{c} hw{hw} k{k} s{s}");
        }
    }
}
