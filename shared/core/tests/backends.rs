//! The stock-candle backend switch (`model::ops::set_stock_candle`): the kernels crate and
//! stock candle ops give the same logits (eval, folded and unfolded) and the same train-mode
//! gradients.
use std::sync::Mutex;

use adaptivenet_core::model::{
    block_forward, head_forward, ops, stem_forward, ArchDescriptor, Model, Params, TrainCtx,
};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

/// The switch is process-wide and tests run on parallel threads: one test at a time.
static BACKEND: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    BACKEND.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` with the given backend and restores the default (kernels) afterwards.
fn with_backend<T>(stock: bool, f: impl FnOnce() -> T) -> T {
    ops::set_stock_candle(stock);
    let out = f();
    ops::set_stock_candle(false);
    out
}

fn arch(json: &str) -> ArchDescriptor {
    ArchDescriptor::from_json(json.as_bytes()).unwrap()
}

const RESNET20: &str = r#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],
    "widths":[16,32,64],"in_channels":1,"num_classes":10}"#;
const MOBILENET_V2: &str =
    r#"{"family":"torchvision.mobilenet_v2","width_mult":0.5,"num_classes":10}"#;
const TINY_TV_RESNET: &str =
    r#"{"family":"torchvision.resnet","block":"basic","layers":[1,1,1,1],"num_classes":10}"#;

/// A random model whose BN layers are not the identity (so folding changes the weights).
fn model(json: &str, seed: u64) -> Model {
    let mut m = Model::init(&arch(json).spec, seed).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut perturb = |p: &mut Params| {
        for (name, t) in p.iter_mut() {
            let is_bn = name.contains("bn") || name.starts_with("downsample.1");
            if !is_bn || name.ends_with("num_batches_tracked") {
                continue;
            }
            let n = t.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let u: f32 = rng.random();
                    if name.ends_with("running_var") || name.ends_with(".weight") {
                        0.5 + u
                    } else {
                        0.2 * (u - 0.5)
                    }
                })
                .collect();
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        }
    };
    perturb(&mut m.stem);
    m.blocks.iter_mut().for_each(&mut perturb);
    perturb(&mut m.head);
    m
}

fn input(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(name: &str, ours: &Tensor, stock: &Tensor, tol: f32) {
    assert_eq!(ours.dims(), stock.dims(), "{name}: shapes");
    let diff = max_abs(&(ours - stock).unwrap());
    let scale = max_abs(stock).max(1.0);
    println!("{name}: max |ours - stock| = {diff:.3e} (max |stock| = {scale:.3})");
    assert!(diff <= tol * scale, "{name}: {diff} > {tol} * {scale}");
}

fn check_eval(label: &str, json: &str, shape: (usize, usize, usize, usize)) {
    let _g = lock();
    let m = model(json, 7);
    let folded = m.folded().unwrap();
    let x = input(shape, 11);
    for (kind, mm) in [("unfolded", &m), ("folded", &folded)] {
        let ours = with_backend(false, || mm.forward(&x).unwrap());
        let stock = with_backend(true, || mm.forward(&x).unwrap());
        assert!(!ops::stock_candle(), "default must be the kernels crate");
        assert_close(&format!("{label} {kind}"), &ours, &stock, 1e-4);
    }
    // Folded and unfolded agree with each other as well.
    let a = m.forward(&x).unwrap();
    let b = folded.forward(&x).unwrap();
    assert_close(&format!("{label} folded vs unfolded"), &b, &a, 1e-4);
}

#[test]
fn default_backend_is_the_kernels_crate() {
    let _g = lock();
    assert!(!ops::stock_candle());
}

#[test]
fn resnet20_logits_match_under_both_backends() {
    check_eval("resnet20", RESNET20, (2, 1, 28, 28));
}

#[test]
fn mobilenet_v2_logits_match_under_both_backends() {
    check_eval("mobilenet_v2", MOBILENET_V2, (1, 3, 96, 96));
}

/// At 160x160 the first expanded maps (48 channels at 80x80) are large enough for the
/// folded forward's fused expand + depthwise kernel.
#[test]
fn mobilenet_v2_fused_expand_dw_matches_both_backends() {
    assert!(
        adaptivenet_kernels::isa() == adaptivenet_kernels::Isa::Portable
            || adaptivenet_kernels::expand_dw_fuses(48, 80, 80, 3, 2),
        "the fused kernel must run on this map"
    );
    check_eval("mobilenet_v2 160", MOBILENET_V2, (1, 3, 160, 160));
}

#[test]
fn tiny_torchvision_resnet_logits_match_under_both_backends() {
    check_eval("tv resnet [1,1,1,1]", TINY_TV_RESNET, (2, 3, 64, 64));
}

/// Trainable copies of a module's params: every tensor a `Var` (running statistics get no
/// gradient: train-mode BN detaches them).
fn vars(p: &Params, prefix: &str, out: &mut Vec<(String, Var)>) -> Params {
    p.iter()
        .map(|(n, t)| {
            let v = Var::from_tensor(t).unwrap();
            let t = v.as_tensor().clone();
            out.push((format!("{prefix}{n}"), v));
            (n.clone(), t)
        })
        .collect()
}

/// Train-mode forward + cross-entropy + backward; the gradient of every parameter.
fn train_grads(m: &Model, x: &Tensor, labels: &Tensor) -> Vec<(String, Tensor)> {
    let mut all = Vec::new();
    let stem = vars(&m.stem, "stem.", &mut all);
    let blocks: Vec<Params> = m
        .blocks
        .iter()
        .enumerate()
        .map(|(i, p)| vars(p, &format!("blocks.{i}."), &mut all))
        .collect();
    let head = vars(&m.head, "head.", &mut all);
    let num = &m.spec.numerics;
    let mut ctx = TrainCtx::new(0.1);
    let mut h = stem_forward(&m.spec.stem, num, &stem, x, Some(&mut ctx)).unwrap();
    for (b, p) in m.spec.blocks.iter().zip(&blocks) {
        h = block_forward(b, num, p, &h, Some(&mut ctx)).unwrap();
    }
    let logits = head_forward(&m.spec.head, num, &head, &h, Some(&mut ctx)).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, labels).unwrap();
    let grads: GradStore = loss.backward().unwrap();
    all.into_iter()
        .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n, g.clone())))
        .collect()
}

/// Worst element-wise gradient error of ours vs stock, relative to max(1, |g|), for a batch
/// of 4 of `shape` (C, H, W).
fn worst_grad_error(
    label: &str,
    json: &str,
    shape: (usize, usize, usize),
    seed: u64,
) -> (f32, String) {
    let m = model(json, seed);
    let x = input((4, shape.0, shape.1, shape.2), seed + 100);
    let labels = Tensor::new(&[1u32, 7, 3, 9], &Device::Cpu).unwrap();
    let ours = with_backend(false, || train_grads(&m, &x, &labels));
    let stock = with_backend(true, || train_grads(&m, &x, &labels));
    let names = |g: &[(String, Tensor)]| g.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&stock));
    // Every trainable tensor (conv / BN affine / fc) has a gradient.
    let counted: usize = ours.iter().map(|(_, g)| g.elem_count()).sum();
    assert_eq!(
        counted as u64,
        m.spec.num_params(),
        "gradient count vs parameter count"
    );
    let mut worst = (0f32, String::new());
    for ((n, a), (_, b)) in ours.iter().zip(&stock) {
        assert_eq!(a.dtype(), DType::F32);
        let rel =
            ((a - b).unwrap().abs().unwrap() / b.abs().unwrap().maximum(1f32).unwrap()).unwrap();
        let e = max_abs(&rel);
        if e > worst.0 {
            worst = (e, n.clone());
        }
    }
    println!(
        "{label} b4 train grads, seed {seed}: {} tensors, worst error {:.3e} ({})",
        ours.len(),
        worst.0,
        worst.1
    );
    worst
}

/// Train-mode forward + CE + backward at batch 4: same gradients (1e-4 relative to
/// max(1, |g|)) under both backends.
///
/// The gradient of a ReLU network is discontinuous: a pre-activation within ~1e-6 of zero can
/// change sign between two f32 summation orders, and that one flipped ReLU mask changes early
/// layers' gradients by ~1e-3. Measured: for 1 seed in 8, stock candle f32 *and* ours differ
/// from an f64 stock-candle reference by 6e-4 while agreeing with each other to 1e-6; for
/// another, ours alone flipped one mask (1e-3). So one seed out of three may miss 1e-4 but must
/// stay within 1e-2 (a wrong kernel gives large errors on every seed).
#[test]
fn resnet20_train_gradients_match_under_both_backends() {
    check_train_grads("resnet20", RESNET20, (1, 28, 28));
}

/// MobileNetV2's train-mode gradients (MBConv blocks: depthwise convs, train-mode BN fused
/// with ReLU6) under our kernels are as close to float64 gradients (stock candle on an f64
/// copy of the model) as stock candle's own f32 gradients are, within 2x + 1e-4 of
/// max(1, |g|), for each seed.
///
/// Ours and stock f32 are not compared with each other directly: the depthwise weight
/// gradients sum over every pixel of the batch, and both f32 backends measured 0.8-1.1e-4
/// from f64 there, in different directions; and on one seed in three both flip a ReLU6 mask
/// (0.3 from f64). 65x65 input: every strided layer divides evenly, because candle's grouped
/// conv backward is wrong when it does not (e.g. 32x32: errors up to 1e3 in the reference).
#[test]
fn mobilenet_v2_train_gradients_are_as_close_to_f64_as_stock_f32() {
    let _g = lock();
    let to64 = |p: &Params| -> Params {
        p.iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(DType::F64).unwrap()))
            .collect()
    };
    for seed in [1u64, 2, 4] {
        let m = model(MOBILENET_V2, seed);
        let x = input((4, 3, 65, 65), seed + 100);
        let labels = Tensor::new(&[1u32, 7, 3, 9], &Device::Cpu).unwrap();
        let ours = with_backend(false, || train_grads(&m, &x, &labels));
        let stock = with_backend(true, || train_grads(&m, &x, &labels));
        let m64 = Model {
            spec: m.spec.clone(),
            stem: to64(&m.stem),
            blocks: m.blocks.iter().map(to64).collect(),
            head: to64(&m.head),
        };
        let x64 = x.to_dtype(DType::F64).unwrap();
        let exact = with_backend(true, || train_grads(&m64, &x64, &labels));
        let err = |g: &Tensor, r: &Tensor| -> f64 {
            let den = r.abs().unwrap().maximum(1f64).unwrap();
            let d = (g.to_dtype(DType::F64).unwrap() - r)
                .unwrap()
                .abs()
                .unwrap();
            (d / den)
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (mut eo, mut es) = ((0f64, String::new()), (0f64, String::new()));
        assert_eq!(ours.len(), exact.len());
        for (((n, a), (_, b)), (_, r)) in ours.iter().zip(&stock).zip(&exact) {
            let (x, y) = (err(a, r), err(b, r));
            if x > eo.0 {
                eo = (x, n.clone());
            }
            if y > es.0 {
                es = (y, n.clone());
            }
        }
        println!("mobilenet_v2 b4 seed {seed}: ours vs f64 {eo:?}, stock f32 vs f64 {es:?}");
        assert!(
            eo.0 <= 2.0 * es.0 + 1e-4,
            "seed {seed}: ours {eo:?} vs stock f32 {es:?}"
        );
    }
}

fn check_train_grads(label: &str, json: &str, shape: (usize, usize, usize)) {
    let _g = lock();
    let errs: Vec<(f32, String)> = [1u64, 2, 4]
        .into_iter()
        .map(|seed| worst_grad_error(label, json, shape, seed))
        .collect();
    let misses = errs.iter().filter(|(e, _)| *e > 1e-4).count();
    assert!(
        misses <= 1,
        "gradients differ by more than 1e-4 on {misses} seeds: {errs:?}"
    );
    assert!(
        errs.iter().all(|(e, _)| *e <= 1e-2),
        "gradient error above 1e-2: {errs:?}"
    );
}
