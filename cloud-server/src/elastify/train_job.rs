//! The oracle-training job body: what a worker runs for a `StartOracleTraining` job.
//!
//! Trains an oracle on a registered dataset, from scratch (the job's `arch_json`) or
//! fine-tuned from an uploaded oracle whose classifier is replaced by a fresh one for the
//! dataset's classes ([`Model::with_new_head`]). The dataset is read exactly like an
//! elastification job reads it (materialised, by its format, at its input spec, with its
//! normalisation and augmentation); training runs on a blocking thread with checkpoints in the
//! blob store, so cancel, crash and resume behave as for elastification. The result (weights
//! as safetensors + a chain descriptor) and a readable report go back to the worker, which
//! validates and registers them as a new oracle, fenced by the lease.
use adaptivenet_core::data::{Dataset, Holdout};
use adaptivenet_core::model::{ArchDescriptor, Model, ModelSpec};
use adaptivenet_core::weights::read_tensors_from_bytes;
use serde::{Deserialize, Serialize};

use super::cli::{TrainDefaults, FINETUNE_DEFAULTS, SCRATCH_DEFAULTS};
use super::fit::{check_fit, DataShape, HeadFit};
use crate::datasets::DatasetFormat;
use crate::error::{CloudError, Result};
use crate::jobs::{BlobCheckpoints, JobContext, OracleOutput};
use adaptivenet_train::oracle::{train_oracle_resumable, TrainOracleConfig};
use adaptivenet_train::pipeline::TrainingData;

/// The keys `params_json` of an oracle-training job may hold.
pub const TRAIN_PARAM_KEYS: [&str; 10] = [
    "steps",
    "epochs",
    "batch",
    "lr",
    "warmup_steps",
    "weight_decay",
    "seed",
    "checkpoint_every",
    "max_train_images",
    "val_size",
];

/// Upper bounds that keep a typo from queueing a job that runs for weeks.
const MAX_STEPS: u64 = 10_000_000;
const MAX_EPOCHS: f64 = 1000.0;

/// An oracle-training job's `params_json`. Every key is optional; unset ones take the mode's
/// defaults ([`FINETUNE_DEFAULTS`] or [`SCRATCH_DEFAULTS`], batch 128, weight decay 5e-4,
/// a checkpoint every 50 steps).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainJobParams {
    /// Optimisation steps (exclusive with `epochs`).
    pub steps: Option<u64>,
    /// Passes over the training images (exclusive with `steps`).
    pub epochs: Option<f64>,
    pub batch: Option<usize>,
    /// Peak learning rate (SGD, Nesterov momentum 0.9, warm-up + cosine decay).
    pub lr: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub weight_decay: Option<f64>,
    /// Seeds the initialisation (the new head when fine-tuning), batches, augmentation and the
    /// held-out split.
    pub seed: u64,
    pub checkpoint_every: Option<u64>,
    /// Train on at most this many images (0: all).
    pub max_train_images: usize,
    /// Training images held out (stratified) for the reported accuracy when the dataset has
    /// no test split (default: a fifth of them, at most 1000; 0: no accuracy).
    pub val_size: Option<usize>,
}

impl TrainJobParams {
    /// Parses and range-checks `params_json` (empty means defaults); errors name the key as
    /// `params_json.KEY`.
    pub fn parse(json: &str) -> Result<Self> {
        let v: serde_json::Value = if json.trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_str(json)
                .map_err(|e| CloudError::invalid("params_json", e.to_string()))?
        };
        let obj = v
            .as_object()
            .ok_or_else(|| CloudError::invalid("params_json", "must be a JSON object"))?;
        for (k, val) in obj {
            if !TRAIN_PARAM_KEYS.contains(&k.as_str()) {
                return Err(CloudError::invalid(
                    format!("params_json.{k}"),
                    format!("unknown key (known: {})", TRAIN_PARAM_KEYS.join(", ")),
                ));
            }
            // Each key alone, so a type error names its key.
            let mut one = serde_json::Map::new();
            one.insert(k.clone(), val.clone());
            serde_json::from_value::<TrainJobParams>(serde_json::Value::Object(one))
                .map_err(|e| CloudError::invalid(format!("params_json.{k}"), e.to_string()))?;
        }
        let p: TrainJobParams = serde_json::from_value(v)
            .map_err(|e| CloudError::invalid("params_json", e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// Range checks that do not need the data.
    pub fn validate(&self) -> Result<()> {
        let field = |k: &str| format!("params_json.{k}");
        if self.steps.is_some() && self.epochs.is_some() {
            return Err(CloudError::invalid(
                field("epochs"),
                "give steps or epochs, not both",
            ));
        }
        if let Some(s) = self.steps {
            if !(1..=MAX_STEPS).contains(&s) {
                return Err(CloudError::invalid(
                    field("steps"),
                    format!("{s} not in 1..={MAX_STEPS}"),
                ));
            }
        }
        if let Some(e) = self.epochs {
            if !(e.is_finite() && e > 0.0 && e <= MAX_EPOCHS) {
                return Err(CloudError::invalid(
                    field("epochs"),
                    format!("{e} not in (0, {MAX_EPOCHS}]"),
                ));
            }
        }
        if let Some(b) = self.batch {
            if !(1..=4096).contains(&b) {
                return Err(CloudError::invalid(
                    field("batch"),
                    format!("{b} not in 1..=4096"),
                ));
            }
        }
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0 && lr <= 10.0) {
                return Err(CloudError::invalid(
                    field("lr"),
                    format!("{lr} not in (0, 10]"),
                ));
            }
        }
        if let Some(w) = self.weight_decay {
            if !(w.is_finite() && (0.0..1.0).contains(&w)) {
                return Err(CloudError::invalid(
                    field("weight_decay"),
                    format!("{w} not in [0, 1)"),
                ));
            }
        }
        if let (Some(w), Some(s)) = (self.warmup_steps, self.steps) {
            if w > s {
                return Err(CloudError::invalid(
                    field("warmup_steps"),
                    format!("{w} exceeds steps {s}"),
                ));
            }
        }
        if let Some(v) = self.val_size {
            if v > 1_000_000 {
                return Err(CloudError::invalid(
                    field("val_size"),
                    format!("{v} not in 0..=1000000"),
                ));
            }
        }
        Ok(())
    }

    /// The recipe for `train_len` training images: the mode's defaults where unset.
    pub fn recipe(&self, fine_tune: bool, train_len: usize) -> TrainOracleConfig {
        let d: TrainDefaults = if fine_tune {
            FINETUNE_DEFAULTS
        } else {
            SCRATCH_DEFAULTS
        };
        let batch = self.batch.unwrap_or(128);
        let per_epoch = TrainOracleConfig::steps_for_epochs(1.0, train_len, batch);
        let steps = self.steps.unwrap_or_else(|| {
            TrainOracleConfig::steps_for_epochs(self.epochs.unwrap_or(d.epochs), train_len, batch)
        });
        let warmup = self
            .warmup_steps
            .unwrap_or((d.warmup_epochs * per_epoch as f64) as u64)
            .min(steps);
        TrainOracleConfig {
            steps,
            batch,
            lr: self.lr.unwrap_or(d.lr),
            warmup_steps: warmup,
            weight_decay: self.weight_decay.unwrap_or(5e-4),
            seed: self.seed,
            checkpoint_every: self.checkpoint_every.unwrap_or(50),
            ..TrainOracleConfig::default()
        }
    }
}

/// The readable summary of an oracle-training job (the job's `report_json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJobReport {
    /// `fine-tune` or `scratch`.
    pub mode: String,
    pub classes: usize,
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub train_images: usize,
    /// Top-1 accuracy on `accuracy_split` (absent when nothing was held out).
    pub accuracy: Option<f64>,
    /// `test` (the dataset's test split) or `held-out` (images kept out of training).
    pub accuracy_split: Option<String>,
    pub accuracy_images: usize,
    pub first_loss: f64,
    pub final_mean_loss: f64,
    pub images_per_sec: f64,
    pub train_seconds: f64,
    pub threads: usize,
}

/// Checks a from-scratch architecture against a dataset before queueing: it parses, and its
/// input channels and classes are the dataset's (when registration recorded them).
pub fn check_scratch_arch(
    arch_json: &str,
    channels: Option<usize>,
    classes: Option<usize>,
) -> Result<ModelSpec> {
    let arch = ArchDescriptor::from_json(arch_json.as_bytes())
        .map_err(|e| CloudError::invalid("arch_json", e.to_string()))?;
    let spec = arch.spec;
    check_channels(&spec, channels, "arch_json")?;
    if let Some(c) = classes {
        if c != spec.head.classes {
            return Err(CloudError::invalid(
                "arch_json",
                format!(
                    "num_classes is {}, the dataset has {c} classes",
                    spec.head.classes
                ),
            ));
        }
    }
    Ok(spec)
}

/// The model must take the dataset's channels (a request-field error naming `field`; the
/// stored-data checks are `fit::check_fit`'s).
fn check_channels(spec: &ModelSpec, channels: Option<usize>, field: &str) -> Result<()> {
    match channels {
        Some(c) if c != spec.stem.cin => Err(CloudError::invalid(
            field,
            format!(
                "the model takes {}-channel images, the dataset has {c} channels",
                spec.stem.cin
            ),
        )),
        _ => Ok(()),
    }
}

/// Runs one oracle-training job attempt.
pub async fn run_train_job(ctx: JobContext) -> Result<OracleOutput> {
    let params = TrainJobParams::parse(&ctx.job.params_json)?;
    let app = ctx.checkpoints.app().clone();
    let dataset_id = ctx.job.dataset_id.ok_or_else(|| {
        CloudError::FailedPrecondition("dataset_id: oracle training needs a dataset".into())
    })?;
    let dataset = app.store().get_dataset(dataset_id).await?;
    let data_dir = crate::datasets::materialise(&ctx.blobs, &dataset).await?;
    let format = DatasetFormat::parse("dataset.format", &dataset.format)?;
    // The starting point: an uploaded oracle's weights (fine-tune) or an architecture.
    enum Base {
        Pretrained(ArchDescriptor, Vec<u8>),
        Scratch(ModelSpec),
    }
    let base_name = ctx
        .oracle
        .as_ref()
        .map_or_else(String::new, |o| o.name.clone());
    let base = match (&ctx.oracle, &ctx.job.arch_json) {
        (Some(o), _) => Base::Pretrained(
            ArchDescriptor::from_json(o.arch_json.as_bytes())?,
            ctx.blobs.read(&o.weights_sha256).await?,
        ),
        (None, Some(a)) => Base::Scratch(ArchDescriptor::from_json(a.as_bytes())?.spec),
        (None, None) => {
            return Err(CloudError::FailedPrecondition(
                "the job names neither a base oracle nor an architecture".into(),
            ))
        }
    };
    let ck = BlobCheckpoints {
        store: ctx.checkpoints.clone(),
        rt: tokio::runtime::Handle::current(),
    };
    let mut progress = ctx.progress.clone();
    let cancel = ctx.cancel.clone();
    tokio::task::spawn_blocking(move || -> Result<OracleOutput> {
        let classes = dataset.summary.as_ref().map(|s| s.classes.as_slice());
        let data = TrainingData::read(
            &data_dir,
            format,
            dataset.input_spec.as_ref(),
            dataset.augment,
            classes,
        )?;
        let n_classes = data.train.num_classes();
        let (init, spec) = match base {
            Base::Pretrained(arch, weights) => {
                let m = Model::load(&arch, read_tensors_from_bytes(&weights)?)?;
                let shape = DataShape::of_training(&dataset.name, &data);
                check_fit(&base_name, &m.spec, &shape, HeadFit::Replace)?;
                let m = m.with_new_head(n_classes, params.seed)?;
                let spec = m.spec.clone();
                (Some(m), spec)
            }
            Base::Scratch(spec) => {
                let shape = DataShape::of_training(&dataset.name, &data);
                check_fit("arch_json", &spec, &shape, HeadFit::Keep)?;
                (None, spec)
            }
        };
        let (train, eval, split) = eval_split(&data, &params)?;
        let mut config = params.recipe(init.is_some(), train.len());
        config.normalize = data.spec.normalize();
        config.augment = data.augment;
        config.validate()?;
        let (model, r) = train_oracle_resumable(
            &spec,
            &config,
            &train,
            eval.as_ref(),
            &mut progress,
            &cancel,
            Some(&ck),
            init.as_ref(),
        )?;
        let report = TrainJobReport {
            mode: if init.is_some() {
                "fine-tune"
            } else {
                "scratch"
            }
            .into(),
            classes: n_classes,
            steps: r.steps,
            batch: config.batch,
            lr: config.lr,
            train_images: train.len(),
            accuracy: r.test_accuracy,
            accuracy_split: split.map(String::from),
            accuracy_images: eval.as_ref().map_or(0, Dataset::len),
            first_loss: r.first_loss,
            final_mean_loss: r.final_mean_loss,
            images_per_sec: r.images_per_sec,
            train_seconds: r.train_time.as_secs_f64(),
            threads: adaptivenet_kernels::threads::current(),
        };
        let desc = ArchDescriptor::chain(model.spec.clone());
        Ok(OracleOutput {
            arch_json: serde_json::to_string(&desc.raw)
                .map_err(|e| CloudError::Internal(format!("arch json: {e}")))?,
            weights: adaptivenet_core::artifact::params_to_safetensors(model.canonical_tensors())?,
            report_json: serde_json::to_string(&report)
                .map_err(|e| CloudError::Internal(format!("report json: {e}")))?,
        })
    })
    .await
    .map_err(|e| CloudError::Internal(format!("oracle training thread: {e}")))?
}

/// The training images and the images the accuracy is reported on: the test split when the
/// dataset has one, else `val_size` stratified training images held out.
fn eval_split(
    data: &TrainingData,
    params: &TrainJobParams,
) -> Result<(Dataset, Option<Dataset>, Option<&'static str>)> {
    let (mut train, eval, split) = match &data.test {
        Some(t) => (data.train.clone(), Some(t.clone()), Some("test")),
        None => {
            let n = data.train.len();
            let val = params.val_size.unwrap_or((n / 5).min(1000));
            if val == 0 {
                (data.train.clone(), None, None)
            } else {
                if val >= n {
                    return Err(CloudError::invalid(
                        "params_json.val_size",
                        format!("{val} leaves no training images of {n}"),
                    ));
                }
                let (rest, held) = adaptivenet_core::data::holdout(
                    &data.train.labels,
                    Holdout::Total(val),
                    params.seed,
                )?;
                (
                    data.train.subset(&rest)?,
                    Some(data.train.subset(&held)?),
                    Some("held-out"),
                )
            }
        }
    };
    if params.max_train_images > 0 && params.max_train_images < train.len() {
        // Stratified, so a class-sorted dataset keeps every class.
        let (_, keep) = adaptivenet_core::data::holdout(
            &train.labels,
            Holdout::Total(params.max_train_images),
            params.seed,
        )?;
        train = train.subset(&keep)?;
    }
    Ok((train, eval, split))
}
