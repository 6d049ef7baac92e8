//! Elastification: training the branches of a supernet built from a frozen oracle.
//!
//! Stem, head and every original block stay frozen with BN in inference mode, so the
//! all-original subnet remains the oracle bit for bit. Each step samples one valid path that
//! uses at least one branch ([`SupernetSpec::sample`] with `require_branch`), then:
//! - stage 0 (feature distillation): loss = mean over the path's branches of the MSE between
//!   the branch output and the oracle's feature at the same block boundary; each branch is fed
//!   the subnet's own running feature (path-level distillation);
//! - stage 1 (task fine-tuning): `ce_weight * CE(logits, y) + (1 - ce_weight) * T^2 * KD`
//!   against the oracle's logits.
//!
//! Only branch weights train (AdamW, warm-up + cosine per stage, a fresh optimizer per stage);
//! branch BN layers run in train mode and their running statistics are kept. Checkpoints hold
//! branch tensors, optimizer state, stage, step and sample position (the RNG of a step is
//! derived from `(seed, stage, step)`), so a resumed run ends bit-identical to an
//! uninterrupted one.
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use adaptivenet_core::artifact::{params_to_safetensors, sha256_hex};
use adaptivenet_core::data::{AugmentPolicy, Dataset, Normalize};
use adaptivenet_core::model::{Model, ModelSpec, Params, TrainCtx};
use adaptivenet_core::supernet::{
    branches::{build_supernet, check_kinds_fit, keep_fitting_kinds},
    Choice, ModuleKey, Subnet, Supernet, SupernetConfig,
};
use candle_core::{Device, Tensor};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{to_json, CheckpointIo, CheckpointMeta};
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, OptimState, Optimizer, WarmupCosine};
use crate::oracle::check_data;
use crate::progress::{ProgressEvent, ProgressSink};
use crate::train::{
    cross_entropy, kd_loss, mse, step_rng, train_transform, BatchSampler, TrainModule, BN_MOMENTUM,
};

const CHECKPOINT_FORMAT: &str = "adaptivenet.elastify.checkpoint/1";

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
}

impl ElastifyConfig {
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
        Ok(sn)
    }

    fn steps(&self, stage: usize) -> u64 {
        [self.stage0_steps, self.stage1_steps][stage]
    }

    fn lr(&self, stage: usize) -> f64 {
        [self.lr_stage0, self.lr_stage1][stage]
    }

    /// What a checkpoint must agree with to be resumed (everything but `checkpoint_every`).
    fn fingerprint(&self, oracle_digest: &str) -> String {
        let c = ElastifyConfig {
            checkpoint_every: 0,
            ..self.clone()
        };
        sha256_hex(format!("{c:?}|{oracle_digest}").as_bytes())
    }
}

/// Loss and throughput of one stage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageReport {
    pub steps: u64,
    /// Per-step training losses of the whole stage (including steps before a resume).
    pub losses: Vec<f64>,
    /// Steps run by this invocation and their throughput (samples/s).
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
    let fingerprint = config.fingerprint(&oracle_digest(oracle)?);
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

    let frozen = frozen_folded(&supernet)?;
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
            let subnet = supernet
                .spec
                .sample_weighted(&mut rng, true, config.original_weight)?;
            let idx = sampler.batch(cur.samples, config.batch);
            let (x, y) = data.batch_tensor_augmented(&idx, &transform, &mut rng, &Device::Cpu)?;
            let lr = sched.lr(step);
            let loss = train_step(
                &frozen,
                &mut branches,
                &mut opt,
                config,
                stage,
                &subnet,
                &x,
                &y,
                lr,
            )?;
            if !loss.is_finite() {
                return Err(TrainError::Internal(format!(
                    "stage {stage} diverged at step {step} (loss {loss}); lower lr_stage{stage}"
                )));
            }
            cur.step += 1;
            cur.samples += config.batch as u64;
            cur.losses[stage].push(loss);
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
                lr,
                samples_per_sec: (run * config.batch as u64) as f64 / el,
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
            steps_run: run,
            samples_per_sec: (run * config.batch as u64) as f64 / time.as_secs_f64().max(1e-9),
            time,
        };
    }
    save(&cur, &branches, &opt)?;
    for (key, m) in &branches {
        supernet.modules.insert(*key, m.snapshot()?);
    }
    Ok(ElastifyOutcome { supernet, report })
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

/// One optimisation step on one sampled path; returns the loss. `sn` is the frozen, folded
/// supernet of [`frozen_folded`]; branch weights come from `branches`.
#[allow(clippy::too_many_arguments)]
fn train_step(
    sn: &Supernet,
    branches: &mut BTreeMap<ModuleKey, TrainModule>,
    opt: &mut AdamW,
    config: &ElastifyConfig,
    stage: usize,
    subnet: &Subnet,
    x: &Tensor,
    y: &Tensor,
    lr: f64,
) -> Result<f64> {
    let n = sn.spec.num_positions();
    let path: Vec<(ModuleKey, usize)> = subnet
        .steps()
        .map(|k| (k, sn.spec.choice(k).map_or(1, |c| c.span)))
        .collect();
    let first = path
        .iter()
        .position(|(k, _)| k.choice != Choice::Original)
        .ok_or_else(|| TrainError::Internal(format!("sampled subnet {subnet} uses no branch")))?;
    let last_end = path
        .iter()
        .filter(|(k, _)| k.choice != Choice::Original)
        .map(|(k, span)| k.pos + span)
        .max()
        .unwrap_or(n);
    // The frozen oracle's features at every block boundary needed (no variables involved:
    // these carry no gradient).
    let need = if stage == 0 { last_end } else { n };
    let mut teacher = vec![sn.forward_stem(x)?];
    for i in 0..need {
        let t = sn.forward_module(ModuleKey::new(i, Choice::Original), &teacher[i])?;
        teacher.push(t);
    }
    // Up to the first branch the path is the oracle's: start from its feature.
    let mut h = teacher[path[first].0.pos].clone();
    let mut terms = Vec::new();
    let mut used: Vec<(ModuleKey, TrainCtx)> = Vec::new();
    for &(key, span) in &path[first..] {
        if stage == 0 && key.pos >= last_end {
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
        h = sn.forward_module_train(key, &m.params(), &input, &mut ctx)?;
        used.push((key, ctx));
        if stage == 0 {
            terms.push(mse(&h, &teacher[key.pos + span])?);
        }
    }
    let loss = if stage == 0 {
        let k = terms.len() as f64;
        Tensor::stack(&terms, 0)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.affine(1.0 / k, 0.0))?
    } else {
        let logits = sn.forward_head(&h)?;
        let t_logits = sn.forward_head(&teacher[n])?;
        let ce = cross_entropy(&logits, y)?;
        let kd = kd_loss(&logits, &t_logits, config.temperature)?;
        (ce.affine(config.ce_weight, 0.0)? + kd.affine(1.0 - config.ce_weight, 0.0)?)?
    };
    let grads = loss.backward()?;
    let mut vars = Vec::new();
    for (key, _) in &used {
        vars.extend(branches[key].named_vars(&key.name()));
    }
    opt.step(&vars, &grads, lr)?;
    for (key, mut ctx) in used {
        if let Some(m) = branches.get_mut(&key) {
            m.apply(&mut ctx);
        }
    }
    Ok(f64::from(loss.to_scalar::<f32>()?))
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
