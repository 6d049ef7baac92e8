//! The packed inference conv ([`pack_conv`] + [`conv_packed`]) against candle's reference
//! conv2d: 3x3 (ResNet's), 1x1 (pointwise and strided downsample), 5x5 and 7x7 (stems),
//! stride 1 and 2, symmetric, TF-SAME and other asymmetric padding, bias + no activation /
//! ReLU / ReLU6, with and without the fused residual add, on odd sizes (tiles that span
//! several rows, maps narrower than one tile), output channels that leave partial panels,
//! and 1 and 2 threads (over images and over output channels of one image).
//!
//! Tolerance: 1e-4 relative to the reference output's largest magnitude (at least 1): the
//! data are scaled so outputs are O(1), and only the summation order differs.
//!
//! `resnet_shapes_avx512_match`: the AVX-512 kernel (forced with [`conv_packed_on`], and
//! the default where the CPU has avx512f) on every conv shape of ResNet-20 and ResNet-18
//! against candle (1e-4 as above) and the portable loop and the AVX2 kernel (2e-5: the same
//! products, summed in the same order, differing only by fused vs separate rounding), on 1
//! and 2 threads. Skipped, with a printed reason, on a CPU without AVX-512F.

mod common;

use adaptivenet_kernels::{
    conv_packed, conv_packed_on, isa, pack_conv, threads, Activation, Conv2dParams, Isa,
};
use candle_core::{DType, Device, Tensor};
use common::*;

const TOL: f32 = 1e-4;
struct Case {
    n: usize,
    c: usize,
    o: usize,
    hw: (usize, usize),
    k: usize,
    p: Conv2dParams,
}

/// Checks one case with and without a residual.
fn check(rng: &mut Rng, cs: &Case, act: Activation) {
    let Case { n, c, o, hw, k, p } = *cs;
    let x = rng.tensor(&[n, c, hw.0, hw.1], 1.0);
    let wt = rng.tensor(&[o, c, k, k], 1.7 / ((c * k * k) as f32).sqrt());
    let b = rng.tensor(&[o], 0.5);
    let packed = pack_conv(&wt).unwrap();
    let conv = candle_conv(&x, &wt, Some(&b), &p).unwrap();
    let what = format!("n{n} c{c} o{o} {hw:?} k{k} {p:?} {act:?}");
    let got = conv_packed(&x, &packed, o, (k, k), Some(&b), &p, act, None).unwrap();
    let d = rel_diff(&got, &reference_act(conv.clone(), act));
    assert!(d <= TOL, "{what}: {d}");
    let res = rng.tensor(conv.dims(), 1.0);
    let got = conv_packed(&x, &packed, o, (k, k), Some(&b), &p, act, Some(&res)).unwrap();
    let want = reference_act((&conv + &res).unwrap(), act);
    let d = rel_diff(&got, &want);
    assert!(d <= TOL, "{what} +res: {d}");
}

#[test]
fn conv3x3_matches_candle() {
    let mut rng = Rng::new(21);
    let mut i = 0;
    for s in [1usize, 2] {
        for &(c, o) in &[(1, 16), (16, 16), (3, 7), (32, 64), (13, 5), (64, 64)] {
            for &hw in &[(28, 28), (7, 7), (14, 14), (1, 1), (5, 9), (17, 3), (8, 40)] {
                let pads = [
                    (1, 1, 1, 1),
                    Conv2dParams::same(hw, (3, 3), (s, s)).padding,
                    (0, 0, 0, 0),
                    (2, 0, 1, 2),
                ];
                for pad in pads {
                    if hw.0 + pad.0 + pad.1 < 3 || hw.1 + pad.2 + pad.3 < 3 {
                        continue;
                    }
                    let p = Conv2dParams {
                        stride: (s, s),
                        padding: pad,
                        ..Conv2dParams::default()
                    };
                    let cs = Case {
                        n: 1 + i % 3,
                        c,
                        o,
                        hw,
                        k: 3,
                        p,
                    };
                    check(&mut rng, &cs, ACTS[i % 3]);
                    i += 1;
                }
            }
        }
    }
    assert!(i > 250, "{i} cases");
}

/// Other kernel sizes share the kernel: strided 1x1 (ResNet downsample), unit-stride 1x1
/// (the pointwise GEMM), 5x5 and the 7x7 / stride-2 stem, and a long reduction.
#[test]
fn other_kernels_match_candle() {
    let mut rng = Rng::new(22);
    let cases = [
        (2, 16, 32, (28, 28), 1, 2, 0),
        (1, 64, 128, (14, 14), 1, 2, 0),
        (2, 7, 9, (9, 11), 1, 1, 0),
        (1, 3, 64, (40, 36), 7, 2, 3),
        (2, 5, 11, (12, 13), 5, 1, 2),
        (1, 6, 8, (15, 15), 5, 2, 2),
        (1, 300, 13, (6, 7), 3, 1, 1),
        (1, 3, 32, (33, 32), 3, 2, 1),
    ];
    for (i, &(n, c, o, hw, k, s, pad)) in cases.iter().enumerate() {
        let cs = Case {
            n,
            c,
            o,
            hw,
            k,
            p: Conv2dParams::new(s, pad),
        };
        check(&mut rng, &cs, ACTS[i % 3]);
    }
}

/// Worker splits (over images, or over output-channel panels of one image) give the same
/// results as one thread, bit for bit.
#[test]
fn conv_packed_threads_agree() {
    let mut rng = Rng::new(23);
    let x = rng.tensor(&[3, 24, 15, 13], 1.0);
    let wt = rng.tensor(&[40, 24, 3, 3], 0.1);
    let b = rng.tensor(&[40], 0.5);
    let packed = pack_conv(&wt).unwrap();
    for s in [1usize, 2] {
        let p = Conv2dParams::new(s, 1);
        let (oh, ow) = ((15 + 2 - 3) / s + 1, (13 + 2 - 3) / s + 1);
        let res = rng.tensor(&[3, 40, oh, ow], 1.0);
        let run = |x: &Tensor, r: &Tensor| {
            conv_packed(
                x,
                &packed,
                40,
                (3, 3),
                Some(&b),
                &p,
                Activation::Relu,
                Some(r),
            )
            .unwrap()
        };
        let x1 = x.narrow(0, 0, 1).unwrap();
        let r1 = res.narrow(0, 0, 1).unwrap();
        let (one, one1) = (run(&x, &res), run(&x1, &r1));
        threads::set_max_threads(2);
        threads::set_flop_threshold(0);
        let (two, two1) = (run(&x, &res), run(&x1, &r1));
        threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
        threads::set_max_threads(0);
        assert_eq!(max_abs_diff(&one, &two), 0.0, "stride {s}");
        assert_eq!(max_abs_diff(&one1, &two1), 0.0, "stride {s}");
    }
}

/// `(n, c, o, hw, k, stride, pad, residual)` of each conv of ResNet-20 (28x28, widths
/// 16 / 32 / 64, batch 2 so two threads split images) and ResNet-18 (224, batch 1 so two
/// threads split output channels); each 3x3 stride-1 conv with the residual it fuses.
type Layer = (usize, usize, usize, usize, usize, usize, usize, bool);
const RESNET: [Layer; 19] = [
    (2, 1, 16, 28, 3, 1, 1, false),
    (2, 16, 16, 28, 3, 1, 1, true),
    (2, 16, 32, 28, 3, 2, 1, false),
    (2, 16, 32, 28, 1, 2, 0, false),
    (2, 32, 32, 14, 3, 1, 1, true),
    (2, 32, 64, 14, 3, 2, 1, false),
    (2, 32, 64, 14, 1, 2, 0, false),
    (2, 64, 64, 7, 3, 1, 1, true),
    (1, 3, 64, 224, 7, 2, 3, false),
    (1, 64, 64, 56, 3, 1, 1, true),
    (1, 64, 128, 56, 3, 2, 1, false),
    (1, 64, 128, 56, 1, 2, 0, false),
    (1, 128, 128, 28, 3, 1, 1, true),
    (1, 128, 256, 28, 3, 2, 1, false),
    (1, 128, 256, 28, 1, 2, 0, false),
    (1, 256, 256, 14, 3, 1, 1, true),
    (1, 256, 512, 14, 3, 2, 1, false),
    (1, 256, 512, 14, 1, 2, 0, false),
    (1, 512, 512, 7, 3, 1, 1, true),
];

#[test]
fn resnet_shapes_avx512_match() {
    if isa() < Isa::Avx512 {
        println!("skipped: this CPU has no AVX-512F ({:?})", isa());
        return;
    }
    println!("running the AVX-512 direct conv ({:?} CPU)", isa());
    let mut rng = Rng::new(24);
    for (i, &(n, c, o, hw, k, s, pad, with_res)) in RESNET.iter().enumerate() {
        let p = Conv2dParams::new(s, pad);
        let x = rng.tensor(&[n, c, hw, hw], 1.0);
        let wt = rng.tensor(&[o, c, k, k], 1.7 / ((c * k * k) as f32).sqrt());
        let b = rng.tensor(&[o], 0.5);
        let packed = pack_conv(&wt).unwrap();
        let conv = candle_conv(&x, &wt, Some(&b), &p).unwrap();
        let res = with_res.then(|| rng.tensor(conv.dims(), 1.0));
        let act = ACTS[i % 3];
        let want = match &res {
            Some(r) => reference_act((&conv + r).unwrap(), act),
            None => reference_act(conv, act),
        };
        let run = |level: Isa| {
            conv_packed_on(
                level,
                &x,
                &packed,
                o,
                (k, k),
                Some(&b),
                &p,
                act,
                res.as_ref(),
            )
            .unwrap()
        };
        let what = format!("n{n} c{c} o{o} {hw} k{k} s{s} {act:?} res {with_res}");
        let portable = run(Isa::Portable);
        let avx2 = run(Isa::Avx2);
        for t in [1, 2] {
            threads::set_max_threads(t);
            threads::set_flop_threshold(if t == 1 {
                threads::DEFAULT_FLOP_THRESHOLD
            } else {
                0
            });
            let got = run(Isa::Avx512);
            let dflt = conv_packed(&x, &packed, o, (k, k), Some(&b), &p, act, res.as_ref());
            threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
            threads::set_max_threads(0);
            assert_eq!(
                max_abs_diff(&got, &dflt.unwrap()),
                0.0,
                "{what}: default path"
            );
            let d = rel_diff(&got, &want);
            assert!(d <= TOL, "{what} {t} threads vs candle: {d}");
            for (name, other) in [("portable", &portable), ("AVX2", &avx2)] {
                let d = rel_diff(&got, other);
                assert!(d <= 2e-5, "{what} {t} threads vs {name}: {d}");
            }
        }
    }
}

/// A level the CPU lacks is an error, not a fault.
#[test]
fn conv_packed_on_checks_the_cpu() {
    let x = Tensor::zeros((1, 2, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let packed =
        pack_conv(&Tensor::zeros((3, 2, 3, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let p = Conv2dParams::new(1, 1);
    for level in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
        let r = conv_packed_on(
            level,
            &x,
            &packed,
            3,
            (3, 3),
            None,
            &p,
            Activation::Relu,
            None,
        );
        if level <= isa() {
            assert_eq!(r.unwrap().dims(), [1, 3, 5, 5]);
        } else {
            assert!(r.unwrap_err().to_string().contains("lacks"));
        }
    }
}

#[test]
fn conv_packed_rejects_bad_shapes() {
    let z = |d: &[usize]| Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
    let x = z(&[1, 4, 6, 6]);
    let packed = pack_conv(&z(&[5, 4, 3, 3])).unwrap();
    let p = Conv2dParams::new(1, 1);
    let act = Activation::None;
    // Packed for another kernel size or channel count (a count in another number of
    // 16-channel panels: the packed shape does not tell 5 from 7, the bias does).
    let err = conv_packed(&x, &packed, 5, (1, 1), None, &p, act, None).unwrap_err();
    assert!(err.to_string().contains("packed weight"), "{err}");
    let err = conv_packed(&x, &packed, 21, (3, 3), None, &p, act, None).unwrap_err();
    assert!(err.to_string().contains("packed weight"), "{err}");
    let err = conv_packed(&x, &packed, 7, (3, 3), Some(&z(&[5])), &p, act, None).unwrap_err();
    assert!(err.to_string().contains("bias"), "{err}");
    // Residual not shaped like the output; a bias of the wrong length.
    let err = conv_packed(
        &x,
        &packed,
        5,
        (3, 3),
        None,
        &p,
        act,
        Some(&z(&[1, 5, 5, 6])),
    );
    assert!(err.unwrap_err().to_string().contains("residual"));
    let err = conv_packed(&x, &packed, 5, (3, 3), Some(&z(&[4])), &p, act, None);
    assert!(err.unwrap_err().to_string().contains("bias"));
    // Groups and dilation are not this kernel's.
    let err = conv_packed(&x, &packed, 5, (3, 3), None, &p.with_groups(2), act, None);
    assert!(err.unwrap_err().to_string().contains("groups"));
    let dil = Conv2dParams {
        dilation: (2, 2),
        ..p
    };
    let err = conv_packed(&x, &packed, 5, (3, 3), None, &dil, act, None);
    assert!(err.unwrap_err().to_string().contains("dilation"));
}
