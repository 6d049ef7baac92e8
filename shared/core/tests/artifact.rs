//! Supernet artifact: manifest + content-addressed module blobs.
mod common;

use adaptivenet_core::artifact::{
    blob_path, load_supernet, read_manifest, write_artifact, InputSpec, Manifest,
};
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::branches::build_supernet;
use adaptivenet_core::supernet::{Subnet, SupernetConfig};
use adaptivenet_core::CoreError;
use candle_core::{Device, Tensor};

fn tiny() -> (
    adaptivenet_core::supernet::Supernet,
    tempfile::TempDir,
    Manifest,
) {
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[2,2],
            "widths":[8,16],"in_channels":1,"num_classes":10}"#,
    )
    .unwrap();
    let oracle = Model::init(&arch.spec, 1).unwrap();
    let cfg = SupernetConfig::from_names(&["merge2", "merge3", "prune1"], 2).unwrap();
    let sn = build_supernet(&oracle, &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.286],
        std: vec![0.353],
        class_names: (0..10).map(|i| format!("c{i}")).collect(),
    };
    let m = write_artifact(dir.path(), &sn, input, &"ab".repeat(32), vec![]).unwrap();
    (sn, dir, m)
}

#[test]
fn artifact_round_trips_and_loads_only_needed_modules() {
    let (sn, dir, m) = tiny();
    let back = read_manifest(dir.path()).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.subnet_count, sn.spec.count().to_string());
    let full = load_supernet(dir.path(), &back, None).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 1, 28, 28), &Device::Cpu).unwrap();
    for s in sn.spec.enumerate(1000).unwrap() {
        let d = common::max_abs_diff(&sn.forward(&s, &x).unwrap(), &full.forward(&s, &x).unwrap());
        assert_eq!(d, 0.0, "{s}");
    }
    let s = Subnet::parse("1xP0").unwrap();
    let partial = load_supernet(dir.path(), &back, Some(std::slice::from_ref(&s))).unwrap();
    assert_eq!(partial.modules.len(), 3);
    assert_eq!(back.modules_for(&s).unwrap().len(), 5);
    assert!(partial.forward(&Subnet::original(4), &x).is_err());
    let d = common::max_abs_diff(
        &sn.forward(&s, &x).unwrap(),
        &partial.forward(&s, &x).unwrap(),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn corrupt_blob_is_caught_and_named() {
    let (_sn, dir, m) = tiny();
    let e = &m.positions[1].choices[0].module;
    let path = blob_path(dir.path(), &e.sha256);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    match load_supernet(dir.path(), &m, None) {
        Err(CoreError::Artifact { module, reason }) => {
            assert_eq!(module, "p1c0");
            assert!(reason.contains("sha256"), "{reason}");
        }
        other => panic!("expected an artifact error, got {other:?}"),
    }
    std::fs::write(&path, &bytes[..10]).unwrap();
    let err = load_supernet(dir.path(), &m, None).unwrap_err().to_string();
    assert!(err.contains("p1c0") && err.contains("size"), "{err}");
}

#[test]
fn hostile_manifests_are_rejected_without_panicking() {
    let (_sn, _dir, m) = tiny();
    let good = m.to_json().unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["format_version"] = 2.into();
    let err = Manifest::from_json(&serde_json::to_vec(&v).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("format_version 2"), "{err}");
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["stem"]["sha256"] = "xyz".into();
    assert!(Manifest::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["positions"][0]["choices"][1]["span"] = 9.into();
    assert!(Manifest::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
    // Truncations and byte flips: errors, never panics.
    let mut state = 0x1234_5678_u64;
    for i in 0..400 {
        let mut b = good.clone();
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = (state >> 33) as usize % b.len();
        if i % 2 == 0 {
            b.truncate(at);
        } else {
            b[at] = (state >> 13) as u8;
        }
        let _ = Manifest::from_json(&b);
    }
}
