//! Gradients against central finite differences, for every op, including cases candle's own
//! autograd cannot do (max-pool with padding and kernel != stride, asymmetric padding,
//! non-square stride, dilation, grouped and depthwise convs).
//!
//! The loss is `sum(op(t) * r)` accumulated in f64 from f32 outputs. Conv and average pooling
//! are linear in each argument, so a large step (h = 0.5) gives exact differences up to f32
//! rounding; max-pool is piecewise linear, so inputs are pairwise >= 0.01 apart and h = 1e-3
//! never changes an argmax. Tolerance: |fd - analytic| <= 1e-3 * max(1, |analytic|).

mod common;

use adaptivenet_kernels::{conv2d, global_avg_pool, max_pool2d, threads, Conv2dParams};
use candle_core::{Tensor, Var};
use common::*;

const TOL: f32 = 1e-3;

fn check_conv(seed: u64, x_dims: [usize; 4], w_dims: [usize; 4], p: Conv2dParams) {
    let mut rng = Rng::new(seed);
    let x = rng.tensor(&x_dims, 1.0);
    let w = rng.tensor(&w_dims, 0.4);
    let b = rng.tensor(&[w_dims[0]], 0.5);
    let (xv, wv, bv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&w).unwrap(),
        Var::from_tensor(&b).unwrap(),
    );
    let y = conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), &p).unwrap();
    let r = rng.tensor(y.dims(), 1.0);
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = grads.get(xv.as_tensor()).unwrap();
    let gw = grads.get(wv.as_tensor()).unwrap();
    let gb = grads.get(bv.as_tensor()).unwrap();
    let fx = |t: &Tensor| conv2d(t, &w, Some(&b), &p);
    let fw = |t: &Tensor| conv2d(&x, t, Some(&b), &p);
    let fb = |t: &Tensor| conv2d(&x, &w, Some(t), &p);
    let ex = fd_check(&fx, &x, gx, &r, 0.5, &sample_idx(x.elem_count(), 150));
    let ew = fd_check(&fw, &w, gw, &r, 0.5, &sample_idx(w.elem_count(), 150));
    let eb = fd_check(&fb, &b, gb, &r, 0.5, &sample_idx(b.elem_count(), 150));
    assert!(
        ex <= TOL && ew <= TOL && eb <= TOL,
        "{p:?} x{x_dims:?} w{w_dims:?}: errors x {ex} w {ew} b {eb}"
    );
}

fn conv_cases() -> Vec<([usize; 4], [usize; 4], Conv2dParams)> {
    let p = |stride, padding, dilation, groups| Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
    };
    vec![
        (
            [2, 3, 7, 9],
            [4, 3, 3, 3],
            p((1, 1), (1, 1, 1, 1), (1, 1), 1),
        ),
        (
            [1, 3, 9, 8],
            [5, 3, 3, 3],
            p((2, 2), (0, 1, 1, 0), (1, 1), 1),
        ),
        (
            [2, 4, 6, 7],
            [3, 4, 1, 1],
            p((1, 1), (0, 0, 0, 0), (1, 1), 1),
        ),
        (
            [2, 4, 7, 7],
            [3, 4, 1, 1],
            p((2, 2), (0, 0, 0, 0), (1, 1), 1),
        ),
        (
            [1, 2, 11, 10],
            [3, 2, 5, 5],
            p((2, 1), (2, 2, 1, 3), (1, 1), 1),
        ),
        (
            [1, 2, 12, 12],
            [2, 2, 7, 7],
            p((2, 2), (3, 3, 3, 3), (1, 1), 1),
        ),
        (
            [2, 2, 9, 9],
            [2, 2, 3, 3],
            p((1, 1), (2, 2, 2, 2), (2, 2), 1),
        ),
        (
            [2, 5, 8, 7],
            [5, 1, 3, 3],
            p((1, 1), (1, 1, 1, 1), (1, 1), 5),
        ),
        (
            [2, 5, 9, 8],
            [5, 1, 3, 3],
            p((2, 2), (0, 1, 1, 0), (1, 1), 5),
        ),
        (
            [1, 3, 10, 11],
            [3, 1, 5, 5],
            p((2, 1), (2, 2, 2, 2), (1, 1), 3),
        ),
        (
            [1, 3, 9, 9],
            [3, 1, 3, 3],
            p((1, 2), (2, 2, 2, 2), (2, 2), 3),
        ),
        (
            [2, 4, 7, 8],
            [6, 2, 3, 3],
            p((1, 1), (1, 1, 1, 1), (1, 1), 2),
        ),
        (
            [1, 3, 8, 8],
            [6, 1, 3, 3],
            p((2, 2), (1, 1, 1, 1), (1, 1), 3),
        ),
    ]
}

#[test]
fn conv_grads_match_finite_differences() {
    for (i, (xd, wd, p)) in conv_cases().into_iter().enumerate() {
        check_conv(100 + i as u64, xd, wd, p);
    }
}

#[test]
fn max_pool_grads_match_finite_differences() {
    let cases = [
        ([1, 2, 9, 11], (3, 3), (2, 2), (1, 1)),
        ([2, 2, 7, 7], (3, 3), (1, 1), (1, 1)),
        ([1, 3, 10, 9], (3, 2), (2, 1), (1, 0)),
        ([1, 2, 11, 13], (5, 5), (3, 3), (2, 2)),
        ([2, 2, 6, 6], (2, 2), (1, 1), (1, 1)),
        ([1, 2, 8, 8], (2, 2), (2, 2), (0, 0)),
        ([1, 1, 7, 9], (4, 3), (3, 2), (2, 1)),
    ];
    for (i, (dims, k, s, p)) in cases.into_iter().enumerate() {
        let mut rng = Rng::new(200 + i as u64);
        let x = rng.distinct(&dims, 0.01);
        let xv = Var::from_tensor(&x).unwrap();
        let y = max_pool2d(xv.as_tensor(), k, s, p).unwrap();
        let r = rng.tensor(y.dims(), 1.0);
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(xv.as_tensor()).unwrap();
        let f = |t: &Tensor| max_pool2d(t, k, s, p);
        let e = fd_check(&f, &x, gx, &r, 1e-3, &sample_idx(x.elem_count(), 400));
        assert!(e <= TOL, "{dims:?} k{k:?} s{s:?} p{p:?}: error {e}");
    }
}

#[test]
fn global_avg_pool_grads_match_finite_differences() {
    for (i, dims) in [[1, 3, 5, 7], [2, 4, 3, 3], [2, 2, 1, 1]]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::new(300 + i as u64);
        let x = rng.tensor(&dims, 1.0);
        let xv = Var::from_tensor(&x).unwrap();
        let y = global_avg_pool(xv.as_tensor()).unwrap();
        let r = rng.tensor(y.dims(), 1.0);
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(xv.as_tensor()).unwrap();
        let e = fd_check(
            &|t: &Tensor| global_avg_pool(t),
            &x,
            gx,
            &r,
            0.5,
            &sample_idx(x.elem_count(), 200),
        );
        assert!(e <= TOL, "{dims:?}: error {e}");
    }
}

/// The multi-threaded paths (batch-parallel and GEMM-parallel, plane-parallel depthwise and
/// pooling) must give the same results as the single-threaded ones.
#[test]
fn threaded_paths_match_single_threaded() {
    let mut rng = Rng::new(400);
    let run = |x: &Tensor, w: &Tensor, b: &Tensor, p: &Conv2dParams| -> Vec<Tensor> {
        let xv = Var::from_tensor(x).unwrap();
        let wv = Var::from_tensor(w).unwrap();
        let bv = Var::from_tensor(b).unwrap();
        let y = conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), p).unwrap();
        let m = max_pool2d(&y, (3, 3), (2, 2), (1, 1)).unwrap();
        let g = global_avg_pool(&m).unwrap();
        let grads = g.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        vec![
            y,
            grads.get(xv.as_tensor()).unwrap().clone(),
            grads.get(wv.as_tensor()).unwrap().clone(),
            grads.get(bv.as_tensor()).unwrap().clone(),
        ]
    };
    let cases = [
        (4, 8, 8, 1, 3, 1),  // batch-parallel GEMM
        (1, 8, 8, 1, 3, 1),  // GEMM-parallel
        (3, 8, 8, 1, 1, 1),  // 1x1, N not a multiple of the thread count
        (4, 8, 8, 8, 3, 2),  // depthwise, stride 2
        (2, 8, 12, 4, 3, 1), // grouped
    ];
    for (n, c, o, groups, k, s) in cases {
        let x = rng.tensor(&[n, c, 13, 12], 1.0);
        let w = rng.tensor(&[o, c / groups, k, k], 0.3);
        let b = rng.tensor(&[o], 0.3);
        let p = Conv2dParams::new(s, k / 2).with_groups(groups);
        // Thread settings are process-global: other tests of this binary may run meanwhile,
        // which only changes their thread counts, never their results.
        threads::set_flop_threshold(u64::MAX);
        let single = run(&x, &w, &b, &p);
        threads::set_max_threads(2);
        threads::set_flop_threshold(0);
        let multi = run(&x, &w, &b, &p);
        threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
        threads::set_max_threads(0);
        for (a, e) in multi.iter().zip(&single) {
            let d = max_abs_diff(a, e);
            assert!(d <= 1e-5, "n{n} c{c} o{o} g{groups} k{k} s{s}: {d}");
        }
    }
}
