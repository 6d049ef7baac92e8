//! The product's happy path with real processes over real gRPC on 127.0.0.1:
//! upload → elastify (tiny job) → publish → enroll → download → profile → search → serve →
//! report → dashboard aggregates. Once on SQLite, once on PostgreSQL, and once with its blobs
//! on an S3-compatible server (the S3 tier of scripts/test.sh: a `cloud-server` built with
//! `--features s3` and moto on 127.0.0.1).
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_tests::{binary, field_after, free_port, run_ok, write_synthetic_idx, KillOnDrop};

fn happy_path(database_url: Option<String>, blob_url: Option<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cloud_bin = binary("cloud-server");
    let agent_bin = binary("edge-agent");
    let cloud = |args: &[&str]| {
        let mut c = Command::new(&cloud_bin);
        c.arg("--data-dir").arg(d.join("cloud"));
        if let Some(u) = &database_url {
            c.args(["--database-url", u]);
        }
        if let Some(u) = &blob_url {
            c.args(["--blob-url", u]);
        }
        c.args(args);
        c
    };

    // A tiny oracle and a learnable data set.
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1,1,1],
            "widths":[8,16,16],"in_channels":1,"num_classes":10}"#,
    )
    .expect("arch");
    let oracle = Model::init(&arch.spec, 5).expect("init");
    oracle
        .save(&d.join("oracle.json"), &d.join("oracle.safetensors"))
        .expect("save");
    let data = d.join("data");
    write_synthetic_idx(&data, 400, 150);

    // Cloud: migrate, bootstrap credentials and a fleet, serve.
    run_ok(&mut cloud(&["migrate"]));
    let admin = field_after(
        &run_ok(&mut cloud(&["token", "create-api", "--role", "admin"])),
        "token:",
    );
    let viewer = field_after(
        &run_ok(&mut cloud(&["token", "create-api", "--role", "viewer"])),
        "token:",
    );
    let fleet = run_ok(&mut cloud(&["fleet", "create", "e2e"]))
        .trim()
        .to_string();
    let enroll = field_after(
        &run_ok(&mut cloud(&[
            "token",
            "create-enrollment",
            "--fleet",
            "e2e",
            "--uses",
            "1",
        ])),
        "token:",
    );
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(d.join("cloud.log")).expect("log");
    let _server = KillOnDrop(
        cloud(&[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            // One device: the dashboard's privacy floor would suppress its group.
            "--min-group-devices",
            "1",
            "--dataset-root",
            d.to_str().expect("utf8"),
        ])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn cloud"),
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "cloud did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let client = |token: &str, args: &[&str]| {
        let mut c = Command::new(&cloud_bin);
        c.args(["client", "--endpoint", &url, "--token", token]);
        c.args(args);
        c
    };

    // Developer: upload, register the data set, elastify (tiny job), publish.
    let up = run_ok(&mut client(
        &admin,
        &[
            "upload",
            "--name",
            "tiny",
            "--arch",
            d.join("oracle.json").to_str().unwrap(),
            d.join("oracle.safetensors").to_str().unwrap(),
        ],
    ));
    let oracle_id = up.split_whitespace().nth(2).expect("oracle id").to_string();
    let ds = run_ok(&mut client(
        &admin,
        &[
            "register-dataset",
            "--name",
            "synthetic",
            "--uri",
            data.to_str().unwrap(),
        ],
    ));
    let dataset_id = ds
        .split_whitespace()
        .nth(1)
        .expect("dataset id")
        .to_string();
    let params = r#"{"stage0_steps":4,"stage1_steps":4,"batch":16,"val_size":100,"priors":6,"checkpoint_every":2}"#;
    let job = run_ok(&mut client(
        &admin,
        &[
            "elastify",
            &oracle_id,
            "--dataset-id",
            &dataset_id,
            "--params",
            params,
            "--watch",
        ],
    ));
    let done = job
        .lines()
        .find(|l| l.contains(" Succeeded "))
        .unwrap_or_else(|| panic!("job did not succeed:\n{job}"));
    let supernet = done
        .split_whitespace()
        .nth(3)
        .expect("supernet id")
        .to_string();
    run_ok(&mut client(
        &admin,
        &["publish", &supernet, "--fleet", &fleet, "--label", "stable"],
    ));
    run_ok(&mut client(
        &admin,
        &["desire", "--fleet", &fleet, "--label", "stable"],
    ));

    // Device: enroll, download, profile, search, serve, report.
    let out = run_ok(
        Command::new(&agent_bin)
            .args(["run", "--cloud", &url, "--enroll-token", &enroll, "--state"])
            .arg(d.join("agent"))
            .arg("--data")
            .arg(&data)
            .args([
                "--images",
                "100",
                "--population",
                "8",
                "--generations",
                "2",
                "--rounds",
                "5",
                "--validate",
                "5",
                "--label-free",
                "--duration",
                "3",
                "--heartbeat-ms",
                "500",
                "--report-every",
                "1",
            ])
            .stderr(Stdio::inherit()),
    );
    assert!(out.contains("serving "), "{out}");
    assert!(out.contains("served "), "{out}");
    // Only aggregates reached the cloud, and a dashboard sees them.
    let agg = run_ok(&mut client(&viewer, &["aggregates"]));
    assert!(agg.contains("devices: 1 total"), "{agg}");
    assert!(agg.contains(&format!("supernet {supernet}")), "{agg}");
    // Blobs (oracle, checkpoints, modules) live where the server was told: on local disk by
    // default, and with --blob-url every one of them in the bucket, none under the data dir.
    let local: Vec<_> = walk(&d.join("cloud"))
        .into_iter()
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .collect();
    if blob_url.is_some() {
        assert!(local.is_empty(), "blobs stored locally: {local:?}");
    } else {
        assert!(!local.is_empty(), "no blob under the local data directory");
    }
    // A viewer cannot mutate.
    let denied = client(&viewer, &["publish", &supernet, "--fleet", &fleet])
        .output()
        .expect("run");
    assert!(!denied.status.success());
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn happy_path_on_sqlite() {
    happy_path(None, None);
}

#[test]
fn happy_path_on_postgres() {
    // Needs PostgreSQL at 127.0.0.1:5432 (trust auth); a fresh database per run.
    let Some(db) = adaptivenet_tests::FreshPg::create("e2e") else {
        return;
    };
    happy_path(Some(db.url.clone()), None);
}

#[test]
fn happy_path_on_s3() {
    // Needs the S3 tier: `ADAPTIVENET_S3_BUCKET` on a server named by the `AWS_*` variables,
    // and the `cloud-server` binary built with `--features s3`.
    match std::env::var("ADAPTIVENET_S3_BUCKET") {
        Ok(bucket) if !bucket.is_empty() => {
            let prefix = uuid::Uuid::new_v4().simple();
            happy_path(None, Some(format!("s3://{bucket}/happy-{prefix}")));
        }
        _ => {
            assert!(
                std::env::var("ADAPTIVENET_REQUIRE_S3").as_deref() != Ok("1"),
                "S3 required but ADAPTIVENET_S3_BUCKET is not set"
            );
            println!("skipping: no S3-compatible server (ADAPTIVENET_S3_BUCKET unset)");
        }
    }
}
