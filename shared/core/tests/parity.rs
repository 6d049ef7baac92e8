//! PyTorch parity: every torchvision fixture reproduces PyTorch's logits within 1e-4.
mod common;

use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::weights::read_tensors;
use candle_core::{DType, Device};

const TOL: f32 = 1e-4;

fn check_fixture(name: &str) -> f32 {
    let dir = common::fixtures_dir();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let arch = ArchDescriptor::from_value(index[name].clone()).unwrap();
    let model = Model::load(
        &arch,
        read_tensors(&dir.join(format!("{name}.safetensors"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        model.num_params(),
        index[name]["params"].as_u64().unwrap(),
        "{name}: parameter count"
    );
    let io =
        candle_core::safetensors::load(dir.join(format!("{name}.io.safetensors")), &Device::Cpu)
            .unwrap();
    let input = io["input"].to_dtype(DType::F32).unwrap();
    let want = io["logits"].to_dtype(DType::F32).unwrap();
    let got = model.forward(&input).unwrap();
    assert_eq!(got.dims(), want.dims());
    let err = common::max_abs_diff(&got, &want);
    println!("parity {name}: max |diff| = {err:.3e}");
    assert!(err <= TOL, "{name}: max abs diff {err} > {TOL}");
    err
}

#[test]
fn resnet18_matches_pytorch() {
    check_fixture("tv_resnet18_c10");
}

#[test]
fn resnet_bottleneck_matches_pytorch() {
    check_fixture("tv_resnet_bottleneck1111_w16_c10");
}

#[test]
fn mobilenet_v2_matches_pytorch() {
    check_fixture("tv_mobilenet_v2_w050_c10");
}

#[test]
fn wrong_shape_names_the_tensor() {
    let dir = common::fixtures_dir();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    // ResNet-18 weights against a ResNet-34 layout: layer1.2 is missing.
    let mut entry = index["tv_resnet18_c10"].clone();
    entry["layers"] = serde_json::json!([3, 4, 6, 3]);
    let arch = ArchDescriptor::from_value(entry).unwrap();
    let tensors = read_tensors(&dir.join("tv_resnet18_c10.safetensors")).unwrap();
    let err = Model::load(&arch, tensors).unwrap_err().to_string();
    assert!(err.contains("layer1.2.conv1.weight"), "{err}");
    assert!(err.contains("[64, 64, 3, 3]"), "{err}");
    // Wrong class count: the fc shape mismatch names the tensor and both shapes.
    let mut entry = index["tv_resnet18_c10"].clone();
    entry["num_classes"] = serde_json::json!(7);
    let arch = ArchDescriptor::from_value(entry).unwrap();
    let tensors = read_tensors(&dir.join("tv_resnet18_c10.safetensors")).unwrap();
    let err = Model::load(&arch, tensors).unwrap_err().to_string();
    assert!(
        err.contains("fc.weight") && err.contains("[7, 512]") && err.contains("[10, 512]"),
        "{err}"
    );
    // Unknown family.
    let err = ArchDescriptor::from_json(br#"{"family":"torchvision.vgg"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("torchvision.vgg"), "{err}");
    // A missing field is named.
    let err = ArchDescriptor::from_json(br#"{"family":"torchvision.resnet","block":"basic"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layers"), "{err}");
}

#[test]
fn exported_model_round_trips() {
    let dir = common::fixtures_dir();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let name = "tv_mobilenet_v2_w050_c10";
    let arch = ArchDescriptor::from_value(index[name].clone()).unwrap();
    let model = Model::load(
        &arch,
        read_tensors(&dir.join(format!("{name}.safetensors"))).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a, w) = (
        tmp.path().join("arch.json"),
        tmp.path().join("w.safetensors"),
    );
    model.save(&a, &w).unwrap();
    let back = Model::from_files(&a, &w).unwrap();
    let x = candle_core::Tensor::randn(0f32, 1.0, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let (y0, y1) = (model.forward(&x).unwrap(), back.forward(&x).unwrap());
    assert_eq!(common::max_abs_diff(&y0, &y1), 0.0);
}

#[test]
fn verify_reports_the_difference_and_reads_index_entries() {
    use adaptivenet_core::model::verify::{read_descriptor, verify_io};
    let dir = common::fixtures_dir();
    let name = "tv_resnet_bottleneck1111_w16_c10";
    let arch = read_descriptor(&dir.join("index.json"), Some(name)).unwrap();
    let model = Model::load(
        &arch,
        read_tensors(&dir.join(format!("{name}.safetensors"))).unwrap(),
    )
    .unwrap();
    let r = verify_io(&model, &dir.join(format!("{name}.io.safetensors"))).unwrap();
    assert!(r.max_abs_diff <= TOL, "{r:?}");
    assert_eq!(r.top1_agreement, 1.0);
    assert_eq!(r.logits_shape, vec![2, 10]);
    // The wrong reference (another model's logits) is reported as a large difference.
    let r = verify_io(&model, &dir.join("tv_resnet18_c10.io.safetensors")).unwrap();
    assert!(r.max_abs_diff > 1e-2, "{r:?}");
    let err = read_descriptor(&dir.join("index.json"), Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn folded_models_match_pytorch_too() {
    let dir = common::fixtures_dir();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    for name in [
        "tv_resnet18_c10",
        "tv_resnet_bottleneck1111_w16_c10",
        "tv_mobilenet_v2_w050_c10",
    ] {
        let arch = ArchDescriptor::from_value(index[name].clone()).unwrap();
        let model = Model::load(
            &arch,
            read_tensors(&dir.join(format!("{name}.safetensors"))).unwrap(),
        )
        .unwrap()
        .folded()
        .unwrap();
        let r = adaptivenet_core::model::verify::verify_io(
            &model,
            &dir.join(format!("{name}.io.safetensors")),
        )
        .unwrap();
        println!("folded parity {name}: max |diff| = {:.3e}", r.max_abs_diff);
        assert!(r.max_abs_diff <= TOL, "{name}: {r:?}");
    }
}
