//! 1x1 conv training (stride 1, unpadded: MBConv's expand and project convs): the weight
//! gradient's direct dot-product kernel (maps of 1 to 1280 pixels, packed below 16, channel
//! counts that leave partial register tiles, batches of 1 to 33) and the grad-input run as
//! the forward with the transposed weight, against their f64 definitions (<= 1e-4 relative
//! to the largest gradient); 1 and 2 threads agree bit for bit.

mod common;

use adaptivenet_kernels::{conv2d, threads, Conv2dParams};
use candle_core::{DType, Device, Tensor, Var};
use common::*;

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `(gx, gw)` of `sum(conv1x1(x, w) * r)` in f64.
fn naive(x: &Tensor, w: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
    let (n, c, h, wd) = x.dims4().unwrap();
    let o = w.dim(0).unwrap();
    let p = h * wd;
    let (xv, wv, rv) = (f64s(x), f64s(w), f64s(r));
    let mut gx = vec![0f64; n * c * p];
    let mut gw = vec![0f64; o * c];
    for ni in 0..n {
        for oc in 0..o {
            for ci in 0..c {
                for q in 0..p {
                    let g = rv[(ni * o + oc) * p + q];
                    gx[(ni * c + ci) * p + q] += g * wv[oc * c + ci];
                    gw[oc * c + ci] += g * xv[(ni * c + ci) * p + q];
                }
            }
        }
    }
    let t = |v: Vec<f64>, d: &[usize]| {
        Tensor::from_vec(
            v.into_iter().map(|x| x as f32).collect::<Vec<_>>(),
            d,
            &Device::Cpu,
        )
        .unwrap()
    };
    (t(gx, x.dims()), t(gw, w.dims()))
}

fn grads(x: &Tensor, w: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let y = conv2d(
        xv.as_tensor(),
        wv.as_tensor(),
        None,
        &Conv2dParams::default(),
    )
    .unwrap();
    let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    (
        g.get(xv.as_tensor()).unwrap().clone(),
        g.get(wv.as_tensor()).unwrap().clone(),
    )
}

const CASES: [(usize, usize, usize, usize, usize); 13] = [
    // (n, c, o, h, w): 2x2 (packed, 4-pixel rows), 1x1, odd sizes, 4x4 and 8x8 unpacked.
    (4, 12, 20, 2, 2),
    (33, 7, 5, 2, 2),
    (3, 5, 9, 1, 1),
    (5, 6, 7, 1, 3),
    (2, 3, 4, 3, 3),
    (3, 16, 24, 4, 4),
    (2, 13, 11, 4, 4),
    (1, 8, 8, 3, 5),
    (2, 10, 6, 8, 8),
    (3, 4, 14, 5, 7),
    (1, 40, 3, 17, 1),
    (2, 2, 1, 9, 9),
    // Over 1024 pixels per image: one image per reduction block, three blocks.
    (3, 5, 6, 32, 40),
];

#[test]
fn pointwise_gradients_match_their_definition() {
    let mut rng = Rng::new(41);
    for (n, c, o, h, w) in CASES {
        let x = rng.tensor(&[n, c, h, w], 1.0);
        let wt = rng.tensor(&[o, c, 1, 1], 0.5);
        let r = rng.tensor(&[n, o, h, w], 1.0);
        let (gx, gw) = grads(&x, &wt, &r);
        let (ex, ew) = naive(&x, &wt, &r);
        let (dx, dw) = (rel_diff(&gx, &ex), rel_diff(&gw, &ew));
        assert!(
            dx <= 1e-4 && dw <= 1e-4,
            "n{n} c{c} o{o} {h}x{w}: grad x {dx}, grad w {dw}"
        );
    }
}

#[test]
fn pointwise_gradients_are_the_same_on_one_and_two_threads() {
    let mut rng = Rng::new(42);
    for (n, c, o, h, w) in CASES {
        let x = rng.tensor(&[n, c, h, w], 1.0);
        let wt = rng.tensor(&[o, c, 1, 1], 0.5);
        let r = rng.tensor(&[n, o, h, w], 1.0);
        threads::set_flop_threshold(u64::MAX);
        let (a, b) = grads(&x, &wt, &r);
        threads::set_max_threads(2);
        threads::set_flop_threshold(0);
        let (c2, d2) = grads(&x, &wt, &r);
        threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
        threads::set_max_threads(0);
        assert_eq!(max_abs_diff(&a, &c2), 0.0, "n{n} c{c} o{o} {h}x{w}: grad x");
        assert_eq!(max_abs_diff(&b, &d2), 0.0, "n{n} c{c} o{o} {h}x{w}: grad w");
    }
}
