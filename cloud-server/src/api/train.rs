//! `StartOracleTraining`: checks a request completely (name, dataset, exactly one of an
//! architecture or a base oracle that fits the dataset by `fit::check_fit`, the classes only
//! from scratch since fine-tuning replaces the head, `params_json`) and only then queues a
//! `train_oracle` job, so a bad request stores nothing.
use adaptivenet_core::model::ArchDescriptor;
use adaptivenet_proto::v1 as pb;
use tonic::Status;

use super::{convert, MAX_ARCH_JSON};
use crate::app::App;
use crate::domain::{check_name, parse_id, Job, JobKind};
use crate::elastify::fit::{check_fit, DataShape, HeadFit};
use crate::elastify::train_job::{check_scratch_arch, TrainJobParams};
use crate::error::CloudError;

/// Validates and queues an oracle-training job; the caller has authorised the write.
pub(super) async fn start_oracle_training(
    app: &App,
    r: pb::StartOracleTrainingRequest,
) -> Result<pb::Job, Status> {
    check_name("name", &r.name)?;
    if r.dataset_id.is_empty() {
        return Err(CloudError::invalid("dataset_id", "required: the dataset to train on").into());
    }
    let dataset_id = parse_id("dataset_id", &r.dataset_id)?;
    let (arch_json, base) = match (r.arch_json.is_empty(), r.base_oracle_id.is_empty()) {
        (false, false) => {
            return Err(CloudError::invalid(
                "base_oracle_id",
                "give arch_json (from scratch) or base_oracle_id (fine-tune), not both",
            )
            .into())
        }
        (true, true) => {
            return Err(CloudError::invalid(
                "arch_json",
                "give arch_json (from scratch) or base_oracle_id (fine-tune)",
            )
            .into())
        }
        (false, true) => (Some(r.arch_json), None),
        (true, false) => (None, Some(parse_id("base_oracle_id", &r.base_oracle_id)?)),
    };
    if arch_json.as_ref().is_some_and(|a| a.len() > MAX_ARCH_JSON) {
        return Err(CloudError::invalid("arch_json", "larger than 1 MiB").into());
    }
    if r.params_json.len() > 64 << 10 {
        return Err(CloudError::invalid("params_json", "larger than 64 KiB").into());
    }
    let params_json = if r.params_json.trim().is_empty() {
        "{}".to_string()
    } else {
        r.params_json
    };
    TrainJobParams::parse(&params_json)?;
    let store = app.store();
    let dataset = store.get_dataset(dataset_id).await?;
    // What registration recorded about the data (absent only for data not read at
    // registration): the model must take its channels; from scratch, have its classes.
    let shape = DataShape::of_record(&dataset);
    let (channels, classes) = (shape.channels, shape.classes);
    let oracle_id = match base {
        Some(id) => {
            let o = store.get_oracle(id).await?;
            let arch = ArchDescriptor::from_json(o.arch_json.as_bytes())
                .map_err(|e| CloudError::Internal(format!("stored oracle descriptor: {e}")))?;
            // The head is replaced for the dataset's classes: any class count fits.
            check_fit(&o.name, &arch.spec, &shape, HeadFit::Replace)?;
            Some(o.id)
        }
        None => {
            let spec =
                check_scratch_arch(arch_json.as_deref().unwrap_or_default(), channels, classes)?;
            check_fit("arch_json", &spec, &shape, HeadFit::Keep)?;
            None
        }
    };
    let job = Job::queued(
        JobKind::TrainOracle,
        oracle_id,
        Some(dataset.id),
        r.name,
        params_json,
        arch_json,
        app.config().job_max_attempts,
    );
    store.insert_job(&job).await?;
    app.emit_job(job.id);
    Ok(convert::job(&job))
}
