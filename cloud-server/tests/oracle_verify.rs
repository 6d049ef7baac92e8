//! `cloud-server oracle verify`: the developer's parity check against PyTorch outputs.
use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    std::env::var("ADAPTIVENET_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/core/tests/fixtures/torchvision")
        })
}

fn verify(entry: &str, weights: &str, io: &str, tol: &str) -> (bool, String) {
    let f = fixtures();
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-server"))
        .args(["oracle", "verify", "--arch"])
        .arg(f.join("index.json"))
        .args(["--entry", entry, "--weights"])
        .arg(f.join(weights))
        .arg("--io")
        .arg(f.join(io))
        .args(["--tol", tol])
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run cloud-server");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn verify_passes_on_matching_outputs_and_fails_above_tolerance() {
    let (ok, text) = verify(
        "tv_mobilenet_v2_w050_c10",
        "tv_mobilenet_v2_w050_c10.safetensors",
        "tv_mobilenet_v2_w050_c10.io.safetensors",
        "1e-4",
    );
    assert!(ok, "{text}");
    assert!(text.contains("max |diff|") && text.contains("OK"), "{text}");
    // Another model's reference logits: a large difference, non-zero exit, the number printed.
    let (ok, text) = verify(
        "tv_mobilenet_v2_w050_c10",
        "tv_mobilenet_v2_w050_c10.safetensors",
        "tv_resnet18_c10.io.safetensors",
        "1e-4",
    );
    assert!(!ok, "{text}");
    assert!(text.contains("exceeds --tol"), "{text}");
    // Weights of the wrong architecture: a clear error naming a tensor.
    let (ok, text) = verify(
        "tv_mobilenet_v2_w050_c10",
        "tv_resnet18_c10.safetensors",
        "tv_mobilenet_v2_w050_c10.io.safetensors",
        "1e-4",
    );
    assert!(!ok, "{text}");
    assert!(text.contains("tensor"), "{text}");
}
