//! The one path from a dataset to a supernet artifact, shared by the job runner and the local
//! CLI: read the dataset by its format and bring it to its input spec, train (elastify) with
//! the spec's normalisation and the dataset's augmentation policy, evaluate the priors on a
//! held-out split, and write the artifact with the same spec.
//!
//! No consumer hard-wires a dataset's numbers: mean/std, class names and augmentation come
//! from the dataset (recorded at registration, or computed here for local data).
use std::path::{Path, PathBuf};

use adaptivenet_core::artifact::{self, build_artifact, BlobSink, Manifest};
use adaptivenet_core::data::{
    channel_stats, read_idx_pair, read_image_folder_for, AugmentPolicy, Dataset, InputSpec,
    ResizePolicy,
};
use adaptivenet_core::data::{holdout, Holdout};
use adaptivenet_core::model::Model;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::CheckpointIo;
use crate::error::{Result, TrainError};
use crate::priors::{evaluate_priors, prior_subnets};
use crate::progress::ProgressSink;
use crate::supernet::{elastify, ElastifyConfig, ElastifyReport};

/// How a dataset's files are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// `<class>/<image>.png|jpg|jpeg`, any sizes, grey or colour.
    #[serde(rename = "imagefolder")]
    ImageFolder,
    /// `<split>-images-idx3-ubyte[.gz]` + `<split>-labels-idx1-ubyte[.gz]` (`train` required),
    /// optional `classes.txt`.
    Idx,
}

impl DatasetFormat {
    /// Parses a format name; `field` names the setting in the error.
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        match s {
            "imagefolder" => Ok(DatasetFormat::ImageFolder),
            "idx" => Ok(DatasetFormat::Idx),
            _ => Err(TrainError::invalid(
                field,
                format!("{s:?} (expected \"imagefolder\" or \"idx\")"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DatasetFormat::ImageFolder => "imagefolder",
            DatasetFormat::Idx => "idx",
        }
    }
}

/// A dataset read for training, at its input spec's channels and size.
#[derive(Clone, Debug)]
pub struct TrainingData {
    /// The training split.
    pub train: Dataset,
    /// The test split when the dataset has one (IDX `t10k-*`).
    pub test: Option<Dataset>,
    pub spec: InputSpec,
    pub augment: AugmentPolicy,
}

impl TrainingData {
    /// Reads `dir` laid out as `format`. With a `spec` (a registered dataset's), images are
    /// brought to it; without one (local data), the spec is the data's own shape with mean/std
    /// computed over the training split by [`channel_stats`]. `class_names` (a registered
    /// dataset's summary) name IDX labels; ImageFolder classes are the folder names.
    pub fn read(
        dir: &Path,
        format: DatasetFormat,
        spec: Option<&InputSpec>,
        augment: AugmentPolicy,
        class_names: Option<&[String]>,
    ) -> Result<Self> {
        augment.validate()?;
        let (train, test) = match format {
            DatasetFormat::Idx => {
                let names: Vec<&str> = class_names
                    .unwrap_or_default()
                    .iter()
                    .map(String::as_str)
                    .collect();
                let names = match read_classes_txt(dir)? {
                    Some(n) if names.is_empty() => n,
                    _ => names.iter().map(|s| s.to_string()).collect(),
                };
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let split = |s: &str| -> Result<Option<Dataset>> {
                    match (
                        idx_file(dir, &format!("{s}-images-idx3-ubyte")),
                        idx_file(dir, &format!("{s}-labels-idx1-ubyte")),
                    ) {
                        (Some(i), Some(l)) => Ok(Some(read_idx_pair(i, l, &names)?)),
                        _ => Ok(None),
                    }
                };
                let train = split("train")?.ok_or_else(|| {
                    TrainError::invalid(
                        "dataset",
                        format!(
                            "{} has no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz]",
                            dir.display()
                        ),
                    )
                })?;
                let mut test = split("t10k")?;
                if test.is_none() {
                    test = split("test")?;
                }
                match spec {
                    Some(s) => (s.conform(train)?, test.map(|t| s.conform(t)).transpose()?),
                    None => (train, test),
                }
            }
            DatasetFormat::ImageFolder => {
                let spec = match spec {
                    Some(s) => s.clone(),
                    None => folder_spec(dir)?,
                };
                (read_image_folder_for(dir, &spec)?, None)
            }
        };
        if train.is_empty() {
            return Err(TrainError::invalid("dataset", "no training images"));
        }
        let spec = match spec {
            Some(s) => s.clone(),
            None => {
                let (mean, std) = channel_stats(&train)?;
                InputSpec {
                    channels: train.channels,
                    height: train.height,
                    width: train.width,
                    resize: ResizePolicy::Stretch,
                    mean,
                    std,
                }
            }
        };
        spec.validate()?;
        Ok(Self {
            train,
            test,
            spec,
            augment,
        })
    }

    /// The artifact's input spec: this spec's shape and normalisation, the class names.
    pub fn artifact_input(&self) -> artifact::InputSpec {
        artifact::InputSpec {
            shape: [self.spec.channels, self.spec.height, self.spec.width],
            mean: self.spec.mean.clone(),
            std: self.spec.std.clone(),
            class_names: self.train.class_names.clone(),
        }
    }
}

/// `<dir>/<stem>.gz` or `<dir>/<stem>` if either exists.
fn idx_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [dir.join(format!("{stem}.gz")), dir.join(stem)]
        .into_iter()
        .find(|p| p.is_file())
}

/// The optional `classes.txt` of an IDX folder: one class name per non-empty line.
fn read_classes_txt(dir: &Path) -> Result<Option<Vec<String>>> {
    let p = dir.join("classes.txt");
    match std::fs::read_to_string(&p) {
        Ok(t) => Ok(Some(
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::io(&p, e)),
    }
}

/// The spec of a local ImageFolder without one: channels and size of its first image
/// (others are stretched to it), placeholder statistics replaced once the data is read.
fn folder_spec(dir: &Path) -> Result<InputSpec> {
    let first = std::fs::read_dir(dir)
        .map_err(|e| TrainError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .flat_map(|d| {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            files
        })
        .find_map(|p| image::open(&p).ok())
        .ok_or_else(|| {
            TrainError::invalid(
                "dataset",
                format!("{} holds no readable class/image", dir.display()),
            )
        })?;
    Ok(InputSpec {
        channels: if first.color().has_color() { 3 } else { 1 },
        height: first.height() as usize,
        width: first.width() as usize,
        resize: ResizePolicy::Stretch,
        mean: vec![0.0],
        std: vec![1.0],
    })
}

/// What to do with the data besides the elastification recipe.
#[derive(Clone, Debug)]
pub struct ElastifyPlan {
    /// The recipe; its `normalize` and `augment` are set from the data.
    pub config: ElastifyConfig,
    /// Training images held out (stratified) for the priors.
    pub val_size: usize,
    /// At most this many subnets get a prior.
    pub priors: usize,
    /// Train on at most this many images (0: all).
    pub max_train_images: usize,
    /// sha256 of the oracle's weights, recorded in the manifest.
    pub oracle_digest: String,
}

/// Elastifies `oracle` on `data`, evaluates the priors on a held-out split and writes the
/// artifact to `out_dir` (the local CLI's output).
pub fn elastify_to_artifact(
    oracle: &Model,
    data: &TrainingData,
    plan: &ElastifyPlan,
    progress: &mut dyn ProgressSink,
    checkpoints: Option<&dyn CheckpointIo>,
    cancel: &CancellationToken,
    out_dir: &Path,
) -> Result<(Manifest, ElastifyReport)> {
    let mut sink = DirSink(out_dir);
    let (manifest, report) =
        elastify_to_blobs(oracle, data, plan, progress, checkpoints, cancel, &mut sink)?;
    // Written last: a reader never sees a manifest whose blobs are missing.
    artifact::write_atomic(&out_dir.join("manifest.json"), &manifest.to_json()?)?;
    Ok((manifest, report))
}

/// An artifact directory as a blob sink with the crate's error.
struct DirSink<'a>(&'a Path);

impl BlobSink for DirSink<'_> {
    type Error = TrainError;
    fn put(&mut self, sha256: &str, bytes: &[u8]) -> Result<()> {
        Ok(artifact::DirBlobs(self.0).put(sha256, bytes)?)
    }
}

/// Like [`elastify_to_artifact`], but every module blob goes to `sink` (the job runner's:
/// the blob store) and the manifest is only returned. Fails with the sink's error type.
pub fn elastify_to_blobs<S: BlobSink>(
    oracle: &Model,
    data: &TrainingData,
    plan: &ElastifyPlan,
    progress: &mut dyn ProgressSink,
    checkpoints: Option<&dyn CheckpointIo>,
    cancel: &CancellationToken,
    sink: &mut S,
) -> std::result::Result<(Manifest, ElastifyReport), S::Error>
where
    S::Error: From<TrainError>,
{
    let (out, priors) = train_with_priors(oracle, data, plan, progress, checkpoints, cancel)?;
    let manifest = build_artifact(
        &out.supernet,
        data.artifact_input(),
        &plan.oracle_digest,
        priors,
        sink,
    )?;
    Ok((manifest, out.report))
}

/// Elastification on the training split and the priors on the held-out one.
fn train_with_priors(
    oracle: &Model,
    data: &TrainingData,
    plan: &ElastifyPlan,
    progress: &mut dyn ProgressSink,
    checkpoints: Option<&dyn CheckpointIo>,
    cancel: &CancellationToken,
) -> Result<(crate::supernet::ElastifyOutcome, Vec<artifact::Prior>)> {
    let mut config = plan.config.clone();
    config.normalize = data.spec.normalize();
    config.augment = data.augment;
    config.validate()?;
    let seed = config.seed;
    let (mut train, val) = split_validation(&data.train, plan.val_size, seed)?;
    if plan.max_train_images > 0 && plan.max_train_images < train.len() {
        let idx: Vec<usize> = (0..plan.max_train_images).collect();
        train = train.subset(&idx)?;
    }
    let out = elastify(oracle, &config, &train, progress, checkpoints, cancel)?;
    let subnets = prior_subnets(&out.supernet, plan.priors, seed)?;
    let priors = evaluate_priors(
        &out.supernet,
        &subnets,
        &val,
        &config.normalize,
        "validation",
        500,
    )?;
    Ok((out, priors))
}

/// Splits off `val_size` stratified images for the priors: `(train, validation)`.
pub fn split_validation(data: &Dataset, val_size: usize, seed: u64) -> Result<(Dataset, Dataset)> {
    if val_size == 0 || val_size >= data.len() {
        return Err(TrainError::invalid(
            "val_size",
            format!("{val_size} not in 1..{}", data.len()),
        ));
    }
    let (rest, held) = holdout(&data.labels, Holdout::Total(val_size), seed)?;
    Ok((data.subset(&rest)?, data.subset(&held)?))
}
