//! Winograd F(2x2, 3x3) ([`pack_winograd`] + [`winograd_packed`]) and F(4x4, 3x3)
//! ([`pack_winograd_tile`] with tile 4) against candle's reference conv2d and against the packed direct conv ([`conv_packed`]): the stride-1 3x3
//! shapes of ResNet-20 (16/32/64 channels at 28/14/7) and ResNet-18 (64..512 channels at
//! 56/28/14/7, fewer images), odd maps (7x7, 9x9), pad 1, pad 0 and asymmetric padding,
//! bias with no activation / ReLU / ReLU6, with and without the fused residual add, batch 1
//! and 50, 1 and 2 threads.
//!
//! Tolerance: 1e-4 relative to the reference output's largest magnitude (at least 1). The
//! data are scaled so outputs are O(1); F(2, 3) in f32 adds the transforms' rounding (sums
//! of up to 9 transformed terms with weights 1/2 and 1/4) to the direct conv's; F(4, 3)'s
//! transforms scale terms by up to 25 (input) and 8 (output), so its rounding is larger but
//! still within the tolerance (the largest difference seen is printed per shape class).

mod common;

use adaptivenet_kernels::{
    conv_packed, pack_conv, pack_winograd, pack_winograd_tile, threads, winograd_packed,
    Activation, Conv2dParams,
};
use candle_core::Tensor;
use common::*;

const TOL: f32 = 1e-4;
/// Checks one shape with and without a residual, both tile sides, against candle and the
/// direct conv; returns the largest difference to candle of each tile side.
fn check(
    rng: &mut Rng,
    (n, c, o, hw): (usize, usize, usize, (usize, usize)),
    p: &Conv2dParams,
    act: Activation,
) -> [f32; 2] {
    let x = rng.tensor(&[n, c, hw.0, hw.1], 1.0);
    let wt = rng.tensor(&[o, c, 3, 3], 1.7 / ((c * 9) as f32).sqrt());
    let b = rng.tensor(&[o], 0.5);
    let packed = pack_conv(&wt).unwrap();
    let winos = [
        pack_winograd(&wt).unwrap(),
        pack_winograd_tile(&wt, 4).unwrap(),
    ];
    let conv = candle_conv(&x, &wt, Some(&b), p).unwrap();
    let res = rng.tensor(conv.dims(), 1.0);
    let what = format!("n{n} c{c} o{o} {hw:?} {:?} {act:?}", p.padding);
    let mut worst = [0f32; 2];
    for r in [None, Some(&res)] {
        let want = match r {
            Some(r) => reference_act((&conv + r).unwrap(), act),
            None => reference_act(conv.clone(), act),
        };
        let direct = conv_packed(&x, &packed, o, (3, 3), Some(&b), p, act, r).unwrap();
        for (k, wino) in winos.iter().enumerate() {
            let tile = 2 * (k + 1);
            let got = winograd_packed(&x, wino, o, Some(&b), p, act, r).unwrap();
            let d = rel_diff(&got, &want);
            assert!(
                d <= TOL,
                "F{tile} {what} res {}: vs candle {d}",
                r.is_some()
            );
            worst[k] = worst[k].max(d);
            let d = rel_diff(&got, &direct);
            assert!(
                d <= TOL,
                "F{tile} {what} res {}: vs direct {d}",
                r.is_some()
            );
        }
    }
    worst
}

#[test]
fn resnet_shapes_match_candle_and_direct() {
    let mut rng = Rng::new(31);
    let p = Conv2dParams::new(1, 1);
    let (mut i, mut worst) = (0, [0f32; 2]);
    let mut keep = |w: [f32; 2]| worst = [worst[0].max(w[0]), worst[1].max(w[1])];
    // ResNet-20 at 28x28 input, batch 1 and 50.
    for (c, hw) in [(16, 28), (32, 14), (64, 7)] {
        for n in [1, 50] {
            keep(check(&mut rng, (n, c, c, (hw, hw)), &p, ACTS[i % 3]));
            i += 1;
        }
    }
    // ResNet-18 at 224 (batch 1; 2 images on the small maps).
    for (c, hw, n) in [(64, 56, 1), (128, 28, 1), (256, 14, 2), (512, 7, 2)] {
        keep(check(&mut rng, (n, c, c, (hw, hw)), &p, ACTS[i % 3]));
        i += 1;
    }
    println!(
        "largest relative difference to candle: F(2,3) {:.1e}, F(4,3) {:.1e}",
        worst[0], worst[1]
    );
}

/// Odd maps, pad 0 / 1 / asymmetric, channel counts off the 16-channel panels and maps
/// smaller than one tile.
#[test]
fn odd_shapes_match_candle_and_direct() {
    let mut rng = Rng::new(32);
    let (mut i, mut worst) = (0, 0f32);
    for &(c, o) in &[(16, 16), (3, 7), (24, 40), (64, 17)] {
        for &hw in &[(7, 7), (9, 9), (28, 28), (14, 14), (5, 9), (1, 1), (17, 3)] {
            for pad in [(1, 1, 1, 1), (0, 0, 0, 0), (2, 0, 1, 2), (0, 1, 0, 1)] {
                if hw.0 + pad.0 + pad.1 < 3 || hw.1 + pad.2 + pad.3 < 3 {
                    continue;
                }
                let p = Conv2dParams {
                    padding: pad,
                    ..Conv2dParams::default()
                };
                worst = worst.max(check(&mut rng, (1 + i % 3, c, o, hw), &p, ACTS[i % 3])[1]);
                i += 1;
            }
        }
    }
    assert!(i > 90, "{i} cases");
    println!("largest relative difference of F(4,3) to candle: {worst:.1e}");
}

/// Chunk splits over 2 threads give the same results as one thread, bit for bit (each
/// tile's sums run in one order whatever chunk it falls in).
#[test]
fn winograd_threads_agree() {
    let mut rng = Rng::new(33);
    for (n, c, hw) in [(50, 16, 28), (1, 64, 7), (50, 64, 7), (3, 24, 9)] {
        let x = rng.tensor(&[n, c, hw, hw], 1.0);
        let wt = rng.tensor(&[c, c, 3, 3], 0.1);
        let b = rng.tensor(&[c], 0.5);
        let res = rng.tensor(&[n, c, hw, hw], 1.0);
        let p = Conv2dParams::new(1, 1);
        for tile in [2, 4] {
            let wino = pack_winograd_tile(&wt, tile).unwrap();
            let run = || {
                winograd_packed(&x, &wino, c, Some(&b), &p, Activation::Relu, Some(&res)).unwrap()
            };
            let one = run();
            threads::set_max_threads(2);
            threads::set_flop_threshold(0);
            let two = run();
            threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
            threads::set_max_threads(0);
            assert_eq!(max_abs_diff(&one, &two), 0.0, "F{tile} n{n} c{c} {hw}");
        }
    }
}

#[test]
fn winograd_rejects_bad_shapes() {
    let z =
        |d: &[usize]| Tensor::zeros(d, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let x = z(&[1, 4, 8, 8]);
    let wino = pack_winograd(&z(&[5, 4, 3, 3])).unwrap();
    let act = Activation::None;
    let p = Conv2dParams::new(1, 1);
    assert!(pack_winograd(&z(&[5, 4, 1, 1])).is_err());
    assert!(pack_winograd_tile(&z(&[5, 4, 3, 3]), 3).is_err());
    let wino4 = pack_winograd_tile(&z(&[5, 4, 3, 3]), 4).unwrap();
    assert!(winograd_packed(&x, &wino4, 5, None, &p, act, None).is_ok());
    assert!(winograd_packed(&x, &wino4, 17, None, &p, act, None).is_err());
    assert!(winograd_packed(&x, &wino, 5, None, &Conv2dParams::new(2, 1), act, None).is_err());
    assert!(winograd_packed(&x, &wino, 5, None, &p.with_groups(2), act, None).is_err());
    assert!(winograd_packed(&x, &wino, 21, None, &p, act, None).is_err());
    assert!(winograd_packed(&z(&[1, 3, 8, 8]), &wino, 5, None, &p, act, None).is_err());
    assert!(winograd_packed(&x, &wino, 5, Some(&z(&[4])), &p, act, None).is_err());
    assert!(winograd_packed(&x, &wino, 5, None, &p, act, Some(&z(&[1, 5, 7, 8]))).is_err());
    // A direct-packed weight is not a Winograd one.
    let direct = pack_conv(&z(&[5, 4, 3, 3])).unwrap();
    assert!(winograd_packed(&x, &direct, 5, None, &p, act, None).is_err());
    assert!(winograd_packed(&x, &wino, 5, None, &p, act, None).is_ok());
}
