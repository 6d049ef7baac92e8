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

fn to_f64(m: &Model) -> Model {
    let f = |p: &Params| -> Params {
        p.iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(DType::F64).unwrap()))
            .collect()
    };
    Model {
        spec: m.spec.clone(),
        stem: f(&m.stem),
        blocks: m.blocks.iter().map(f).collect(),
        head: f(&m.head),
    }
}

#[test]
fn resnet20_train_gradients_match_under_both_backends() {
    let _g = lock();
    let m = model(RESNET20, 3);
    let x = input((4, 1, 28, 28), 5);
    let labels = Tensor::new(&[1u32, 7, 3, 9], &Device::Cpu).unwrap();
    let ours = with_backend(false, || train_grads(&m, &x, &labels));
    let stock = with_backend(true, || train_grads(&m, &x, &labels));
    let names = |g: &[(String, Tensor)]| g.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&stock));
    // Every trainable tensor (conv / BN affine / fc) has a gradient.
    let trainable = m.spec.num_params();
    let counted: usize = ours.iter().map(|(_, g)| g.elem_count()).sum();
    assert_eq!(
        counted as u64, trainable,
        "gradient count vs parameter count"
    );
    if std::env::var("BACKENDS_F64").is_ok() {
        let m64 = to_f64(&m);
        let x64 = x.to_dtype(DType::F64).unwrap();
        let r = with_backend(true, || train_grads(&m64, &x64, &labels));
        for (((n, a), (_, b)), (_, c)) in ours.iter().zip(&stock).zip(&r) {
            let c = c.to_dtype(DType::F32).unwrap();
            println!(
                "{n}: max|g| {:.3e} ours-stock {:.3e} ours-f64 {:.3e} stock-f64 {:.3e}",
                max_abs(&c),
                max_abs(&(a - b).unwrap()),
                max_abs(&(a - &c).unwrap()),
                max_abs(&(b - &c).unwrap())
            );
        }
    }
    let mut worst = (0f32, String::new());
    for ((n, a), (_, b)) in ours.iter().zip(&stock) {
        assert_eq!(a.dtype(), DType::F32);
        // Element-wise error relative to max(1, |g|).
        let rel =
            ((a - b).unwrap().abs().unwrap() / b.abs().unwrap().maximum(1f32).unwrap()).unwrap();
        let e = max_abs(&rel);
        if e > worst.0 {
            worst = (e, n.clone());
        }
        assert!(e <= 1e-4, "{n}: gradient error {e}");
    }
    println!(
        "resnet20 train grads: {} tensors, worst relative error {:.3e} ({})",
        ours.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn diag_single_conv_grads() {
    let _g = lock();
    for (n, c, o, h, s) in [(4, 16, 16, 28, 1), (4, 1, 16, 28, 1), (4, 16, 32, 28, 2), (4, 32, 32, 14, 1), (1, 16, 16, 28, 1), (64, 16, 16, 28, 1)] {
        let x = Var::from_tensor(&input((n, c, h, h), 1)).unwrap();
        let w = Var::from_tensor(&(input((o, c, 3, 3), 2) * 0.2).unwrap()).unwrap();
        let oh = (h + 2 - 3) / s + 1;
        let gy = input((n, o, oh, oh), 3);
        let run = |stock: bool| {
            with_backend(stock, || {
                let y = ops::conv2d(x.as_tensor(), w.as_tensor(), s, (1, 1, 1, 1), 1).unwrap();
                let l = (y * &gy).unwrap().sum_all().unwrap();
                let g = l.backward().unwrap();
                (g.get(x.as_tensor()).unwrap().clone(), g.get(w.as_tensor()).unwrap().clone())
            })
        };
        let (ax, aw) = run(false);
        let (bx, bw) = run(true);
        println!(
            "n{n} c{c} o{o} h{h} s{s}: gx diff {:.3e} (max {:.3e}), gw diff {:.3e} (max {:.3e})",
            max_abs(&(&ax - &bx).unwrap()), max_abs(&bx),
            max_abs(&(&aw - &bw).unwrap()), max_abs(&bw)
        );
    }
}

fn train_grads_mixed(m: &Model, x: &Tensor, labels: &Tensor, ours: &[usize]) -> Vec<(String, Tensor)> {
    let mut all = Vec::new();
    let stem = vars(&m.stem, "stem.", &mut all);
    let blocks: Vec<Params> = m.blocks.iter().enumerate().map(|(i, p)| vars(p, &format!("blocks.{i}."), &mut all)).collect();
    let head = vars(&m.head, "head.", &mut all);
    let num = &m.spec.numerics;
    let mut ctx = TrainCtx::new(0.1);
    ops::set_stock_candle(!ours.contains(&0));
    let mut h = stem_forward(&m.spec.stem, num, &stem, x, Some(&mut ctx)).unwrap();
    for (i, (b, p)) in m.spec.blocks.iter().zip(&blocks).enumerate() {
        ops::set_stock_candle(!ours.contains(&(i + 1)));
        h = block_forward(b, num, p, &h, Some(&mut ctx)).unwrap();
    }
    ops::set_stock_candle(true);
    let logits = head_forward(&m.spec.head, num, &head, &h, Some(&mut ctx)).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, labels).unwrap();
    let grads: GradStore = loss.backward().unwrap();
    ops::set_stock_candle(false);
    all.into_iter().filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n, g.clone()))).collect()
}

#[test]
fn diag_bisect() {
    let _g = lock();
    let m = model(RESNET20, 3);
    let x = input((4, 1, 28, 28), 5);
    let labels = Tensor::new(&[1u32, 7, 3, 9], &Device::Cpu).unwrap();
    let stock = train_grads_mixed(&m, &x, &labels, &[]);
    let again = train_grads_mixed(&m, &x, &labels, &[]);
    for sel in [vec![], vec![0], vec![1], vec![2], vec![3], vec![2, 3], (0..10).collect::<Vec<_>>()] {
        let o = train_grads_mixed(&m, &x, &labels, &sel);
        let mut worst = (0f32, String::new());
        for ((n, a), (_, b)) in o.iter().zip(&stock) {
            let e = max_abs(&(a - b).unwrap());
            if e > worst.0 { worst = (e, n.clone()); }
        }
        println!("ours on {sel:?}: worst {:.3e} at {}", worst.0, worst.1);
    }
    let e: f32 = again.iter().zip(&stock).map(|((_, a), (_, b))| max_abs(&(a - b).unwrap())).fold(0.0, f32::max);
    println!("stock twice: {e:.3e}");
}

#[test]
fn diag_seeds() {
    let _g = lock();
    for seed in 1..9u64 {
        let m = model(RESNET20, seed);
        let x = input((4, 1, 28, 28), seed + 100);
        let labels = Tensor::new(&[1u32, 7, 3, 9], &Device::Cpu).unwrap();
        let o = train_grads_mixed(&m, &x, &labels, &(0..10).collect::<Vec<_>>());
        let s = train_grads_mixed(&m, &x, &labels, &[]);
        let m64 = to_f64(&m);
        let r = train_grads_mixed(&m64, &x.to_dtype(DType::F64).unwrap(), &labels, &[]);
        let worst = |a: &[(String, Tensor)], b: &[(String, Tensor)]| a.iter().zip(b).map(|((_, a), (_, b))| max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())).fold(0f32, f32::max);
        println!("seed {seed}: ours-stock {:.3e} ours-f64 {:.3e} stock-f64 {:.3e}", worst(&o, &s), worst(&o, &r), worst(&s, &r));
    }
}
