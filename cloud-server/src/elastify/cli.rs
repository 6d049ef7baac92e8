//! Command-line entry points: `clap` argument structs and `run_*` functions with a progress
//! bar (stderr; hidden when stderr is not a terminal). The binary wires them as subcommands.
use std::path::PathBuf;

use adaptivenet_core::artifact::{sha256_hex, write_atomic, Manifest};
use adaptivenet_core::data::AugmentPolicy;
use adaptivenet_core::model::{ArchDescriptor, Model};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::fit::{check_fit, DataShape, HeadFit};
use crate::datasets::DatasetFormat;
use crate::error::{CloudError, Result};
use adaptivenet_train::oracle::{train_oracle_resumable, OracleReport, TrainOracleConfig};
use adaptivenet_train::pipeline::{elastify_to_artifact, ElastifyPlan, TrainingData};
use adaptivenet_train::supernet::{ElastifyConfig, ElastifyReport};
use adaptivenet_train::{DirCheckpoints, ProgressEvent};

/// The reference oracle: CIFAR-style ResNet-20 for 28x28 grey images (272,186 parameters).
pub const RESNET20_FASHION: &str = r#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[16,32,64],"in_channels":1,"num_classes":10}"#;

/// `train-oracle`: train an oracle on a local dataset (IDX or ImageFolder), from scratch or
/// fine-tuned from pretrained weights with a new head for the data's classes.
///
/// Defaults depend on the mode. From scratch: 20 epochs, lr 0.1, 1 warm-up epoch (the
/// reference recipe). Fine-tuning (`--init-arch` + `--init-weights`): 5 epochs, lr 0.02,
/// 0.2 warm-up epochs: the pretrained features need small steps, and the fresh head a short
/// warm-up before the full rate reaches them.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainOracleArgs {
    /// Architecture descriptor JSON (default: ResNet-20 for the data's channels and classes).
    #[arg(long, conflicts_with = "init_arch")]
    pub arch: Option<PathBuf>,
    /// Fine-tune: the pretrained model's architecture descriptor (any family). Its classifier
    /// is replaced by a fresh, seeded one sized to the data's classes; every other weight is
    /// the pretrained one.
    #[arg(long, requires = "init_weights")]
    pub init_arch: Option<PathBuf>,
    /// Fine-tune: the pretrained weights (safetensors or PyTorch .pth) for --init-arch.
    #[arg(long, requires = "init_arch")]
    pub init_weights: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Output folder: oracle.arch.json, oracle.safetensors, train-report.json.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Epochs over the training images [default: 20 from scratch, 5 fine-tuning]. From
    /// scratch on the demo data, 20 reaches 94.19 % test accuracy with the other defaults.
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Stop after this many steps (overrides --epochs; for throughput measurements).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Peak learning rate (SGD, Nesterov momentum 0.9, cosine decay) [default: 0.1 from
    /// scratch, 0.02 fine-tuning].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up length [default: 1 from scratch, 0.2 fine-tuning].
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Seeds the initialisation (the new head when fine-tuning), batches and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: only on Ctrl-C).
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: u64,
    /// Checkpoint folder (default: <out_dir>/checkpoint). A checkpoint there for the same
    /// recipe (and, fine-tuning, the same initial weights) is resumed: a killed run continues
    /// where it stopped, with the same result.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
}

/// The defaults of a training mode (see [`TrainOracleArgs`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainDefaults {
    pub epochs: f64,
    pub lr: f64,
    pub warmup_epochs: f64,
}

/// From scratch: the reference recipe.
pub const SCRATCH_DEFAULTS: TrainDefaults = TrainDefaults {
    epochs: 20.0,
    lr: 0.1,
    warmup_epochs: 1.0,
};

/// Fine-tuning pretrained weights with a new head.
pub const FINETUNE_DEFAULTS: TrainDefaults = TrainDefaults {
    epochs: 5.0,
    lr: 0.02,
    warmup_epochs: 0.2,
};

/// `elastify`: build and train a supernet from an oracle, write the artifact with priors.
#[derive(clap::Args, Debug, Clone)]
pub struct ElastifyArgs {
    /// Oracle architecture descriptor JSON.
    #[arg(long)]
    pub oracle_arch: PathBuf,
    /// Oracle weights (safetensors or .pth).
    #[arg(long)]
    pub oracle_weights: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Artifact output folder (manifest.json + blobs/).
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Branch kinds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "merge2,merge3")]
    pub branches: Vec<String>,
    #[arg(long, default_value_t = 3000)]
    pub stage0_steps: u64,
    #[arg(long, default_value_t = 3000)]
    pub stage1_steps: u64,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Stage-0 learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Stage-1 learning rate (AdamW).
    #[arg(long, default_value_t = 4e-4)]
    pub lr_stage1: f64,
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f64,
    /// Path sampling: weight of an original block against 1 per branch at each position
    /// (1: uniform per position, as the paper; 0.5: more training on the few-block paths
    /// that tight latency budgets pick).
    #[arg(long, default_value_t = 1.0)]
    pub original_weight: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: u64,
    /// Checkpoint folder (default: <out_dir>/checkpoint); an existing checkpoint is resumed.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Training images held out (stratified) for the priors.
    #[arg(long, default_value_t = 1000)]
    pub val_size: usize,
    /// At most this many subnets get a prior (all of them if the space is that small).
    #[arg(long, default_value_t = 64)]
    pub priors: usize,
}

/// Layout of a local dataset folder.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataFormatArg {
    /// `<split>-images-idx3-ubyte[.gz]` + `<split>-labels-idx1-ubyte[.gz]`, optional
    /// `classes.txt`.
    #[default]
    Idx,
    /// `<class>/<image>.png|jpg|jpeg`.
    Imagefolder,
}

/// The local dataset and its preprocessing (what `upload-dataset` records for the cloud).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// Dataset folder (default: <assets>/fashion-mnist, the demo data).
    #[arg(long = "data", alias = "dataset-dir")]
    pub dataset_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DataFormatArg::Idx)]
    pub format: DataFormatArg,
    /// Zero padding of the random training crop (default: 2 for idx, 0 for imagefolder;
    /// 0 disables the crop).
    #[arg(long)]
    pub crop_padding: Option<usize>,
    /// Random horizontal flip in training. Off unless asked: wrong for digits, text, signs.
    #[arg(long)]
    pub hflip: bool,
    /// Per-channel mean of `x / 255`, comma-separated (default: computed over the training
    /// images).
    #[arg(long, value_delimiter = ',')]
    pub mean: Vec<f32>,
    /// Per-channel std of `x / 255` (default: computed with the mean).
    #[arg(long, value_delimiter = ',')]
    pub std: Vec<f32>,
}

impl DataArgs {
    /// Reads the dataset, checked before any work; errors name the flag.
    /// The dataset folder.
    pub fn dir(&self) -> PathBuf {
        self.dataset_dir
            .clone()
            .unwrap_or_else(|| adaptivenet_core::assets_dir().join("fashion-mnist"))
    }

    pub fn read(&self) -> Result<TrainingData> {
        let dir = self.dir();
        if !dir.is_dir() {
            return Err(CloudError::invalid(
                "data",
                format!(
                    "{} is not a directory (the demo data: scripts/fetch-assets.sh)",
                    dir.display()
                ),
            ));
        }
        let format = match self.format {
            DataFormatArg::Idx => DatasetFormat::Idx,
            DataFormatArg::Imagefolder => DatasetFormat::ImageFolder,
        };
        let augment = AugmentPolicy {
            crop_padding: self.crop_padding.unwrap_or(match format {
                DatasetFormat::Idx => 2,
                DatasetFormat::ImageFolder => 0,
            }),
            hflip: self.hflip,
        };
        if self.mean.is_empty() != self.std.is_empty() {
            return Err(CloudError::invalid("std", "give --mean and --std together"));
        }
        let mut data = TrainingData::read(&dir, format, None, augment, None)?;
        if !self.mean.is_empty() {
            data.spec.mean = self.mean.clone();
            data.spec.std = self.std.clone();
            data.spec.validate()?;
        }
        Ok(data)
    }
}

impl ElastifyArgs {
    /// The library config these arguments describe.
    pub fn config(&self) -> ElastifyConfig {
        ElastifyConfig {
            branches: self.branches.clone(),
            seed: self.seed,
            stage0_steps: self.stage0_steps,
            stage1_steps: self.stage1_steps,
            batch: self.batch,
            lr_stage0: self.lr,
            lr_stage1: self.lr_stage1,
            temperature: self.temperature,
            original_weight: self.original_weight,
            checkpoint_every: self.checkpoint_every,
            ..ElastifyConfig::default()
        }
    }
}

fn bar(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} {msg} (eta {eta})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

fn show(pb: &ProgressBar, e: &ProgressEvent) {
    pb.set_prefix(e.stage.clone());
    pb.set_position(e.global_step);
    pb.set_message(format!(
        "ep {} loss {:.4} (avg {:.4}) lr {:.2e} {:.0} img/s",
        e.epoch, e.loss, e.loss_avg, e.lr, e.samples_per_sec
    ));
}

/// Trains the oracle (from scratch, or fine-tuned from `--init-*` with a new head) and writes
/// `oracle.arch.json`, `oracle.safetensors` and `train-report.json` to `out_dir`.
pub fn run_train_oracle(
    args: &TrainOracleArgs,
    cancel: &CancellationToken,
) -> Result<OracleReport> {
    let d = if args.init_arch.is_some() {
        FINETUNE_DEFAULTS
    } else {
        SCRATCH_DEFAULTS
    };
    let epochs = args.epochs.unwrap_or(d.epochs);
    if !(epochs.is_finite() && epochs > 0.0) {
        return Err(CloudError::invalid(
            "epochs",
            format!("{epochs} must be > 0"),
        ));
    }
    let data = args.data.read()?;
    let classes = data.train.num_classes();
    let init = match (&args.init_arch, &args.init_weights) {
        (Some(a), Some(w)) => {
            for (field, p) in [("init_arch", a), ("init_weights", w)] {
                if !p.is_file() {
                    return Err(CloudError::invalid(
                        field,
                        format!("{} not found", p.display()),
                    ));
                }
            }
            let pretrained = Model::from_files(a, w)?;
            Some(pretrained.with_new_head(classes, args.seed)?)
        }
        _ => None,
    };
    let spec = match &init {
        Some(m) => m.spec.clone(),
        None => {
            let arch_bytes = match &args.arch {
                Some(p) => std::fs::read(p).map_err(|e| CloudError::io(p, e))?,
                None => default_oracle_arch(data.spec.channels, classes).into_bytes(),
            };
            ArchDescriptor::from_json(&arch_bytes)?.spec
        }
    };
    let train = &data.train;
    let test = data.test.as_ref();
    let per_epoch = TrainOracleConfig::steps_for_epochs(1.0, train.len(), args.batch);
    let epochs_steps = TrainOracleConfig::steps_for_epochs(epochs, train.len(), args.batch);
    let steps = args.max_steps.unwrap_or(epochs_steps);
    let warmup_epochs = args.warmup_epochs.unwrap_or(d.warmup_epochs);
    let config = TrainOracleConfig {
        steps,
        batch: args.batch,
        lr: args.lr.unwrap_or(d.lr),
        warmup_steps: ((warmup_epochs.max(0.0) * per_epoch as f64) as u64).min(steps),
        weight_decay: args.weight_decay,
        normalize: data.spec.normalize(),
        augment: data.augment,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        ..TrainOracleConfig::default()
    };
    config.validate()?;
    let ck = DirCheckpoints::new(
        args.checkpoint_dir
            .clone()
            .unwrap_or_else(|| args.out_dir.join("checkpoint")),
    );
    let pb = bar(steps);
    let mut sink = |e: &ProgressEvent| show(&pb, e);
    let (model, report) = train_oracle_resumable(
        &spec,
        &config,
        train,
        test,
        &mut sink,
        cancel,
        Some(&ck),
        init.as_ref(),
    )?;
    pb.finish_and_clear();
    std::fs::create_dir_all(&args.out_dir).map_err(|e| CloudError::io(&args.out_dir, e))?;
    model.save(
        &args.out_dir.join("oracle.arch.json"),
        &args.out_dir.join("oracle.safetensors"),
    )?;
    let json = serde_json::json!({
        "mode": if init.is_some() { "fine-tune" } else { "scratch" },
        "steps": report.steps,
        "batch": config.batch,
        "lr": config.lr,
        "warmup_steps": config.warmup_steps,
        "classes": classes,
        "first_loss": report.first_loss,
        "last_loss": report.last_loss,
        "final_mean_loss": report.final_mean_loss,
        "images_per_sec": report.images_per_sec,
        "threads": adaptivenet_kernels::threads::current(),
        "train_seconds": report.train_time.as_secs_f64(),
        "test_accuracy": report.test_accuracy,
    });
    write_atomic(
        &args.out_dir.join("train-report.json"),
        json.to_string().as_bytes(),
    )?;
    Ok(report)
}

/// Loads an oracle and the data, elastifies (resuming from `<checkpoint_dir>` if a checkpoint
/// is there), evaluates priors on a held-out split and writes the artifact to `out_dir`.
pub fn run_elastify(
    args: &ElastifyArgs,
    cancel: &CancellationToken,
) -> Result<(Manifest, ElastifyReport)> {
    let config = args.config();
    config.validate()?;
    let data = args.data.read()?;
    for (field, p) in [
        ("oracle_arch", &args.oracle_arch),
        ("oracle_weights", &args.oracle_weights),
    ] {
        if !p.is_file() {
            return Err(CloudError::invalid(
                field,
                format!("{} not found", p.display()),
            ));
        }
    }
    let oracle = Model::from_files(&args.oracle_arch, &args.oracle_weights)?;
    let shape = DataShape::of_training(args.data.dir().display().to_string(), &data);
    let oracle_name = args.oracle_arch.display().to_string();
    check_fit(&oracle_name, &oracle.spec, &shape, HeadFit::Keep)?;
    let weights =
        std::fs::read(&args.oracle_weights).map_err(|e| CloudError::io(&args.oracle_weights, e))?;
    let ck = DirCheckpoints::new(
        args.checkpoint_dir
            .clone()
            .unwrap_or_else(|| args.out_dir.join("checkpoint")),
    );
    let plan = ElastifyPlan {
        config,
        val_size: args.val_size,
        priors: args.priors,
        max_train_images: 0,
        oracle_digest: sha256_hex(&weights),
    };
    let pb = bar(plan.config.stage0_steps + plan.config.stage1_steps);
    let mut sink = |e: &ProgressEvent| show(&pb, e);
    let out = elastify_to_artifact(
        &oracle,
        &data,
        &plan,
        &mut sink,
        Some(&ck),
        cancel,
        &args.out_dir,
    );
    pb.finish_and_clear();
    Ok(out?)
}

/// The default oracle: ResNet-20 (CIFAR-style, widths 16/32/64) for the data's channels and
/// classes.
pub fn default_oracle_arch(channels: usize, classes: usize) -> String {
    serde_json::json!({
        "family": "adaptivenet.resnet_small", "block": "basic", "layers": [3, 3, 3],
        "widths": [16, 32, 64], "in_channels": channels, "num_classes": classes
    })
    .to_string()
}

/// A readable summary of an oracle training run.
pub fn oracle_summary(r: &OracleReport) -> String {
    let acc = r.test_accuracy.map_or("no test split".to_string(), |a| {
        format!("{:.2} %", a * 100.0)
    });
    format!(
        "oracle trained: {} steps in {:.1} s, {:.0} images/s on {} threads\n  test accuracy: {acc}\n  loss: {:.4} -> {:.4} (mean of the last steps {:.4})",
        r.steps,
        r.train_time.as_secs_f64(),
        r.images_per_sec,
        adaptivenet_kernels::threads::current(),
        r.first_loss,
        r.last_loss,
        r.final_mean_loss
    )
}
