//! The MBConv inference kernels against candle's reference ops: the register-blocked
//! depthwise forward (3x3 / 5x5, stride 1 / 2, symmetric, TF-SAME and other asymmetric
//! padding, bias + ReLU / ReLU6) and the pre-packed pointwise GEMM (bias, activation and
//! residual add fused), on random shapes including odd sizes, widths that are not multiples
//! of the 8 / 16 / 32-lane tiles, reductions longer than one k-block, and 1 and 2 threads.
//! The fused expand + depthwise against candle's two convs in sequence. Tolerance: 1e-4
//! absolute with data scaled so outputs are O(1).

mod common;

use adaptivenet_kernels::{
    conv2d, conv2d_fused, expand_dw_packed, pack_pointwise, pointwise_packed, threads, Activation,
    Conv2dParams,
};
use candle_core::{Device, Tensor};
use common::*;

const TOL: f32 = 1e-4;

#[test]
fn depthwise_forward_matches_candle() {
    let mut rng = Rng::new(11);
    let mut cases = 0;
    for k in [3usize, 5] {
        for s in [1usize, 2] {
            for &(h, w) in &[
                (7, 7),
                (9, 13),
                (14, 14),
                (17, 45),
                (40, 33),
                (1, 70),
                (5, 8),
                (3, 2),
                (28, 28),
                (56, 57),
                (12, 112),
            ] {
                let pads = [
                    (k / 2, k / 2, k / 2, k / 2),
                    Conv2dParams::same((h, w), (k, k), (s, s)).padding,
                    (0, 0, 0, 0),
                    (k - 1, 0, 1, k - 1),
                ];
                for pad in pads {
                    if h + pad.0 + pad.1 < k || w + pad.2 + pad.3 < k {
                        continue;
                    }
                    let c = 3 + cases % 4;
                    let n = 1 + cases % 2;
                    let p = Conv2dParams {
                        stride: (s, s),
                        padding: pad,
                        dilation: (1, 1),
                        groups: c,
                    };
                    let x = rng.tensor(&[n, c, h, w], 1.0);
                    let wt = rng.tensor(&[c, 1, k, k], 1.7 / k as f32);
                    let b = rng.tensor(&[c], 0.5);
                    let act = ACTS[cases % 3];
                    let want = reference_act(candle_conv(&x, &wt, Some(&b), &p).unwrap(), act);
                    let got = conv2d_fused(&x, &wt, Some(&b), &p, act).unwrap();
                    let d = max_abs_diff(&got, &want);
                    assert!(d <= TOL, "k{k} s{s} {h}x{w} pad {pad:?} {act:?}: {d}");
                    // The differentiable op's forward runs the same kernel (no bias here).
                    let got = conv2d(&x, &wt, None, &p).unwrap();
                    let want = candle_conv(&x, &wt, None, &p).unwrap();
                    let d = max_abs_diff(&got, &want);
                    assert!(d <= TOL, "k{k} s{s} {h}x{w} pad {pad:?} unfused: {d}");
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 80, "{cases} cases");
}

/// The inference depthwise on the tiny maps that run in channel lanes (outputs of at most 4
/// pixels: Lite0's last stage at 64x64), with full and partial channel blocks.
#[test]
fn depthwise_forward_on_tiny_maps_matches_candle() {
    let mut rng = Rng::new(21);
    for (c, h, k, s) in [
        (40, 2, 5, 1),
        (40, 2, 3, 1),
        (19, 4, 3, 2),
        (33, 4, 5, 2),
        (8, 1, 3, 1),
    ] {
        let p = Conv2dParams::same((h, h), (k, k), (s, s)).with_groups(c);
        let x = rng.tensor(&[2, c, h, h], 1.0);
        let wt = rng.tensor(&[c, 1, k, k], 1.7 / k as f32);
        let b = rng.tensor(&[c], 0.5);
        for act in ACTS {
            let want = reference_act(candle_conv(&x, &wt, Some(&b), &p).unwrap(), act);
            let got = conv2d_fused(&x, &wt, Some(&b), &p, act).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= TOL, "c{c} {h}x{h} k{k} s{s} {act:?}: {d}");
        }
    }
}

/// The depthwise forward on every width 1-40 (narrower than one 8- or 16-lane vector,
/// partial last vectors, interior and edge column blocks) and Lite0's 56 and 112, at both
/// kernel sizes and strides, TF-SAME or symmetric padding, heights giving each count of
/// rows in a last row block.
#[test]
fn depthwise_forward_matches_candle_all_widths() {
    let mut rng = Rng::new(12);
    let mut cases = 0;
    for w in (1..=40).chain([56, 112]) {
        for k in [3usize, 5] {
            for s in [1usize, 2] {
                let h = 1 + (w + k + s) % 8;
                let pad = if (w + s) % 2 == 0 {
                    Conv2dParams::same((h, w), (k, k), (s, s)).padding
                } else {
                    (k / 2, k / 2, k / 2, k / 2)
                };
                if h + pad.0 + pad.1 < k || w + pad.2 + pad.3 < k {
                    continue;
                }
                let c = 2 + cases % 3;
                let p = Conv2dParams {
                    stride: (s, s),
                    padding: pad,
                    dilation: (1, 1),
                    groups: c,
                };
                let x = rng.tensor(&[1, c, h, w], 1.0);
                let wt = rng.tensor(&[c, 1, k, k], 1.7 / k as f32);
                let b = rng.tensor(&[c], 0.5);
                let act = ACTS[cases % 3];
                let want = reference_act(candle_conv(&x, &wt, Some(&b), &p).unwrap(), act);
                let got = conv2d_fused(&x, &wt, Some(&b), &p, act).unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(d <= TOL, "k{k} s{s} {h}x{w} pad {pad:?} {act:?}: {d}");
                cases += 1;
            }
        }
    }
    assert!(cases > 150, "{cases} cases");
}

fn pointwise_case(rng: &mut Rng, n: usize, c: usize, o: usize, (h, w): (usize, usize), i: usize) {
    let x = rng.tensor(&[n, c, h, w], 1.0);
    let wt = rng.tensor(&[o, c, 1, 1], 1.7 / (c as f32).sqrt());
    let b = rng.tensor(&[o], 0.5);
    let res = rng.tensor(&[n, o, h, w], 1.0);
    let act = ACTS[i % 3];
    let packed = pack_pointwise(&wt).unwrap();
    let conv = candle_conv(&x, &wt, Some(&b), &Conv2dParams::default()).unwrap();
    let want = reference_act((&conv + &res).unwrap(), act);
    let got = pointwise_packed(&x, &packed, o, Some(&b), act, Some(&res)).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d <= TOL, "n{n} c{c} o{o} {h}x{w} {act:?} +res: {d}");
    let want = reference_act(conv, act);
    let got = pointwise_packed(&x, &packed, o, Some(&b), act, None).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d <= TOL, "n{n} c{c} o{o} {h}x{w} {act:?}: {d}");
}

#[test]
fn pointwise_packed_matches_candle() {
    let mut rng = Rng::new(12);
    let mut i = 0;
    for &c in &[1usize, 3, 16, 37, 300] {
        for &o in &[1usize, 5, 6, 7, 13, 32] {
            for &hw in &[
                (1, 1),
                (1, 7),
                (2, 4),
                (3, 3),
                (4, 4),
                (1, 17),
                (7, 7),
                (10, 10),
            ] {
                pointwise_case(&mut rng, 1 + i % 2, c, o, hw, i);
                i += 1;
            }
        }
    }
}

/// Worker splits (over images, or over output-channel panels of one image) give the same
/// results as one thread.
#[test]
fn pointwise_packed_threads_agree() {
    let mut rng = Rng::new(13);
    let x = rng.tensor(&[3, 40, 9, 11], 1.0);
    let wt = rng.tensor(&[50, 40, 1, 1], 0.3);
    let b = rng.tensor(&[50], 0.5);
    let res = rng.tensor(&[3, 50, 9, 11], 1.0);
    let packed = pack_pointwise(&wt).unwrap();
    let run = |x: &Tensor, r: &Tensor| {
        pointwise_packed(x, &packed, 50, Some(&b), Activation::Relu6, Some(r)).unwrap()
    };
    let x1 = x.narrow(0, 0, 1).unwrap();
    let r1 = res.narrow(0, 0, 1).unwrap();
    let (one, one1) = (run(&x, &res), run(&x1, &r1));
    threads::set_max_threads(2);
    threads::set_flop_threshold(0);
    let (two, two1) = (run(&x, &res), run(&x1, &r1));
    threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
    threads::set_max_threads(0);
    assert_eq!(max_abs_diff(&one, &two), 0.0);
    assert_eq!(max_abs_diff(&one1, &two1), 0.0);
}

#[test]
fn pointwise_packed_rejects_bad_shapes() {
    let x = Tensor::zeros((1, 4, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((5, 4, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let packed = pack_pointwise(&w).unwrap();
    // Out channels in another number of 16-channel panels; within the panel, the bias.
    let err = pointwise_packed(&x, &packed, 17, None, Activation::None, None).unwrap_err();
    assert!(err.to_string().contains("packed weight"), "{err}");
    let b5 = Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = pointwise_packed(&x, &packed, 7, Some(&b5), Activation::None, None).unwrap_err();
    assert!(err.to_string().contains("bias"), "{err}");
    let r = Tensor::zeros((1, 5, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = pointwise_packed(&x, &packed, 5, None, Activation::None, Some(&r)).unwrap_err();
    assert!(err.to_string().contains("residual"), "{err}");
    let w3 = Tensor::zeros((5, 4, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = pack_pointwise(&w3).unwrap_err();
    assert!(err.to_string().contains("[O, C, 1, 1]"), "{err}");
}

/// The fused expand + depthwise equals the expand conv then the depthwise (candle's convs,
/// bias and activation after each), on maps narrower and wider than one 32-lane column
/// block, hidden channels in one and several 16-channel panels (the last partial), both
/// kernel sizes and strides, symmetric and TF-SAME padding, and 1 and 2 threads.
#[test]
fn expand_dw_matches_candle() {
    let mut rng = Rng::new(14);
    let mut i = 0;
    for (n, c, hidden, h, w) in [
        (1, 16, 96, 20, 23),
        (2, 5, 7, 9, 40),
        (1, 24, 40, 33, 9),
        (1, 3, 17, 6, 6),
    ] {
        for k in [3usize, 5] {
            for s in [1usize, 2] {
                let x = rng.tensor(&[n, c, h, w], 1.0);
                let we = rng.tensor(&[hidden, c, 1, 1], 1.7 / (c as f32).sqrt());
                let be = rng.tensor(&[hidden], 0.5);
                let wd = rng.tensor(&[hidden, 1, k, k], 1.7 / k as f32);
                let bd = rng.tensor(&[hidden], 0.5);
                let act = ACTS[i % 3];
                let pad = if i % 2 == 0 {
                    (k / 2, k / 2, k / 2, k / 2)
                } else {
                    Conv2dParams::same((h, w), (k, k), (s, s)).padding
                };
                let dw = Conv2dParams {
                    stride: (s, s),
                    padding: pad,
                    dilation: (1, 1),
                    groups: hidden,
                };
                let e = candle_conv(&x, &we, Some(&be), &Conv2dParams::default()).unwrap();
                let e = reference_act(e, act);
                let want = reference_act(candle_conv(&e, &wd, Some(&bd), &dw).unwrap(), act);
                let packed = pack_pointwise(&we).unwrap();
                let run = || {
                    expand_dw_packed(&x, &packed, hidden, Some(&be), &wd, Some(&bd), &dw, act)
                        .unwrap()
                };
                let got = run();
                let d = max_abs_diff(&got, &want);
                assert!(
                    d <= TOL,
                    "n{n} c{c} h{hidden} {h}x{w} k{k} s{s} {act:?}: {d}"
                );
                threads::set_max_threads(2);
                threads::set_flop_threshold(0);
                let two = run();
                threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
                threads::set_max_threads(0);
                assert_eq!(max_abs_diff(&got, &two), 0.0, "threads");
                i += 1;
            }
        }
    }
}

#[test]
fn expand_dw_rejects_bad_shapes() {
    let z = |d: &[usize]| Tensor::zeros(d, candle_core::DType::F32, &Device::Cpu).unwrap();
    let x = z(&[1, 4, 8, 8]);
    let packed = pack_pointwise(&z(&[8, 4, 1, 1])).unwrap();
    let dw = Conv2dParams {
        stride: (1, 1),
        padding: (1, 1, 1, 1),
        dilation: (1, 1),
        groups: 8,
    };
    let act = Activation::Relu6;
    // A 7x7 depthwise is not one the fused kernel runs; a weight of other channels.
    let err = expand_dw_packed(&x, &packed, 8, None, &z(&[8, 1, 7, 7]), None, &dw, act);
    assert!(err.unwrap_err().to_string().contains("depthwise"));
    let err = expand_dw_packed(&x, &packed, 8, None, &z(&[6, 1, 3, 3]), None, &dw, act);
    assert!(err.is_err());
    // Hidden channels in another number of 16-channel panels than the packed weight.
    let dw17 = Conv2dParams { groups: 17, ..dw };
    let err = expand_dw_packed(&x, &packed, 17, None, &z(&[17, 1, 3, 3]), None, &dw17, act);
    assert!(err.unwrap_err().to_string().contains("packed weight"));
}
