//! Elastification: training the branches of a supernet built from a frozen oracle.
//!
//! Stem, head and every original block stay frozen with BN in inference mode, so the
//! all-original subnet remains the oracle bit for bit. Each step samples one valid path that
//! uses at least one branch ([`SupernetSpec::sample`] with `require_branch`), then:
//! - stage 0 (feature distillation): loss = mean over the path's branches of the MSE between
//!   the branch output and the oracle's feature at the same block boundary; each branch is fed
//!   the subnet's own running feature (path-level distillation);
//! - stage 1 (task fine-tuning): `ce_weight * CE(logits, y) + (1 - ce_weight) * T^2 * KD`
//!   against the oracle's logits. Optionally ([`ElastifyConfig::sandwich`]) a stage-1 step
//!   trains several paths on its batch, the smallest and the largest among them (the sandwich
//!   rule), and the paths other than the largest may learn from soft labels only
//!   ([`InplaceDistill`]).
//!
//! Only branch weights train (AdamW, warm-up + cosine per stage, a fresh optimizer per stage);
//! branch BN layers run in train mode and their running statistics are kept, or
//! ([`BranchBn::Frozen`]) run in inference mode on statistics estimated once, before the first
//! step, on the oracle's own features. Checkpoints hold
//! branch tensors, optimizer state, stage, step and sample position (the RNG of a step is
//! derived from `(seed, stage, step)`), so a resumed run ends bit-identical to an
//! uninterrupted one.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use adaptivenet_core::artifact::{params_to_safetensors, sha256_hex};
use adaptivenet_core::data::{AugmentPolicy, Dataset, Normalize};
use adaptivenet_core::model::{BlockSpec, Model, ModelSpec, Params, TrainCtx};
use adaptivenet_core::supernet::{
    branches::{build_supernet, check_kinds_fit, fresh_names, keep_fitting_kinds},
    Choice, ModuleKey, Subnet, Supernet, SupernetConfig, SupernetSpec,
};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{to_json, CheckpointIo, CheckpointMeta};
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, OptimState, Optimizer, WarmupCosine};
use crate::oracle::check_data;
use crate::progress::{LossWindows, PathRole, ProgressEvent, ProgressSink, SizeLoss, TrainedPath};
use crate::train::{
    cross_entropy, eval_transform, kd_loss, mse, step_rng, train_transform, BatchSampler,
    TrainModule, BN_MOMENTUM,
};

const CHECKPOINT_FORMAT: &str = "adaptivenet.elastify.checkpoint/1";
/// Most random paths of a sandwich step.
pub const MAX_SANDWICH_RANDOM: u32 = 16;

/// How branch BatchNorm layers run during elastification.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BranchBn {
    /// [`BranchBn::Calibrated`] for an oracle of inverted-residual (MBConv) blocks, else
    /// [`BranchBn::Batch`]. On EfficientNet-Lite0 at 64x64 (batches of 32, feature maps down
    /// to 2x2) the running averages of batch training fit no path. Same-host A/B on one
    /// candidate set (medium preset): `calibrated` kept 0.983 of the oracle at budget 0.8
    /// against 0.946 for `frozen` (whose weights train through fixed statistics, with a
    /// 3x higher stage-1 loss) and 0.965 for `batch`.
    #[default]
    Auto,
    /// Train mode: batch statistics in the forward, running statistics kept with momentum
    /// 0.1 (the paper). A branch's shipped statistics then average the inputs of whatever
    /// paths trained it last, and small batches of small feature maps make batch statistics
    /// noisy.
    Batch,
    /// Inference mode: before the first step every branch's statistics are estimated on the
    /// oracle's own feature at its position (the input it gets on the near-original paths that
    /// generous budgets choose), then kept fixed while the weights and BN affine train against
    /// exactly the computation the device serves.
    Frozen,
    /// Train mode as [`BranchBn::Batch`]; after the last step every branch's statistics are
    /// re-estimated, with its trained weights, on the oracle's own feature at its position
    /// (as [`BranchBn::Frozen`] estimates them before the first step), instead of shipping
    /// running averages over the heavily compressed random paths that trained it.
    Calibrated,
}

impl BranchBn {
    /// The mode `self` means for `oracle` ([`BranchBn::Auto`] resolved).
    pub fn resolve(self, oracle: &ModelSpec) -> BranchBn {
        match self {
            BranchBn::Auto => {
                let mbconv = |b: &BlockSpec| matches!(b, BlockSpec::MbConv { .. });
                if oracle.blocks.iter().any(mbconv) {
                    BranchBn::Calibrated
                } else {
                    BranchBn::Batch
                }
            }
            other => other,
        }
    }
}

/// Batches of the [`BranchBn::Frozen`] statistics estimate.
pub const BN_CALIBRATION_BATCHES: usize = 8;

/// In-place distillation (BigNAS): in a sandwich step the largest path learns the task as
/// every path does without it (`ce_weight` CE + KD against the oracle), while the other paths
/// only imitate a teacher's soft labels (`T^2 * KD`, no labels): small paths cannot fit the
/// labels as well as large ones, and chasing them competes with the large paths over the
/// branches they share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InplaceDistill {
    /// Every path gets the same task loss (the paper).
    #[default]
    Off,
    /// The teacher is the oracle, i.e. the all-original path: the true largest network.
    Oracle,
    /// The teacher is the same step's largest trained path (its logits, detached), as in
    /// BigNAS and Once-for-All, where the largest network trains too.
    Largest,
}

/// The elastification recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct ElastifyConfig {
    /// Branch kinds: `merge2`, `merge3`, `prune1`, `prune2`.
    pub branches: Vec<String>,
    /// Seed of branch initialisation, path sampling, augmentation and data order.
    pub seed: u64,
    pub stage0_steps: u64,
    pub stage1_steps: u64,
    pub batch: usize,
    pub lr_stage0: f64,
    pub lr_stage1: f64,
    /// Linear warm-up steps at the start of each stage (capped at the stage's steps).
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// KD temperature T of stage 1.
    pub temperature: f64,
    /// Weight of the CE term in stage 1 (the KD term gets `1 - ce_weight`).
    pub ce_weight: f64,
    /// Stage 0: stop the gradient at each branch's input, so a branch learns only from its
    /// own output MSE (cheaper; no backward through frozen blocks). `false` lets a branch's
    /// loss also train the branches before it on the path.
    pub stage0_detach_inputs: bool,
    /// The dataset's normalisation (its input spec's mean/std; `x / 255` by default).
    pub normalize: Normalize,
    /// The dataset's augmentation policy (none by default: no crop, no flip).
    pub augment: AugmentPolicy,
    /// Write a checkpoint every this many steps (0: only on cancel and at the end).
    pub checkpoint_every: u64,
    /// Path sampling: weight of the original block at each position against 1 per branch
    /// (1.0: uniform per position, as the paper; below 1: more steps on paths with fewer
    /// blocks, which tight latency budgets choose). See [`SupernetSpec::sample_weighted`].
    ///
    /// [`SupernetSpec::sample_weighted`]: adaptivenet_core::supernet::SupernetSpec::sample_weighted
    pub original_weight: f64,
    /// Stage 1, the sandwich rule (BigNAS, Once-for-All): every step trains, on its batch, the
    /// smallest path (fewest MACs), the largest path that trains anything (the all-original
    /// path is the frozen oracle, so: the most MACs with at least one branch) and
    /// `sandwich_random` random paths, their losses summed into one backward pass and one
    /// optimizer step. `false`: one random path per step, as the paper. A sandwich step costs
    /// about `2 + sandwich_random` paths' work (the oracle's forward is shared): divide
    /// `stage1_steps` by that for the same sample budget. See [`sandwich_ends`].
    pub sandwich: bool,
    /// Random paths of a sandwich step (0..=[`MAX_SANDWICH_RANDOM`]).
    pub sandwich_random: u32,
    /// Stage 1 with `sandwich`: the loss of the paths other than the largest.
    pub inplace_distill: InplaceDistill,
    /// How branch BN layers run while they train.
    pub branch_bn: BranchBn,
}

impl ElastifyConfig {
    /// Paths one step of `stage` trains (the sandwich's two ends may coincide on a tiny
    /// supernet; then one fewer).
    pub fn paths_per_step(&self, stage: usize) -> u64 {
        if stage == 1 && self.sandwich {
            2 + u64::from(self.sandwich_random)
        } else {
            1
        }
    }

    /// The branch kinds to build on `oracle`: the default kinds where they fit (a small oracle
    /// may have no room for `merge3`), but a kind the developer named must fit some block and
    /// is refused otherwise, naming the kind and each block's reason. (Naming exactly the
    /// default set counts as the default.)
    pub fn kinds_for(
        &self,
        oracle: &ModelSpec,
        sn: SupernetConfig,
    ) -> adaptivenet_core::Result<SupernetConfig> {
        if self.branches == ElastifyConfig::default().branches {
            Ok(keep_fitting_kinds(oracle, &sn))
        } else {
            check_kinds_fit(oracle, &sn)?;
            Ok(sn)
        }
    }
}

impl Default for ElastifyConfig {
    fn default() -> Self {
        Self {
            branches: vec!["merge2".into(), "merge3".into()],
            seed: 0,
            stage0_steps: 3000,
            stage1_steps: 3000,
            batch: 128,
            lr_stage0: 1e-3,
            lr_stage1: 4e-4,
            warmup_steps: 100,
            weight_decay: 0.01,
            temperature: 4.0,
            ce_weight: 0.5,
            stage0_detach_inputs: true,
            normalize: Normalize::UnitRange,
            augment: AugmentPolicy::default(),
            checkpoint_every: 200,
            original_weight: 1.0,
            sandwich: false,
            sandwich_random: 2,
            inplace_distill: InplaceDistill::Off,
            branch_bn: BranchBn::Auto,
        }
    }
}

impl ElastifyConfig {
    /// Rejects a bad config before any work, naming the field.
    pub fn validate(&self) -> Result<SupernetConfig> {
        if self.branches.is_empty() {
            return Err(TrainError::invalid(
                "branches",
                "at least one branch kind is required",
            ));
        }
        let sn = SupernetConfig::from_names(&self.branches, self.seed)?;
        if self
            .stage0_steps
            .checked_add(self.stage1_steps)
            .unwrap_or(0)
            == 0
        {
            return Err(TrainError::invalid(
                "stage0_steps",
                "stage0_steps + stage1_steps must be at least 1",
            ));
        }
        if self.batch == 0 || self.batch > 4096 {
            return Err(TrainError::invalid(
                "batch",
                format!("{} not in 1..=4096", self.batch),
            ));
        }
        for (field, lr) in [("lr_stage0", self.lr_stage0), ("lr_stage1", self.lr_stage1)] {
            if !(lr.is_finite() && lr > 0.0 && lr <= 1.0) {
                return Err(TrainError::invalid(field, format!("{lr} not in (0, 1]")));
            }
        }
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&self.weight_decay)) {
            return Err(TrainError::invalid(
                "weight_decay",
                format!("{} not in [0, 1)", self.weight_decay),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0 && self.temperature <= 100.0) {
            return Err(TrainError::invalid(
                "temperature",
                format!("{} not in (0, 100]", self.temperature),
            ));
        }
        if !(0.0..=1.0).contains(&self.ce_weight) {
            return Err(TrainError::invalid(
                "ce_weight",
                format!("{} not in [0, 1]", self.ce_weight),
            ));
        }
        if !(self.original_weight.is_finite()
            && self.original_weight > 0.0
            && self.original_weight <= 10.0)
        {
            return Err(TrainError::invalid(
                "original_weight",
                format!("{} not in (0, 10]", self.original_weight),
            ));
        }
        if self.sandwich_random > MAX_SANDWICH_RANDOM {
            return Err(TrainError::invalid(
                "sandwich_random",
                format!("{} not in 0..={MAX_SANDWICH_RANDOM}", self.sandwich_random),
            ));
        }
        if self.inplace_distill != InplaceDistill::Off && !self.sandwich {
            return Err(TrainError::invalid(
                "inplace_distill",
                "needs sandwich: the largest path of a sandwich step keeps the task loss",
            ));
        }
        Ok(sn)
    }

    fn steps(&self, stage: usize) -> u64 {
        [self.stage0_steps, self.stage1_steps][stage]
    }

    fn lr(&self, stage: usize) -> f64 {
        [self.lr_stage0, self.lr_stage1][stage]
    }

    /// What a checkpoint must agree with to be resumed (everything but `checkpoint_every`).
    /// What a checkpoint must match to be resumed: the recipe, the oracle and the branches'
    /// shapes (so a checkpoint written under another branch-construction rule is refused).
    fn fingerprint(&self, oracle_digest: &str, spec: &SupernetSpec) -> String {
        let c = ElastifyConfig {
            checkpoint_every: 0,
            ..self.clone()
        };
        sha256_hex(format!("{c:?}|{oracle_digest}|{:?}", spec.positions).as_bytes())
    }
}

/// Loss and throughput of one stage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageReport {
    pub steps: u64,
    /// Per-step training losses of the whole stage (including steps before a resume); a step
    /// that trained several paths records their mean.
    pub losses: Vec<f64>,
    /// At the end of the stage: the mean loss of the last paths of each size (see
    /// [`ProgressEvent::loss_by_blocks`]).
    pub loss_by_blocks: Vec<SizeLoss>,
    /// Steps run by this invocation and their throughput: images times the paths each was
    /// trained through, per second (a sandwich step counts each of its paths).
    pub steps_run: u64,
    pub samples_per_sec: f64,
    pub time: Duration,
}

impl StageReport {
    /// Mean loss of the first `k` steps.
    pub fn head_mean(&self, k: usize) -> f64 {
        mean(&self.losses[..k.min(self.losses.len())])
    }

    /// Mean loss of the last `k` steps.
    pub fn tail_mean(&self, k: usize) -> f64 {
        mean(&self.losses[self.losses.len().saturating_sub(k)..])
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ElastifyReport {
    pub stages: [StageReport; 2],
    /// `(stage, step)` the run resumed from, if it found a checkpoint.
    pub resumed_from: Option<(usize, u64)>,
}

/// The trained supernet and what the run measured.
#[derive(Debug)]
pub struct ElastifyOutcome {
    pub supernet: Supernet,
    pub report: ElastifyReport,
}

/// Progress of the loop, as checkpointed.
#[derive(Clone, Debug, Default, PartialEq)]
struct Cursor {
    stage: usize,
    /// Steps done in `stage`.
    step: u64,
    /// Global sample position of the data order.
    samples: u64,
    losses: [Vec<f64>; 2],
    /// Smoothed losses per stage (display only, but kept so that a resumed run prints and
    /// reports what an uninterrupted one would).
    windows: [LossWindows; 2],
}

/// sha256 of an oracle's canonical tensors (ties checkpoints to their oracle).
pub fn oracle_digest(oracle: &Model) -> Result<String> {
    Ok(sha256_hex(&params_to_safetensors(
        oracle.canonical_tensors(),
    )?))
}

/// Elastifies `oracle` on `data` (see the module docs). With `checkpoints`, resumes from the
/// latest checkpoint if there is one and writes one every `checkpoint_every` steps, on cancel
/// and at the end. A cancel stops before the next step with `Err(TrainError::Cancelled)`
/// after writing a checkpoint.
pub fn elastify(
    oracle: &Model,
    config: &ElastifyConfig,
    data: &Dataset,
    progress: &mut dyn ProgressSink,
    checkpoints: Option<&dyn CheckpointIo>,
    cancel: &CancellationToken,
) -> Result<ElastifyOutcome> {
    let sn_cfg = config.validate()?;
    check_data(&oracle.spec, data, "data")?;
    let config = &ElastifyConfig {
        branch_bn: config.branch_bn.resolve(&oracle.spec),
        ..config.clone()
    };
    let sn_cfg = config.kinds_for(&oracle.spec, sn_cfg)?;
    let mut supernet = build_supernet(oracle, &sn_cfg)?;
    if supernet.spec.count() <= 1 {
        return Err(TrainError::invalid(
            "branches",
            format!("no {:?} branch fits this oracle's chain", config.branches),
        ));
    }
    let mut branches: BTreeMap<ModuleKey, TrainModule> = BTreeMap::new();
    for (&key, p) in &supernet.modules {
        if key.choice != Choice::Original {
            branches.insert(key, TrainModule::new(p)?);
        }
    }
    let fingerprint = config.fingerprint(&oracle_digest(oracle)?, &supernet.spec);
    let mut cur = Cursor::default();
    let mut opt = AdamW::new(config.weight_decay);
    let mut report = ElastifyReport::default();
    if let Some(ck) = checkpoints {
        if let Some(bytes) = ck.load()? {
            cur = restore(&bytes, &fingerprint, &mut branches, &mut opt)?;
            report.resumed_from = Some((cur.stage, cur.step));
        }
    }
    let save = |cur: &Cursor, branches: &BTreeMap<ModuleKey, TrainModule>, opt: &AdamW| {
        match checkpoints {
            Some(ck) => ck.save(&encode(cur, &fingerprint, branches, &opt.state())?),
            None => Ok(()),
        }
    };

    let ends = if config.sandwich {
        Some(sandwich_ends(&supernet.spec)?)
    } else {
        None
    };
    let frozen = frozen_folded(&supernet)?;
    if cur.stage == 0 && cur.step == 0 {
        scale_fresh_outputs(&frozen, &oracle.spec, &mut branches, data, config)?;
        if config.branch_bn == BranchBn::Frozen {
            calibrate_branch_bn(&frozen, &mut branches, data, config)?;
        }
    }
    let total_steps = config.stage0_steps + config.stage1_steps;
    let transform = train_transform(&config.normalize, &config.augment);
    let mut sampler = BatchSampler::new(data.len(), config.seed);
    let start_stage = cur.stage;
    for stage in start_stage..2 {
        if stage != cur.stage {
            cur.stage = stage;
            cur.step = 0;
            opt = AdamW::new(config.weight_decay);
        }
        let steps = config.steps(stage);
        let sched = WarmupCosine {
            base_lr: config.lr(stage),
            min_lr: 0.0,
            warmup_steps: config.warmup_steps.min(steps),
            total_steps: steps,
        };
        let t0 = Instant::now();
        let first = cur.step;
        let mut path_samples = 0u64;
        while cur.step < steps {
            if cancel.is_cancelled() {
                save(&cur, &branches, &opt)?;
                return Err(TrainError::Cancelled(format!(
                    "elastification cancelled at stage {stage} step {}; checkpoint kept",
                    cur.step
                )));
            }
            let step = cur.step;
            let mut rng = step_rng(config.seed, stage as u64, step);
            // The paths first, then the augmentation: with one random path this is the
            // paper's schedule draw for draw.
            let paths = step_paths(&supernet.spec, config, stage, ends.as_ref(), &mut rng)?;
            let idx = sampler.batch(cur.samples, config.batch);
            let (x, y) = data.batch_tensor_augmented(&idx, &transform, &mut rng, &Device::Cpu)?;
            let lr = sched.lr(step);
            let path_losses = train_step(
                &frozen,
                &mut branches,
                &mut opt,
                config,
                stage,
                &paths,
                &x,
                &y,
                lr,
            )?;
            let loss = path_losses.iter().sum::<f64>() / path_losses.len() as f64;
            if !loss.is_finite() {
                return Err(TrainError::Internal(format!(
                    "stage {stage} diverged at step {step} (loss {loss}); lower lr_stage{stage}"
                )));
            }
            cur.step += 1;
            cur.samples += config.batch as u64;
            cur.losses[stage].push(loss);
            let windows = &mut cur.windows[stage];
            windows.step(loss);
            let trained: Vec<TrainedPath> = paths
                .into_iter()
                .zip(path_losses)
                .map(|((subnet, role), loss)| {
                    let (blocks, branches) = path_size(&subnet);
                    windows.path(blocks, branches, loss);
                    TrainedPath { subnet, role, loss }
                })
                .collect();
            path_samples += (config.batch * trained.len()) as u64;
            let el = t0.elapsed().as_secs_f64().max(1e-9);
            let run = cur.step - first;
            let per_step = el / run as f64;
            let global = config.stage0_steps * stage as u64 + cur.step;
            progress.report(&ProgressEvent {
                stage: format!("stage{stage}"),
                epoch: (cur.samples - 1) / data.len() as u64,
                step: cur.step,
                stage_steps: steps,
                global_step: global,
                total_steps,
                loss,
                loss_avg: windows.mean(),
                loss_by_blocks: windows.by_blocks(),
                paths: trained,
                lr,
                samples_per_sec: path_samples as f64 / el,
                eta: Duration::from_secs_f64(per_step * (total_steps - global) as f64),
            });
            if config.checkpoint_every > 0
                && cur.step % config.checkpoint_every == 0
                && global < total_steps
            {
                save(&cur, &branches, &opt)?;
            }
        }
        let time = t0.elapsed();
        let run = cur.step - first;
        report.stages[stage] = StageReport {
            steps,
            losses: cur.losses[stage].clone(),
            loss_by_blocks: cur.windows[stage].by_blocks(),
            steps_run: run,
            samples_per_sec: path_samples as f64 / time.as_secs_f64().max(1e-9),
            time,
        };
    }
    save(&cur, &branches, &opt)?;
    if config.branch_bn == BranchBn::Calibrated {
        // After the checkpoint: a resumed finished run calibrates the same trained weights.
        calibrate_branch_bn(&frozen, &mut branches, data, config)?;
    }
    for (key, m) in &branches {
        supernet.modules.insert(*key, m.snapshot()?);
    }
    Ok(ElastifyOutcome { supernet, report })
}

/// Gives each fresh output BN of an MBConv merge branch (`project.bn` of a span whose blocks
/// all reshape, e.g. Lite0's blocks 0-1) the per-channel mean (bias) and standard deviation
/// (weight) of the oracle's feature at the span's end, over [`BN_CALIBRATION_BATCHES`]
/// unaugmented batches. An identity-initialised BN emits unit-variance features where the
/// oracle's have a standard deviation above 10 (Lite0 at block 2): AdamW moves the BN weight
/// about `lr` per step, so the branch could not reach the feature's scale within any
/// schedule, and every path through it stayed at chance.
fn scale_fresh_outputs(
    sn: &Supernet,
    oracle: &ModelSpec,
    branches: &mut BTreeMap<ModuleKey, TrainModule>,
    data: &Dataset,
    config: &ElastifyConfig,
) -> Result<()> {
    let targets: Vec<(ModuleKey, usize)> = branches
        .keys()
        .filter_map(|&key| {
            let kind = key.choice.kind()?;
            let c = sn.spec.choice(key)?;
            let fresh = fresh_names(oracle, key.pos, kind);
            (c.block.is_mbconv()
                && fresh.iter().any(|n| n == "project.bn.weight")
                && fresh.iter().any(|n| n == "project.bn.bias"))
            .then_some((key, key.pos + c.span))
        })
        .collect();
    if targets.is_empty() {
        return Ok(());
    }
    // Per boundary: sums of the per-channel batch means and mean squares.
    let mut sums: BTreeMap<usize, (Tensor, Tensor)> = BTreeMap::new();
    for_calibration_batches(sn, data, config, |_, feats| {
        for &(_, end) in &targets {
            let f = &feats[end];
            let mean = f
                .mean_keepdim(0)?
                .mean_keepdim(2)?
                .mean_keepdim(3)?
                .flatten_all()?;
            let sq = f
                .sqr()?
                .mean_keepdim(0)?
                .mean_keepdim(2)?
                .mean_keepdim(3)?
                .flatten_all()?;
            let e = sums
                .entry(end)
                .or_insert((mean.zeros_like()?, sq.zeros_like()?));
            *e = ((&e.0 + &mean)?, (&e.1 + &sq)?);
        }
        Ok(())
    })?;
    let k = BN_CALIBRATION_BATCHES as f64;
    for (key, end) in targets {
        let (m, sq) = &sums[&end];
        let mean = m.affine(1.0 / k, 0.0)?;
        let std = (sq.affine(1.0 / k, 0.0)? - mean.sqr()?)?.relu()?.sqrt()?;
        let module = branches
            .get_mut(&key)
            .ok_or_else(|| TrainError::Internal(format!("branch {key} missing")))?;
        for (name, v) in &module.vars {
            match name.as_str() {
                "project.bn.weight" => v.set(&std.to_dtype(v.dtype())?)?,
                "project.bn.bias" => v.set(&mean.to_dtype(v.dtype())?)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// [`BranchBn::Frozen`]: sets every branch's BN running statistics to their mean over
/// [`BN_CALIBRATION_BATCHES`] batches (unaugmented images of a seeded draw) of the branch run
/// in train mode on the oracle's own feature at its position, as
/// [`Supernet::recalibrate_bn`] does along one path. Copied statistics of a pruned or merged
/// block's reshaped layers, and fresh layers' unit statistics, become those of the inputs the
/// branch gets on near-original paths.
fn calibrate_branch_bn(
    sn: &Supernet,
    branches: &mut BTreeMap<ModuleKey, TrainModule>,
    data: &Dataset,
    config: &ElastifyConfig,
) -> Result<()> {
    for_calibration_batches(sn, data, config, |b, feats| {
        for (key, m) in branches.iter_mut() {
            // Momentum 1/(b+1): the running value becomes the mean of the batch values.
            let mut ctx = TrainCtx::new(1.0 / (b + 1) as f64);
            sn.forward_module_train(*key, &m.snapshot()?, &feats[key.pos], &mut ctx)?;
            m.apply(&mut ctx);
        }
        Ok(())
    })
}

/// Runs `f(b, features)` for each of the [`BN_CALIBRATION_BATCHES`] calibration batches
/// (unaugmented images of a seeded draw): `features[i]` is the oracle's feature at block
/// boundary `i` (0: the stem's output), computed on `sn`'s original blocks.
fn for_calibration_batches(
    sn: &Supernet,
    data: &Dataset,
    config: &ElastifyConfig,
    mut f: impl FnMut(usize, &[Tensor]) -> Result<()>,
) -> Result<()> {
    let transform = eval_transform(&config.normalize);
    let mut sampler = BatchSampler::new(data.len(), config.seed ^ 0xb4_ca1b);
    let n = sn.spec.num_positions();
    for b in 0..BN_CALIBRATION_BATCHES {
        let idx = sampler.batch((b * config.batch) as u64, config.batch);
        let (x, _) = data.batch_tensor(&idx, &transform, &Device::Cpu)?;
        let mut feats = vec![sn.forward_stem(&x)?];
        for i in 0..n {
            let next = sn.forward_module(ModuleKey::new(i, Choice::Original), &feats[i])?;
            feats.push(next);
        }
        f(b, &feats)?;
    }
    Ok(())
}

/// The frozen part of `sn` (stem, head and original blocks, no branches) with BN folded into
/// the convs. The teacher's features and the original blocks on a student path run on it:
/// one fused kernel per conv instead of conv + BN + activation (and no BN ops in the
/// backward), equal to the unfolded oracle to ~1e-6. The exported supernet keeps the
/// unfolded original weights untouched.
fn frozen_folded(sn: &Supernet) -> Result<Supernet> {
    let mut f = sn.clone();
    f.modules.retain(|k, _| k.choice == Choice::Original);
    f.fold()?;
    Ok(f)
}

/// The sandwich rule's fixed paths of `spec`: `(smallest, largest)`, the paths with the fewest
/// and with the most MACs among those that use at least one branch (dynamic programming over
/// positions, ties to the earlier choice at a position). The all-original path is left out:
/// it is the frozen oracle and trains nothing.
pub fn sandwich_ends(spec: &SupernetSpec) -> Result<(Subnet, Subnet)> {
    let o = &spec.oracle;
    let [_, h, w] = o.input;
    let shapes = o.block_shapes(h, w);
    let n = spec.num_positions();
    let extreme = |better: fn(u64, u64) -> bool| -> Option<Subnet> {
        // best[i][need]: the best (MACs, choice index) from position i to the end, where
        // `need` says a branch must still come.
        let mut best: Vec<[Option<(u64, usize)>; 2]> = vec![[None; 2]; n + 1];
        best[n][0] = Some((0, 0));
        for i in (0..n).rev() {
            let [_, hi, wi] = shapes[i];
            for (ci, c) in spec.positions[i].iter().enumerate() {
                if i + c.span > n {
                    continue;
                }
                let m = c.block.macs(&o.numerics, hi, wi);
                for need in [false, true] {
                    let rest = need && c.id == Choice::Original;
                    let Some((r, _)) = best[i + c.span][usize::from(rest)] else {
                        continue;
                    };
                    let slot = &mut best[i][usize::from(need)];
                    if slot.is_none_or(|(b, _)| better(r + m, b)) {
                        *slot = Some((r + m, ci));
                    }
                }
            }
        }
        let (mut v, mut i, mut need) = (Vec::with_capacity(n), 0, true);
        while i < n {
            let (_, ci) = best[i][usize::from(need)]?;
            let c = &spec.positions[i][ci];
            v.push(c.id);
            v.extend(std::iter::repeat_n(Choice::Covered, c.span - 1));
            need = need && c.id == Choice::Original;
            i += c.span;
        }
        Some(Subnet(v))
    };
    match (extreme(|a, b| a < b), extreme(|a, b| a > b)) {
        (Some(small), Some(large)) => Ok((small, large)),
        _ => Err(TrainError::invalid(
            "branches",
            "the supernet has no branch: only the original path exists",
        )),
    }
}

/// The paths step `rng` of `stage` trains: one random path (the paper), or in a stage-1
/// sandwich step the largest, the smallest (unless it is the largest) and the random ones.
fn step_paths(
    spec: &SupernetSpec,
    config: &ElastifyConfig,
    stage: usize,
    ends: Option<&(Subnet, Subnet)>,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Vec<(Subnet, PathRole)>> {
    let mut paths = Vec::new();
    let random = match ends {
        Some((small, large)) if stage == 1 => {
            paths.push((large.clone(), PathRole::Largest));
            if small != large {
                paths.push((small.clone(), PathRole::Smallest));
            }
            config.sandwich_random
        }
        _ => 1,
    };
    for _ in 0..random {
        let s = spec.sample_weighted(rng, true, config.original_weight)?;
        paths.push((s, PathRole::Random));
    }
    Ok(paths)
}

/// Blocks a path runs and how many of them are branches.
fn path_size(s: &Subnet) -> (usize, usize) {
    let branches = s.steps().filter(|k| k.choice != Choice::Original).count();
    (s.steps().count(), branches)
}

/// A path through the supernet as module steps with their spans, from its first branch on.
struct PathPlan {
    path: Vec<(ModuleKey, usize)>,
    /// Index in `path` of the first branch (before it the path is the oracle's).
    first: usize,
    /// Block boundary after the last branch.
    last_end: usize,
}

impl PathPlan {
    fn new(sn: &Supernet, subnet: &Subnet) -> Result<PathPlan> {
        let n = sn.spec.num_positions();
        let path: Vec<(ModuleKey, usize)> = subnet
            .steps()
            .map(|k| (k, sn.spec.choice(k).map_or(1, |c| c.span)))
            .collect();
        let first = path
            .iter()
            .position(|(k, _)| k.choice != Choice::Original)
            .ok_or_else(|| {
                TrainError::Internal(format!("sampled subnet {subnet} uses no branch"))
            })?;
        let last_end = path
            .iter()
            .filter(|(k, _)| k.choice != Choice::Original)
            .map(|(k, span)| k.pos + span)
            .max()
            .unwrap_or(n);
        Ok(PathPlan {
            path,
            first,
            last_end,
        })
    }
}

/// One optimisation step on the paths of a step, all on batch `(x, y)`; returns each path's
/// loss. The losses are summed into one backward pass (gradients accumulate over the paths)
/// and one optimizer step; each path's BN statistics are applied in path order. `sn` is the
/// frozen, folded supernet of [`frozen_folded`]; branch weights come from `branches`.
#[allow(clippy::too_many_arguments)]
fn train_step(
    sn: &Supernet,
    branches: &mut BTreeMap<ModuleKey, TrainModule>,
    opt: &mut AdamW,
    config: &ElastifyConfig,
    stage: usize,
    paths: &[(Subnet, PathRole)],
    x: &Tensor,
    y: &Tensor,
    lr: f64,
) -> Result<Vec<f64>> {
    let n = sn.spec.num_positions();
    let plans: Vec<PathPlan> = paths
        .iter()
        .map(|(s, _)| PathPlan::new(sn, s))
        .collect::<Result<_>>()?;
    // The frozen oracle's features at every block boundary needed (no variables involved:
    // these carry no gradient), shared by the step's paths.
    let need = if stage == 0 {
        plans.iter().map(|p| p.last_end).max().unwrap_or(n)
    } else {
        n
    };
    let mut teacher = vec![sn.forward_stem(x)?];
    for i in 0..need {
        let t = sn.forward_module(ModuleKey::new(i, Choice::Original), &teacher[i])?;
        teacher.push(t);
    }
    let t_logits = if stage == 1 {
        Some(sn.forward_head(&teacher[n])?)
    } else {
        None
    };
    let mut used: Vec<(ModuleKey, TrainCtx)> = Vec::new();
    let mut total: Option<Tensor> = None;
    let mut values = Vec::with_capacity(paths.len());
    let mut largest: Option<Tensor> = None;
    for ((_, role), plan) in paths.iter().zip(&plans) {
        let (h, terms) = forward_path(sn, branches, config, stage, plan, &teacher, &mut used)?;
        let loss = match &t_logits {
            None => {
                let k = terms.len() as f64;
                Tensor::stack(&terms, 0)
                    .and_then(|t| t.sum_all())
                    .and_then(|t| t.affine(1.0 / k, 0.0))?
            }
            Some(t_logits) => {
                let logits = sn.forward_head(&h)?;
                let t = config.temperature;
                let loss = match (config.inplace_distill, role) {
                    (InplaceDistill::Off, _) | (_, PathRole::Largest) => {
                        let ce = cross_entropy(&logits, y)?;
                        let kd = kd_loss(&logits, t_logits, t)?;
                        (ce.affine(config.ce_weight, 0.0)?
                            + kd.affine(1.0 - config.ce_weight, 0.0)?)?
                    }
                    (InplaceDistill::Oracle, _) => kd_loss(&logits, t_logits, t)?,
                    (InplaceDistill::Largest, _) => {
                        let teacher = largest.as_ref().ok_or_else(|| {
                            TrainError::Internal(
                                "in-place distillation without a largest path".into(),
                            )
                        })?;
                        kd_loss(&logits, teacher, t)?
                    }
                };
                if *role == PathRole::Largest {
                    largest = Some(logits.detach());
                }
                loss
            }
        };
        values.push(f64::from(loss.to_scalar::<f32>()?));
        total = Some(match total {
            None => loss,
            Some(sum) => (sum + loss)?,
        });
    }
    let total = total.ok_or_else(|| TrainError::Internal("a step without a path".into()))?;
    let grads = total.backward()?;
    // A branch on several paths is one set of variables: one update from its summed gradient.
    let keys: BTreeSet<ModuleKey> = used.iter().map(|(k, _)| *k).collect();
    let mut vars = Vec::new();
    for key in &keys {
        vars.extend(branches[key].named_vars(&key.name()));
    }
    opt.step(&vars, &grads, lr)?;
    for (key, mut ctx) in used {
        if let Some(m) = branches.get_mut(&key) {
            m.apply(&mut ctx);
        }
    }
    Ok(values)
}

/// The student forward of one path from its first branch: the feature at its end (stage 1)
/// and, in stage 0, each branch's feature MSE against the oracle. The train-mode contexts of
/// the branches it ran go to `used`.
fn forward_path(
    sn: &Supernet,
    branches: &BTreeMap<ModuleKey, TrainModule>,
    config: &ElastifyConfig,
    stage: usize,
    plan: &PathPlan,
    teacher: &[Tensor],
    used: &mut Vec<(ModuleKey, TrainCtx)>,
) -> Result<(Tensor, Vec<Tensor>)> {
    // Up to the first branch the path is the oracle's: start from its feature.
    let mut h = teacher[plan.path[plan.first].0.pos].clone();
    let mut terms = Vec::new();
    for &(key, span) in &plan.path[plan.first..] {
        if stage == 0 && key.pos >= plan.last_end {
            break;
        }
        if key.choice == Choice::Original {
            // Stage 0 with detached branch inputs never differentiates an original block's
            // output (the next branch detaches it): run it as plain inference.
            if stage == 0 && config.stage0_detach_inputs {
                h = h.detach();
            }
            h = sn.forward_module(key, &h)?;
            continue;
        }
        let m = branches
            .get(&key)
            .ok_or_else(|| TrainError::Internal(format!("branch {key} missing")))?;
        let input = if stage == 0 && config.stage0_detach_inputs {
            h.detach()
        } else {
            h
        };
        let mut ctx = TrainCtx::new(BN_MOMENTUM);
        h = match config.branch_bn {
            BranchBn::Frozen => sn.forward_module_with(key, &m.params(), &input)?,
            // `elastify` resolved `Auto` before the first step.
            BranchBn::Batch | BranchBn::Calibrated | BranchBn::Auto => {
                sn.forward_module_train(key, &m.params(), &input, &mut ctx)?
            }
        };
        used.push((key, ctx));
        if stage == 0 {
            terms.push(mse(&h, &teacher[key.pos + span])?);
        }
    }
    Ok((h, terms))
}

/// Stage-0 loss of `subnet` in eval mode on `x`: mean over its branches of the feature MSE
/// against the oracle (the supernet's own original blocks) at the same block boundary.
pub fn feature_mse(sn: &Supernet, subnet: &Subnet, x: &Tensor) -> Result<f64> {
    sn.spec.validate(subnet)?;
    let mut teacher = vec![sn.forward_stem(x)?];
    for i in 0..sn.spec.num_positions() {
        let t = sn.forward_module(ModuleKey::new(i, Choice::Original), &teacher[i])?;
        teacher.push(t);
    }
    let mut h = teacher[0].clone();
    let (mut sum, mut k) = (0.0, 0);
    for key in subnet.steps() {
        h = sn.forward_module(key, &h)?;
        if key.choice != Choice::Original {
            let span = sn.spec.choice(key).map_or(1, |c| c.span);
            sum += mse(&h, &teacher[key.pos + span]).and_then(|t| t.to_scalar::<f32>())? as f64;
            k += 1;
        }
    }
    Ok(if k == 0 { 0.0 } else { sum / k as f64 })
}

fn encode(
    cur: &Cursor,
    fingerprint: &str,
    branches: &BTreeMap<ModuleKey, TrainModule>,
    opt: &OptimState,
) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (key, m) in branches {
        for (n, t) in m.snapshot()? {
            tensors.push((format!("branch.{key}.{n}"), t));
        }
    }
    for (n, t) in &opt.slots {
        tensors.push((format!("opt.{n}"), t.contiguous()?));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
    meta.insert("fingerprint".to_string(), fingerprint.to_string());
    meta.insert("stage".to_string(), cur.stage.to_string());
    meta.insert("step".to_string(), cur.step.to_string());
    meta.insert("samples".to_string(), cur.samples.to_string());
    meta.insert(
        "rng".to_string(),
        "chacha8 per step from (seed, stage, step)".to_string(),
    );
    meta.insert("losses".to_string(), to_json(&cur.losses)?);
    meta.insert("loss_windows".to_string(), to_json(&cur.windows)?);
    meta.insert("opt_steps".to_string(), to_json(&opt.steps)?);
    safetensors::tensor::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| TrainError::Internal(format!("checkpoint serialisation: {e}")))
}

fn restore(
    bytes: &[u8],
    fingerprint: &str,
    branches: &mut BTreeMap<ModuleKey, TrainModule>,
    opt: &mut AdamW,
) -> Result<Cursor> {
    let meta = CheckpointMeta::read(
        bytes,
        "elastification checkpoint",
        CHECKPOINT_FORMAT,
        fingerprint,
        "the checkpoint belongs to a different oracle or config; remove it or restore the \
         original settings",
    )?;
    let bad = |r: String| meta.bad(r);
    let get = |k: &str| meta.get(k);
    let num = |k: &str| -> Result<u64> { get(k)?.parse().map_err(|e| bad(format!("{k}: {e}"))) };
    let cur = Cursor {
        stage: num("stage")? as usize,
        step: num("step")?,
        samples: num("samples")?,
        losses: serde_json::from_str(&get("losses")?).map_err(|e| bad(e.to_string()))?,
        windows: serde_json::from_str(&get("loss_windows")?).map_err(|e| bad(e.to_string()))?,
    };
    if cur.stage > 1 {
        return Err(bad(format!("stage {}", cur.stage)));
    }
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    let mut per_module: HashMap<String, Params> = HashMap::new();
    let mut slots = BTreeMap::new();
    for (name, t) in tensors {
        if let Some(rest) = name.strip_prefix("branch.") {
            let (module, local) = rest.split_once('.').ok_or_else(|| bad(name.clone()))?;
            per_module
                .entry(module.to_string())
                .or_default()
                .insert(local.to_string(), t);
        } else if let Some(slot) = name.strip_prefix("opt.") {
            slots.insert(slot.to_string(), t);
        } else {
            return Err(bad(format!("unexpected tensor {name}")));
        }
    }
    for (key, m) in branches.iter_mut() {
        let name = key.name();
        let p = per_module
            .get(&name)
            .ok_or_else(|| bad(format!("missing module {name}")))?;
        m.load(p).map_err(|e| bad(format!("{name}: {e}")))?;
    }
    let steps = serde_json::from_str(&get("opt_steps")?).map_err(|e| bad(e.to_string()))?;
    opt.load_state(OptimState { slots, steps });
    Ok(cur)
}
