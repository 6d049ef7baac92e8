//! `StartOracleTraining` over real gRPC on SQLite and PostgreSQL: an uploaded tiny oracle
//! fine-tuned with a new head on an uploaded RGB ImageFolder (the result is an oracle with the
//! dataset's classes that then elastifies), training from scratch, a worker killed mid-way
//! (another resumes from the checkpoint to the bit-identical result), cancel, and bad
//! requests (INVALID_ARGUMENT naming the field, nothing queued).
mod common;

use std::sync::Arc;
use std::time::Duration;

use adaptivenet_cloud::domain::{JobState, Role};
use adaptivenet_cloud::elastify::runner::ElastifyRunner;
use adaptivenet_cloud::jobs::Worker;
use adaptivenet_core::model::ArchDescriptor;
use adaptivenet_proto::v1 as pb;
use common::*;
use tonic::Code;

/// The base oracle: 10 classes, RGB, random weights (the dataset has 3 classes).
const BASE_ARCH: &[u8] = br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[2],"widths":[8],"in_channels":3,"num_classes":10}"#;
/// A from-scratch architecture for the 3-class dataset.
const SCRATCH_ARCH: &str = r#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[2],"widths":[8],"in_channels":3,"num_classes":3}"#;

struct Setup {
    h: Harness,
    dev: String,
    dataset: String,
    oracle: String,
    _tmp: tempfile::TempDir,
}

/// A server (with `workers` in-process workers running the real runner), a developer token,
/// the small RGB dataset uploaded with the CLI and the 10-class base oracle uploaded.
async fn setup(db: Db, workers: usize) -> Option<Setup> {
    let h = Harness::start(
        db,
        |c| {
            c.workers = workers;
            c.job_lease = Duration::from_millis(800);
        },
        Some(Arc::new(ElastifyRunner)),
    )
    .await?;
    let dev = h.token(Role::Developer).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rgb");
    write_small_rgb_folder(&dir);
    let out = stdout_ok(
        &cli(
            &h,
            &dev,
            &["upload-dataset", dir.to_str().unwrap(), "--name", "rgb3"],
        )
        .await,
    );
    let dataset = dataset_id(&out);
    let weights = fixture_weights(BASE_ARCH, 7);
    let msgs = vec![
        pb::UploadOracleRequest {
            msg: Some(pb::upload_oracle_request::Msg::Header(
                pb::OracleUploadHeader {
                    name: "base10".into(),
                    arch_json: BASE_ARCH.to_vec(),
                    size_bytes: weights.len() as u64,
                    weights_sha256: sha256_hex(&weights),
                },
            )),
        },
        pb::UploadOracleRequest {
            msg: Some(pb::upload_oracle_request::Msg::Chunk(weights)),
        },
    ];
    let oracle = h
        .developer()
        .upload_oracle(authed(futures::stream::iter(msgs), &dev))
        .await
        .unwrap()
        .into_inner()
        .oracle
        .unwrap()
        .id;
    Some(Setup {
        h,
        dev,
        dataset,
        oracle,
        _tmp: tmp,
    })
}

fn request(s: &Setup, name: &str, base: bool, params: &str) -> pb::StartOracleTrainingRequest {
    pb::StartOracleTrainingRequest {
        name: name.into(),
        dataset_id: s.dataset.clone(),
        arch_json: if base {
            String::new()
        } else {
            SCRATCH_ARCH.into()
        },
        base_oracle_id: if base {
            s.oracle.clone()
        } else {
            String::new()
        },
        params_json: params.into(),
    }
}

async fn start(s: &Setup, req: pb::StartOracleTrainingRequest) -> pb::Job {
    s.h.developer()
        .start_oracle_training(authed(req, &s.dev))
        .await
        .expect("start oracle training")
        .into_inner()
}

async fn get_job(s: &Setup, id: &str) -> pb::Job {
    s.h.developer()
        .get_job(authed(
            pb::GetJobRequest {
                job_id: id.to_string(),
            },
            &s.dev,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Polls until the job is terminal (in-process workers run it).
async fn wait_terminal(s: &Setup, id: &str) -> pb::Job {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let j = get_job(s, id).await;
        let st = pb::JobState::try_from(j.state).unwrap();
        if matches!(
            st,
            pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
        ) {
            return j;
        }
        assert!(tokio::time::Instant::now() < deadline, "job stuck: {j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_oracle(s: &Setup, id: &str) -> pb::Oracle {
    s.h.developer()
        .get_oracle(authed(
            pb::GetOracleRequest {
                oracle_id: id.to_string(),
            },
            &s.dev,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn count_jobs(s: &Setup) -> usize {
    s.h.developer()
        .list_jobs(authed(pb::ListJobsRequest::default(), &s.dev))
        .await
        .unwrap()
        .into_inner()
        .jobs
        .len()
}

const TUNE: &str = r#"{"steps":30,"batch":8,"lr":0.02,"val_size":12,"checkpoint_every":10}"#;

/// Fine-tuning through the CLI client (`--watch`): the job succeeds, the new oracle has the
/// dataset's 3 classes and the base's features, the report is readable, and the new oracle
/// elastifies.
async fn fine_tune_then_elastify(db: Db) {
    let Some(s) = setup(db, 1).await else { return };
    let out = stdout_ok(
        &cli(
            &s.h,
            &s.dev,
            &[
                "train-oracle",
                "--dataset",
                &s.dataset,
                "--from-oracle",
                &s.oracle,
                "--name",
                "tuned3",
                "--params",
                TUNE,
                "--watch",
            ],
        )
        .await,
    );
    let job_id = out
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .expect("job id")
        .to_string();
    assert!(out.contains("Succeeded"), "{out}");
    assert!(out.contains("images/s"), "readable summary: {out}");
    let j = get_job(&s, &job_id).await;
    assert_eq!(j.state, pb::JobState::Succeeded as i32, "{j:?}");
    assert_eq!(j.kind, "train_oracle");
    assert_eq!(j.oracle_id, s.oracle, "the base oracle is the job's input");
    assert!(
        out.contains(&format!("oracle {}", j.result_oracle_id)),
        "{out}"
    );
    let report: serde_json::Value = serde_json::from_str(&j.report_json).unwrap();
    assert_eq!(report["mode"], "fine-tune");
    assert_eq!(report["classes"], 3);
    assert_eq!(report["steps"], 30);
    assert_eq!(report["accuracy_split"], "held-out");
    assert_eq!(report["accuracy_images"], 12);
    let acc = report["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{report}");
    assert!(report["images_per_sec"].as_f64().unwrap() > 0.0);

    // The new oracle: the dataset's classes, validated like an upload, stored weights.
    let o = get_oracle(&s, &j.result_oracle_id).await;
    assert_eq!(o.name, "tuned3");
    let arch = ArchDescriptor::from_json(&o.arch_json).unwrap();
    assert_eq!(arch.spec.head.classes, 3);
    let base = ArchDescriptor::from_json(BASE_ARCH).unwrap().spec;
    assert_eq!(arch.spec.blocks, base.blocks, "same body as the base");
    assert_eq!(arch.spec.stem, base.stem);
    let blob =
        s.h.app()
            .blobs()
            .read(&o.weights_sha256)
            .await
            .expect("weights blob");
    assert_eq!(sha256_hex(&blob), o.weights_sha256);

    // ... which elastifies.
    let e = s
        .h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: o.id.clone(),
                dataset_id: s.dataset.clone(),
                supernet_name: String::new(),
                params_json: r#"{"branches":["merge2"],"stage0_steps":2,"stage1_steps":2,"batch":8,"val_size":12,"priors":4,"checkpoint_every":0}"#.into(),
            },
            &s.dev,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.kind, "elastify");
    let done = wait_terminal(&s, &e.id).await;
    assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");
    assert!(!done.supernet_id.is_empty());
    assert!(done.result_oracle_id.is_empty() && done.report_json.is_empty());
    s.h.finish().await;
}
both_backends!(fine_tune_then_elastify_db, fine_tune_then_elastify);

/// From scratch with `arch_json`: no input oracle, a new one with the architecture.
async fn from_scratch(db: Db) {
    let Some(s) = setup(db, 1).await else { return };
    let j = start(
        &s,
        request(
            &s,
            "scratch3",
            false,
            r#"{"epochs":2,"batch":8,"val_size":0}"#,
        ),
    )
    .await;
    assert_eq!(j.state, pb::JobState::Queued as i32);
    assert!(j.oracle_id.is_empty());
    let done = wait_terminal(&s, &j.id).await;
    assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");
    let report: serde_json::Value = serde_json::from_str(&done.report_json).unwrap();
    assert_eq!(report["mode"], "scratch");
    // 60 images, 2 epochs of batch 8.
    assert_eq!(report["steps"], 15);
    assert!(report["accuracy"].is_null(), "nothing held out: {report}");
    let o = get_oracle(&s, &done.result_oracle_id).await;
    assert_eq!(o.name, "scratch3");
    let got = ArchDescriptor::from_json(&o.arch_json).unwrap().spec;
    let want = ArchDescriptor::from_json(SCRATCH_ARCH.as_bytes())
        .unwrap()
        .spec;
    assert_eq!(
        (&got.stem, &got.blocks, &got.head),
        (&want.stem, &want.blocks, &want.head)
    );
    s.h.finish().await;
}
both_backends!(from_scratch_db, from_scratch);

const LONG: &str = r#"{"steps":400,"batch":8,"lr":0.02,"val_size":12,"checkpoint_every":5}"#;

/// Far more steps than the test waits for.
const ENDLESS: &str = r#"{"steps":1000000,"batch":8,"val_size":12,"checkpoint_every":5}"#;

/// Waits until the job has a checkpoint and more than `min_progress`.
async fn wait_checkpointed(s: &Setup, id: uuid::Uuid, min_progress: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let j = s.h.app().store().get_job(id).await.unwrap();
        if j.checkpoint_sha256.is_some() && j.progress > min_progress {
            assert_eq!(j.state, JobState::Running);
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A worker killed mid-way: once its lease expires another worker resumes from the
/// checkpoint, and the result is bit-identical to an uninterrupted run (the same weights,
/// so the same stored oracle).
async fn killed_worker_resumes(db: Db) {
    let Some(s) = setup(db, 0).await else { return };
    let stop = tokio_util::sync::CancellationToken::new();
    let whole = start(&s, request(&s, "whole", true, LONG)).await;
    let w = Worker::new(s.h.app().clone(), Arc::new(ElastifyRunner), "whole-worker");
    assert!(w.poll_once(&stop).await.unwrap());
    let whole = get_job(&s, &whole.id).await;
    assert_eq!(whole.state, pb::JobState::Succeeded as i32, "{whole:?}");

    let j = start(&s, request(&s, "resumed", true, LONG)).await;
    let id = uuid::Uuid::parse_str(&j.id).unwrap();
    let stop_a = tokio_util::sync::CancellationToken::new();
    let a = tokio::spawn(
        Worker::new(s.h.app().clone(), Arc::new(ElastifyRunner), "worker-a").run(stop_a.clone()),
    );
    wait_checkpointed(&s, id, 0.05).await;
    // "Crash": the worker loop stops heartbeating (its training thread runs on until its
    // next fenced checkpoint write fails).
    a.abort();
    let b = Worker::new(s.h.app().clone(), Arc::new(ElastifyRunner), "worker-b");
    assert!(!b.poll_once(&stop).await.unwrap(), "lease still held by A");
    tokio::time::sleep(s.h.app().config().job_lease + Duration::from_millis(200)).await;
    // On PostgreSQL the claim skips a row that is locked at that instant (`SKIP LOCKED`), and
    // A's orphaned training thread still writes fenced checkpoints until B owns the job; a
    // worker polls again, so the test does too (bounded).
    let mut claimed = false;
    for _ in 0..50 {
        if b.poll_once(&stop).await.unwrap() {
            claimed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(claimed, "B claims after expiry");
    let done = get_job(&s, &j.id).await;
    assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempts, 2);
    assert_eq!(
        done.result_oracle_id, whole.result_oracle_id,
        "resumed weights are bit-identical to the uninterrupted run's"
    );
    let r: serde_json::Value = serde_json::from_str(&done.report_json).unwrap();
    let rw: serde_json::Value = serde_json::from_str(&whole.report_json).unwrap();
    assert_eq!(r["accuracy"], rw["accuracy"]);
    assert_eq!(r["final_mean_loss"], rw["final_mean_loss"]);
    s.h.finish().await;
}
both_backends!(killed_worker_resumes_db, killed_worker_resumes);

/// CancelJob stops training at the next step: cancelled, no oracle stored.
async fn cancel_stops_training(db: Db) {
    let Some(s) = setup(db, 0).await else { return };
    let j = start(&s, request(&s, "cancelled", true, ENDLESS)).await;
    let id = uuid::Uuid::parse_str(&j.id).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let w = tokio::spawn(
        Worker::new(s.h.app().clone(), Arc::new(ElastifyRunner), "w").run(stop.clone()),
    );
    wait_checkpointed(&s, id, 0.0).await;
    s.h.developer()
        .cancel_job(authed(
            pb::CancelJobRequest {
                job_id: j.id.clone(),
            },
            &s.dev,
        ))
        .await
        .unwrap();
    let done = wait_terminal(&s, &j.id).await;
    assert_eq!(done.state, pb::JobState::Cancelled as i32, "{done:?}");
    assert!(done.progress < 1.0);
    assert!(done.result_oracle_id.is_empty());
    let oracles =
        s.h.developer()
            .list_oracles(authed(pb::ListOraclesRequest::default(), &s.dev))
            .await
            .unwrap()
            .into_inner()
            .oracles;
    assert_eq!(oracles.len(), 1, "only the base oracle");
    stop.cancel();
    w.await.unwrap();
    s.h.finish().await;
}
both_backends!(cancel_stops_training_db, cancel_stops_training);

/// Bad requests: INVALID_ARGUMENT (or NOT_FOUND / PERMISSION_DENIED) naming the field, and no
/// job queued.
async fn bad_requests(db: Db) {
    let Some(s) = setup(db, 0).await else { return };
    let expect = |field: &'static str, code: Code| {
        move |e: tonic::Status| {
            assert_eq!(e.code(), code, "{field}: {e:?}");
            assert!(e.message().contains(field), "{field} not named: {e:?}");
        }
    };
    let cases: Vec<(pb::StartOracleTrainingRequest, &str, Code)> = vec![
        (
            pb::StartOracleTrainingRequest {
                arch_json: SCRATCH_ARCH.into(),
                ..request(&s, "both", true, "")
            },
            "base_oracle_id",
            Code::InvalidArgument,
        ),
        (
            pb::StartOracleTrainingRequest {
                base_oracle_id: String::new(),
                ..request(&s, "neither", true, "")
            },
            "arch_json",
            Code::InvalidArgument,
        ),
        (
            request(&s, "x", true, r#"{"steps":10,"lernrate":0.1}"#),
            "params_json.lernrate",
            Code::InvalidArgument,
        ),
        (
            request(&s, "x", true, r#"{"lr":-1}"#),
            "params_json.lr",
            Code::InvalidArgument,
        ),
        (
            request(&s, "x", true, r#"{"steps":"ten"}"#),
            "params_json.steps",
            Code::InvalidArgument,
        ),
        (
            request(&s, "x", true, r#"{"steps":10,"epochs":1}"#),
            "params_json.epochs",
            Code::InvalidArgument,
        ),
        (
            request(&s, "x", true, r#"{"batch":0}"#),
            "params_json.batch",
            Code::InvalidArgument,
        ),
        (
            request(&s, "x", true, "[1]"),
            "params_json",
            Code::InvalidArgument,
        ),
        (request(&s, "", true, ""), "name", Code::InvalidArgument),
        (
            pb::StartOracleTrainingRequest {
                dataset_id: String::new(),
                ..request(&s, "x", true, "")
            },
            "dataset_id",
            Code::InvalidArgument,
        ),
        (
            pb::StartOracleTrainingRequest {
                dataset_id: uuid::Uuid::new_v4().to_string(),
                ..request(&s, "x", true, "")
            },
            "dataset",
            Code::NotFound,
        ),
        (
            pb::StartOracleTrainingRequest {
                base_oracle_id: uuid::Uuid::new_v4().to_string(),
                ..request(&s, "x", true, "")
            },
            "oracle",
            Code::NotFound,
        ),
        (
            pb::StartOracleTrainingRequest {
                arch_json: "{\"family\":\"nope\"}".into(),
                ..request(&s, "x", false, "")
            },
            "arch_json",
            Code::InvalidArgument,
        ),
        // Grey model on an RGB dataset.
        (
            pb::StartOracleTrainingRequest {
                arch_json: SCRATCH_ARCH.replace("\"in_channels\":3", "\"in_channels\":1"),
                ..request(&s, "x", false, "")
            },
            "arch_json",
            Code::InvalidArgument,
        ),
        // From scratch, the classes must be the dataset's.
        (
            pb::StartOracleTrainingRequest {
                arch_json: SCRATCH_ARCH.replace("\"num_classes\":3", "\"num_classes\":10"),
                ..request(&s, "x", false, "")
            },
            "arch_json",
            Code::InvalidArgument,
        ),
    ];
    for (req, field, code) in cases {
        let e =
            s.h.developer()
                .start_oracle_training(authed(req, &s.dev))
                .await
                .expect_err(field);
        expect(field, code)(e);
    }
    // A viewer may not start jobs.
    let viewer = s.h.token(Role::Viewer).await;
    let e =
        s.h.developer()
            .start_oracle_training(authed(request(&s, "x", true, ""), &viewer))
            .await
            .expect_err("viewer");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(count_jobs(&s).await, 0, "nothing queued");
    s.h.finish().await;
}
both_backends!(bad_requests_db, bad_requests);
