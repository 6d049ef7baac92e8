//! `Model::with_new_head`: the classifier is replaced for a new class count, everything else is
//! kept bit for bit, for every family's head (ResNet `fc`, MobileNetV2 / EfficientNet-Lite
//! 1x1 conv + `classifier`).
use adaptivenet_core::model::{ArchDescriptor, Model};
use candle_core::{Device, Tensor};

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn check(arch_json: &str, classes: usize) {
    let arch = ArchDescriptor::from_json(arch_json.as_bytes()).unwrap();
    let old_classes = arch.spec.head.classes;
    assert_ne!(old_classes, classes);
    let model = Model::init(&arch.spec, 7).unwrap();
    let tuned = model.with_new_head(classes, 3).unwrap();
    assert_eq!(tuned.spec.head.classes, classes);
    // Only the class count changed in the architecture.
    let mut spec = tuned.spec.clone();
    spec.head.classes = old_classes;
    assert_eq!(spec, model.spec);

    let old: std::collections::BTreeMap<_, _> = model.canonical_tensors().into_iter().collect();
    let new: std::collections::BTreeMap<_, _> = tuned.canonical_tensors().into_iter().collect();
    assert_eq!(
        old.keys().collect::<Vec<_>>(),
        new.keys().collect::<Vec<_>>()
    );
    let mut kept = 0;
    for (name, t) in &old {
        let n = &new[name];
        if name.starts_with("head.fc.") {
            assert_eq!(n.dims()[0], classes, "{name}");
            assert_eq!(t.dims()[0], old_classes, "{name}");
            assert_eq!(n.dims()[1..], t.dims()[1..], "{name}");
        } else {
            assert!(same(t, n), "{name} changed");
            kept += 1;
        }
    }
    assert_eq!(kept, old.len() - 2);
    let feat = tuned.spec.head.conv.unwrap_or(tuned.spec.head.cin);
    let w = &new["head.fc.weight"];
    assert_eq!(w.dims(), &[classes, feat]);
    // PyTorch-default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not all zero; bias zero.
    let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bound = 1.0 / (feat as f32).sqrt();
    assert!(v.iter().all(|x| x.abs() <= bound));
    assert!(v.iter().any(|x| *x != 0.0));

    // Seeded: the same seed gives the same head, another seed another one.
    let again = model.with_new_head(classes, 3).unwrap();
    assert!(same(&again.head["fc.weight"], &tuned.head["fc.weight"]));
    let other = model.with_new_head(classes, 4).unwrap();
    assert!(!same(&other.head["fc.weight"], &tuned.head["fc.weight"]));
    assert_ne!(
        tuned.weights_digest().unwrap(),
        other.weights_digest().unwrap()
    );
    assert_eq!(
        tuned.weights_digest().unwrap(),
        again.weights_digest().unwrap()
    );

    // The new model runs and saves as a self-contained chain oracle.
    let [c, _, _] = tuned.spec.input;
    let x = Tensor::zeros((2, c, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(tuned.forward(&x).unwrap().dims(), &[2, classes]);
    let dir = tempfile::tempdir().unwrap();
    let (a, wts) = (dir.path().join("a.json"), dir.path().join("w.safetensors"));
    tuned.save(&a, &wts).unwrap();
    let back = Model::from_files(&a, &wts).unwrap();
    assert_eq!(back.spec.head.classes, classes);
    assert_eq!(
        back.weights_digest().unwrap(),
        tuned.weights_digest().unwrap()
    );
}

#[test]
fn resnet_small_head_is_replaced_and_the_rest_kept() {
    check(
        r#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1,1],
            "widths":[8,16],"in_channels":3,"num_classes":10}"#,
        4,
    );
}

#[test]
fn torchvision_resnet_head_is_replaced_and_the_rest_kept() {
    check(
        r#"{"family":"torchvision.resnet","block":"basic","layers":[1,1,1,1],"num_classes":1000}"#,
        10,
    );
}

#[test]
fn mobilenet_v2_classifier_is_replaced_and_the_head_conv_kept() {
    check(
        r#"{"family":"torchvision.mobilenet_v2","width_mult":0.25,"num_classes":1000}"#,
        3,
    );
}

#[test]
fn efficientnet_lite_classifier_is_replaced_and_the_head_conv_kept() {
    check(r#"{"family":"efficientnet_lite","variant":"lite0"}"#, 10);
}

#[test]
fn zero_classes_is_refused() {
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1],
            "widths":[8],"in_channels":1,"num_classes":10}"#,
    )
    .unwrap();
    let m = Model::init(&arch.spec, 0).unwrap();
    let e = m.with_new_head(0, 0).unwrap_err().to_string();
    assert!(e.contains("classes"), "{e}");
}
