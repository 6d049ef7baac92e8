//! Jobs: the [`JobRunner`] plug-in point and the worker loop that leases jobs from the
//! database queue, heartbeats the lease, relays progress, stores checkpoints and settles the
//! job. Jobs have a kind ([`JobKind`]): elastification results are registered as supernets,
//! oracle-training results as oracles; lease, checkpoints, progress, cancel and resume are the
//! same for both.
//!
//! Crash recovery: a worker that dies stops heartbeating; once its lease expires any other
//! worker claims the job (attempt + 1) and the runner resumes from
//! [`CheckpointStore::load`]. Every write of a running job is fenced by the lease owner, so a
//! worker that comes back after losing its lease cannot clobber the new owner's work.
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::App;
use crate::blobs::BlobStore;
pub use crate::domain::OracleOutput;
use crate::domain::{now_ms, Job, JobKind, JobState, Oracle};
use crate::error::{CloudError, Result};
use crate::ops::metrics::Metrics;

/// Progress of a running job.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub stage: String,
    /// Overall fraction in [0, 1].
    pub fraction: f64,
}

/// Sends progress to the worker loop, which persists it (coalesced) and wakes watchers.
/// Never blocks: only the latest value matters.
#[derive(Debug, Clone)]
pub struct ProgressSender(watch::Sender<Progress>);

impl ProgressSender {
    pub fn send(&self, stage: &str, fraction: f64) {
        let _ = self.0.send(Progress {
            stage: stage.to_string(),
            fraction: fraction.clamp(0.0, 1.0),
        });
    }
}

/// A training run's progress, as the stage and overall fraction the job row keeps.
impl adaptivenet_train::ProgressSink for ProgressSender {
    fn report(&mut self, event: &adaptivenet_train::ProgressEvent) {
        self.send(&event.stage, event.fraction());
    }
}

/// Checkpoints of a job in the blob store, from the blocking training thread.
pub struct BlobCheckpoints {
    pub store: CheckpointStore,
    pub rt: tokio::runtime::Handle,
}

impl adaptivenet_train::CheckpointIo for BlobCheckpoints {
    fn load(&self) -> adaptivenet_train::Result<Option<Vec<u8>>> {
        self.rt.block_on(self.store.load()).map_err(checkpoint_err)
    }
    fn save(&self, bytes: &[u8]) -> adaptivenet_train::Result<()> {
        self.rt
            .block_on(self.store.save(bytes))
            .map_err(checkpoint_err)
    }
}

/// The store's error, carried through training unchanged (see `From<TrainError>`).
fn checkpoint_err(e: CloudError) -> adaptivenet_train::TrainError {
    adaptivenet_train::TrainError::Checkpoints(Box::new(e))
}

/// Checkpoints of one job attempt: blobs in the blob store, the latest digest in the job row.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    app: App,
    job_id: Uuid,
    worker_id: String,
}

impl CheckpointStore {
    /// The application the job runs in (store, blobs, config).
    pub fn app(&self) -> &App {
        &self.app
    }

    /// Stores a checkpoint; fails with CANCELLED if the lease was lost meanwhile.
    pub async fn save(&self, data: &[u8]) -> Result<()> {
        let r = self.app.blobs().put(data).await?;
        let ok = self
            .app
            .store()
            .job_checkpoint(self.job_id, &self.worker_id, &r.sha256, now_ms())
            .await?;
        if !ok {
            return Err(CloudError::Cancelled("job lease lost".into()));
        }
        Ok(())
    }

    /// The latest checkpoint of the job, from any earlier attempt.
    pub async fn load(&self) -> Result<Option<Vec<u8>>> {
        let job = self.app.store().get_job(self.job_id).await?;
        match job.checkpoint_sha256 {
            Some(sha) => Ok(Some(self.app.blobs().read(&sha).await?)),
            None => Ok(None),
        }
    }
}

/// Everything a runner gets for one attempt.
#[derive(Debug)]
pub struct JobContext {
    pub job: Job,
    /// The job's input oracle (None for an oracle trained from scratch).
    pub oracle: Option<Oracle>,
    pub progress: ProgressSender,
    /// Cancelled on user cancel, lost lease or worker shutdown: stop soon after, return
    /// `Err(CloudError::Cancelled)` (a checkpoint saved before that is kept).
    pub cancel: CancellationToken,
    pub checkpoints: CheckpointStore,
    /// To read the oracle weights and write module blobs.
    pub blobs: BlobStore,
}

/// What a successful run produced: a supernet manifest whose `modules[].sha256` blobs the
/// runner has already written to `ctx.blobs`.
#[derive(Debug, Clone)]
pub struct JobOutput {
    pub manifest_json: Vec<u8>,
}

/// The bodies of jobs, by kind (the real ones live in `elastify`).
pub trait JobRunner: Send + Sync + 'static {
    /// An elastification job.
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<JobOutput>>;

    /// An oracle-training job. Runners that only elastify fail such jobs.
    fn train_oracle(&self, _ctx: JobContext) -> BoxFuture<'static, Result<OracleOutput>> {
        Box::pin(async {
            Err(CloudError::FailedPrecondition(
                "this worker does not train oracles".into(),
            ))
        })
    }
}

/// What a finished attempt produced, by job kind.
enum Outcome {
    Supernet(JobOutput),
    Oracle(OracleOutput),
}

/// Why a running attempt was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupt {
    None,
    UserCancel,
    LeaseLost,
    Shutdown,
}

/// A job worker: claims jobs one at a time and runs them with a [`JobRunner`].
pub struct Worker {
    app: App,
    runner: Arc<dyn JobRunner>,
    id: String,
}

impl Worker {
    pub fn new(app: App, runner: Arc<dyn JobRunner>, id: impl Into<String>) -> Self {
        Worker {
            app,
            runner,
            id: id.into(),
        }
    }

    /// Runs until `stop` is cancelled; a job in progress at that point is given back to the
    /// queue.
    pub async fn run(self, stop: CancellationToken) {
        let mut wake = self.app.subscribe_jobs();
        loop {
            if stop.is_cancelled() {
                return;
            }
            match self.poll_once(&stop).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => tracing::warn!(worker = %self.id, error = %e, "job queue poll failed"),
            }
            let poll = self.app.config().job_poll;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
                _ = wake.recv() => {}
            }
        }
    }

    /// Claims and runs at most one job; returns whether there was one.
    pub async fn poll_once(&self, stop: &CancellationToken) -> Result<bool> {
        let store = self.app.store();
        let now = now_ms();
        store.reap_jobs(now).await?;
        let lease = self.app.config().job_lease.as_millis() as i64;
        let Some(claimed) = store.claim_job(&self.id, now, now + lease).await? else {
            return Ok(false);
        };
        let job = claimed.job;
        tracing::info!(worker = %self.id, job = %job.id, attempt = job.attempts, "job claimed");
        self.app.emit_job(job.id);
        self.run_job(job, stop).await?;
        Ok(true)
    }

    async fn run_job(&self, job: Job, stop: &CancellationToken) -> Result<()> {
        let app = &self.app;
        let store = app.store();
        let id = job.id;
        let oracle = match job.oracle_id {
            Some(o) => Some(store.get_oracle(o).await?),
            None => None,
        };
        let (ptx, mut prx) = watch::channel(Progress {
            stage: job.stage.clone(),
            fraction: job.progress,
        });
        let cancel = CancellationToken::new();
        let ctx = JobContext {
            job: job.clone(),
            oracle,
            progress: ProgressSender(ptx),
            cancel: cancel.clone(),
            checkpoints: CheckpointStore {
                app: app.clone(),
                job_id: id,
                worker_id: self.id.clone(),
            },
            blobs: app.blobs().clone(),
        };
        let body: BoxFuture<'static, Result<Outcome>> = match job.kind {
            JobKind::Elastify => {
                let f = self.runner.run(ctx);
                Box::pin(async move { f.await.map(Outcome::Supernet) })
            }
            JobKind::TrainOracle => {
                let f = self.runner.train_oracle(ctx);
                Box::pin(async move { f.await.map(Outcome::Oracle) })
            }
        };
        let mut run = tokio::spawn(body);
        let lease = app.config().job_lease;
        let mut beat = tokio::time::interval((lease / 3).max(Duration::from_millis(20)));
        beat.tick().await;
        let mut interrupt = Interrupt::None;
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = beat.tick() => {
                    let now = now_ms();
                    match store.heartbeat_job(id, &self.id, now, now + lease.as_millis() as i64).await {
                        Ok(None) => { interrupt = Interrupt::LeaseLost; cancel.cancel(); }
                        Ok(Some(true)) if interrupt == Interrupt::None => {
                            interrupt = Interrupt::UserCancel; cancel.cancel();
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(job = %id, error = %e, "lease heartbeat failed"),
                    }
                }
                changed = prx.changed() => {
                    if changed.is_ok() {
                        let p = prx.borrow_and_update().clone();
                        if let Ok(true) = store.job_progress(id, &self.id, &p.stage, p.fraction, now_ms()).await {
                            app.emit_job(id);
                        }
                    }
                }
                _ = stop.cancelled(), if interrupt == Interrupt::None => {
                    interrupt = Interrupt::Shutdown; cancel.cancel();
                }
            }
        };
        let now = now_ms();
        let outcome = match result {
            Ok(r) => r,
            Err(join) => Err(CloudError::Internal(format!("job runner panicked: {join}"))),
        };
        match (outcome, interrupt) {
            (_, Interrupt::LeaseLost) => {
                tracing::warn!(job = %id, "lease lost; another worker owns the job now");
            }
            (Ok(out), _) => {
                // The lease is renewed until the registration settles: checking every module
                // blob may outlast it on a slow store. The registration is fenced anyway.
                let register = async {
                    match &out {
                        Outcome::Supernet(o) => app
                            .register_job_supernet(&job, &self.id, &o.manifest_json)
                            .await
                            .map(|s| s.map(|s| format!("supernet {} v{}", s.id, s.version))),
                        Outcome::Oracle(o) => app
                            .register_job_oracle(&job, &self.id, o)
                            .await
                            .map(|o| o.map(|o| format!("oracle {}", o.id))),
                    }
                };
                tokio::pin!(register);
                let registered = loop {
                    tokio::select! {
                        r = &mut register => break r,
                        _ = beat.tick() => {
                            let now = now_ms();
                            let until = now + lease.as_millis() as i64;
                            if let Err(e) = store.heartbeat_job(id, &self.id, now, until).await {
                                tracing::warn!(job = %id, error = %e, "lease heartbeat failed");
                            }
                        }
                    }
                };
                match registered {
                    Ok(Some(result)) => {
                        tracing::info!(job = %id, %result, "job succeeded");
                        Metrics::inc(&app.metrics().jobs_finished_total);
                    }
                    Ok(None) => {
                        tracing::warn!(job = %id, "lease lost before registration; result dropped");
                    }
                    Err(e) => {
                        let what = match job.kind {
                            JobKind::Elastify => "registering the supernet failed",
                            JobKind::TrainOracle => "registering the oracle failed",
                        };
                        let msg = public_job_error(id, what, &e);
                        store
                            .finish_job(id, &self.id, JobState::Failed, Some(&msg), None, now_ms())
                            .await?;
                        Metrics::inc(&app.metrics().jobs_finished_total);
                    }
                }
            }
            (Err(_), Interrupt::Shutdown) => {
                store.release_job(id, &self.id, now).await?;
                tracing::info!(job = %id, "job released on shutdown");
            }
            (Err(_), Interrupt::UserCancel) | (Err(CloudError::Cancelled(_)), Interrupt::None) => {
                store
                    .finish_job(
                        id,
                        &self.id,
                        JobState::Cancelled,
                        Some("cancelled"),
                        None,
                        now,
                    )
                    .await?;
                Metrics::inc(&app.metrics().jobs_finished_total);
            }
            (Err(e), Interrupt::None) => {
                let msg = public_job_error(id, "job failed", &e);
                store
                    .finish_job(id, &self.id, JobState::Failed, Some(&msg), None, now)
                    .await?;
                Metrics::inc(&app.metrics().jobs_finished_total);
            }
        }
        app.emit_job(id);
        Ok(())
    }
}

/// The error text stored on a failed job, which every reader of the job (viewers included)
/// sees: what kind of failure it was and a reference id, never paths, I/O or database
/// text. The full error is logged here with the same reference id.
pub fn public_job_error(job: Uuid, context: &str, e: &CloudError) -> String {
    let reference = &Uuid::new_v4().simple().to_string()[..12];
    tracing::warn!(%job, reference, error = %e, "{context}");
    let safe = |t: &str| !t.contains('/') && !t.contains('\\');
    let what = match e {
        CloudError::InvalidArgument { field, reason } if safe(field) && safe(reason) => {
            e.to_string()
        }
        CloudError::InvalidArgument { field, .. } if safe(field) => {
            format!("invalid argument: {field}")
        }
        CloudError::InvalidArgument { .. } => "invalid argument".to_string(),
        CloudError::NotFound { .. } | CloudError::AlreadyExists { .. } => e.to_string(),
        CloudError::FailedPrecondition(m) if safe(m) => e.to_string(),
        CloudError::FailedPrecondition(_) => "failed precondition".to_string(),
        CloudError::ResourceExhausted { what, .. } => format!("resource exhausted: {what}"),
        CloudError::Cancelled(_) => "cancelled".to_string(),
        CloudError::Unavailable(_) => "a dependency was unavailable".to_string(),
        CloudError::DataLoss(_) => "stored data failed its integrity check".to_string(),
        CloudError::Unauthenticated(_) | CloudError::PermissionDenied(_) => {
            "not authorised".to_string()
        }
        // Database, migration, I/O, internal, and anything added later.
        _ => "internal error".to_string(),
    };
    format!("{context}: {what} (ref {reference}; details in the server log)")
}

/// Starts `n` in-process workers; they stop when `stop` is cancelled.
pub fn spawn_workers(
    app: &App,
    runner: Arc<dyn JobRunner>,
    n: usize,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let w = Worker::new(
                app.clone(),
                runner.clone(),
                format!("{}-{i}", worker_id_prefix()),
            );
            tokio::spawn(w.run(stop.clone()))
        })
        .collect()
}

/// A process-unique worker id prefix (host name is not available portably; a UUID is).
pub fn worker_id_prefix() -> String {
    format!("w-{}", &Uuid::new_v4().simple().to_string()[..8])
}
