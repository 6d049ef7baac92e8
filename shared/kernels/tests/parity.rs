//! Forward parity against candle's reference ops (≤ 1e-4 absolute, data scaled so outputs are
//! O(1)), backward parity against candle's autograd (≤ 1e-4 relative to max(1, max|grad|)),
//! fused activations, BN folding (≤ 1e-5), dtype errors, non-contiguous inputs.

mod common;

use adaptivenet_kernels::{
    conv2d, conv2d_fused, fold_bn, global_avg_pool, max_pool2d, Activation, Conv2dParams,
};
use candle_core::{DType, Device, Tensor, Var};
use common::*;

const FWD_TOL: f32 = 1e-4;
const BWD_TOL: f32 = 1e-4;

#[derive(Clone, Debug)]
struct Case {
    n: usize,
    c: usize,
    o: usize,
    h: usize,
    w: usize,
    k: (usize, usize),
    p: Conv2dParams,
}

fn conv_grid(square_only: bool) -> Vec<Case> {
    let mut out = Vec::new();
    for k in [1usize, 3, 5, 7] {
        for s in [1usize, 2] {
            let pads = [
                (0, 0, 0, 0),
                (k / 2, k / 2, k / 2, k / 2),
                (k / 2, k / 2 + 1, 1, 0),
            ];
            for pad in pads {
                // (C, O, groups): dense, depthwise, 2 groups
                for (c, o, groups) in [(5, 7, 1), (6, 6, 6), (4, 6, 2)] {
                    for n in [1usize, 3] {
                        let sizes: &[(usize, usize)] = if square_only {
                            &[(9, 9), (8, 8)]
                        } else {
                            &[(9, 11), (7, 6)]
                        };
                        for &(h, w) in sizes {
                            if h + pad.0 + pad.1 < k || w + pad.2 + pad.3 < k {
                                continue;
                            }
                            out.push(Case {
                                n,
                                c,
                                o,
                                h,
                                w,
                                k: (k, k),
                                p: Conv2dParams {
                                    stride: (s, s),
                                    padding: pad,
                                    dilation: (1, 1),
                                    groups,
                                },
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

fn inputs(rng: &mut Rng, cs: &Case) -> (Tensor, Tensor, Tensor) {
    let cg = cs.c / cs.p.groups;
    let fan_in = (cg * cs.k.0 * cs.k.1) as f32;
    let x = rng.tensor(&[cs.n, cs.c, cs.h, cs.w], 1.0);
    let w = rng.tensor(&[cs.o, cg, cs.k.0, cs.k.1], 1.7 / fan_in.sqrt());
    let b = rng.tensor(&[cs.o], 0.5);
    (x, w, b)
}

#[test]
fn conv_forward_matches_candle() {
    let mut rng = Rng::new(1);
    let cases = conv_grid(false);
    assert!(cases.len() > 100);
    for cs in &cases {
        let (x, w, b) = inputs(&mut rng, cs);
        let want = candle_conv(&x, &w, Some(&b), &cs.p).unwrap();
        let got = conv2d(&x, &w, Some(&b), &cs.p).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d <= FWD_TOL, "{cs:?}: max diff {d}");
        let got = conv2d_fused(&x, &w, None, &cs.p, Activation::None).unwrap();
        let want = candle_conv(&x, &w, None, &cs.p).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d <= FWD_TOL, "{cs:?} (no bias): max diff {d}");
    }
}

#[test]
fn conv_forward_nonsquare_stride_and_dilation_match_naive() {
    let mut rng = Rng::new(2);
    let mut cases = Vec::new();
    for (c, o, groups) in [(5, 7, 1), (6, 6, 6), (4, 6, 2), (3, 6, 3)] {
        for (stride, dilation, pad) in [
            ((2, 1), (1, 1), (1, 1, 1, 1)),
            ((1, 3), (1, 1), (0, 2, 1, 1)),
            ((1, 1), (2, 2), (2, 2, 2, 2)),
            ((2, 2), (2, 1), (1, 0, 0, 1)),
            ((3, 2), (1, 2), (2, 1, 0, 3)),
        ] {
            cases.push(Case {
                n: 2,
                c,
                o,
                h: 10,
                w: 9,
                k: (3, 2),
                p: Conv2dParams {
                    stride,
                    padding: pad,
                    dilation,
                    groups,
                },
            });
        }
    }
    for cs in &cases {
        let (x, w, b) = inputs(&mut rng, cs);
        let want = naive_conv(&x, &w, Some(&b), &cs.p);
        let got = conv2d(&x, &w, Some(&b), &cs.p).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d <= FWD_TOL, "{cs:?}: max diff {d}");
    }
}

#[test]
fn conv_same_padding_helper() {
    let p = Conv2dParams::same((28, 28), (3, 3), (2, 2));
    assert_eq!(p.padding, (0, 1, 0, 1));
    let p = Conv2dParams::same((28, 27), (5, 5), (1, 1));
    assert_eq!(p.padding, (2, 2, 2, 2));
    let mut rng = Rng::new(3);
    let x = rng.tensor(&[1, 3, 28, 28], 1.0);
    let w = rng.tensor(&[4, 3, 3, 3], 0.3);
    let p = Conv2dParams::same((28, 28), (3, 3), (2, 2));
    let y = conv2d(&x, &w, None, &p).unwrap();
    assert_eq!(y.dims(), &[1, 4, 14, 14]);
    assert!(max_abs_diff(&y, &naive_conv(&x, &w, None, &p)) <= FWD_TOL);
}

#[test]
fn conv_fused_activations() {
    let mut rng = Rng::new(4);
    for cs in conv_grid(false).iter().step_by(7) {
        let (x, w, b) = inputs(&mut rng, cs);
        let lin = candle_conv(&x, &w, Some(&b), &cs.p).unwrap();
        let relu = conv2d_fused(&x, &w, Some(&b), &cs.p, Activation::Relu).unwrap();
        assert!(
            max_abs_diff(&relu, &lin.relu().unwrap()) <= FWD_TOL,
            "{cs:?}"
        );
        // Scale up so that the 6 clamp is exercised.
        let w8 = (&w * 8.0).unwrap();
        let lin8 = candle_conv(&x, &w8, Some(&b), &cs.p).unwrap();
        let relu6 = conv2d_fused(&x, &w8, Some(&b), &cs.p, Activation::Relu6).unwrap();
        let d = max_abs_diff(&relu6, &lin8.clamp(0f32, 6f32).unwrap());
        assert!(d <= 8.0 * FWD_TOL, "{cs:?}: {d}");
        assert!(!relu.track_op());
    }
}

#[test]
fn conv_backward_matches_candle_autograd() {
    let mut rng = Rng::new(5);
    let cases = conv_grid(true);
    for cs in cases.iter() {
        let (x, w, b) = inputs(&mut rng, cs);
        let (xv, wv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let ours = conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), &cs.p).unwrap();
        let r = rng.tensor(ours.dims(), 1.0);
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let theirs =
            candle_conv(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), &cs.p).unwrap();
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &xv), ("w", &wv), ("b", &bv)] {
            let a = g1.get(v.as_tensor()).unwrap();
            let e = g2.get(v.as_tensor()).unwrap();
            let d = rel_diff(a, e);
            assert!(d <= BWD_TOL, "{cs:?}: grad {name} rel diff {d}");
        }
    }
}

#[test]
fn conv_grad_only_for_tracked_inputs() {
    let mut rng = Rng::new(6);
    let x = rng.tensor(&[2, 3, 8, 8], 1.0);
    let w = Var::from_tensor(&rng.tensor(&[4, 3, 3, 3], 0.3)).unwrap();
    let y = conv2d(&x, w.as_tensor(), None, &Conv2dParams::new(1, 1)).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none());
    assert_eq!(g.get(w.as_tensor()).unwrap().dims(), &[4, 3, 3, 3]);
}

#[test]
fn non_contiguous_inputs() {
    let mut rng = Rng::new(7);
    let xt = rng.tensor(&[2, 4, 11, 9], 1.0);
    let x = xt.transpose(2, 3).unwrap(); // [2, 4, 9, 11], non-contiguous
    assert!(!x.is_contiguous());
    let w = rng.tensor(&[4, 5, 3, 3], 0.3).transpose(0, 1).unwrap(); // [5, 4, 3, 3]
    let p = Conv2dParams::new(2, 1);
    let got = conv2d(&x, &w, None, &p).unwrap();
    let want = candle_conv(&x.contiguous().unwrap(), &w.contiguous().unwrap(), None, &p).unwrap();
    assert!(max_abs_diff(&got, &want) <= FWD_TOL);
    let got = max_pool2d(&x, (3, 3), (2, 2), (1, 1)).unwrap();
    let want = candle_max_pool(&x.contiguous().unwrap(), (3, 3), (2, 2), (1, 1)).unwrap();
    assert_eq!(max_abs_diff(&got, &want), 0.0);
    let got = global_avg_pool(&x).unwrap();
    let want = x.mean((2, 3)).unwrap();
    assert!(max_abs_diff(&got, &want) <= 1e-6);
}

#[test]
fn other_dtypes_error_with_dtype_name() {
    let x = Tensor::zeros((1, 2, 5, 5), DType::F64, &Device::Cpu).unwrap();
    let w = Tensor::zeros((2, 2, 3, 3), DType::F64, &Device::Cpu).unwrap();
    let e = conv2d(&x, &w, None, &Conv2dParams::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("f64"), "{e}");
    let e = max_pool2d(&x, (2, 2), (2, 2), (0, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("f64"), "{e}");
    let e = global_avg_pool(&x.to_dtype(DType::F16).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("f16"), "{e}");
}

#[test]
fn shape_errors() {
    let x = Tensor::zeros((1, 4, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((2, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&x, &w, None, &Conv2dParams::default()).is_err());
    let w = Tensor::zeros((2, 4, 7, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&x, &w, None, &Conv2dParams::default()).is_err());
    assert!(max_pool2d(&x, (2, 2), (2, 2), (2, 2)).is_err());
}

type PoolCase = (
    (usize, usize, usize, usize),
    (usize, usize),
    (usize, usize),
    (usize, usize),
);

fn pool_cases() -> Vec<PoolCase> {
    vec![
        ((1, 3, 9, 11), (3, 3), (2, 2), (1, 1)),
        ((2, 4, 8, 8), (2, 2), (2, 2), (0, 0)),
        ((2, 2, 7, 7), (3, 3), (1, 1), (1, 1)),
        ((1, 3, 10, 9), (3, 2), (2, 1), (1, 0)),
        ((3, 2, 11, 13), (5, 5), (3, 3), (2, 2)),
        ((1, 5, 6, 6), (2, 2), (1, 1), (1, 1)),
        ((2, 3, 112, 112), (3, 3), (2, 2), (1, 1)),
    ]
}

#[test]
fn max_pool_forward_matches_candle() {
    let mut rng = Rng::new(8);
    for (dims, k, s, p) in pool_cases() {
        let x = rng.tensor(&[dims.0, dims.1, dims.2, dims.3], 1.0);
        let got = max_pool2d(&x, k, s, p).unwrap();
        let want = candle_max_pool(&x, k, s, p).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{dims:?} {k:?} {s:?} {p:?}");
    }
}

#[test]
fn max_pool_backward_matches_candle_up_to_its_scale_bug() {
    let mut rng = Rng::new(9);
    for (dims, k) in [
        ((2, 3, 8, 8), (2, 2)),
        ((1, 2, 9, 12), (3, 3)),
        ((2, 2, 9, 8), (3, 2)),
    ] {
        let x = Var::from_tensor(&rng.distinct(&[dims.0, dims.1, dims.2, dims.3], 0.01)).unwrap();
        let ours = max_pool2d(x.as_tensor(), k, k, (0, 0)).unwrap();
        let r = rng.tensor(ours.dims(), 1.0);
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let theirs = x.as_tensor().max_pool2d_with_stride(k, k).unwrap();
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // candle 0.11.1's max-pool backward scales the gradient by 1/(kh*kw): it multiplies by
        // avg_pool(mask) (= 1/(kh*kw) for a unique maximum) where it means to divide by the
        // number of maxima. Our gradient is checked against finite differences in
        // tests/grads.rs; here it must equal candle's times kh*kw.
        let theirs_fixed = (g2.get(x.as_tensor()).unwrap() * (k.0 * k.1) as f64).unwrap();
        let d = max_abs_diff(g1.get(x.as_tensor()).unwrap(), &theirs_fixed);
        assert!(d <= 1e-6, "{dims:?} {k:?}: {d}");
    }
}

#[test]
fn global_avg_pool_matches_candle() {
    let mut rng = Rng::new(10);
    for dims in [
        [1, 3, 7, 7],
        [4, 16, 8, 8],
        [2, 5, 1, 1],
        [1, 64, 28, 28],
        [3, 2, 5, 13],
    ] {
        let x = Var::from_tensor(&rng.tensor(&dims, 1.0)).unwrap();
        let ours = global_avg_pool(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().mean((2, 3)).unwrap();
        assert!(max_abs_diff(&ours, &theirs) <= 1e-6, "{dims:?}");
        let r = rng.tensor(ours.dims(), 1.0);
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_abs_diff(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(d <= 1e-6, "{dims:?}: {d}");
    }
}

#[test]
fn bn_folding_is_exact() {
    let mut rng = Rng::new(11);
    let eps = 1e-5;
    for (c, o, groups, with_bias) in [
        (8, 16, 1, false),
        (16, 16, 16, true),
        (6, 4, 2, true),
        (3, 32, 1, true),
    ] {
        let cs = Case {
            n: 2,
            c,
            o,
            h: 12,
            w: 10,
            k: (3, 3),
            p: Conv2dParams::new(1, 1).with_groups(groups),
        };
        let (x, w, b) = inputs(&mut rng, &cs);
        let gamma = (rng.tensor(&[o], 0.5) + 1.0).unwrap();
        let beta = rng.tensor(&[o], 0.5);
        let mean = rng.tensor(&[o], 0.3);
        let var = (rng.tensor(&[o], 0.5).abs().unwrap() + 0.5).unwrap();
        let bias = with_bias.then_some(&b);
        // Unfolded eval-mode model: conv, then BN.
        let bn = |y: &Tensor| -> Tensor {
            let sh = (1, o, 1, 1);
            let y = y.broadcast_sub(&mean.reshape(sh).unwrap()).unwrap();
            let y = y
                .broadcast_div(&(var.reshape(sh).unwrap() + eps).unwrap().sqrt().unwrap())
                .unwrap();
            y.broadcast_mul(&gamma.reshape(sh).unwrap())
                .unwrap()
                .broadcast_add(&beta.reshape(sh).unwrap())
                .unwrap()
        };
        let unfolded = bn(&candle_conv(&x, &w, bias, &cs.p).unwrap());
        let unfolded_ours = bn(&conv2d(&x, &w, bias, &cs.p).unwrap());
        let (w2, b2) = fold_bn(&w, bias, &gamma, &beta, &mean, &var, eps).unwrap();
        assert_eq!(w2.dims(), w.dims());
        assert_eq!(w2.dtype(), DType::F32);
        let folded = conv2d_fused(&x, &w2, Some(&b2), &cs.p, Activation::None).unwrap();
        let d = max_abs_diff(&folded, &unfolded);
        assert!(d <= 1e-5, "groups {groups}: folded vs unfolded candle {d}");
        let d = max_abs_diff(&folded, &unfolded_ours);
        assert!(d <= 1e-5, "groups {groups}: folded vs unfolded ours {d}");
        // And the fused ReLU on the folded conv.
        let folded_relu = conv2d_fused(&x, &w2, Some(&b2), &cs.p, Activation::Relu).unwrap();
        assert!(max_abs_diff(&folded_relu, &unfolded.relu().unwrap()) <= 1e-5);
    }
}

#[test]
fn max_pool_propagates_nan() {
    let mut v: Vec<f32> = (0..2 * 36).map(|i| i as f32).collect();
    v[7] = f32::NAN; // plane 0, row 1, col 1
    let x = Tensor::from_vec(v, (1, 2, 6, 6), &Device::Cpu).unwrap();
    let y: Vec<f32> = max_pool2d(&x, (3, 3), (2, 2), (1, 1))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // Windows of plane 0 that contain (1, 1): outputs (0, 0), (0, 1), (1, 0), (1, 1).
    for (i, v) in y[..9].iter().enumerate() {
        let has_nan = matches!(i, 0 | 1 | 3 | 4);
        assert_eq!(v.is_nan(), has_nan, "output {i}: {v}");
    }
    assert!(y[9..].iter().all(|v| !v.is_nan()));
}

/// Large im2col matrices (> 1M elements) are built and multiplied in bands of output rows;
/// the result must equal the one-shot reference, for stride 1 and 2 and a row count that does
/// not divide evenly into bands.
#[test]
fn banded_im2col_matches_reference() {
    let mut rng = Rng::new(900);
    for (hw, stride, pad) in [(90, 1, 1), (181, 2, 3)] {
        let x = rng.tensor(&[1, 16, hw, hw], 1.0);
        let w = rng.tensor(&[3, 16, 3, 3], 0.3);
        let b = rng.tensor(&[3], 0.5);
        let p = Conv2dParams::new(stride, pad);
        let ours = conv2d_fused(&x, &w, Some(&b), &p, Activation::Relu).unwrap();
        let want = naive_conv(&x, &w, Some(&b), &p).relu().unwrap();
        let e = max_abs_diff(&ours, &want);
        assert!(e <= 1e-4, "hw {hw} stride {stride}: {e}");
    }
}
