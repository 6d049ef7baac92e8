//! The elastification job body: what a worker runs for a `StartElastification` job.
//!
//! Reads the oracle (descriptor + weight blob) and the registered data set, runs
//! [`elastify`](super::elastify) with the job's parameters on a blocking thread (progress to
//! the job's watchers, checkpoints to the blob store so that another worker resumes after a
//! crash, cancellation at the next step), evaluates priors on a held-out split, writes every
//! module blob to the blob store and returns the manifest for registration.
use std::path::PathBuf;
use std::sync::Arc;

use adaptivenet_core::artifact::{read_manifest, write_artifact, InputSpec};
use adaptivenet_core::data::idx::fashion_mnist;
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::weights::read_tensors_from_bytes;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::cli::split_validation;
use super::priors::{evaluate_priors, prior_subnets};
use super::{elastify, CheckpointIo, ElastifyConfig, OrCloud};
use crate::blobs::sha256_hex;
use crate::error::{CloudError, Result};
use crate::jobs::{CheckpointStore, JobContext, JobOutput, JobRunner};

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
struct BlobCheckpoints {
    store: CheckpointStore,
    rt: tokio::runtime::Handle,
}

impl CheckpointIo for BlobCheckpoints {
    fn load(&self) -> Result<Option<Vec<u8>>> {
        self.rt.block_on(self.store.load())
    }
    fn save(&self, bytes: &[u8]) -> Result<()> {
        self.rt.block_on(self.store.save(bytes))
    }
}

/// Runs elastification jobs on registered IDX (Fashion-MNIST layout) data sets.
#[derive(Debug, Default)]
pub struct ElastifyRunner;

impl JobRunner for ElastifyRunner {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<JobOutput>> {
        Box::pin(run_job(ctx))
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
    let data_dir = PathBuf::from(dataset.uri.trim_start_matches("file://"));
    let arch = ArchDescriptor::from_json(ctx.oracle.arch_json.as_bytes()).cl()?;
    let weights = ctx.blobs.read(&ctx.oracle.weights_sha256).await?;
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
    let digest = sha256_hex(&weights);
    tokio::task::spawn_blocking(move || -> Result<()> {
        let oracle = Model::load(&arch, read_tensors_from_bytes(&weights).cl()?).cl()?;
        let full = fashion_mnist(&data_dir, true).cl()?;
        let (mut train, val) = split_validation(&full, params.val_size, params.seed)?;
        if params.max_train_images > 0 && params.max_train_images < train.len() {
            let idx: Vec<usize> = (0..params.max_train_images).collect();
            train = train.subset(&idx).cl()?;
        }
        let mut sink = progress;
        let res = elastify(&oracle, &config, &train, &mut sink, Some(&ck), &cancel)?;
        let subnets = prior_subnets(&res.supernet, params.priors, params.seed)?;
        let priors = evaluate_priors(&res.supernet, &subnets, &val, "validation", 500)?;
        let input = InputSpec {
            shape: [full.channels, full.height, full.width],
            mean: vec![0.2860; full.channels],
            std: vec![0.3530; full.channels],
            class_names: full.class_names.clone(),
        };
        write_artifact(out2.path(), &res.supernet, input, &digest, priors).cl()?;
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
