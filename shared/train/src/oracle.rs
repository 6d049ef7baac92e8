//! Training the oracle from scratch with the
//! reference recipe (SGD momentum 0.9 Nesterov, weight decay 5e-4, lr 0.1 with linear warm-up
//! and cosine decay, batch 128, BN in train mode) on any dataset, with its normalisation and augmentation policy.
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use adaptivenet_core::data::{AugmentPolicy, Dataset, Normalize};
use adaptivenet_core::model::{
    block_forward, head_forward, stem_forward, Model, ModelSpec, TrainCtx,
};
use candle_core::Device;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{to_json, CheckpointIo, CheckpointMeta};
use crate::error::{Result, TrainError};
use crate::optim::{OptimState, Optimizer, Sgd, WarmupCosine};
use crate::progress::{ProgressEvent, ProgressSink, LOSS_WINDOW};
use crate::train::{
    accuracy, cross_entropy, step_rng, train_transform, BatchSampler, TrainModule, BN_MOMENTUM,
};

/// The oracle-training recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOracleConfig {
    /// Optimisation steps (20 epochs of 60,000 at batch 128 is 9,375).
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// The dataset's normalisation (its input spec's mean/std; `x / 255` by default).
    pub normalize: Normalize,
    /// The dataset's augmentation policy (none by default: no crop, no flip).
    pub augment: AugmentPolicy,
    pub seed: u64,
    /// Evaluation batch size.
    pub eval_batch: usize,
    /// Write a checkpoint every this many steps when checkpoints are given (0: only on
    /// cancel). Not part of the recipe: changing it does not invalidate a checkpoint.
    pub checkpoint_every: u64,
}

const CHECKPOINT_FORMAT: &str = "adaptivenet.oracle.checkpoint/1";

impl Default for TrainOracleConfig {
    fn default() -> Self {
        Self {
            steps: 7969,
            batch: 128,
            lr: 0.1,
            warmup_steps: 469,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            normalize: Normalize::UnitRange,
            augment: AugmentPolicy::default(),
            seed: 0,
            eval_batch: 500,
            checkpoint_every: 200,
        }
    }
}

impl TrainOracleConfig {
    /// Steps for `epochs` passes over `n` images.
    pub fn steps_for_epochs(epochs: f64, n: usize, batch: usize) -> u64 {
        ((epochs * n as f64) / batch.max(1) as f64).ceil() as u64
    }

    /// What a checkpoint must agree with to be resumed: the recipe and the architecture.
    fn fingerprint(&self, spec: &ModelSpec) -> String {
        let c = TrainOracleConfig {
            checkpoint_every: 0,
            eval_batch: 0,
            ..self.clone()
        };
        adaptivenet_core::artifact::sha256_hex(format!("{c:?}|{spec:?}").as_bytes())
    }

    /// Rejects a bad recipe before any work, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(TrainError::invalid("steps", "must be at least 1"));
        }
        if self.batch == 0 || self.batch > 4096 {
            return Err(TrainError::invalid(
                "batch",
                format!("{} not in 1..=4096", self.batch),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return Err(TrainError::invalid(
                "lr",
                format!("{} not in (0, 10]", self.lr),
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(TrainError::invalid(
                "momentum",
                format!("{} not in [0, 1)", self.momentum),
            ));
        }
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&self.weight_decay)) {
            return Err(TrainError::invalid(
                "weight_decay",
                format!("{} not in [0, 1)", self.weight_decay),
            ));
        }
        if self.warmup_steps > self.steps {
            return Err(TrainError::invalid("warmup_steps", "exceeds steps"));
        }
        Ok(())
    }
}

/// What a training run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct OracleReport {
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Mean training loss of the last min(50, steps) steps.
    pub final_mean_loss: f64,
    /// Training throughput (augmentation + forward + backward + update).
    pub images_per_sec: f64,
    pub train_time: Duration,
    /// Top-1 accuracy on `test`, if given.
    pub test_accuracy: Option<f64>,
}

/// Trains a model of `spec` from a seeded Kaiming initialisation on `train`, evaluates it on
/// `test`, and returns it (save it with [`Model::save`]). Cancel stops after the current step
/// with `Err(Cancelled)`.
pub fn train_oracle(
    spec: &ModelSpec,
    config: &TrainOracleConfig,
    train: &Dataset,
    test: Option<&Dataset>,
    progress: &mut dyn ProgressSink,
    cancel: &CancellationToken,
) -> Result<(Model, OracleReport)> {
    train_oracle_resumable(spec, config, train, test, progress, cancel, None, None)
}

/// [`train_oracle`] with checkpoints: resumes from the latest one if `checkpoints` holds one
/// for the same recipe and architecture, writes one every `config.checkpoint_every` steps and
/// on cancel. Batches and augmentation are pure functions of (seed, step), so a resumed run
/// ends in exactly the state of an uninterrupted one.
///
/// `init` fine-tunes: training starts from these weights (e.g. pretrained ones given a fresh
/// head by [`Model::with_new_head`]) instead of a seeded initialisation; its spec must be
/// `spec`. The weights' digest is part of the checkpoint fingerprint, so a checkpoint is never
/// resumed onto another starting point.
#[allow(clippy::too_many_arguments)]
pub fn train_oracle_resumable(
    spec: &ModelSpec,
    config: &TrainOracleConfig,
    train: &Dataset,
    test: Option<&Dataset>,
    progress: &mut dyn ProgressSink,
    cancel: &CancellationToken,
    checkpoints: Option<&dyn CheckpointIo>,
    init: Option<&Model>,
) -> Result<(Model, OracleReport)> {
    config.validate()?;
    check_data(spec, train, "train")?;
    if let Some(t) = test {
        check_data(spec, t, "test")?;
    }
    let mut fingerprint = config.fingerprint(spec);
    let init = match init {
        Some(m) => {
            if m.spec != *spec {
                return Err(TrainError::invalid(
                    "init",
                    "the initial weights belong to another architecture",
                ));
            }
            let digest = m.weights_digest()?;
            fingerprint = adaptivenet_core::artifact::sha256_hex(
                format!("{fingerprint}|init:{digest}").as_bytes(),
            );
            m.clone()
        }
        None => Model::init(spec, config.seed)?,
    };
    let mut stem = TrainModule::new(&init.stem)?;
    let mut blocks = init
        .blocks
        .iter()
        .map(TrainModule::new)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut head = TrainModule::new(&init.head)?;
    let mut vars: Vec<_> = stem.named_vars("stem").collect();
    for (i, b) in blocks.iter().enumerate() {
        vars.extend(b.named_vars(&format!("blocks.{i}")));
    }
    vars.extend(head.named_vars("head"));

    let mut opt = Sgd::new(config.momentum, config.nesterov, config.weight_decay);
    let sched = WarmupCosine {
        base_lr: config.lr,
        min_lr: 0.0,
        warmup_steps: config.warmup_steps,
        total_steps: config.steps,
    };
    let transform = train_transform(&config.normalize, &config.augment);
    let mut sampler = BatchSampler::new(train.len(), config.seed);
    let num = &spec.numerics;
    let mut losses = Vec::with_capacity(config.steps as usize);
    let mut first_step = 0u64;
    // Training time of earlier (checkpointed) runs, so images/s covers the whole training.
    let mut earlier = Duration::ZERO;
    if let Some(ck) = checkpoints {
        if let Some(bytes) = ck.load()? {
            let r = restore(&bytes, &fingerprint, &mut stem, &mut blocks, &mut head)?;
            opt.load_state(r.opt);
            first_step = r.step;
            losses = r.losses;
            earlier = r.elapsed;
            tracing::info!(
                step = first_step,
                "oracle training resumes from its checkpoint"
            );
        }
    }
    let save = |step: u64,
                losses: &[f64],
                elapsed: Duration,
                stem: &TrainModule,
                blocks: &[TrainModule],
                head: &TrainModule,
                opt: &Sgd|
     -> Result<()> {
        if let Some(ck) = checkpoints {
            let bytes = serialize(
                &fingerprint,
                step,
                losses,
                elapsed,
                stem,
                blocks,
                head,
                &opt.state(),
            )?;
            ck.save(&bytes)?;
        }
        Ok(())
    };
    let start = Instant::now();
    for step in first_step..config.steps {
        let pos = step * config.batch as u64;
        let idx = sampler.batch(pos, config.batch);
        let mut rng = step_rng(config.seed, 100, step);
        let (x, y) = train.batch_tensor_augmented(&idx, &transform, &mut rng, &Device::Cpu)?;
        let mut c = TrainCtx::new(BN_MOMENTUM);
        let mut h = stem_forward(&spec.stem, num, &stem.params(), &x, Some(&mut c))?;
        stem.apply(&mut c);
        for (b, m) in spec.blocks.iter().zip(blocks.iter_mut()) {
            h = block_forward(b, num, &m.params(), &h, Some(&mut c))?;
            m.apply(&mut c);
        }
        let logits = head_forward(&spec.head, num, &head.params(), &h, Some(&mut c))?;
        head.apply(&mut c);
        let loss = cross_entropy(&logits, &y)?;
        let grads = loss.backward()?;
        let lr = sched.lr(step);
        opt.step(&vars, &grads, lr)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            return Err(TrainError::Internal(format!(
                "training diverged at step {step} (loss {lv}); lower lr"
            )));
        }
        losses.push(lv);
        let el = start.elapsed().as_secs_f64();
        let done = step + 1;
        let this_run = done - first_step;
        let rate = (this_run * config.batch as u64) as f64 / el.max(1e-9);
        let eta = Duration::from_secs_f64(el / this_run as f64 * (config.steps - done) as f64);
        progress.report(&ProgressEvent {
            stage: "oracle".into(),
            epoch: pos / train.len() as u64,
            step: done,
            stage_steps: config.steps,
            global_step: done,
            total_steps: config.steps,
            loss: lv,
            loss_avg: {
                let w = &losses[losses.len().saturating_sub(LOSS_WINDOW)..];
                w.iter().sum::<f64>() / w.len() as f64
            },
            loss_by_blocks: Vec::new(),
            paths: Vec::new(),
            lr,
            samples_per_sec: rate,
            eta,
        });
        let cancelled = cancel.is_cancelled() && done < config.steps;
        if cancelled || (config.checkpoint_every > 0 && done % config.checkpoint_every == 0) {
            let elapsed = earlier + start.elapsed();
            save(done, &losses, elapsed, &stem, &blocks, &head, &opt)?;
        }
        if cancelled {
            return Err(TrainError::Cancelled(format!(
                "oracle training cancelled after step {done}{}",
                if checkpoints.is_some() {
                    "; checkpoint kept"
                } else {
                    ""
                }
            )));
        }
    }
    let train_time = earlier + start.elapsed();
    let model = Model {
        spec: spec.clone(),
        stem: stem.snapshot()?,
        blocks: blocks
            .iter()
            .map(TrainModule::snapshot)
            .collect::<candle_core::Result<_>>()?,
        head: head.snapshot()?,
    };
    let test_accuracy = match test {
        Some(t) => Some(accuracy(&model, t, &config.normalize, config.eval_batch)?),
        None => None,
    };
    let tail = losses.len().min(50);
    let report = OracleReport {
        steps: config.steps,
        first_loss: losses[0],
        last_loss: *losses.last().expect("steps >= 1"),
        final_mean_loss: losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64,
        images_per_sec: (config.steps * config.batch as u64) as f64
            / train_time.as_secs_f64().max(1e-9),
        train_time,
        test_accuracy,
    };
    Ok((model, report))
}

/// The dataset must be non-empty, with the model's input channels and classes.
pub(crate) fn check_data(spec: &ModelSpec, data: &Dataset, field: &str) -> Result<()> {
    if data.is_empty() {
        return Err(TrainError::invalid(field, "the dataset is empty"));
    }
    if data.channels != spec.stem.cin {
        return Err(TrainError::invalid(
            field,
            format!(
                "images have {} channels, the model expects {}",
                data.channels, spec.stem.cin
            ),
        ));
    }
    if data.num_classes() != spec.head.classes {
        return Err(TrainError::invalid(
            field,
            format!(
                "the dataset has {} classes, the model {}",
                data.num_classes(),
                spec.head.classes
            ),
        ));
    }
    Ok(())
}

/// The state a checkpoint restores.
struct Restored {
    step: u64,
    losses: Vec<f64>,
    elapsed: Duration,
    opt: OptimState,
}

#[allow(clippy::too_many_arguments)]
fn serialize(
    fingerprint: &str,
    step: u64,
    losses: &[f64],
    elapsed: Duration,
    stem: &TrainModule,
    blocks: &[TrainModule],
    head: &TrainModule,
    opt: &OptimState,
) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, candle_core::Tensor)> = Vec::new();
    let mut add = |prefix: &str, m: &TrainModule| -> Result<()> {
        for (n, t) in m.snapshot()? {
            tensors.push((format!("model.{prefix}.{n}"), t.contiguous()?));
        }
        Ok(())
    };
    add("stem", stem)?;
    for (i, b) in blocks.iter().enumerate() {
        add(&format!("blocks.{i}"), b)?;
    }
    add("head", head)?;
    for (k, t) in &opt.slots {
        tensors.push((format!("opt.{k}"), t.contiguous()?));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
    meta.insert("fingerprint".to_string(), fingerprint.to_string());
    meta.insert("step".to_string(), step.to_string());
    meta.insert("elapsed_s".to_string(), elapsed.as_secs_f64().to_string());
    meta.insert("losses".to_string(), to_json(&losses)?);
    meta.insert("opt_steps".to_string(), to_json(&opt.steps)?);
    safetensors::tensor::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| TrainError::Internal(format!("checkpoint serialisation: {e}")))
}

fn restore(
    bytes: &[u8],
    fingerprint: &str,
    stem: &mut TrainModule,
    blocks: &mut [TrainModule],
    head: &mut TrainModule,
) -> Result<Restored> {
    let meta = CheckpointMeta::read(
        bytes,
        "oracle checkpoint",
        CHECKPOINT_FORMAT,
        fingerprint,
        "the oracle checkpoint was written for a different recipe or architecture; remove it \
         or restore the original settings",
    )?;
    let bad = |r: String| meta.bad(r);
    let get = |k: &str| meta.get(k);
    let step: u64 = get("step")?
        .parse()
        .map_err(|e| bad(format!("step: {e}")))?;
    let elapsed: f64 = get("elapsed_s")?
        .parse()
        .map_err(|e| bad(format!("elapsed_s: {e}")))?;
    let losses: Vec<f64> =
        serde_json::from_str(&get("losses")?).map_err(|e| bad(format!("losses: {e}")))?;
    let opt_steps: BTreeMap<String, u64> =
        serde_json::from_str(&get("opt_steps")?).map_err(|e| bad(format!("opt_steps: {e}")))?;
    if losses.len() as u64 != step {
        return Err(bad(format!("{} losses for step {step}", losses.len())));
    }
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    let mut modules: HashMap<String, adaptivenet_core::model::Params> = HashMap::new();
    let mut slots = BTreeMap::new();
    for (name, t) in tensors {
        if let Some(k) = name.strip_prefix("opt.") {
            slots.insert(k.to_string(), t);
        } else if let Some(rest) = name.strip_prefix("model.") {
            let (module, local) = match rest.strip_prefix("blocks.") {
                Some(b) => {
                    let (i, local) = b.split_once('.').ok_or_else(|| bad(name.clone()))?;
                    (format!("blocks.{i}"), local)
                }
                None => {
                    let (m, local) = rest.split_once('.').ok_or_else(|| bad(name.clone()))?;
                    (m.to_string(), local)
                }
            };
            modules
                .entry(module)
                .or_default()
                .insert(local.to_string(), t);
        } else {
            return Err(bad(format!("unexpected tensor {name}")));
        }
    }
    let load = |key: &str, m: &mut TrainModule| -> Result<()> {
        let p = modules
            .get(key)
            .ok_or_else(|| bad(format!("no tensors for {key}")))?;
        m.load(p).map_err(|e| bad(format!("{key}: {e}")))
    };
    load("stem", stem)?;
    for (i, b) in blocks.iter_mut().enumerate() {
        load(&format!("blocks.{i}"), b)?;
    }
    load("head", head)?;
    Ok(Restored {
        step,
        losses,
        elapsed: Duration::from_secs_f64(elapsed),
        opt: OptimState {
            slots,
            steps: opt_steps,
        },
    })
}
