//! The elastification job body: what a worker runs for a `StartElastification` job.
//!
//! Reads the oracle (descriptor + weight blob) and the registered dataset (materialised from
//! the blob store or read in place, by its format, at its input spec), runs
//! [`super::pipeline`] with the job's parameters on a blocking thread (progress to
//! the job's watchers, checkpoints to the blob store so that another worker resumes after a
//! crash, cancellation at the next step), evaluates priors on a held-out split, puts every
//! module blob straight into the blob store (no scratch artifact directory) and returns the
//! manifest for registration.

use adaptivenet_core::artifact::BlobSink;
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::weights::read_tensors_from_bytes;
use futures::future::BoxFuture;

use super::fit::{check_fit, DataShape, HeadFit};
use super::params::JobParams;
use crate::blobs::sha256_hex;
use crate::datasets::DatasetFormat;
use crate::error::{CloudError, Result};
use crate::jobs::{BlobCheckpoints, JobContext, JobOutput, JobRunner, OracleOutput};
use adaptivenet_train::pipeline::{elastify_to_blobs, ElastifyPlan, TrainingData};

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
    // Checked when the job was requested too; a row written otherwise must not train either.
    let params = JobParams::parse(&ctx.job.params_json)?;
    let config = params.config();
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
    let oracle = ctx
        .oracle
        .as_ref()
        .ok_or_else(|| CloudError::Internal("elastification job without an oracle".into()))?;
    let arch = ArchDescriptor::from_json(oracle.arch_json.as_bytes())?;
    let shape = DataShape::of_record(&dataset);
    params.check_oracle(&arch.spec, &oracle.name)?;
    params.check_dataset(&shape)?;
    check_fit(&oracle.name, &arch.spec, &shape, HeadFit::Keep)?;
    let data_dir = crate::datasets::materialise(&ctx.blobs, &dataset).await?;
    let format = DatasetFormat::parse("dataset.format", &dataset.format)?;
    let weights = ctx.blobs.read(&oracle.weights_sha256).await?;
    let rt = tokio::runtime::Handle::current();
    let ck = BlobCheckpoints {
        store: ctx.checkpoints.clone(),
        rt: rt.clone(),
    };
    let mut blobs = StoreBlobs {
        blobs: ctx.blobs.clone(),
        rt: rt.clone(),
    };
    let progress = ctx.progress.clone();
    let cancel = ctx.cancel.clone();
    let plan = ElastifyPlan {
        config,
        val_size: params.val_size,
        priors: params.priors,
        max_train_images: params.max_train_images,
        oracle_digest: sha256_hex(&weights),
    };
    let manifest = tokio::task::spawn_blocking(move || -> Result<_> {
        let oracle = Model::load(&arch, read_tensors_from_bytes(&weights)?)?;
        let classes = dataset.summary.as_ref().map(|s| s.classes.as_slice());
        let data = TrainingData::read(
            &data_dir,
            format,
            dataset.input_spec.as_ref(),
            dataset.augment,
            classes,
        )?;
        let mut sink = progress;
        let (manifest, _) = elastify_to_blobs(
            &oracle,
            &data,
            &plan,
            &mut sink,
            Some(&ck),
            &cancel,
            &mut blobs,
        )?;
        Ok(manifest)
    })
    .await
    .map_err(|e| CloudError::Internal(format!("elastification thread: {e}")))??;
    Ok(JobOutput {
        manifest_json: manifest.to_json()?,
    })
}

/// Module blobs straight into the blob store (digest-verified there), from the blocking
/// training thread: no scratch artifact directory to write and read back.
struct StoreBlobs {
    blobs: crate::blobs::BlobStore,
    rt: tokio::runtime::Handle,
}

impl BlobSink for StoreBlobs {
    type Error = CloudError;
    fn put(&mut self, sha256: &str, bytes: &[u8]) -> Result<()> {
        let r = self.rt.block_on(self.blobs.put(bytes))?;
        if r.sha256 != sha256 {
            return Err(CloudError::Internal(format!(
                "module blob {sha256} stored as {}",
                r.sha256
            )));
        }
        Ok(())
    }
}
