//! Storage and job hardening: a blob directory shared by several processes, what viewers
//! learn from failed jobs and datasets, lease fencing of a job's supernet registration,
//! oracle deletion next to shared content-addressed blobs, blob garbage collection (in
//! process and through `cloud-server gc`), and a full file system (a real small tmpfs).
mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adaptivenet_cloud::blobs::BlobStore;
use adaptivenet_cloud::domain::{now_ms, JobState, Role};
use adaptivenet_cloud::error::CloudError;
use adaptivenet_cloud::gc;
use adaptivenet_cloud::jobs::{JobContext, JobOutput, JobRunner, Worker};
use adaptivenet_proto::v1 as pb;
use common::{
    authed, job_dataset, job_oracle, job_oracle_weights, make_supernet, part_files,
    safetensors_bytes, sha256_hex, store_supernet_artifact, upload, Db, Harness,
};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_cloud-server");

/// A job runner defined by a closure over its context.
struct FnRunner<F>(F);

impl<F, Fut> JobRunner for FnRunner<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<JobOutput, CloudError>> + Send + 'static,
{
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<JobOutput, CloudError>> {
        Box::pin((self.0)(ctx))
    }
}

/// Uploads an oracle and a dataset that fits it, and queues a job on them; returns (oracle
/// id, job id).
async fn oracle_and_job(h: &Harness, name: &str, seed: u64) -> (String, String) {
    let o = job_oracle(h, &h.admin, name, seed).await;
    let dataset = job_dataset(h, &h.admin).await;
    let j = h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: o.id.clone(),
                dataset_id: dataset,
                supernet_name: name.into(),
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .expect("start")
        .into_inner();
    (o.id, j.id)
}

/// Runs the queued job once with `runner` on a worker of this test (deterministic: returns
/// when the worker has settled the attempt).
async fn run_once<R: JobRunner>(h: &Harness, id: &str, runner: R) {
    let w = Worker::new(h.app().clone(), Arc::new(runner), id);
    assert!(
        w.poll_once(&CancellationToken::new()).await.expect("poll"),
        "a job was claimed"
    );
}

// ---------------------------------------------------------------- shared blob directory

/// `cloud-server migrate` (a separate process opening the same blob directory, as in the
/// compose and Kubernetes deployments) while an upload is in flight: the upload still
/// commits. Before per-process scratch directories, opening the store deleted every temp
/// file under `blobs/tmp`, live or not.
#[tokio::test]
async fn another_process_opening_the_blob_dir_keeps_writes_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::open(dir.path().join("blobs"))
        .await
        .expect("open");
    let data = vec![7u8; 300_000];
    let mut w = store.writer().await.expect("writer");
    w.write(&data[..100_000]).await.expect("write");
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path())
        .arg("migrate")
        .output()
        .expect("run migrate");
    assert!(out.status.success(), "migrate: {out:?}");
    w.write(&data[100_000..])
        .await
        .expect("write after migrate");
    let r = w
        .commit(Some(("sha256", &sha256_hex(&data))))
        .await
        .expect("commit after another process opened the store");
    assert_eq!(store.read(&r.sha256).await.expect("read"), data);
    assert_eq!(part_files(&dir.path().join("blobs/tmp")), 0);
    // The migrate process exited: its scratch directory is gone or collectable; only this
    // process's own one remains after the next open.
    let again = BlobStore::open(dir.path().join("blobs"))
        .await
        .expect("reopen");
    let live: Vec<_> = std::fs::read_dir(dir.path().join("blobs/tmp"))
        .expect("tmp")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(live.len(), 2, "two live stores, two scratch dirs: {live:?}");
    drop(again);
}

// ---------------------------------------------------------------- what viewers see

async fn job_errors_are_public(db: Db) {
    let runner = FnRunner(|_ctx: JobContext| async {
        Err(CloudError::io(
            "/srv/private/datasets/fmnist/train-images",
            std::io::Error::other("read failed at sector 4242"),
        ))
    });
    let Some(h) = Harness::start(db, |c| c.workers = 0, None).await else {
        return;
    };
    let (_, job_id) = oracle_and_job(&h, "leaky", 1).await;
    run_once(&h, "w-err", runner).await;
    let viewer = h.token(Role::Viewer).await;
    let job = h
        .developer()
        .get_job(authed(
            pb::GetJobRequest {
                job_id: job_id.clone(),
            },
            &viewer,
        ))
        .await
        .expect("viewer reads the job")
        .into_inner();
    assert_eq!(job.state, pb::JobState::Failed as i32);
    for secret in ["/srv", "private", "sector", "4242", "fmnist"] {
        assert!(!job.error.contains(secret), "{secret:?} in {:?}", job.error);
    }
    assert!(job.error.contains("internal error"), "{}", job.error);
    let reference = job
        .error
        .split("(ref ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .expect("a reference id");
    assert_eq!(reference.len(), 12, "{}", job.error);
    let listed = h
        .dashboard()
        .list_jobs(authed(pb::ListJobsForDashboardRequest::default(), &viewer))
        .await
        .expect("dashboard jobs")
        .into_inner();
    assert!(listed.jobs.iter().all(|j| !j.error.contains("/srv")));

    // Dataset URIs: shown to developers, hidden from viewers (a row as registration
    // stores it).
    let ds = adaptivenet_cloud::domain::Dataset {
        id: uuid::Uuid::new_v4(),
        name: "private-data".into(),
        uri: "/srv/private/datasets/fmnist".into(),
        format: "idx".into(),
        num_samples: 10,
        created_ms: now_ms(),
        input_spec: None,
        augment: Default::default(),
        summary: None,
        digest: None,
    };
    h.app()
        .store()
        .insert_dataset(&ds)
        .await
        .expect("dataset row");
    let got = h
        .developer()
        .get_dataset(authed(
            pb::GetDatasetRequest {
                dataset_id: ds.id.to_string(),
            },
            &viewer,
        ))
        .await
        .expect("viewer gets the dataset")
        .into_inner();
    assert_eq!((got.name.as_str(), got.uri.as_str()), ("private-data", ""));
    let list = |token: String| {
        let mut dev = h.developer();
        async move {
            dev.list_datasets(authed(pb::ListDatasetsRequest::default(), &token))
                .await
                .expect("list datasets")
                .into_inner()
                .datasets
        }
    };
    // Two rows: this one and the job's uploaded dataset.
    let seen = list(viewer.clone()).await;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().any(|d| d.name == "private-data"));
    for d in &seen {
        assert_eq!(d.uri, "", "viewers do not see dataset URIs: {}", d.name);
    }
    let developer = h.token(Role::Developer).await;
    let private = list(developer)
        .await
        .into_iter()
        .find(|d| d.name == "private-data")
        .expect("listed");
    assert_eq!(private.uri, "/srv/private/datasets/fmnist");
    h.finish().await;
}
both_backends!(
    job_errors_and_dataset_uris_are_hidden_from_viewers,
    job_errors_are_public
);

// ---------------------------------------------------------------- lease fencing

/// The lease is lost between the end of the run and the registration (another worker took
/// the job over): the registration is refused, no version is added, and the new owner's
/// own registration is the only one.
async fn lost_lease_at_finish(db: Db) {
    let Some(h) = Harness::start(db, |c| c.workers = 0, None).await else {
        return;
    };
    let (_, job_id) = oracle_and_job(&h, "fenced", 2).await;
    let manifest = Arc::new(Mutex::new(None));
    let m2 = manifest.clone();
    let runner = FnRunner(move |ctx: JobContext| {
        let m2 = m2.clone();
        async move {
            let json = store_supernet_artifact(&ctx.blobs, 11).await;
            *m2.lock().expect("lock") = Some(json.clone());
            // Taken over right at the end: released (as on a stalled worker) and claimed.
            let store = ctx.checkpoints.app().store();
            let owner = ctx.job.lease_owner.clone().expect("owner");
            let now = now_ms();
            assert!(store.release_job(ctx.job.id, &owner, now).await?);
            store
                .claim_job("thief", now, now + 60_000)
                .await?
                .expect("the thief claims it");
            Ok(JobOutput {
                manifest_json: json,
            })
        }
    });
    run_once(&h, "w-slow", runner).await;
    let id = uuid::Uuid::parse_str(&job_id).expect("uuid");
    let store = h.app().store();
    let versions = |h: &Harness| {
        let store = h.app().store().clone();
        async move {
            store
                .list_supernets(
                    adaptivenet_cloud::domain::Page::new(100, "").expect("page"),
                    Some("fenced"),
                )
                .await
                .expect("list")
                .len()
        }
    };
    assert_eq!(
        versions(&h).await,
        0,
        "a worker without the lease registers nothing"
    );
    let job = store.get_job(id).await.expect("job");
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.lease_owner.as_deref(), Some("thief"));
    // The owner's registration succeeds, once.
    let json = manifest.lock().expect("lock").clone().expect("manifest");
    let s = h
        .app()
        .register_job_supernet(&job, "thief", &json)
        .await
        .expect("register")
        .expect("the owner holds the lease");
    assert_eq!(s.version, 1);
    let job = store.get_job(id).await.expect("job");
    assert_eq!(
        (job.state, job.supernet_id),
        (JobState::Succeeded, Some(s.id))
    );
    assert!(h
        .app()
        .register_job_supernet(&job, "thief", &json)
        .await
        .expect("second try")
        .is_none());
    assert_eq!(versions(&h).await, 1);
    h.finish().await;
}
both_backends!(lost_lease_at_finish_registers_nothing, lost_lease_at_finish);

// ---------------------------------------------------------------- oracle deletion

async fn delete_oracle_shared_blob(db: Db) {
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let weights = safetensors_bytes(1, 3);
    let a = upload(&h, &h.admin, "a", &weights)
        .await
        .expect("upload a")
        .oracle
        .expect("oracle");
    let b = upload(&h, &h.admin, "b", &safetensors_bytes(1, 4))
        .await
        .expect("upload b")
        .oracle
        .expect("oracle");
    // A supernet of `b` whose stem module has exactly the bytes of `a`'s weights.
    make_supernet(&h, &b.id, std::slice::from_ref(&weights)).await;
    let del = |id: String| {
        let mut dev = h.developer();
        let admin = h.admin.clone();
        async move {
            dev.delete_oracle(authed(pb::DeleteOracleRequest { oracle_id: id }, &admin))
                .await
        }
    };
    let refused = del(b.id.clone()).await.expect_err("b is referenced");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(h.app().blobs().exists(&b.weights_sha256).await);
    del(a.id.clone()).await.expect("a is unreferenced");
    let gone = h
        .developer()
        .get_oracle(authed(pb::GetOracleRequest { oracle_id: a.id }, &h.admin))
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert_eq!(
        h.app()
            .blobs()
            .read(&sha256_hex(&weights))
            .await
            .expect("still stored"),
        weights,
        "the supernet module sharing the bytes keeps its blob"
    );
    h.finish().await;
}
both_backends!(
    delete_oracle_keeps_a_blob_shared_with_a_supernet,
    delete_oracle_shared_blob
);

// ---------------------------------------------------------------- garbage collection

async fn gc_of_unreferenced_blobs(db: Db) {
    let Some(h) = Harness::start(db, |c| c.workers = 0, None).await else {
        return;
    };
    let (oracle_id, job_id) = oracle_and_job(&h, "collected", 5).await;
    let orphan = Arc::new(Mutex::new(String::new()));
    let o2 = orphan.clone();
    let runner = FnRunner(move |ctx: JobContext| {
        let o2 = o2.clone();
        async move {
            for i in 0u8..3 {
                ctx.checkpoints.save(&[i; 1000]).await?;
            }
            // A module blob of an abandoned attempt: written, never registered.
            *o2.lock().expect("lock") = ctx.blobs.put(b"abandoned module").await?.sha256;
            Ok(JobOutput {
                manifest_json: store_supernet_artifact(&ctx.blobs, 21).await,
            })
        }
    });
    run_once(&h, "w-gc", runner).await;
    let app = h.app();
    let job = app
        .store()
        .get_job(uuid::Uuid::parse_str(&job_id).expect("uuid"))
        .await
        .expect("job");
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let (_, _, modules) = app
        .store()
        .get_supernet_full(job.supernet_id.expect("supernet"))
        .await
        .expect("supernet");
    let garbage: Vec<String> = (0u8..3)
        .map(|i| sha256_hex(&[i; 1000]))
        .chain([orphan.lock().expect("lock").clone()])
        .collect();
    for g in &garbage {
        assert!(app.blobs().exists(g).await);
    }
    // Within the grace period nothing goes (the CLI, as operators run it).
    let run_gc = |grace: u64| {
        let mut c = Command::new(BIN);
        c.arg("--data-dir")
            .arg(h.dir.path())
            .arg("--database-url")
            .arg(&app.config().database_url)
            .args(["gc", "--grace-secs", &grace.to_string()]);
        let out = c.output().expect("run gc");
        assert!(out.status.success(), "gc: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = run_gc(86_400);
    assert!(first.contains(", 0 deleted"), "{first}");
    assert!(
        first.contains(&format!("{} unreferenced", garbage.len())),
        "{first}"
    );
    let second = run_gc(0);
    assert!(
        second.contains(&format!("{} deleted", garbage.len())),
        "{second}"
    );
    for g in &garbage {
        assert!(!app.blobs().exists(g).await, "{g} collected");
    }
    // Everything referenced survives and is served.
    let oracle = app
        .store()
        .get_oracle(uuid::Uuid::parse_str(&oracle_id).expect("uuid"))
        .await
        .expect("oracle");
    app.blobs()
        .read(&oracle.weights_sha256)
        .await
        .expect("oracle weights kept");
    for m in &modules {
        app.blobs().read(&m.sha256).await.expect("module kept");
    }
    // In process, as `serve` runs it: nothing left to collect.
    let r = gc::collect(app.store(), app.blobs(), Duration::ZERO)
        .await
        .expect("collect");
    assert_eq!((r.deleted, r.referenced), (0, r.scanned));
    h.finish().await;
}
both_backends!(
    gc_collects_unreferenced_checkpoints_and_modules,
    gc_of_unreferenced_blobs
);

// ---------------------------------------------------------------- full file system

/// A 512 KiB tmpfs mounted at a fresh directory, unmounted on drop; `None` (after printing
/// why) where mounting is not permitted.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount() -> Option<SmallFs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallFs { dir }),
            Ok(o) => {
                eprintln!(
                    "skipping: cannot mount a tmpfs here: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_file_system_fails_clearly_and_keeps_the_previous_state() {
    let Some(fs) = SmallFs::mount() else {
        return;
    };
    let blob_dir = fs.dir.path().join("blobs");
    let bd = blob_dir.clone();
    let Some(h) = Harness::start(
        Db::Sqlite,
        move |c| {
            c.blob_dir = bd;
            c.workers = 0;
        },
        None,
    )
    .await
    else {
        return;
    };
    // Before: a stored oracle.
    let (oracle_id, _job) = oracle_and_job(&h, "small", 6).await;
    let oracle = h
        .app()
        .store()
        .get_oracle(uuid::Uuid::parse_str(&oracle_id).expect("uuid"))
        .await
        .expect("oracle");

    // An upload larger than the free space: RESOURCE_EXHAUSTED, nothing stored, the temp
    // file gone (its space back).
    let big: Vec<u8> = (0..1_000_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761) as u8)
        .collect();
    let err = upload(&h, &h.admin, "big", &big)
        .await
        .expect_err("the file system is full");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("storage"), "{}", err.message());
    assert!(!err
        .message()
        .contains(fs.dir.path().to_str().expect("utf8")));
    assert_eq!(part_files(&blob_dir.join("tmp")), 0);
    assert!(!h.app().blobs().exists(&sha256_hex(&big)).await);
    assert_eq!(
        h.app()
            .blobs()
            .read(&oracle.weights_sha256)
            .await
            .expect("previous oracle"),
        job_oracle_weights(6)
    );
    let listed = h
        .developer()
        .list_oracles(authed(pb::ListOraclesRequest::default(), &h.admin))
        .await
        .expect("list")
        .into_inner()
        .oracles;
    assert_eq!(listed.len(), 1);

    // A checkpoint that does not fit: the job sees RESOURCE_EXHAUSTED and the previous
    // checkpoint stays the job's, readable.
    let seen = Arc::new(Mutex::new(None));
    let s2 = seen.clone();
    let runner = FnRunner(move |ctx: JobContext| {
        let s2 = s2.clone();
        async move {
            ctx.checkpoints.save(b"step 1").await?;
            let full = ctx.checkpoints.save(&vec![9u8; 1 << 20]).await;
            let kept = ctx.checkpoints.load().await?;
            *s2.lock().expect("lock") = Some((full.map_err(|e| e.code()), kept));
            Err(CloudError::exhausted("storage", "checkpoint did not fit"))
        }
    });
    run_once(&h, "w-full", runner).await;
    let (full, kept) = seen.lock().expect("lock").take().expect("runner ran");
    assert_eq!(full, Err(tonic::Code::ResourceExhausted));
    assert_eq!(kept.as_deref(), Some(&b"step 1"[..]));
    let job = h
        .app()
        .store()
        .list_jobs(
            adaptivenet_cloud::domain::Page::new(10, "").expect("page"),
            None,
        )
        .await
        .expect("jobs")
        .remove(0);
    assert_eq!(job.checkpoint_sha256, Some(sha256_hex(b"step 1")));
    assert_eq!(part_files(&blob_dir.join("tmp")), 0);

    // Space back: the same kind of write works again.
    upload(&h, &h.admin, "after", &safetensors_bytes(1, 7))
        .await
        .expect("upload after the failure");
    h.finish().await;
}
