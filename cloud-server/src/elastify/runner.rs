//! The elastification job body: what a worker runs for a `StartElastification` job.
//!
//! Reads the oracle (descriptor + weight blob) and the registered dataset (materialised from
//! the blob store or read in place, by its format, at its input spec), runs
//! [`super::pipeline`] with the job's parameters on a blocking thread (progress to
//! the job's watchers, checkpoints to the blob store so that another worker resumes after a
//! crash, cancellation at the next step), evaluates priors on a held-out split, writes every
//! module blob to the blob store and returns the manifest for registration.
use std::sync::Arc;

use adaptivenet_core::artifact::read_manifest;
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::weights::read_tensors_from_bytes;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::pipeline::{elastify_to_artifact, ElastifyPlan, TrainingData};
use super::{CheckpointIo, ElastifyConfig, OrCloud};
use crate::blobs::sha256_hex;
use crate::datasets::DatasetFormat;
use crate::error::{CloudError, Result};
use crate::jobs::{CheckpointStore, JobContext, JobOutput, JobRunner, OracleOutput};

/// The job's `params_json`: every field optional, unknown fields rejected (a typo must not
/// silently train with defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobParams {
    pub branches: Vec<String>,
    pub seed: u64,
    pub stage0_steps: u64,
    pub stage1_steps: u64,
    pub batch: usize,
    pub lr_stage0: f64,
    pub lr_stage1: f64,
    pub temperature: f64,
    /// Weight of an original block against 1 per branch when sampling paths.
    pub original_weight: f64,
    pub checkpoint_every: u64,
    /// Images held out of training for the cloud-side priors.
    pub val_size: usize,
    /// Subnets evaluated for the priors (all if the space is at most this large).
    pub priors: usize,
    /// Train on at most this many images (0: all); quick presets use a subset.
    pub max_train_images: usize,
}

impl Default for JobParams {
    fn default() -> Self {
        let c = ElastifyConfig::default();
        Self {
            branches: c.branches,
            seed: c.seed,
            stage0_steps: c.stage0_steps,
            stage1_steps: c.stage1_steps,
            batch: c.batch,
            lr_stage0: c.lr_stage0,
            lr_stage1: c.lr_stage1,
            temperature: c.temperature,
            original_weight: c.original_weight,
            checkpoint_every: 50,
            val_size: 1000,
            priors: 160,
            max_train_images: 0,
        }
    }
}

impl JobParams {
    /// Parses `params_json` (empty means defaults); errors name the field.
    pub fn parse(json: &str) -> Result<Self> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(json).map_err(|e| CloudError::invalid("params_json", e.to_string()))
    }

    pub fn config(&self) -> ElastifyConfig {
        ElastifyConfig {
            branches: self.branches.clone(),
            seed: self.seed,
            stage0_steps: self.stage0_steps,
            stage1_steps: self.stage1_steps,
            batch: self.batch,
            lr_stage0: self.lr_stage0,
            lr_stage1: self.lr_stage1,
            temperature: self.temperature,
            original_weight: self.original_weight,
            checkpoint_every: self.checkpoint_every,
            ..ElastifyConfig::default()
        }
    }
}

/// Checkpoints of a job in the blob store, from the blocking training thread.
pub(crate) struct BlobCheckpoints {
    pub(crate) store: CheckpointStore,
    pub(crate) rt: tokio::runtime::Handle,
}

impl CheckpointIo for BlobCheckpoints {
    fn load(&self) -> Result<Option<Vec<u8>>> {
        self.rt.block_on(self.store.load())
    }
    fn save(&self, bytes: &[u8]) -> Result<()> {
        self.rt.block_on(self.store.save(bytes))
    }
}

/// Runs elastification and oracle-training jobs on registered datasets (uploaded or
/// `file://`, IDX or ImageFolder).
#[derive(Debug, Default)]
pub struct ElastifyRunner;

impl JobRunner for ElastifyRunner {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<JobOutput>> {
        Box::pin(run_job(ctx))
    }

    fn train_oracle(&self, ctx: JobContext) -> BoxFuture<'static, Result<OracleOutput>> {
        Box::pin(super::train_job::run_train_job(ctx))
    }
}

async fn run_job(ctx: JobContext) -> Result<JobOutput> {
    let params = JobParams::parse(&ctx.job.params_json)?;
    let config = params.config();
    config.validate()?;
    let dataset_id = ctx.job.dataset_id.ok_or_else(|| {
        CloudError::FailedPrecondition(
            "dataset_id: elastification trains on a registered data set; register one first".into(),
        )
    })?;
    let dataset = ctx
        .checkpoints
        .app()
        .store()
        .get_dataset(dataset_id)
        .await?;
    let data_dir = crate::datasets::materialise(&ctx.blobs, &dataset).await?;
    let format = DatasetFormat::parse("dataset.format", &dataset.format)?;
    let oracle = ctx
        .oracle
        .as_ref()
        .ok_or_else(|| CloudError::Internal("elastification job without an oracle".into()))?;
    let arch = ArchDescriptor::from_json(oracle.arch_json.as_bytes()).cl()?;
    let weights = ctx.blobs.read(&oracle.weights_sha256).await?;
    let out_dir = tempfile_dir(ctx.blobs.root())?;
    let rt = tokio::runtime::Handle::current();
    let ck = BlobCheckpoints {
        store: ctx.checkpoints.clone(),
        rt: rt.clone(),
    };
    let progress = ctx.progress.clone();
    let cancel = ctx.cancel.clone();
    let out = Arc::new(out_dir);
    let out2 = out.clone();
    let plan = ElastifyPlan {
        config,
        val_size: params.val_size,
        priors: params.priors,
        max_train_images: params.max_train_images,
        oracle_digest: sha256_hex(&weights),
    };
    tokio::task::spawn_blocking(move || -> Result<()> {
        let oracle = Model::load(&arch, read_tensors_from_bytes(&weights).cl()?).cl()?;
        let classes = dataset.summary.as_ref().map(|s| s.classes.as_slice());
        let data = TrainingData::read(
            &data_dir,
            format,
            dataset.input_spec.as_ref(),
            dataset.augment,
            classes,
        )?;
        let mut sink = progress;
        elastify_to_artifact(
            &oracle,
            &data,
            &plan,
            &mut sink,
            Some(&ck),
            &cancel,
            out2.path(),
        )?;
        Ok(())
    })
    .await
    .map_err(|e| CloudError::Internal(format!("elastification thread: {e}")))??;
    let manifest = read_manifest(out.path()).cl()?;
    for (name, m) in manifest.modules() {
        let bytes = std::fs::read(adaptivenet_core::artifact::blob_path(out.path(), &m.sha256))
            .map_err(|e| CloudError::Internal(format!("module {name}: {e}")))?;
        ctx.blobs.put(&bytes).await?;
    }
    Ok(JobOutput {
        manifest_json: manifest.to_json().cl()?,
    })
}

/// A scratch directory for the artifact next to the blob store (same file system).
fn tempfile_dir(root: &std::path::Path) -> Result<tempfile::TempDir> {
    let parent = root.join("tmp");
    std::fs::create_dir_all(&parent).map_err(|e| CloudError::io(&parent, e))?;
    tempfile::tempdir_in(&parent).map_err(|e| CloudError::io(&parent, e))
}
