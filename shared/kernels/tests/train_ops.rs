//! Train-mode BatchNorm, ReLU and residual add + ReLU: forward and gradients against candle's
//! reference composition (<= 1e-4) and central finite differences.

mod common;

use adaptivenet_kernels::{
    add_relu, batch_norm_train, batch_norm_train_act, relu, relu6, sgd_update, threads, Activation,
    SgdParams,
};
use candle_core::{DType, Device, Tensor, Var, D};
use common::*;

/// The candle composition train-mode BN used to be (normalise with biased batch statistics).
fn bn_reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
    let (n, c, h, w) = x.dims4().unwrap();
    let xt = x.transpose(0, 1).unwrap().reshape((c, n * h * w)).unwrap();
    let mean = xt.mean(D::Minus1).unwrap();
    let centered = xt.broadcast_sub(&mean.unsqueeze(1).unwrap()).unwrap();
    let var = centered.sqr().unwrap().mean(D::Minus1).unwrap();
    let inv = ((&var + eps).unwrap().sqrt().unwrap().recip().unwrap() * gamma).unwrap();
    let y = centered
        .broadcast_mul(&inv.unsqueeze(1).unwrap())
        .unwrap()
        .broadcast_add(&beta.unsqueeze(1).unwrap())
        .unwrap()
        .reshape((c, n, h, w))
        .unwrap()
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap();
    (y, mean, var)
}

fn bn_case(seed: u64, dims: [usize; 4], offset: f32) -> Vec<(String, f32)> {
    let mut rng = Rng::new(seed);
    let x = (rng.tensor(&dims, 2.0) + offset as f64).unwrap();
    let gamma = (rng.tensor(&[dims[1]], 0.5) + 1.0).unwrap();
    let beta = rng.tensor(&[dims[1]], 0.5);
    let r = rng.tensor(&dims, 1.0);
    let run = |ours: bool| {
        let (xv, gv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&gamma).unwrap(),
            Var::from_tensor(&beta).unwrap(),
        );
        let (y, m, v) = if ours {
            batch_norm_train(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), 1e-5).unwrap()
        } else {
            bn_reference(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), 1e-5)
        };
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(xv.as_tensor()).unwrap().clone();
        let gg = g.get(gv.as_tensor()).unwrap().clone();
        let gb = g.get(bv.as_tensor()).unwrap().clone();
        [y, m, v, gx, gg, gb]
    };
    let (a, b) = (run(true), run(false));
    ["y", "mean", "var", "grad x", "grad gamma", "grad beta"]
        .iter()
        .zip(a.iter().zip(&b))
        .map(|(n, (a, b))| {
            let scale = max_abs_diff(b, &b.zeros_like().unwrap()).max(1.0);
            (n.to_string(), max_abs_diff(a, b) / scale)
        })
        .collect()
}

#[test]
fn bn_train_matches_candle_composition() {
    for (i, (dims, offset)) in [
        ([4, 3, 5, 7], 0.0),
        ([2, 16, 8, 8], 3.0),
        ([1, 2, 1, 1], 0.0),
        ([3, 5, 9, 1], -2.0),
    ]
    .into_iter()
    .enumerate()
    {
        for (name, err) in bn_case(10 + i as u64, dims, offset) {
            assert!(err <= 1e-4, "{dims:?}: {name} differs by {err:.2e}");
        }
    }
}

#[test]
fn bn_train_grads_match_finite_differences() {
    let dims = [3, 2, 3, 4];
    let mut rng = Rng::new(77);
    let x = rng.tensor(&dims, 1.5);
    let gamma = (rng.tensor(&[2], 0.5) + 1.0).unwrap();
    let beta = rng.tensor(&[2], 0.5);
    let r = rng.tensor(&dims, 1.0);
    let (xv, gv, bv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&gamma).unwrap(),
        Var::from_tensor(&beta).unwrap(),
    );
    let (y, _, _) = batch_norm_train(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), 1e-5).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let f = |x: &Tensor, gm: &Tensor, bt: &Tensor| batch_norm_train(x, gm, bt, 1e-5).map(|o| o.0);
    // Nonlinear in x (through the statistics): a small step; linear in gamma and beta.
    let ex = fd_check(
        &|t: &Tensor| f(t, &gamma, &beta),
        &x,
        g.get(xv.as_tensor()).unwrap(),
        &r,
        1e-2,
        &sample_idx(x.elem_count(), 72),
    );
    let eg = fd_check(
        &|t: &Tensor| f(&x, t, &beta),
        &gamma,
        g.get(gv.as_tensor()).unwrap(),
        &r,
        0.5,
        &[0, 1],
    );
    let eb = fd_check(
        &|t: &Tensor| f(&x, &gamma, t),
        &beta,
        g.get(bv.as_tensor()).unwrap(),
        &r,
        0.5,
        &[0, 1],
    );
    assert!(
        ex <= 2e-3 && eg <= 1e-3 && eb <= 1e-3,
        "x {ex} gamma {eg} beta {eb}"
    );
}

#[test]
fn bn_with_activation_is_bit_identical_to_bn_then_activation() {
    let mut rng = Rng::new(31);
    let dims = [3, 5, 7, 6];
    let x = (rng.tensor(&dims, 2.0) + 0.3).unwrap();
    // Channel 0 has gamma = beta = 0 (every pre-activation exactly 0, ReLU6's tie at the
    // lower bound), channel 1 gamma = 0, beta = 6 (the tie at the upper bound); the others
    // are scaled so that both bounds clip.
    let gamma = Tensor::new(&[0f32, 0.0, 2.5, 4.0, 1.0], &Device::Cpu).unwrap();
    let beta = Tensor::new(&[0f32, 6.0, 3.0, 0.5, -0.2], &Device::Cpu).unwrap();
    let r = rng.tensor(&dims, 1.0);
    for (act, name) in [(Activation::Relu, "relu"), (Activation::Relu6, "relu6")] {
        let run = |fused: bool| {
            let (xv, gv, bv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&gamma).unwrap(),
                Var::from_tensor(&beta).unwrap(),
            );
            let (y, m, v) = if fused {
                batch_norm_train_act(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), 1e-3, act)
                    .unwrap()
            } else {
                let (z, m, v) =
                    batch_norm_train(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), 1e-3).unwrap();
                let y = match act {
                    Activation::Relu => relu(&z).unwrap(),
                    _ => relu6(&z).unwrap(),
                };
                (y, m, v)
            };
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = g.get(xv.as_tensor()).unwrap().clone();
            let gg = g.get(gv.as_tensor()).unwrap().clone();
            let gb = g.get(bv.as_tensor()).unwrap().clone();
            [y, m, v, gx, gg, gb]
        };
        let (fused, composed) = (run(true), run(false));
        for (what, (a, b)) in ["y", "mean", "var", "grad x", "grad gamma", "grad beta"]
            .iter()
            .zip(fused.iter().zip(&composed))
        {
            assert_eq!(bits(a), bits(b), "{name}: {what}");
        }
        let y = fused[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            y.contains(&0.0) && y.iter().any(|&v| v > 0.0 && v < 6.0),
            "{name}"
        );
        if act == Activation::Relu6 {
            assert!(y.contains(&6.0), "{name}: the upper bound clips");
        }
    }
    // The tie rule is exercised: channel 0's pre-activations are all exactly 0, where ReLU6
    // passes half the upstream gradient, so its beta gradient is half the sum of `r`.
    let xv = Var::from_tensor(&x).unwrap();
    let bv = Var::from_tensor(&beta).unwrap();
    let (y, _, _) = batch_norm_train_act(
        xv.as_tensor(),
        &gamma,
        bv.as_tensor(),
        1e-3,
        Activation::Relu6,
    )
    .unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = g.get(bv.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    let r0: f32 = r
        .narrow(1, 0, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        (gb[0] - r0 / 2.0).abs() <= 1e-4 * r0.abs().max(1.0),
        "{} vs {}",
        gb[0],
        r0 / 2.0
    );
}

#[test]
fn bn_train_rejects_bad_input() {
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let g = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let e = batch_norm_train(&x, &bad, &g, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gamma"), "{e}");
    let e = batch_norm_train(&x.to_dtype(DType::F64).unwrap(), &g, &g, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("f32") && e.contains("x"), "{e}");
    let e = batch_norm_train(&x.flatten_all().unwrap(), &g, &g, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank-4"), "{e}");
}

#[test]
fn relu_and_add_relu_match_candle_including_zeros() {
    let mut rng = Rng::new(5);
    // Values on a coarse grid so that exact zeros (and a + b == 0) occur.
    let grid = |t: Tensor| (t * 4.0).unwrap().round().unwrap();
    let a = grid(rng.tensor(&[2, 3, 5, 5], 1.0));
    let b = grid(rng.tensor(&[2, 3, 5, 5], 1.0));
    let r = rng.tensor(&[2, 3, 5, 5], 1.0);
    let zeros = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(zeros(&(&a + &b).unwrap()).contains(&0.0) && zeros(&a).contains(&0.0));
    let grads = |ours: bool| {
        let (av, bv) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
        let (y1, y2) = if ours {
            (
                relu(av.as_tensor()).unwrap(),
                add_relu(av.as_tensor(), bv.as_tensor()).unwrap(),
            )
        } else {
            (
                av.as_tensor().relu().unwrap(),
                (av.as_tensor() + bv.as_tensor()).unwrap().relu().unwrap(),
            )
        };
        let loss = ((&y1 * &r).unwrap().sum_all().unwrap()
            + (&y2 * &r).unwrap().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let g = loss.backward().unwrap();
        [
            y1,
            y2,
            g.get(av.as_tensor()).unwrap().clone(),
            g.get(bv.as_tensor()).unwrap().clone(),
        ]
    };
    let (o, c) = (grads(true), grads(false));
    for (name, (o, c)) in ["relu", "add_relu", "grad a", "grad b"]
        .iter()
        .zip(o.iter().zip(&c))
    {
        assert_eq!(max_abs_diff(o, c), 0.0, "{name}");
    }
    let e = add_relu(&a, &a.flatten_all().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("add_relu") && e.contains("differ"), "{e}");
}

#[test]
fn relu6_matches_candle_clamp_including_both_bounds() {
    let mut rng = Rng::new(11);
    // A grid of quarters over [-8, 8): exact 0 and 6 (ties with both bounds) occur.
    let x = (rng.tensor(&[2, 4, 9, 9], 8.0) * 4.0)
        .unwrap()
        .round()
        .unwrap()
        .affine(0.25, 0.0)
        .unwrap();
    let vals = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(vals.contains(&0.0) && vals.contains(&6.0) && vals.iter().any(|&v| v > 6.0));
    let r = rng.tensor(&[2, 4, 9, 9], 1.0);
    let run = |ours: bool| {
        let xv = Var::from_tensor(&x).unwrap();
        let y = if ours {
            relu6(xv.as_tensor()).unwrap()
        } else {
            xv.as_tensor().clamp(0f32, 6f32).unwrap()
        };
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(xv.as_tensor()).unwrap().clone())
    };
    let ((y1, g1), (y2, g2)) = (run(true), run(false));
    assert_eq!(max_abs_diff(&y1, &y2), 0.0, "forward");
    assert_eq!(max_abs_diff(&g1, &g2), 0.0, "gradient");
    // The tie rule is really exercised: half the upstream gradient at 0 and at 6.
    let (g, rv) = (
        g1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    let i = vals.iter().position(|&v| v == 6.0).unwrap();
    assert_eq!(g[i], rv[i] / 2.0);
    let e = relu6(&x.to_dtype(DType::F64).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("relu6"), "{e}");
}

#[test]
fn threaded_bn_and_relu_match_single_threaded() {
    let mut rng = Rng::new(9);
    let x = rng.tensor(&[8, 6, 33, 31], 2.0);
    let gamma = rng.tensor(&[6], 1.0);
    let beta = rng.tensor(&[6], 1.0);
    let r = rng.tensor(&[8, 6, 33, 31], 1.0);
    let run = || {
        let xv = Var::from_tensor(&x).unwrap();
        let (y, m, v) = batch_norm_train(xv.as_tensor(), &gamma, &beta, 1e-5).unwrap();
        let y = relu(&y).unwrap();
        let z = add_relu(&y, xv.as_tensor()).unwrap();
        let g = (&z * &r).unwrap().sum_all().unwrap().backward().unwrap();
        [y, m, v, g.get(xv.as_tensor()).unwrap().clone()]
    };
    threads::set_max_threads(1);
    let one = run();
    threads::set_max_threads(2);
    threads::set_flop_threshold(0);
    let two = run();
    threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
    threads::set_max_threads(0);
    for (a, b) in one.iter().zip(&two) {
        assert!(max_abs_diff(a, b) <= 1e-6);
    }
}

/// The candle composition of one PyTorch SGD step (what `sgd_update` replaces).
fn sgd_reference(
    p: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    hp: &SgdParams,
) -> (Tensor, Option<Tensor>) {
    let mut g = g.clone();
    if hp.weight_decay != 0.0 {
        g = (g + p.affine(hp.weight_decay, 0.0).unwrap()).unwrap();
    }
    let (d, buf) = if hp.momentum != 0.0 {
        let buf = match buf {
            Some(b) => (b.affine(hp.momentum, 0.0).unwrap() + &g).unwrap(),
            None => g.copy().unwrap(),
        };
        let d = if hp.nesterov {
            (&g + buf.affine(hp.momentum, 0.0).unwrap()).unwrap()
        } else {
            buf.clone()
        };
        (d, Some(buf))
    } else {
        (g, None)
    };
    ((p - d.affine(hp.lr, 0.0).unwrap()).unwrap(), buf)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn sgd_update_is_bit_identical_to_the_candle_composition() {
    let mut rng = Rng::new(77);
    for (momentum, weight_decay, nesterov) in [
        (0.9, 5e-4, true),
        (0.9, 5e-4, false),
        (0.9, 0.0, true),
        (0.0, 5e-4, false),
        (0.0, 0.0, false),
    ] {
        let hp = SgdParams {
            lr: 0.1,
            momentum,
            weight_decay,
            nesterov,
        };
        let p0 = rng.tensor(&[7, 3, 3, 3], 1.0);
        let var = Var::from_tensor(&p0).unwrap();
        let (mut rp, mut rbuf, mut buf) = (p0.copy().unwrap(), None::<Tensor>, None::<Tensor>);
        for step in 0..4 {
            let g = rng.tensor(&[7, 3, 3, 3], 0.5);
            let (np, nb) = sgd_reference(&rp, &g, rbuf.as_ref(), &hp);
            rp = np;
            rbuf = nb;
            if let Some(new) = sgd_update(var.as_tensor(), &g, buf.as_ref(), &hp).unwrap() {
                buf = Some(new);
            }
            let case = format!("mu {momentum} wd {weight_decay} nesterov {nesterov} step {step}");
            assert_eq!(bits(var.as_tensor()), bits(&rp), "{case}: parameters");
            assert_eq!(
                rbuf.as_ref().map(bits),
                buf.as_ref().map(bits),
                "{case}: momentum buffer"
            );
        }
    }
    // Shape mismatch is an error and leaves the parameter untouched.
    let var = Var::from_tensor(&rng.tensor(&[4], 1.0)).unwrap();
    let before = bits(var.as_tensor());
    let hp = SgdParams {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        nesterov: false,
    };
    assert!(sgd_update(var.as_tensor(), &rng.tensor(&[5], 1.0), None, &hp).is_err());
    assert_eq!(bits(var.as_tensor()), before);
}

/// Values equal as floats (`0.0 == -0.0`): the fused op's gradients may differ from the
/// two-op graph only in the sign of exact zeros (candle adds `+0.0` to the first gradient).
fn same_values(a: &Tensor, b: &Tensor) -> bool {
    let (x, y) = (
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    x.len() == y.len() && x.iter().zip(&y).all(|(p, q)| p == q)
}

#[test]
fn conv_bn_is_bit_identical_to_conv_then_bn() {
    use adaptivenet_kernels::{conv2d, conv_bn_train, Conv2dParams};
    let mut rng = Rng::new(61);
    // (x dims, out channels, kernel, stride, groups): 1x1 (pointwise), depthwise on a small
    // map (channel lanes) and a large stride-1 one (plane kernel), a dense 3x3 and a strided
    // 1x1 (GEMM paths).
    let cases = [
        ([4, 8, 4, 4], 24, 1, 1, 1),
        ([3, 16, 5, 5], 16, 5, 2, 16),
        ([2, 8, 16, 16], 8, 3, 1, 8),
        ([2, 5, 9, 7], 6, 3, 1, 1),
        ([3, 6, 8, 8], 10, 1, 2, 1),
    ];
    for (xd, o, k, s, groups) in cases {
        let x = rng.tensor(&xd, 1.0);
        let w = rng.tensor(&[o, xd[1] / groups, k, k], 0.5);
        let gamma = (rng.tensor(&[o], 0.5) + 1.0).unwrap();
        let beta = rng.tensor(&[o], 1.0);
        let p = Conv2dParams::same((xd[2], xd[3]), (k, k), (s, s)).with_groups(groups);
        for act in [Activation::None, Activation::Relu, Activation::Relu6] {
            for frozen in [false, true] {
                let run = |fused: bool| {
                    let (xv, wv, gv, bv) = (
                        Var::from_tensor(&x).unwrap(),
                        Var::from_tensor(&w).unwrap(),
                        Var::from_tensor(&gamma).unwrap(),
                        Var::from_tensor(&beta).unwrap(),
                    );
                    // Frozen: weight and BN affine constants (a frozen block on a path that
                    // carries a gradient), only the input gradient flows.
                    let (wt, gt, bt) = if frozen {
                        (w.clone(), gamma.clone(), beta.clone())
                    } else {
                        (
                            wv.as_tensor().clone(),
                            gv.as_tensor().clone(),
                            bv.as_tensor().clone(),
                        )
                    };
                    let (y, m, v) = if fused {
                        conv_bn_train(xv.as_tensor(), &wt, &gt, &bt, &p, 1e-3, act).unwrap()
                    } else {
                        let z = conv2d(xv.as_tensor(), &wt, None, &p).unwrap();
                        batch_norm_train_act(&z, &gt, &bt, 1e-3, act).unwrap()
                    };
                    let r = Tensor::ones(y.dims(), DType::F32, &Device::Cpu)
                        .unwrap()
                        .affine(0.5, 0.25)
                        .unwrap();
                    let g = (&y * &r * &y)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let mut out = vec![y, m, v, g.get(xv.as_tensor()).unwrap().clone()];
                    if !frozen {
                        for t in [&wv, &gv, &bv] {
                            out.push(g.get(t.as_tensor()).unwrap().clone());
                        }
                    }
                    out
                };
                let (a, b) = (run(true), run(false));
                assert_eq!(a.len(), b.len());
                for (i, (p1, p2)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        same_values(p1, p2),
                        "x{xd:?} o{o} k{k} s{s} g{groups} {act:?} frozen {frozen}: output {i}"
                    );
                }
            }
        }
    }
}
