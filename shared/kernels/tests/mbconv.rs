//! The MBConv inference kernels against candle's reference ops: the register-blocked
//! depthwise forward (3x3 / 5x5, stride 1 / 2, symmetric, TF-SAME and other asymmetric
//! padding, bias + ReLU / ReLU6) and the pre-packed pointwise GEMM (bias, activation and
//! residual add fused), on random shapes including odd sizes, widths that are not multiples
//! of the 8 / 16 / 32-lane tiles, reductions longer than one k-block, and 1 and 2 threads.
//! Tolerance: 1e-4 absolute with data scaled so outputs are O(1).

mod common;

use adaptivenet_kernels::{
    conv2d, conv2d_fused, pack_pointwise, pointwise_packed, threads, Activation, Conv2dParams,
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
