//! System tests with faults, over real gRPC on 127.0.0.1 with the real `edge-agent` and
//! `cloud-server` binaries as separate processes (the cloud in-process on 127.0.0.1:0 where
//! the test needs to reach into its blob store or metrics directly):
//! - an agent SIGKILLed mid-download resumes from its `.part` file without re-fetching the
//!   blobs it completed, and ends byte-identical;
//! - a flipped byte (agent cache, cloud blob store) is caught by sha256 and never loaded; the
//!   old supernet keeps serving;
//! - the cloud SIGKILLed mid-elastification resumes the job from its checkpoint;
//! - agents keep serving while the cloud is down and reconcile when it returns;
//! - the auth and schema cases `cloud-server/tests/api.rs` does not cover yet.
//!
//! Fault injection uses only what an operator has: signals (SIGKILL, SIGSTOP/SIGCONT to freeze
//! a process at an inspectable point), files on disk, and restarting a process on the same
//! address. No test-only hooks in the binaries.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use adaptivenet_cloud::app::{App, Config};
use adaptivenet_cloud::domain::Role;
use adaptivenet_cloud::server::{self, ServerHandle};
use adaptivenet_core::artifact::{blob_path, Manifest};
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_proto::v1 as pb;
use adaptivenet_tests::{
    agent_spawn, authed, binary, channel, demo_artifact, field_after, metric, read_log,
    register_artifact, run_ok, signal, strings, wait_for, wait_stopped, write_synthetic_idx,
    CloudProcess, KillOnDrop,
};
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The real cloud, in-process on 127.0.0.1:0 (SQLite + blob dir in a temp dir).
struct InProcCloud {
    handle: Option<ServerHandle>,
    url: String,
    admin: String,
    developer: String,
}

impl InProcCloud {
    fn start(rt: &tokio::runtime::Runtime, dir: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        rt.block_on(async {
            let mut cfg = Config::for_data_dir(dir);
            cfg.drain_grace = Duration::from_millis(50);
            cfg.workers = 0;
            tweak(&mut cfg);
            let app = App::open(cfg).await.expect("open cloud");
            let admin = app
                .create_api_token(Role::Admin, "t", None)
                .await
                .expect("admin")
                .token;
            let developer = app
                .create_api_token(Role::Developer, "t", None)
                .await
                .expect("dev")
                .token;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let handle = server::start(app, listener, None, None, None)
                .await
                .expect("start");
            InProcCloud {
                url: format!("http://{}", handle.addr),
                handle: Some(handle),
                admin,
                developer,
            }
        })
    }

    fn app(&self) -> &App {
        self.handle.as_ref().expect("running").app()
    }

    fn bytes_sent(&self) -> u64 {
        self.app()
            .metrics()
            .blob_bytes_sent_total
            .load(Ordering::Relaxed)
    }

    /// A fleet and an enrollment token with `uses` uses.
    fn fleet(&self, rt: &tokio::runtime::Runtime, name: &str, uses: u32) -> (String, String) {
        rt.block_on(async {
            let mut admin = pb::admin_service_client::AdminServiceClient::new(channel(&self.url));
            let fleet = admin
                .create_fleet(authed(
                    pb::CreateFleetRequest { name: name.into() },
                    &self.admin,
                ))
                .await
                .expect("fleet")
                .into_inner();
            let tok = admin
                .create_enrollment_token(authed(
                    pb::CreateEnrollmentTokenRequest {
                        fleet_id: fleet.id.clone(),
                        uses,
                        ttl_seconds: 0,
                    },
                    &self.admin,
                ))
                .await
                .expect("token")
                .into_inner();
            (fleet.id, tok.token)
        })
    }

    /// Publishes a supernet as the fleet's `stable` label and makes it the desired state.
    fn publish(&self, rt: &tokio::runtime::Runtime, supernet: &str, fleet: &str) {
        rt.block_on(async {
            let mut dev =
                pb::developer_service_client::DeveloperServiceClient::new(channel(&self.url));
            dev.publish_supernet(authed(
                pb::PublishSupernetRequest {
                    supernet_id: supernet.into(),
                    fleet_id: fleet.into(),
                    label: "stable".into(),
                },
                &self.developer,
            ))
            .await
            .expect("publish");
            dev.set_desired_state(authed(
                pb::SetDesiredStateRequest {
                    fleet_id: fleet.into(),
                    target: Some(pb::set_desired_state_request::Target::Label(
                        "stable".into(),
                    )),
                    budget: Some(pb::LatencyBudgetPolicy {
                        latency_budget_ms: 0.0,
                        budget_fraction: 0.6,
                        hysteresis: 0.1,
                    }),
                },
                &self.developer,
            ))
            .await
            .expect("desired");
        });
    }
}

/// Runs `edge-agent` to completion (RUST_LOG=info), asserting success; stdout + stderr.
fn agent_ok(args: &[String]) -> String {
    let out = Command::new(binary("edge-agent"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("spawn edge-agent");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "edge-agent {args:?} failed:\n{text}");
    text
}

/// The agent's sync summary: (needed, cached, downloaded, bytes, resumed, restarted).
fn sync_line(log: &str) -> (u64, u64, u64, u64, u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("synced supernet") && l.contains("blobs needed"))
        .unwrap_or_else(|| panic!("no sync summary in:\n{log}"));
    let before = |key: &str| -> u64 {
        let i = line
            .find(key)
            .unwrap_or_else(|| panic!("{key:?} not in {line}"));
        line[..i]
            .trim_end()
            .rsplit([' ', '('])
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number before {key:?} in {line}"))
    };
    (
        before(" blobs needed"),
        before(" cached"),
        before(" downloaded"),
        before(" bytes"),
        before(" resumed"),
        before(" restarted"),
    )
}

fn module_sizes(m: &Manifest) -> BTreeMap<String, u64> {
    m.modules()
        .into_iter()
        .map(|(_, e)| (e.sha256.clone(), e.size))
        .collect()
}

fn flip_byte(path: &Path) {
    let mut b = std::fs::read(path).expect("read blob");
    let i = b.len() / 2;
    b[i] ^= 0x5a;
    std::fs::write(path, b).expect("write blob");
}

// ------------------------------------------------------------------------- download kill

/// At a "mid-download" moment of a blob cache (at least two blobs complete and one partial):
/// the completed blobs and the partial `.part` file (sha, bytes held).
fn mid_download(
    blobs: &Path,
    sizes: &BTreeMap<String, u64>,
) -> Option<(BTreeSet<String>, String, u64)> {
    let mut done = BTreeSet::new();
    let mut part = None;
    for e in std::fs::read_dir(blobs).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        if let Some(sha) = name.strip_suffix(".part") {
            if len > 0 && len < sizes[sha] {
                part = Some((sha.to_string(), len));
            }
        } else if sizes.contains_key(&name) {
            done.insert(name);
        }
    }
    let (sha, len) = part?;
    (done.len() >= 2).then_some((done, sha, len))
}

#[test]
fn agent_killed_mid_download_resumes_without_refetching_completed_blobs() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let rt = runtime();
    let cloud = InProcCloud::start(&rt, &d.join("cloud"), |_| {});
    // Wide enough stages (MB-sized blobs) that a blob takes several slices to download.
    let art = d.join("art");
    let m = demo_artifact(&art, [32, 64, 256], 3);
    let sizes = module_sizes(&m);
    let total: u64 = sizes.values().sum();
    let sid = rt.block_on(register_artifact(cloud.app(), &art));
    const ATTEMPTS: u32 = 3;
    let (fleet, token) = cloud.fleet(&rt, "dl", ATTEMPTS);
    cloud.publish(&rt, &sid, &fleet);
    let state = d.join("agent");
    let blobs = state.join("cache").join(&sid).join("blobs");
    let mut args = strings(&["profile", "--cloud", &cloud.url, "--state"]);
    args.push(state.display().to_string());
    args.extend(strings(&["--rounds", "1", "--validate", "0"]));
    let mut first = args.clone();
    first.extend(strings(&["--enroll-token", &token]));

    // Run the agent in ~1 ms slices (SIGCONT .. SIGSTOP) and SIGKILL it at the first frozen
    // moment with completed blobs and a partial one. A loaded machine can hand the agent a
    // slice long enough to finish; that attempt starts over with a fresh device.
    let mut caught = None;
    for attempt in 1..=ATTEMPTS {
        let _ = std::fs::remove_dir_all(&state);
        let log = d.join(format!("agent-attempt{attempt}"));
        let mut child = agent_spawn(&first, &log);
        let pid = child.id();
        let start = Instant::now();
        caught = loop {
            std::thread::sleep(Duration::from_millis(1));
            signal(pid, "STOP");
            if let Ok(Some(st)) = child.try_wait() {
                println!(
                    "attempt {attempt}: the agent finished ({st}) before a mid-download moment"
                );
                break None;
            }
            // `kill -STOP` returns once the signal is queued; a write in flight still lands.
            // Scan only once the process is really stopped, and again after SIGKILL: the
            // state the restart sees is the one after the process is gone.
            wait_stopped(pid);
            if mid_download(&blobs, &sizes).is_some() {
                child.kill().expect("SIGKILL agent");
                child.wait().expect("reap");
                let after = mid_download(&blobs, &sizes);
                if after.is_none() {
                    println!("attempt {attempt}: the last write completed a blob; retrying");
                }
                break after;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no mid-download moment:\n{}",
                read_log(&log, "err")
            );
            signal(pid, "CONT");
        };
        if caught.is_some() {
            break;
        }
    }
    let (done, part_sha, held) =
        caught.unwrap_or_else(|| panic!("no attempt of {ATTEMPTS} was caught mid-download"));
    // The server can still hand a slice of the dead download to HTTP/2 before it sees the
    // reset: count the restart's bytes from when its counter has settled.
    let mut sent_before = cloud.bytes_sent();
    let settle = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = cloud.bytes_sent();
        if now == sent_before || settle.elapsed() > Duration::from_secs(10) {
            break;
        }
        sent_before = now;
    }
    assert!(done.len() < sizes.len(), "killed before the end");

    // Restart: the stored identity, the cache and the `.part` file are reused.
    let out = agent_ok(&args);
    let (needed, cached, downloaded, bytes, resumed, restarted) = sync_line(&out);
    let missing: u64 = sizes
        .iter()
        .filter(|(s, _)| !done.contains(*s))
        .map(|(_, n)| n)
        .sum::<u64>()
        - held;
    assert_eq!(needed as usize, sizes.len());
    assert_eq!(
        cached as usize,
        done.len(),
        "completed blobs are not fetched again"
    );
    assert_eq!(downloaded as usize, sizes.len() - done.len());
    assert_eq!((resumed, restarted), (1, 0), "{part_sha} resumed at {held}");
    assert_eq!(bytes, missing, "only the missing bytes travel");
    assert_eq!(
        cloud.bytes_sent() - sent_before,
        missing,
        "the server sent exactly the missing bytes after the restart"
    );
    assert!(missing < total);
    // Byte-identical to the cloud's artifact, nothing partial left.
    for sha in sizes.keys() {
        let got = std::fs::read(blob_path(&state.join("cache").join(&sid), sha)).expect("blob");
        assert!(
            got == std::fs::read(blob_path(&art, sha)).expect("src"),
            "{sha}"
        );
    }
    assert!(std::fs::read_dir(&blobs)
        .expect("dir")
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().ends_with(".part")));
    println!(
        "killed with {} of {} blobs done and {held} bytes of {part_sha}; resumed with {bytes} of {total} bytes",
        done.len(),
        sizes.len()
    );
}

// ------------------------------------------------------------------------- flipped bytes

#[test]
fn flipped_byte_is_caught_by_sha256_never_loaded_and_the_old_supernet_keeps_serving() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let rt = runtime();
    let cloud = InProcCloud::start(&rt, &d.join("cloud"), |_| {});
    let art1 = d.join("art1");
    let m1 = demo_artifact(&art1, [4, 8, 8], 1);
    let s1 = rt.block_on(register_artifact(cloud.app(), &art1));
    let (fleet, token) = cloud.fleet(&rt, "flip", 1);
    cloud.publish(&rt, &s1, &fleet);
    let data = d.join("data");
    write_synthetic_idx(&data, 100, 120);
    let state = d.join("agent");
    let cache = state.join("cache");
    let mut args = strings(&["run", "--cloud", &cloud.url, "--state"]);
    args.push(state.display().to_string());
    args.push("--data".into());
    args.push(data.display().to_string());
    args.extend(strings(&[
        "--images",
        "60",
        "--population",
        "6",
        "--generations",
        "1",
        "--rounds",
        "2",
        "--validate",
        "0",
        "--label-free",
        "--duration",
        "1",
        "--heartbeat-ms",
        "300",
    ]));
    let mut first = args.clone();
    first.extend(strings(&["--enroll-token", &token]));
    let out = agent_ok(&first);
    assert!(out.contains("serving "), "{out}");

    // 1. A flipped byte in the agent's cache (the stem: every subnet loads it).
    let stem = m1.stem.sha256.clone();
    let cached = blob_path(&cache.join(&s1), &stem);
    flip_byte(&cached);
    let out = agent_ok(&args);
    assert!(
        out.contains(&format!("cached blob {stem} is corrupt")),
        "caught by sha256:\n{out}"
    );
    let (needed, kept, downloaded, _, _, _) = sync_line(&out);
    assert_eq!(
        (kept, downloaded),
        (needed - 1, 1),
        "only the bad blob is fetched again"
    );
    assert!(
        std::fs::read(&cached).expect("blob")
            == std::fs::read(blob_path(&art1, &stem)).expect("src")
    );
    assert!(out.contains("served "), "{out}");

    // 2. A new supernet whose blob is corrupted on the cloud's disk: the download fails its
    //    digest, the blob never gets its final name, and the agent serves the old supernet.
    let art2 = d.join("art2");
    let m2 = demo_artifact(&art2, [4, 8, 8], 2);
    let s2 = rt.block_on(register_artifact(cloud.app(), &art2));
    let old = module_sizes(&m1);
    let (bad, _) = module_sizes(&m2)
        .into_iter()
        .filter(|(s, _)| !old.contains_key(s))
        .max_by_key(|(_, n)| *n)
        .expect("a blob of the new supernet only");
    flip_byte(&cloud.app().blobs().path_of(&bad));
    cloud.publish(&rt, &s2, &fleet);
    let out = agent_ok(&args);
    assert!(
        out.contains(&format!("blob {bad}")),
        "mismatch reported:\n{out}"
    );
    assert!(
        out.contains(&format!("serving the cached supernet {s1}")),
        "falls back to the old supernet:\n{out}"
    );
    assert!(out.contains("serving ") && out.contains("served "), "{out}");
    assert!(
        !blob_path(&cache.join(&s2), &bad).exists(),
        "never under its final name"
    );
    assert!(!cache.join(&s2).join("manifest.json").exists());
    let current = std::fs::read_to_string(cache.join("current.json")).expect("current");
    assert!(current.contains(&s1), "{current}");
}

// ------------------------------------------------------------------------- elastify kill

/// `(stage, step)` of a checkpoint blob (safetensors metadata written by the elastifier).
fn checkpoint_step(bytes: &[u8]) -> (u64, u64) {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors header");
    let meta = &header["__metadata__"];
    let num = |k: &str| -> u64 {
        meta[k]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("checkpoint metadata {k}: {meta}"))
    };
    (num("stage"), num("step"))
}

#[test]
fn cloud_killed_mid_elastification_resumes_the_job_from_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut cloud = CloudProcess::new(&d.join("cloud"), None);
    run_ok(&mut cloud.cmd(&["migrate"]));
    let admin = field_after(
        &run_ok(&mut cloud.cmd(&["token", "create-api", "--role", "admin"])),
        "token:",
    );
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1,1,1],
            "widths":[8,16,16],"in_channels":1,"num_classes":10}"#,
    )
    .expect("arch");
    Model::init(&arch.spec, 5)
        .expect("init")
        .save(&d.join("oracle.json"), &d.join("oracle.safetensors"))
        .expect("save");
    let data = d.join("data");
    write_synthetic_idx(&data, 500, 20);
    cloud.start();
    let client = |args: &[&str]| {
        let mut c = Command::new(binary("cloud-server"));
        c.args(["client", "--endpoint", &cloud.url(), "--token", &admin]);
        c.args(args);
        c
    };
    let up = run_ok(&mut client(&[
        "upload",
        "--name",
        "tiny",
        "--arch",
        d.join("oracle.json").to_str().expect("utf8"),
        d.join("oracle.safetensors").to_str().expect("utf8"),
    ]));
    let oracle = up.split_whitespace().nth(2).expect("oracle id").to_string();
    let ds = run_ok(&mut client(&[
        "register-dataset",
        "--name",
        "synthetic",
        "--uri",
        data.to_str().expect("utf8"),
    ]));
    let dataset = ds
        .split_whitespace()
        .nth(1)
        .expect("dataset id")
        .to_string();
    const STEPS: u64 = 30;
    let params = format!(
        r#"{{"stage0_steps":{STEPS},"stage1_steps":{STEPS},"batch":16,"val_size":100,"priors":4,"checkpoint_every":5}}"#
    );
    let started = run_ok(&mut client(&[
        "elastify",
        &oracle,
        "--dataset-id",
        &dataset,
        "--params",
        &params,
    ]));
    let job_id = field_after(&started, "job ")
        .split_whitespace()
        .next()
        .expect("job id")
        .to_string();
    let rt = runtime();
    let get_job = |url: String| {
        let req = authed(
            pb::GetJobRequest {
                job_id: job_id.clone(),
            },
            &admin,
        );
        rt.block_on(async move {
            pb::developer_service_client::DeveloperServiceClient::new(channel(&url))
                .get_job(req)
                .await
                .map(|r| r.into_inner())
        })
    };
    // Kill once a few checkpoints were written (a third of the way through).
    let url = cloud.url();
    let at_kill = wait_for(Duration::from_secs(120), "elastification progress", || {
        let j = get_job(url.clone()).ok()?;
        assert_ne!(j.state, pb::JobState::Failed as i32, "{}", j.error);
        (j.state == pb::JobState::Running as i32 && j.progress >= 0.33).then_some(j)
    });
    cloud.kill();
    assert_eq!(at_kill.attempts, 1);

    // The checkpoint the job row points at (read from the dead server's files).
    let (ck_stage, ck_step) = rt.block_on(async {
        let cfg = Config::for_data_dir(&cloud.data_dir);
        let app = App::open(cfg).await.expect("open");
        let job = app
            .store()
            .get_job(uuid::Uuid::parse_str(&job_id).expect("uuid"))
            .await
            .expect("job");
        let sha = job.checkpoint_sha256.expect("a checkpoint before the kill");
        let bytes = app.blobs().read(&sha).await.expect("checkpoint blob");
        app.store().close().await;
        checkpoint_step(&bytes)
    });
    let ck_global = ck_stage * STEPS + ck_step;
    let ck_fraction = ck_global as f64 / (2 * STEPS) as f64;
    assert!(ck_global >= 5, "checkpoint at {ck_stage}/{ck_step}");

    // Restart on the same address; the job is claimed again once the dead worker's lease
    // expires (30 s by default) and must continue from the checkpoint, not from step 0.
    cloud.start();
    let url = cloud.url();
    let restarted = Instant::now();
    let mut seen = Vec::new();
    let last = wait_for(
        Duration::from_secs(150),
        "the resumed job to finish",
        || {
            let j = get_job(url.clone()).ok()?;
            if j.attempts >= 2 && j.state == pb::JobState::Running as i32 {
                seen.push(j.progress);
            }
            std::thread::sleep(Duration::from_millis(30));
            (j.state != pb::JobState::Running as i32 && j.state != pb::JobState::Queued as i32)
                .then_some(j)
        },
    );
    assert_eq!(last.state, pb::JobState::Succeeded as i32, "{}", last.error);
    assert_eq!(last.attempts, 2, "one more attempt after the kill");
    assert!(!last.supernet_id.is_empty());
    let floor = ck_fraction.min(at_kill.progress) - 1e-9;
    let lowest = seen.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        lowest >= floor,
        "the resumed attempt reported progress {lowest:.3} below the checkpoint's {ck_fraction:.3}: it restarted from an earlier step ({seen:?})"
    );
    assert!(
        seen.iter()
            .any(|p| *p > at_kill.progress + 1e-9 && *p < 1.0),
        "progress of the resumed attempt was observed: {seen:?}"
    );
    println!(
        "killed at progress {:.3}; checkpoint stage {ck_stage} step {ck_step} ({ck_fraction:.3}); resumed attempt reported {} progress values from {lowest:.3}; finished {:.1} s after the restart",
        at_kill.progress,
        seen.len(),
        restarted.elapsed().as_secs_f64()
    );
}

// ------------------------------------------------------------------------- cloud outage

#[test]
fn agents_keep_serving_while_the_cloud_is_down_and_reconcile_when_it_returns() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut cloud = CloudProcess::new(&d.join("cloud"), None);
    run_ok(&mut cloud.cmd(&["migrate"]));
    let admin = field_after(
        &run_ok(&mut cloud.cmd(&["token", "create-api", "--role", "admin"])),
        "token:",
    );
    let fleet = run_ok(&mut cloud.cmd(&["fleet", "create", "outage"]))
        .trim()
        .to_string();
    let enroll = field_after(
        &run_ok(&mut cloud.cmd(&[
            "token",
            "create-enrollment",
            "--fleet",
            "outage",
            "--uses",
            "1",
        ])),
        "token:",
    );
    let art = d.join("art");
    demo_artifact(&art, [4, 8, 8], 4);
    let rt = runtime();
    let sid = rt.block_on(async {
        let app = App::open(Config::for_data_dir(&cloud.data_dir))
            .await
            .expect("open");
        let s = register_artifact(&app, &art).await;
        app.store().close().await;
        s
    });
    cloud.start();
    let client = |args: &[&str]| {
        let mut c = Command::new(binary("cloud-server"));
        c.args(["client", "--endpoint", &cloud.url(), "--token", &admin]);
        c.args(args);
        c
    };
    run_ok(&mut client(&[
        "publish", &sid, "--fleet", &fleet, "--label", "stable",
    ]));
    run_ok(&mut client(&[
        "desire", "--fleet", &fleet, "--label", "stable",
    ]));

    let data = d.join("data");
    write_synthetic_idx(&data, 100, 120);
    let state = d.join("agent");
    let mut args = strings(&["run", "--cloud", &cloud.url(), "--enroll-token", &enroll]);
    args.extend(["--state".into(), state.display().to_string()]);
    args.extend(["--data".into(), data.display().to_string()]);
    args.extend(strings(&[
        "--images",
        "120",
        "--population",
        "6",
        "--generations",
        "1",
        "--rounds",
        "2",
        "--validate",
        "0",
        "--label-free",
        "--duration",
        "14",
        "--heartbeat-ms",
        "300",
        "--report-every",
        "1",
        "--interval-ms",
        "200",
        "--cloud-timeout-ms",
        "1000",
    ]));
    let log = d.join("agent");
    let agent = KillOnDrop(agent_spawn(&args, &log));
    wait_for(Duration::from_secs(60), "the agent to serve", || {
        read_log(&log, "out").contains("serving ").then_some(())
    });
    let serving_at = Instant::now();
    let hb = r#"adaptivenet_grpc_requests_total{method="/adaptivenet.v1.DeviceService/Heartbeat",code="0"}"#;
    wait_for(Duration::from_secs(20), "a first heartbeat", || {
        (metric(&cloud.metrics(), hb) >= 1.0).then_some(())
    });

    // Outage: SIGKILL the cloud for ~3 s.
    cloud.kill();
    let down_at = serving_at.elapsed().as_secs_f64();
    wait_for(Duration::from_secs(15), "a failed heartbeat", || {
        read_log(&log, "err")
            .contains("heartbeat failed, still serving")
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(2500));
    let mut agent = agent;
    assert!(
        agent.0.try_wait().expect("wait").is_none(),
        "the agent keeps running while the cloud is down:\n{}",
        read_log(&log, "err")
    );
    let up_at = serving_at.elapsed().as_secs_f64();
    let back_ms = adaptivenet_cloud::domain::now_ms();
    cloud.start();

    // Reconciliation: heartbeats and the (retried) report are accepted by the new process.
    let t = Instant::now();
    loop {
        let m = cloud.metrics();
        if metric(&m, hb) >= 1.0 && metric(&m, "adaptivenet_reports_total") >= 1.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no heartbeat + report after the restart; metrics:\n{}\nagent:\n{}{}",
            m.lines()
                .filter(|l| l.contains("Device") || l.contains("reports"))
                .collect::<Vec<_>>()
                .join("\n"),
            read_log(&log, "out"),
            read_log(&log, "err")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = agent.0.wait().expect("wait agent");
    let out = read_log(&log, "out");
    assert!(status.success(), "{out}\n{}", read_log(&log, "err"));
    let served: u64 = field_after(&out, "served ")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("served count");
    assert!(served > 0, "{out}");
    let viewer = field_after(
        &run_ok(&mut cloud.cmd(&["token", "create-api", "--role", "viewer"])),
        "token:",
    );
    let devices = rt.block_on(async {
        pb::dashboard_service_client::DashboardServiceClient::new(channel(&cloud.url()))
            .list_devices(authed(pb::ListDevicesRequest::default(), &viewer))
            .await
            .expect("devices")
            .into_inner()
            .devices
    });
    assert_eq!(devices.len(), 1);
    assert!(
        devices[0].last_heartbeat_unix_ms >= back_ms,
        "heartbeat after the outage recorded"
    );
    assert!(!devices[0].active_subnet.is_empty());
    // Adaptation windows during the outage, when this agent build records a timeline.
    let tl = state.join("timeline.jsonl");
    match std::fs::read_to_string(&tl) {
        Ok(text) => {
            let during = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v["t_s"].as_f64())
                .filter(|t| *t > down_at + 0.3 && *t < up_at - 0.3)
                .count();
            assert!(
                during >= 1,
                "maintenance windows while the cloud was down:\n{text}"
            );
        }
        Err(_) => println!(
            "note: {} not written by this agent build; adaptation during the outage not checked",
            tl.display()
        ),
    }
}

// ------------------------------------------------------------------------- auth + schema

#[test]
fn expired_credentials_and_viewer_mutations_are_refused_with_nothing_changed() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = runtime();
    let cloud = InProcCloud::start(&rt, dir.path(), |c| {
        c.device_credential_ttl = Some(Duration::from_millis(300));
        c.auth_cache_ttl = Duration::ZERO;
    });
    let (fleet, token) = cloud.fleet(&rt, "auth", 1);
    let app = cloud.app().clone();
    rt.block_on(async {
        let ch = channel(&cloud.url);
        let mut device = pb::device_service_client::DeviceServiceClient::new(ch.clone());
        let mut dev = pb::developer_service_client::DeveloperServiceClient::new(ch.clone());
        let mut admin = pb::admin_service_client::AdminServiceClient::new(ch.clone());
        let enroll = |t: String| pb::EnrollRequest {
            enrollment_token: t,
            device_class: 1,
            agent_version: "0.1.0".into(),
        };
        // Device credential past its lifetime.
        let cred = device
            .enroll(enroll(token))
            .await
            .expect("enroll")
            .into_inner()
            .device_credential;
        device
            .get_desired_state(authed(pb::Empty {}, &cred))
            .await
            .expect("fresh credential works");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let err = device
            .get_desired_state(authed(pb::Empty {}, &cred))
            .await
            .expect_err("expired credential");
        assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
        // Enrollment token past its lifetime.
        let fleet_id = uuid::Uuid::parse_str(&fleet).expect("uuid");
        let short = app
            .create_enrollment_token(fleet_id, 5, Some(Duration::from_millis(50)))
            .await
            .expect("token");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let err = device
            .enroll(enroll(short.token))
            .await
            .expect_err("expired enrollment token");
        assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());

        // A viewer may read but every mutating call is PERMISSION_DENIED.
        let viewer = app
            .create_api_token(Role::Viewer, "v", None)
            .await
            .expect("viewer")
            .token;
        let some_id = uuid::Uuid::new_v4().to_string();
        let denied = |what: &str, r: Result<(), tonic::Status>| {
            let err = r.expect_err(what);
            assert_eq!(
                err.code(),
                Code::PermissionDenied,
                "{what}: {}",
                err.message()
            );
        };
        macro_rules! v {
            ($m:expr) => {
                authed($m, &viewer)
            };
        }
        denied(
            "StartElastification",
            dev.start_elastification(v!(pb::StartElastificationRequest {
                oracle_id: some_id.clone(),
                ..Default::default()
            }))
            .await
            .map(drop),
        );
        denied(
            "CancelJob",
            dev.cancel_job(v!(pb::CancelJobRequest {
                job_id: some_id.clone(),
            }))
            .await
            .map(drop),
        );
        denied(
            "DeleteOracle",
            dev.delete_oracle(v!(pb::DeleteOracleRequest {
                oracle_id: some_id.clone(),
            }))
            .await
            .map(drop),
        );
        denied(
            "PublishSupernet",
            dev.publish_supernet(v!(pb::PublishSupernetRequest {
                supernet_id: some_id.clone(),
                fleet_id: fleet.clone(),
                label: "stable".into(),
            }))
            .await
            .map(drop),
        );
        denied(
            "SetDesiredState",
            dev.set_desired_state(v!(pb::SetDesiredStateRequest {
                fleet_id: fleet.clone(),
                target: Some(pb::set_desired_state_request::Target::Label("x".into())),
                budget: None,
            }))
            .await
            .map(drop),
        );
        denied(
            "CreateFleet",
            admin
                .create_fleet(v!(pb::CreateFleetRequest { name: "v".into() }))
                .await
                .map(drop),
        );
        denied(
            "CreateEnrollmentToken",
            admin
                .create_enrollment_token(v!(pb::CreateEnrollmentTokenRequest {
                    fleet_id: fleet.clone(),
                    uses: 1,
                    ttl_seconds: 0,
                }))
                .await
                .map(drop),
        );
        denied(
            "CreateApiToken",
            admin
                .create_api_token(v!(pb::CreateApiTokenRequest {
                    role: pb::Role::Admin as i32,
                    ..Default::default()
                }))
                .await
                .map(drop),
        );
        denied(
            "RevokeApiToken",
            admin
                .revoke_api_token(v!(pb::RevokeTokenRequest {
                    token_id: some_id.clone(),
                }))
                .await
                .map(drop),
        );
        // Nothing changed: one fleet, no desired state, no jobs, same tokens.
        let fleets = app
            .store()
            .list_fleets(adaptivenet_cloud::domain::Page::new(0, "").expect("page"))
            .await
            .expect("fleets");
        assert_eq!(fleets.len(), 1);
        let d = dev
            .list_jobs(authed(pb::ListJobsRequest::default(), &cloud.developer))
            .await
            .expect("jobs")
            .into_inner();
        assert!(d.jobs.is_empty());
        assert_eq!(
            app.store().list_api_tokens().await.expect("tokens").len(),
            3
        );
    });
}

/// `ReportRequest` as an agent built against a schema with extra fields would send it: the
/// whitelisted aggregates plus raw local data the cloud must never keep.
#[derive(Clone, PartialEq, prost::Message)]
struct ReportWithExtras {
    #[prost(string, tag = "1")]
    supernet_id: String,
    #[prost(string, tag = "2")]
    active_subnet: String,
    #[prost(double, tag = "3")]
    latency_p50_ms: f64,
    #[prost(double, tag = "4")]
    latency_p95_ms: f64,
    #[prost(bytes = "vec", tag = "90")]
    raw_images: Vec<u8>,
    #[prost(string, tag = "91")]
    sample_labels: String,
}

#[test]
fn report_content_outside_the_whitelist_is_rejected_or_dropped_never_stored() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = runtime();
    let cloud = InProcCloud::start(&rt, dir.path(), |_| {});
    let art = dir.path().join("art");
    demo_artifact(&art, [4, 8, 8], 9);
    let sid = rt.block_on(register_artifact(cloud.app(), &art));
    let (fleet, token) = cloud.fleet(&rt, "schema", 1);
    cloud.publish(&rt, &sid, &fleet);
    let marker = format!("PRIVATE-{}", uuid::Uuid::new_v4().simple());
    rt.block_on(async {
        let ch = channel(&cloud.url);
        let mut device = pb::device_service_client::DeviceServiceClient::new(ch.clone());
        let cred = device
            .enroll(pb::EnrollRequest {
                enrollment_token: token,
                device_class: 1,
                agent_version: "0.1.0".into(),
            })
            .await
            .expect("enroll")
            .into_inner()
            .device_credential;
        // Free text where the schema has a constrained string: rejected, field named.
        let hb = pb::HeartbeatRequest {
            agent_version: format!("0.1.0 {marker}"),
            active_supernet_id: sid.clone(),
            active_subnet: "0".repeat(9),
            latency_p50_ms: 1.0,
            latency_p95_ms: 2.0,
            last_adaptation_reason: 0,
            applied_generation: 1,
            ..Default::default()
        };
        let err = device
            .heartbeat(authed(hb, &cred))
            .await
            .expect_err("free-text agent_version");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("agent_version"), "{}", err.message());
        // Fields outside the schema: the protobuf decoder drops them; whatever the answer,
        // the payload must not reach storage.
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        grpc.ready().await.expect("ready");
        let extended = ReportWithExtras {
            supernet_id: sid.clone(),
            active_subnet: "0".repeat(9),
            latency_p50_ms: 1.0,
            latency_p95_ms: 2.0,
            raw_images: marker.as_bytes().repeat(64),
            sample_labels: marker.clone(),
        };
        let r: Result<tonic::Response<pb::Empty>, tonic::Status> = grpc
            .unary(
                authed(extended, &cred),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/adaptivenet.v1.DeviceService/Report",
                ),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        println!("report with unknown fields: {:?}", r.as_ref().map(|_| ()));
    });
    // Nothing under the data directory (database, WAL, blobs) holds the marker.
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(
                std::fs::read_dir(&p)
                    .expect("dir")
                    .flatten()
                    .map(|e| e.path()),
            );
        } else if let Ok(bytes) = std::fs::read(&p) {
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{} holds report content outside the schema",
                p.display()
            );
        }
    }
}

#[test]
fn absurd_declared_upload_size_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = runtime();
    let cloud = InProcCloud::start(&rt, dir.path(), |_| {});
    let arch = br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1,1,1],
            "widths":[8,16,16],"in_channels":1,"num_classes":10}"#;
    let desc = ArchDescriptor::from_json(arch).expect("arch");
    Model::init(&desc.spec, 1)
        .expect("init")
        .save(
            &dir.path().join("o.json"),
            &dir.path().join("o.safetensors"),
        )
        .expect("save");
    let weights = std::fs::read(dir.path().join("o.safetensors")).expect("weights");
    let sha = adaptivenet_cloud::blobs::sha256_hex(&weights);
    let blob_root = cloud.app().blobs().root().to_path_buf();
    let files = |root: &Path| -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(
                    std::fs::read_dir(&p)
                        .expect("dir")
                        .flatten()
                        .map(|e| e.path()),
                );
            } else if p.file_name().is_some_and(|n| n != ".lock") {
                // The store's own scratch-directory lock exists for as long as it lives.
                out.push(p);
            }
        }
        out
    };
    rt.block_on(async {
        let mut dev =
            pb::developer_service_client::DeveloperServiceClient::new(channel(&cloud.url));
        for declared in [u64::MAX, u64::MAX / 2, 0] {
            use pb::upload_oracle_request::Msg;
            let mut msgs = vec![pb::UploadOracleRequest {
                msg: Some(Msg::Header(pb::OracleUploadHeader {
                    name: "absurd".into(),
                    arch_json: arch.to_vec(),
                    size_bytes: declared,
                    weights_sha256: sha.clone(),
                })),
            }];
            msgs.extend(weights.chunks(1 << 14).map(|c| pb::UploadOracleRequest {
                msg: Some(Msg::Chunk(c.to_vec())),
            }));
            let err = dev
                .upload_oracle(authed(tokio_stream::iter(msgs), &cloud.developer))
                .await
                .expect_err("absurd size");
            assert!(
                err.code() == Code::InvalidArgument,
                "declared {declared}: {:?} {}",
                err.code(),
                err.message()
            );
            assert!(err.message().contains("size_bytes"), "{}", err.message());
        }
        let list = dev
            .list_oracles(authed(pb::ListOraclesRequest::default(), &cloud.developer))
            .await
            .expect("list")
            .into_inner();
        assert!(list.oracles.is_empty());
    });
    assert!(files(&blob_root).is_empty(), "{:?}", files(&blob_root));
}
