//! "Bring your own model and data" (docs/USAGE.md), run as written: the shell block of that
//! section is executed by bash against real processes over real gRPC on 127.0.0.1, once on
//! SQLite and once on PostgreSQL. Only the lines that assign the quick settings
//! (`TRAIN_PARAMS`, `ELASTIFY_PARAMS`, `AGENT_OPTS`) are replaced by smaller ones.
//!
//! The model is the torchvision MobileNetV2 (width 0.5, 10 classes) committed as a parity
//! fixture, exactly as `safetensors.torch.save_file(model.state_dict(), ...)` wrote it; the
//! data is a 3-class RGB ImageFolder (not Fashion-MNIST) whose classes depend on left/right.
use std::path::Path;
use std::process::Command;

use adaptivenet_tests::{bin_dir, field_after, run_ok, CloudProcess};

const SECTION: &str = "## Bring your own model and data";

/// The quick settings the test uses instead of the page's.
const QUICK: &[(&str, &str)] = &[
    (
        "TRAIN_PARAMS=",
        r#"TRAIN_PARAMS='{"steps":30,"batch":16,"checkpoint_every":10}'"#,
    ),
    (
        "ELASTIFY_PARAMS=",
        r#"ELASTIFY_PARAMS='{"stage0_steps":6,"stage1_steps":6,"batch":16,"val_size":30,"priors":6,"checkpoint_every":0}'"#,
    ),
    (
        "AGENT_OPTS=",
        r#"AGENT_OPTS='--images 30 --population 6 --generations 1 --rounds 3 --validate 3 --duration 3 --heartbeat-ms 500 --report-every 1 --min-quality-samples 1'"#,
    ),
];

/// The first ```sh block after the section heading of docs/USAGE.md.
fn usage_block() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/USAGE.md"))
        .expect("docs/USAGE.md");
    let (_, rest) = doc
        .split_once(SECTION)
        .unwrap_or_else(|| panic!("docs/USAGE.md has no section {SECTION:?}"));
    let (_, rest) = rest.split_once("```sh\n").expect("a ```sh block");
    let (block, _) = rest.split_once("```").expect("the block ends");
    block.to_string()
}

/// The page's block with the quick settings swapped in (each must be on the page).
fn quick_script() -> String {
    let block = usage_block();
    let mut out = String::new();
    let mut seen = vec![false; QUICK.len()];
    for line in block.lines() {
        match QUICK.iter().position(|(k, _)| line.starts_with(k)) {
            Some(i) => {
                seen[i] = true;
                out.push_str(QUICK[i].1);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    for ((k, _), s) in QUICK.iter().zip(seen) {
        assert!(s, "the page's block no longer assigns {k}");
    }
    out
}

/// `root/<class>/<i>.png`: 3 classes of RGB 32x32 images told apart by which half is bright
/// or by a checkerboard, with per-image variation from `seed`.
fn write_rgb_folder(root: &Path, per_class: u32, seed: u32) {
    for (ci, class) in ["left", "right", "check"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for i in 0..per_class {
            let k = i * 7 + seed;
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let bright = match ci {
                    0 => x < 16,
                    1 => x >= 16,
                    _ => (x / 4 + y / 4) % 2 == 0,
                };
                let noise = ((x * 31 + y * 17 + k * 13) % 23) as u8;
                let v = if bright { 180 + noise } else { 30 + noise };
                image::Rgb([v, v / 2 + (k % 40) as u8, 255 - v])
            });
            img.save(dir.join(format!("{i:03}.png"))).expect("png");
        }
    }
}

fn byo(database_url: Option<String>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/core/tests/fixtures/torchvision"
    );
    std::fs::copy(
        format!("{fixtures}/tv_mobilenet_v2_w050_c10.safetensors"),
        work.join("my-model.safetensors"),
    )
    .expect("fixture weights");
    std::fs::write(
        work.join("my-model.json"),
        r#"{"family": "torchvision.mobilenet_v2", "width_mult": 0.5, "num_classes": 10}"#,
    )
    .expect("arch");
    write_rgb_folder(&work.join("my-data"), 40, 0);
    write_rgb_folder(&work.join("device-images"), 12, 1000);

    let mut cloud = CloudProcess::new(&tmp.path().join("cloud"), database_url);
    run_ok(&mut cloud.cmd(&["migrate"]));
    let developer = field_after(
        &run_ok(&mut cloud.cmd(&["token", "create-api", "--role", "developer"])),
        "token:",
    );
    let viewer = field_after(
        &run_ok(&mut cloud.cmd(&["token", "create-api", "--role", "viewer"])),
        "token:",
    );
    let fleet = run_ok(&mut cloud.cmd(&["fleet", "create", "byo"]))
        .trim()
        .to_string();
    let enroll = field_after(
        &run_ok(&mut cloud.cmd(&[
            "token",
            "create-enrollment",
            "--fleet",
            "byo",
            "--uses",
            "1",
        ])),
        "token:",
    );
    // One device: the dashboard's privacy floor would suppress its group.
    cloud.start_with(&["--min-group-devices", "1"]);

    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = quick_script();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&work)
        .env("PATH", path)
        .env("ADAPTIVENET_ENDPOINT", cloud.url())
        .env("ADAPTIVENET_TOKEN", &developer)
        .env("FLEET", &fleet)
        .env("ENROLL_TOKEN", &enroll)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "the page's commands failed:\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- cloud log\n{}",
        std::fs::read_to_string(&cloud.log).unwrap_or_default()
    );
    // The agent served a subnet of the supernet made from the fine-tuned model.
    assert!(stdout.contains("serving "), "{stdout}");
    assert!(stdout.contains("served "), "{stdout}");

    // What the cloud recorded: the dataset's own classes and shape, a fine-tuned oracle with a
    // 3-class head, and a supernet of it that a dashboard sees in use.
    let client = |token: &str, args: &[&str]| {
        let mut c = cloud.cmd(&["client", "--endpoint", &cloud.url(), "--token", token]);
        c.args(args);
        c
    };
    let datasets = run_ok(&mut client(&developer, &["list", "datasets"]));
    assert!(datasets.contains("my-data"), "{datasets}");
    let oracles = run_ok(&mut client(&developer, &["list", "oracles"]));
    assert!(oracles.contains("my-model-tuned"), "{oracles}");
    let supernets = run_ok(&mut client(&developer, &["list", "supernets"]));
    assert!(supernets.contains("my-model-tuned v1"), "{supernets}");
    let agg = run_ok(&mut client(&viewer, &["aggregates"]));
    assert!(agg.contains("devices: 1 total"), "{agg}");
}

#[test]
fn bring_your_own_model_and_data_on_sqlite() {
    byo(None);
}

#[test]
fn bring_your_own_model_and_data_on_postgres() {
    // Needs PostgreSQL at 127.0.0.1:5432 (trust auth); a fresh database per run.
    let Some(db) = adaptivenet_tests::FreshPg::create("byo") else {
        return;
    };
    byo(Some(db.url.clone()));
}
