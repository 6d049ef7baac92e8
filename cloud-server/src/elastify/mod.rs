//! Cloud-side training: the oracle from scratch and the elastification of an oracle into a
//! supernet (METHOD.md §1), as resumable, cancellable long jobs.
//!
//! # Layout
//! - [`optim`]: SGD (momentum, Nesterov, weight decay) and AdamW over `Var`s with
//!   checkpointable state; linear warm-up + cosine schedule.
//! - [`train`]: trainable modules (variables + BN running statistics), the deterministic
//!   batch sampler, losses and evaluation.
//! - [`oracle`]: [`oracle::train_oracle`], the small-input ResNet on Fashion-MNIST.
//! - [`supernet`]: [`supernet::elastify`], stage 0 (path-level feature distillation) and
//!   stage 1 (CE + KD), with checkpoints and resume.
//! - [`params`]: a job's `params_json`, parsed and range-checked (keys named in errors).
//! - [`fit`]: whether a dataset fits an oracle (channels, classes, input vs strides).
//! - [`priors`]: accuracy of the oracle and of sampled subnets on a validation split.
//! - [`train_job`]: the oracle-training job body (from scratch or fine-tuned with a new
//!   head), registered by the worker as a new oracle.
//! - [`cli`]: `clap` argument structs and `run_*` entry points with a progress bar.
//!
//! Determinism: every random draw of step `k` of stage `s` comes from a ChaCha8 stream
//! seeded by `(seed, s, k)` and the data order from `(seed, epoch)`, so a checkpoint only has
//! to record the stage, the step and the sample position; a resumed run ends bit-identical to
//! an uninterrupted one.
pub mod cli;
pub mod fit;
pub mod optim;
pub mod oracle;
pub mod params;
pub mod pipeline;
pub mod priors;
pub mod runner;
pub mod supernet;
pub mod train;
pub mod train_job;

use std::path::{Path, PathBuf};
use std::time::Duration;

use adaptivenet_core::CoreError;

use crate::error::{CloudError, Result};

pub use cli::{run_elastify, run_train_oracle, ElastifyArgs, TrainOracleArgs};
pub use oracle::{train_oracle, train_oracle_resumable, OracleReport, TrainOracleConfig};
pub use priors::evaluate_priors;
pub use supernet::{elastify, ElastifyConfig, ElastifyOutcome, ElastifyReport, StageReport};

/// One progress report of a long job (sent after every optimisation step).
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressEvent {
    /// `oracle`, `stage0` or `stage1`.
    pub stage: String,
    /// Epoch (passes over the training data so far, 0-based) of this step.
    pub epoch: u64,
    /// Steps done in this stage, 1-based (the step just finished).
    pub step: u64,
    /// Steps of this stage.
    pub stage_steps: u64,
    /// Steps done over all stages, and their total.
    pub global_step: u64,
    pub total_steps: u64,
    /// Training loss of this step.
    pub loss: f64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Training throughput of this stage since it (re)started.
    pub samples_per_sec: f64,
    /// Estimated time to the end of the job at the current throughput.
    pub eta: Duration,
}

impl ProgressEvent {
    /// Overall fraction done, in `[0, 1]`.
    pub fn fraction(&self) -> f64 {
        if self.total_steps == 0 {
            1.0
        } else {
            (self.global_step as f64 / self.total_steps as f64).clamp(0.0, 1.0)
        }
    }
}

/// Where progress goes. Implemented for closures, a `tokio::sync::watch` sender (latest value
/// wins; what the gRPC layer forwards), the job worker's [`crate::jobs::ProgressSender`] and
/// [`NoProgress`]. Never blocks the training loop.
pub trait ProgressSink {
    fn report(&mut self, event: &ProgressEvent);
}

impl<F: FnMut(&ProgressEvent)> ProgressSink for F {
    fn report(&mut self, event: &ProgressEvent) {
        self(event)
    }
}

impl ProgressSink for tokio::sync::watch::Sender<Option<ProgressEvent>> {
    fn report(&mut self, event: &ProgressEvent) {
        self.send_replace(Some(event.clone()));
    }
}

impl ProgressSink for crate::jobs::ProgressSender {
    fn report(&mut self, event: &ProgressEvent) {
        self.send(&event.stage, event.fraction());
    }
}

/// Discards progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn report(&mut self, _: &ProgressEvent) {}
}

/// Where checkpoints go: one opaque byte string, replaced atomically. The directory
/// implementation is [`DirCheckpoints`]; the job worker can wrap its `CheckpointStore`.
/// The metadata of a safetensors checkpoint, checked for its format and for belonging to this
/// run (same fingerprint) before anything is restored from it.
pub(crate) struct CheckpointMeta {
    what: &'static str,
    meta: std::collections::HashMap<String, String>,
}

impl CheckpointMeta {
    /// `mismatch` is the FAILED_PRECONDITION message for a checkpoint of another run.
    pub(crate) fn read(
        bytes: &[u8],
        what: &'static str,
        format: &str,
        fingerprint: &str,
        mismatch: &str,
    ) -> Result<Self> {
        let (_, md) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| CloudError::DataLoss(format!("{what}: {e}")))?;
        let m = CheckpointMeta {
            what,
            meta: md.metadata().clone().unwrap_or_default(),
        };
        if m.get("format")? != format {
            return Err(m.bad(format!("format {:?}", m.get("format")?)));
        }
        if m.get("fingerprint")? != fingerprint {
            return Err(CloudError::FailedPrecondition(mismatch.into()));
        }
        Ok(m)
    }

    /// A metadata value (DATA_LOSS when missing).
    pub(crate) fn get(&self, k: &str) -> Result<String> {
        self.meta
            .get(k)
            .cloned()
            .ok_or_else(|| self.bad(format!("missing {k}")))
    }

    /// A corrupt-checkpoint error naming the checkpoint kind.
    pub(crate) fn bad(&self, reason: String) -> CloudError {
        CloudError::DataLoss(format!("{}: {reason}", self.what))
    }
}

/// JSON for checkpoint metadata.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| CloudError::Internal(format!("json: {e}")))
}

pub trait CheckpointIo {
    /// The latest checkpoint, if any.
    fn load(&self) -> Result<Option<Vec<u8>>>;
    /// Replaces the checkpoint; a crash leaves the old or the new one, never a mix.
    fn save(&self, bytes: &[u8]) -> Result<()>;
}

/// Checkpoints as `<dir>/checkpoint.safetensors`, written with
/// [`adaptivenet_core::artifact::write_atomic`].
#[derive(Clone, Debug)]
pub struct DirCheckpoints {
    pub dir: PathBuf,
}

impl DirCheckpoints {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    /// The checkpoint file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
}

impl CheckpointIo for DirCheckpoints {
    fn load(&self) -> Result<Option<Vec<u8>>> {
        let p = self.path();
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CloudError::io(&p, e)),
        }
    }

    fn save(&self, bytes: &[u8]) -> Result<()> {
        adaptivenet_core::artifact::write_atomic(&self.path(), bytes).map_err(core_err)
    }
}

/// Maps a model-core error into the crate's error (see `From<CoreError>` in `error.rs`).
pub fn core_err(e: CoreError) -> CloudError {
    CloudError::from(e)
}

/// `?`-friendly conversion of core and tensor errors.
pub(crate) trait OrCloud<T> {
    fn cl(self) -> Result<T>;
}

impl<T> OrCloud<T> for std::result::Result<T, CoreError> {
    fn cl(self) -> Result<T> {
        self.map_err(core_err)
    }
}

impl<T> OrCloud<T> for std::result::Result<T, candle_core::Error> {
    fn cl(self) -> Result<T> {
        self.map_err(|e| CloudError::Internal(format!("tensor: {e}")))
    }
}
