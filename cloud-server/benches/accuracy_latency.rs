//! The AdaptiveNet-style accuracy–latency table on Fashion-MNIST (issue #4, METHOD.md §1).
//!
//! `cargo bench --bench accuracy_latency` (from the repository root; needs the assets of
//! `scripts/fetch-assets.sh`). Environment:
//!
//! * `ACC_MODEL=resnet20|lite0` (default `resnet20`, the table below) and
//!   `ACC_DATASET=fmnist|fmnist-rgb64` (default: `fmnist` for ResNet-20, `fmnist-rgb64` for
//!   Lite0). `lite0` prints a second table (code in `accuracy_latency/lite0.rs`): the real
//!   EfficientNet-Lite0 ImageNet weights (`efficientnet-lite0/…pth` in the assets) with a
//!   fresh 10-class head, fine-tuned on Fashion-MNIST rendered once as 3x64x64 RGB PNGs into
//!   an ImageFolder under the work directory (`fmnist-rgb64-<train>-<test>/`, cached) and read
//!   through the cloud's `TrainingData::read` (mean/std from the data, crop-4 + flip);
//!   elastified with merge-2/3 and both prune levels; then, as below, chosen on a held-out
//!   search split and reported on test images at budgets 0.5 to 0.9 of the oracle's batch-1
//!   latency (1 thread, two passes), beside the same candidates with untrained branches.
//!   Lite0's space is too large to enumerate: the candidates are a seeded sample
//!   stratified by latency predicted from a measured per-module table, the oracle path, and
//!   the 4 best per budget of the edge agent's own evolutionary search on the search split
//!   (`ACC_SEARCH=sample` leaves these out). Its presets (`ACC_PRESET`):
//!   `quick` (2,300 train / 500 test images, 60 fine-tuning and 25 + 25 elastification
//!   steps of batch 32, 12 candidates; minutes), `medium` (12,000 / 2,000, 700 and 500 + 500 steps, 60
//!   candidates), `full` (all 60,000 / 10,000, 2,800 steps of 64 and 2,000 + 2,000, 160
//!   candidates). `ACC_FINETUNE_STEPS=N` and `ACC_CANDIDATES=K` override the preset;
//!   `ACC_STAGE_STEPS`, `ACC_ROUNDS`, `ACC_TRAIN_THREADS` and `ACC_FRESH` apply as below;
//!   `ACC_PARAMS='{"branch_bn":"frozen"}'` sets elastification job params (the keys of
//!   `client elastify --params`) over the preset's recipe (the cached supernet is reused only
//!   for the same steps and params); `ACC_WORK_DIR` is the root holding `lite0-<preset>/` and the rendered images. BENCH keys:
//!   `lite0_oracle_acc`, `lite0_retained_at_0_5` … `_0_9`, `lite0_untrained_at_0_6` / `_0_8`,
//!   `lite0_finetune_samples_per_s`, `lite0_elastify_samples_per_s`. With `ACC_BN_RECAL=1`
//!   a `recal` column shows each chosen subnet with its branches' BN statistics re-estimated
//!   on the search split, as `edge-agent --bn-recal branches` serves it
//!   (`lite0_retained_at_0_6_bn_recal`, `lite0_retained_at_0_8_bn_recal`), and a `pick`
//!   column, `edge-agent run --bn-recal branches --recal-pick K` (`ACC_RECAL_PICK=K`, default
//!   4): per budget the K best fitting candidates by search-split accuracy (pooled over the
//!   budgets of a pass), their branches' BN recalibrated and re-scored on the search split,
//!   the best re-scored one reported on test images (`lite0_retained_at_0_5_recal_pick` …
//!   `_0_9_recal_pick`). `ACC_LATENCY_CACHE=FILE`: the per-module latency table, the
//!   candidate list and both latency passes are read from FILE (JSON) if it exists, else
//!   measured and written there, so recipes (`ACC_PARAMS`, `ACC_BN_RECAL`, …) are compared
//!   on one candidate set: a fresh draw of candidates moves the 0.5-0.7 columns more than
//!   most recipe changes (the supernet must have the same modules; `lite0_latency_cached`).
//!   `ACC_VERBOSE=1` prints every candidate's latency and search-split accuracy (trained and
//!   untrained branches) and each branch alone on the oracle path, to see which branches
//!   work.
//! * `ACC_PRESET=full|quick` (default `full`): `full` is the reference recipe (17-epoch
//!   ResNet-20 oracle; 3,450 + 4,730 elastification steps of batch 128, the sample budget of
//!   the PyTorch reference run in issue #4; 100 timed rounds);
//!   `quick` is a smoke run of a few minutes whose accuracies mean little.
//! * `ACC_ORACLE_DIR=DIR`: use `DIR/oracle.arch.json` + `DIR/oracle.safetensors` instead of
//!   training one (e.g. the output of `cloud-server train-oracle`).
//! * `ACC_WORK_DIR=DIR` (default `target/accuracy_latency/<preset>`): trained oracle, supernet
//!   and scratch baselines are cached there with the timings of the run that made them, so a
//!   rerun only re-measures; `ACC_FRESH=1` retrains. Each training run checkpoints every 200
//!   steps under `<name>-checkpoint/` there, so an interrupted bench resumes where it
//!   stopped; throughput and `elastify_s` then come from the steps the last run did.
//! * `ACC_ROUNDS=N`: timed rounds per latency pass.
//! * `ACC_STAGE_STEPS=S0,S1`: elastification steps per stage instead of the preset's (the
//!   scratch baselines follow the total).
//! * `ACC_ORIGINAL_WEIGHT=W`: path-sampling weight of an original block against 1 per branch
//!   (`ElastifyConfig::original_weight`; default the library's).
//! * `ACC_ABLATION=1` (or a comma-separated list of variant names): after the main table, an
//!   ablation of the elastification schedule. Each variant is trained at the preset's sample
//!   budget (images times paths trained through; a sandwich step trains 2 + 2 paths on its
//!   batch, so its stage 1 gets a quarter of the steps; stage 0 is the same run for all),
//!   cached beside the main supernet as `supernet-<variant>/`, chosen and reported like the
//!   AdaptiveNet column on the same latency passes; the table prints retained accuracy at
//!   every budget (1 and 2 threads) and elastification time. Names are `+`-joined tokens:
//!   `paper` (one random path per step, the main table's), `sandwich` (smallest + largest +
//!   2 random paths per step), `kd-oracle` / `kd-largest` (in-place distillation, with
//!   `sandwich`), `wW` (original weight W). `1` runs `paper`, `w0.5`, `sandwich`,
//!   `sandwich+kd-oracle`, `sandwich+kd-largest`. BENCH key `ablation`.
//! * `ACC_BASELINES=0`: skip training the scratch baselines (their column shows `-`); for
//!   quick looks at a supernet, not for the reported table.
//! * `ACC_TRAIN_THREADS=N`: training threads (default every hardware thread).
//! * `ACC_BN_RECAL=1`: BN recalibration as `edge-agent --bn-recal all` does it: the column
//!   `recal` (and `retained_at_0_*_bn_recal`) reports each chosen AdaptiveNet subnet with
//!   every BN of its path re-estimated on the search split (no labels); a second table
//!   compares, for the 4- and 5-block subnets, choosing after recalibration too; a third,
//!   the subnets chosen at 0.50 and 0.60 on a device that sees all classes and on one that
//!   sees footwear only (`off` / `branches` / `all` / `auto`).
//! * `ACC_TORCH=0` skips the same-host comparison with PyTorch, which runs by default when
//!   `$BENCH_PYTHON` (default `python3`) has torch: a short run of the same recipe is timed
//!   step by step, and `accuracy_latency/elastify_peer.py` repeats exactly the paths those
//!   steps trained in PyTorch, on the same weights, batch and thread count (code in
//!   `accuracy_latency/torch_peer.rs`). BENCH keys `elastify_ratio_torch` (ours / PyTorch,
//!   time per sample over both stages) and `_stage0` / `_stage1`.
//! * `ACC_ALL_SUBNETS=1`: also evaluate every subnet on the test set and print, per block
//!   count, the search-chosen and the best test accuracy (a diagnostic of the search split).
//! * `ADAPTIVENET_THREADS` is not read: training and accuracy evaluation run on every hardware
//!   thread (as `cloud-server` does by default; `train_threads` in the BENCH line), latency
//!   is measured at 1 and at 2 threads.
//!
//! Protocol: the search split is 1,000 training images held out from every training run
//! (oracle, elastification, scratch baselines); subnets are *chosen* on it and *reported* on
//! the 10k test set. Every candidate of every method is timed at batch 1 in the same passes:
//! warm-up, then rounds over all candidates in a freshly shuffled order (interleaved), median
//! per candidate. Choice and report use the same pass; a second pass repeats the choice.
//!
//! Methods at each budget (a fraction of the oracle's latency in the same pass):
//! * **AdaptiveNet**: all subnets of the trained merge-only supernet (exhaustive).
//! * **untrained**: the same supernet with branches only weight-inherited (pretraining-assisted
//!   initialisation, no training); same architectures, so the same latencies.
//! * **drop**: the oracle with any subset of its shape-preserving blocks replaced by identity.
//! * **scratch**: smaller networks of the same family (ResNet-8, ResNet-14) trained from scratch
//!   on as many samples as elastification used.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use adaptivenet_cloud::elastify::cli::RESNET20_FASHION;
use adaptivenet_core::artifact::{load_supernet, read_manifest, write_artifact, InputSpec};
use adaptivenet_core::data::{fashion_mnist, Dataset};
use adaptivenet_core::data::{AugmentPolicy, Normalize};
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::branches::build_supernet;
use adaptivenet_core::supernet::{Choice, ModuleKey, Subnet, Supernet, SupernetConfig};
use adaptivenet_kernels::threads;
use adaptivenet_train::pipeline::split_validation;
use adaptivenet_train::progress::LOSS_WINDOW;
use adaptivenet_train::train::{correct, eval_transform};
use adaptivenet_train::{
    elastify, train_oracle_resumable, DirCheckpoints, ElastifyConfig, InplaceDistill,
    TrainOracleConfig,
};
use adaptivenet_train::{ProgressEvent, ProgressSink};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[path = "accuracy_latency/lite0.rs"]
mod lite0;
#[path = "accuracy_latency/torch_peer.rs"]
mod torch_peer;

const BUDGETS: [f64; 10] = [0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95];
const SEARCH_IMAGES: usize = 1000;
const SEED: u64 = 0;

/// Run sizes of one preset.
struct Preset {
    name: &'static str,
    oracle_epochs: f64,
    oracle_batch: usize,
    /// Elastification steps of stage 0 and stage 1.
    stage_steps: [u64; 2],
    elastify_batch: usize,
    rounds: usize,
    warmup_runs: usize,
    original_weight: f64,
}

impl Preset {
    fn from_env() -> Result<Preset> {
        let name = std::env::var("ACC_PRESET").unwrap_or_else(|_| "full".into());
        let mut p = match name.as_str() {
            "full" => Preset {
                name: "full",
                oracle_epochs: 17.0,
                oracle_batch: 128,
                // The PyTorch reference run's sample budget (issue #4): stage 0 for 8 min at
                // 919 samples/s, stage 1 for 12 min at 841 samples/s, batch 128.
                stage_steps: [3450, 4730],
                elastify_batch: 128,
                rounds: 100,
                warmup_runs: 5,
                original_weight: ElastifyConfig::default().original_weight,
            },
            "quick" => Preset {
                name: "quick",
                oracle_epochs: 0.3,
                oracle_batch: 128,
                stage_steps: [40, 40],
                elastify_batch: 64,
                rounds: 15,
                warmup_runs: 2,
                original_weight: ElastifyConfig::default().original_weight,
            },
            other => bail!("ACC_PRESET={other}: expected `full` or `quick`"),
        };
        if let Ok(r) = std::env::var("ACC_ROUNDS") {
            p.rounds = r
                .parse()
                .ok()
                .filter(|&r: &usize| r >= 3)
                .with_context(|| format!("ACC_ROUNDS={r}: expected an integer >= 3"))?;
        }
        if let Ok(v) = std::env::var("ACC_STAGE_STEPS") {
            let steps: Vec<u64> = v
                .split(',')
                .map(|x| x.trim().parse::<u64>())
                .collect::<Result<_, _>>()
                .ok()
                .filter(|s: &Vec<u64>| s.len() == 2 && s[0] + s[1] > 0)
                .with_context(|| format!("ACC_STAGE_STEPS={v}: expected S0,S1 (integers)"))?;
            p.stage_steps = [steps[0], steps[1]];
        }
        if let Ok(v) = std::env::var("ACC_ORIGINAL_WEIGHT") {
            p.original_weight = v
                .parse()
                .ok()
                .filter(|w: &f64| w.is_finite() && *w > 0.0)
                .with_context(|| format!("ACC_ORIGINAL_WEIGHT={v}: expected a positive number"))?;
        }
        Ok(p)
    }

    /// Samples seen by elastification: the training budget of the scratch baselines.
    fn elastify_samples(&self) -> u64 {
        (self.stage_steps[0] + self.stage_steps[1]) * self.elastify_batch as u64
    }
}

/// A progress line every ~10% on stderr: these runs take minutes to hours.
struct Log(&'static str, u64);

impl ProgressSink for Log {
    fn report(&mut self, e: &ProgressEvent) {
        let pct = (e.fraction() * 100.0) as u64;
        if pct / 10 != self.1 / 10 || e.global_step == e.total_steps {
            self.1 = pct;
            eprintln!(
                "  [{}] {} step {}/{} loss {:.4} avg {:.4} {:.0} samples/s eta {:.0} s",
                self.0,
                e.stage,
                e.global_step,
                e.total_steps,
                e.loss,
                e.loss_avg,
                e.samples_per_sec,
                e.eta.as_secs_f64()
            );
            if !e.loss_by_blocks.is_empty() {
                eprintln!("      avg by blocks: {}", e.sizes_line());
            }
        }
    }
}

fn work_dir(p: &Preset) -> PathBuf {
    if let Ok(d) = std::env::var("ACC_WORK_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("accuracy_latency").join(p.name)
}

fn fresh() -> bool {
    std::env::var("ACC_FRESH").is_ok_and(|v| v == "1")
}

fn env_flag(name: &str, default: bool) -> bool {
    std::env::var(name).map_or(default, |v| v == "1")
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Trains (or reuses) a network of `arch_json` on `train` for `steps` with the oracle recipe.
fn trained_model(
    dir: &Path,
    arch_json: &str,
    steps: u64,
    batch: usize,
    train: &Dataset,
    label: &'static str,
) -> Result<(Model, Value)> {
    let (arch, weights, report) = (
        dir.join("oracle.arch.json"),
        dir.join("oracle.safetensors"),
        dir.join("train-report.json"),
    );
    if !fresh() && weights.exists() {
        if let Some(r) = read_json(&report) {
            if r["steps"] == json!(steps) {
                eprintln!("{label}: reusing {}", dir.display());
                return Ok((Model::from_files(&arch, &weights)?, r));
            }
            eprintln!(
                "{label}: {} holds a {}-step run, not {steps}: retraining",
                dir.display(),
                r["steps"]
            );
        }
    }
    let spec = ArchDescriptor::from_json(arch_json.as_bytes())?.spec;
    let per_epoch = TrainOracleConfig::steps_for_epochs(1.0, train.len(), batch);
    let cfg = TrainOracleConfig {
        steps,
        batch,
        warmup_steps: per_epoch.min(steps / 10).max(1),
        seed: SEED,
        checkpoint_every: 200,
        normalize: fashion_normalize(),
        augment: fashion_augment(),
        ..TrainOracleConfig::default()
    };
    eprintln!("{label}: training {steps} steps of batch {batch} ...");
    let ck = checkpoints(dir)?;
    let (model, r) = train_oracle_resumable(
        &spec,
        &cfg,
        train,
        None,
        &mut Log(label, 0),
        &CancellationToken::new(),
        Some(&ck),
        None,
    )?;
    std::fs::create_dir_all(dir)?;
    model.save(&arch, &weights)?;
    let r = json!({
        "steps": r.steps,
        "batch": batch,
        "images_per_sec": r.images_per_sec,
        "train_seconds": r.train_time.as_secs_f64(),
    });
    std::fs::write(&report, r.to_string())?;
    Ok((model, r))
}

/// Checkpoints of the training run that fills `dir`, kept beside it.
fn checkpoints(dir: &Path) -> Result<DirCheckpoints> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("a work directory name")?;
    let ck = dir.with_file_name(format!("{name}-checkpoint"));
    std::fs::create_dir_all(&ck)?;
    Ok(DirCheckpoints::new(ck))
}

/// Random paths of a sandwich step in the ablation (BigNAS and Once-for-All use 2).
const SANDWICH_RANDOM: u32 = 2;

/// One elastification schedule of the ablation (`ACC_ABLATION`), named by `+`-joined
/// tokens: `paper` (one random path per step), `sandwich`, `kd-oracle` / `kd-largest`
/// (in-place distillation, with `sandwich`), `wW` (original weight W).
#[derive(Clone, Debug)]
struct Variant {
    name: String,
    original_weight: f64,
    sandwich: bool,
    inplace: InplaceDistill,
}

impl Variant {
    /// The schedule the main table uses: the paper's, with the preset's original weight.
    fn paper(p: &Preset) -> Variant {
        Variant {
            name: "paper".into(),
            original_weight: p.original_weight,
            sandwich: false,
            inplace: InplaceDistill::Off,
        }
    }

    fn parse(name: &str, p: &Preset) -> Result<Variant> {
        let mut v = Variant::paper(p);
        v.name = name.to_string();
        for token in name.split('+') {
            match token {
                "paper" => {}
                "sandwich" => v.sandwich = true,
                "kd-oracle" => v.inplace = InplaceDistill::Oracle,
                "kd-largest" => v.inplace = InplaceDistill::Largest,
                w if w.starts_with('w') => {
                    v.original_weight = w[1..]
                        .parse()
                        .ok()
                        .filter(|w: &f64| w.is_finite() && *w > 0.0)
                        .with_context(|| format!("ACC_ABLATION: {token}: expected wW, W > 0"))?;
                }
                other => bail!(
                    "ACC_ABLATION: unknown token {other:?} (paper, sandwich, kd-oracle, kd-largest, wW)"
                ),
            }
        }
        if v.inplace != InplaceDistill::Off && !v.sandwich {
            bail!("ACC_ABLATION: {name}: in-place distillation needs `sandwich`");
        }
        Ok(v)
    }

    /// `ACC_ABLATION`: `1` for the standard list, or a comma-separated list of names.
    fn from_env(p: &Preset) -> Result<Vec<Variant>> {
        let list = match std::env::var("ACC_ABLATION") {
            Err(_) => return Ok(Vec::new()),
            Ok(v) if v == "0" || v.is_empty() => return Ok(Vec::new()),
            Ok(v) if v == "1" => {
                "paper,w0.5,sandwich,sandwich+kd-oracle,sandwich+kd-largest".to_string()
            }
            Ok(v) => v,
        };
        list.split(',')
            .map(|n| Variant::parse(n.trim(), p))
            .collect()
    }

    /// Paths a stage-1 step trains.
    fn paths(&self) -> u64 {
        if self.sandwich {
            2 + u64::from(SANDWICH_RANDOM)
        } else {
            1
        }
    }

    /// Steps per stage at the preset's sample budget: a sandwich step trains `paths()`
    /// paths on its batch, so stage 1 gets that many times fewer steps.
    fn stage_steps(&self, p: &Preset) -> [u64; 2] {
        [
            p.stage_steps[0],
            (p.stage_steps[1] / self.paths()).max(u64::from(p.stage_steps[1] > 0)),
        ]
    }

    /// Images times paths trained through: the sample budget.
    fn samples(&self, p: &Preset) -> u64 {
        let s = self.stage_steps(p);
        (s[0] + s[1] * self.paths()) * p.elastify_batch as u64
    }

    /// What the cache must match besides the steps.
    fn schedule(&self) -> Value {
        json!({
            "sandwich": self.sandwich,
            "sandwich_random": if self.sandwich { SANDWICH_RANDOM } else { 0 },
            "inplace_distill": self.inplace,
        })
    }

    /// The paper's schedule is the main table's supernet; the others sit beside it.
    fn dir(&self, wd: &Path) -> PathBuf {
        if self.name == "paper" {
            wd.join("supernet")
        } else {
            wd.join(format!("supernet-{}", self.name.replace('+', "-")))
        }
    }
}

/// The bench's elastification recipe for variant `v` of preset `p`.
fn elastify_config(p: &Preset, v: &Variant) -> ElastifyConfig {
    let steps = v.stage_steps(p);
    ElastifyConfig {
        branches: vec!["merge2".into(), "merge3".into()],
        seed: SEED,
        stage0_steps: steps[0],
        stage1_steps: steps[1],
        batch: p.elastify_batch,
        // From the preset's steps, so that every variant's stage 0 is the same run.
        warmup_steps: (p.stage_steps[0].min(p.stage_steps[1]) / 30).clamp(1, 100),
        checkpoint_every: 200,
        original_weight: v.original_weight,
        sandwich: v.sandwich,
        sandwich_random: SANDWICH_RANDOM,
        inplace_distill: v.inplace,
        normalize: fashion_normalize(),
        augment: fashion_augment(),
        ..ElastifyConfig::default()
    }
}

/// Elastifies (or reuses) the merge-only supernet with schedule `v`; returns it with its
/// timing report.
fn trained_supernet(
    dir: &Path,
    p: &Preset,
    v: &Variant,
    oracle: &Model,
    train: &Dataset,
) -> Result<(Supernet, Value)> {
    let report = dir.join("elastify-report.json");
    let steps = v.stage_steps(p);
    if !fresh() {
        if let (Ok(m), Some(r)) = (read_manifest(dir), read_json(&report)) {
            let cached = [&r["stages"][0]["steps"], &r["stages"][1]["steps"]];
            // Reports written before the knobs existed were trained with weight 1, one path.
            let weight = r["original_weight"].as_f64().unwrap_or(1.0);
            let schedule = match &r["schedule"] {
                Value::Null => Variant::paper(p).schedule(),
                s => s.clone(),
            };
            if cached == [&json!(steps[0]), &json!(steps[1])]
                && weight == v.original_weight
                && schedule == v.schedule()
            {
                eprintln!("supernet {}: reusing {}", v.name, dir.display());
                return Ok((load_supernet(dir, &m, None)?, r));
            }
            eprintln!(
                "supernet {}: {} holds a {} + {}-step run with original weight {weight}, {schedule}, not {} + {} with {}, {}: retraining",
                v.name,
                dir.display(),
                cached[0],
                cached[1],
                steps[0],
                steps[1],
                v.original_weight,
                v.schedule()
            );
        }
    }
    let cfg = elastify_config(p, v);
    let ck = checkpoints(dir)?;
    eprintln!(
        "supernet {}: elastifying, {} + {} steps of batch {} ({} path(s) per stage-1 step), original weight {} ...",
        v.name, cfg.stage0_steps, cfg.stage1_steps, cfg.batch, v.paths(), cfg.original_weight
    );
    let t0 = Instant::now();
    let out = elastify(
        oracle,
        &cfg,
        train,
        &mut Log("elastify", 0),
        Some(&ck),
        &CancellationToken::new(),
    )?;
    for (k, s) in out.report.stages.iter().enumerate() {
        let sizes: Vec<String> = s
            .loss_by_blocks
            .iter()
            .map(|b| {
                format!(
                    "{}b {:.3} ({:.0}% branches)",
                    b.blocks,
                    b.loss,
                    100.0 * b.branch_share
                )
            })
            .collect();
        eprintln!(
            "  stage {k}: loss of the last {} steps {:.4}; by path size: {}",
            s.losses.len().min(LOSS_WINDOW),
            s.tail_mean(LOSS_WINDOW),
            sizes.join(", ")
        );
    }
    let mut secs = t0.elapsed().as_secs_f64();
    if out.report.resumed_from.is_some() {
        // Only part of the run happened here: extrapolate from its measured throughput.
        // A stage finished before the resume ran no steps here; use the throughput of the
        // steps that did run for the whole sample budget.
        let (run, t): (u64, f64) = out
            .report
            .stages
            .iter()
            .filter(|s| s.steps_run > 0)
            .fold((0, 0.0), |(n, t), s| {
                (n + s.steps_run, t + s.time.as_secs_f64())
            });
        if run > 0 {
            secs = t / run as f64 * (steps[0] + steps[1]) as f64;
        }
        eprintln!(
            "supernet: resumed run, elastify_s extrapolated from its throughput: {secs:.0} s"
        );
    }
    let stages: Vec<Value> = out
        .report
        .stages
        .iter()
        .map(|s| json!({"steps": s.steps, "samples_per_sec": s.samples_per_sec, "seconds": s.time.as_secs_f64()}))
        .collect();
    let r = json!({
        "seconds": secs,
        "samples_per_sec": v.samples(p) as f64 / secs,
        "stages": stages,
        "original_weight": v.original_weight,
        "schedule": v.schedule(),
        "threads": threads::max_threads(),
    });
    std::fs::create_dir_all(dir)?;
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.2860],
        std: vec![0.3530],
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    write_artifact(dir, &out.supernet, input, "bench", Vec::new())?;
    std::fs::write(&report, r.to_string())?;
    Ok((out.supernet, r))
}

/// A candidate network: a path through a supernet (block positions may be skipped, i.e.
/// identity) or a standalone model.
#[derive(Clone)]
enum Net {
    /// Module steps through supernet `sn` (0 trained, 1 untrained).
    Path {
        sn: usize,
        steps: Vec<ModuleKey>,
    },
    Model(usize),
}

struct Method {
    name: &'static str,
    /// (label, index into the accuracy and per-pass latency tables)
    cands: Vec<(String, usize)>,
}

/// Top-1 accuracy of every net on `data`; supernet paths share stem and prefixes per batch.
fn accuracies(
    nets: &[Net],
    sns: &[&Supernet],
    models: &[Model],
    data: &Dataset,
) -> Result<Vec<f64>> {
    let t = eval_transform(&fashion_normalize());
    let mut hits = vec![0u64; nets.len()];
    // Group paths by supernet, sorted by steps so that neighbours share prefixes.
    let mut order: Vec<usize> = (0..nets.len()).collect();
    order.sort_by(|&a, &b| match (&nets[a], &nets[b]) {
        (Net::Path { sn: x, steps: s }, Net::Path { sn: y, steps: t }) => (x, s).cmp(&(y, t)),
        (Net::Path { .. }, Net::Model(_)) => std::cmp::Ordering::Less,
        (Net::Model(_), Net::Path { .. }) => std::cmp::Ordering::Greater,
        (Net::Model(x), Net::Model(y)) => x.cmp(y),
    });
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(500) {
        let (x, y) = data.batch_tensor(chunk, &t, &Device::Cpu)?;
        let stems: Vec<Tensor> = sns
            .iter()
            .map(|s| s.forward_stem(&x))
            .collect::<Result<_, _>>()?;
        let mut cur_sn = usize::MAX;
        let mut stack: Vec<(ModuleKey, Tensor)> = Vec::new();
        for &k in &order {
            match &nets[k] {
                Net::Path { sn, steps } => {
                    if *sn != cur_sn {
                        cur_sn = *sn;
                        stack.clear();
                    }
                    let shared = stack
                        .iter()
                        .zip(steps)
                        .take_while(|((a, _), b)| a == *b)
                        .count();
                    stack.truncate(shared);
                    for &key in &steps[shared..] {
                        let input = stack.last().map_or(&stems[*sn], |(_, f)| f);
                        let out = sns[*sn].forward_module(key, input)?;
                        stack.push((key, out));
                    }
                    let h = stack.last().map_or(&stems[*sn], |(_, f)| f);
                    hits[k] += correct(&sns[*sn].forward_head(h)?, &y)?;
                }
                Net::Model(m) => hits[k] += correct(&models[*m].forward(&x)?, &y)?,
            }
        }
    }
    Ok(hits.iter().map(|&h| h as f64 / data.len() as f64).collect())
}

/// What the ablation shares with the main table: data, candidates, latency passes and the
/// search-split accuracies of the other methods.
struct AblationCtx<'a> {
    wd: &'a Path,
    p: &'a Preset,
    oracle: &'a Model,
    train: &'a Dataset,
    search: &'a Dataset,
    test: &'a Dataset,
    an: &'a Method,
    acc_nets: &'a [Net],
    passes: &'a BTreeMap<(usize, usize), Vec<f64>>,
    oracle_idx: usize,
    search_acc: &'a [f64],
    oracle_acc: f64,
}

/// `ACC_ABLATION`: each schedule's supernet, trained at the preset's sample budget, chosen on
/// the search split and reported on the test set exactly as the AdaptiveNet column (same
/// candidates and the same latency passes: weights do not change a path's latency).
fn ablation_table(c: &AblationCtx, variants: &[Variant]) -> Result<Value> {
    let mut rows = Vec::new();
    for v in variants {
        let (mut sn, report) = trained_supernet(&v.dir(c.wd), c.p, v, c.oracle, c.train)?;
        sn.fold()?;
        let nets: Vec<Net> = c.an.cands.iter().map(|k| c.acc_nets[k.1].clone()).collect();
        let at = |i: usize| {
            c.an.cands
                .iter()
                .position(|k| k.1 == i)
                .expect("an AdaptiveNet candidate")
        };
        eprintln!(
            "ablation {}: {} subnets on the search split ...",
            v.name,
            nets.len()
        );
        let v_search = accuracies(&nets, &[&sn], &[], c.search)?;
        let mut sacc = c.search_acc.to_vec();
        for (k, cand) in c.an.cands.iter().enumerate() {
            sacc[cand.1] = v_search[k];
        }
        let mut picks: BTreeMap<(usize, usize), Option<usize>> = BTreeMap::new();
        for t in [1usize, 2] {
            let lat = &c.passes[&(t, 0)];
            for (bi, b) in BUDGETS.iter().enumerate() {
                let pick = choose(c.an, lat, &sacc, b * lat[c.oracle_idx]).map(|i| c.an.cands[i].1);
                picks.insert((t, bi), pick);
            }
        }
        let mut need: BTreeSet<usize> = picks.values().flatten().copied().collect();
        need.insert(c.oracle_idx);
        let need: Vec<usize> = need.into_iter().collect();
        let test_nets: Vec<Net> = need.iter().map(|&i| nets[at(i)].clone()).collect();
        let accs = accuracies(&test_nets, &[&sn], &[], c.test)?;
        let test_acc: BTreeMap<usize, f64> = need.iter().copied().zip(accs).collect();
        if test_acc[&c.oracle_idx] != c.oracle_acc {
            bail!(
                "ablation {}: the all-original path scores {} on the test set, the oracle {}",
                v.name,
                test_acc[&c.oracle_idx],
                c.oracle_acc
            );
        }
        let retained = |t: usize| -> Vec<Option<f64>> {
            (0..BUDGETS.len())
                .map(|bi| picks[&(t, bi)].map(|i| test_acc[&i] / c.oracle_acc))
                .collect()
        };
        let subnets = |t: usize| -> Vec<String> {
            (0..BUDGETS.len())
                .map(|bi| picks[&(t, bi)].map_or("-".into(), |i| c.an.cands[at(i)].0.clone()))
                .collect()
        };
        rows.push(json!({
            "variant": v.name,
            "stage_steps": v.stage_steps(c.p),
            "paths_per_stage1_step": v.paths(),
            "samples": v.samples(c.p),
            "original_weight": v.original_weight,
            "elastify_s": report["seconds"],
            "samples_per_s": report["samples_per_sec"],
            "stage1_samples_per_s": report["stages"][1]["samples_per_sec"],
            "retained": retained(1),
            "retained_threads2": retained(2),
            "subnets": subnets(1),
        }));
    }
    println!();
    println!(
        "ablation of the elastification schedule (each variant {} images x paths trained; retained = test acc / oracle's, chosen on the search split, latency pass 1):",
        variants.first().map_or(0, |v| v.samples(c.p))
    );
    for (t, key) in [(1, "retained"), (2, "retained_threads2")] {
        println!();
        print!(
            "threads {t}: {:<24} {:>11} {:>10} {:>9} |",
            "variant", "s1 steps*p", "elastify s", "samples/s"
        );
        for b in BUDGETS {
            print!(" {:>6.2}", b);
        }
        println!(" | {:>6}", "mean");
        for r in &rows {
            let vals: Vec<Option<f64>> = r[key]
                .as_array()
                .map(|a| a.iter().map(Value::as_f64).collect())
                .unwrap_or_default();
            print!(
                "           {:<24} {:>11} {:>10.0} {:>9.0} |",
                r["variant"].as_str().unwrap_or("?"),
                format!("{}*{}", r["stage_steps"][1], r["paths_per_stage1_step"]),
                r["elastify_s"].as_f64().unwrap_or(f64::NAN),
                r["samples_per_s"].as_f64().unwrap_or(f64::NAN),
            );
            for v in &vals {
                print!(
                    " {:>6}",
                    v.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v))
                );
            }
            let got: Vec<f64> = vals.iter().flatten().copied().collect();
            let mean = got.iter().sum::<f64>() / got.len().max(1) as f64;
            println!(" | {:>5.2}%", 100.0 * mean);
        }
    }
    Ok(Value::Array(rows))
}

/// Batch-1 forward of one net (folded weights).
fn run(net: &Net, sns: &[&Supernet], models: &[Model], x: &Tensor) -> Result<Tensor> {
    Ok(match net {
        Net::Path { sn, steps } => {
            let sn = sns[*sn];
            let mut h = sn.forward_stem(x)?;
            for &key in steps {
                h = sn.forward_module(key, &h)?;
            }
            sn.forward_head(&h)?
        }
        Net::Model(m) => models[*m].forward(x)?,
    })
}

/// One latency pass: median ms per net over `rounds` interleaved, shuffled rounds.
fn latency_pass(
    nets: &[Net],
    sns: &[&Supernet],
    models: &[Model],
    p: &Preset,
    seed: u64,
) -> Result<Vec<f64>> {
    let x = Tensor::randn(0f32, 1.0, (1, 1, 28, 28), &Device::Cpu)?;
    for net in nets {
        for _ in 0..p.warmup_runs {
            run(net, sns, models, &x)?;
        }
    }
    let mut times = vec![Vec::with_capacity(p.rounds); nets.len()];
    let mut order: Vec<usize> = (0..nets.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..p.rounds {
        order.shuffle(&mut rng);
        for &k in &order {
            let t0 = Instant::now();
            let y = run(&nets[k], sns, models, &x)?;
            // Force the result (candle's CPU backend is synchronous; this keeps it honest).
            let _ = y.dims();
            times[k].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

/// Chooses, per budget, the candidate with the best search accuracy within the budget.
fn choose(m: &Method, lat: &[f64], search_acc: &[f64], limit: f64) -> Option<usize> {
    (0..m.cands.len())
        .filter(|&i| lat[m.cands[i].1] <= limit)
        .max_by(|&a, &b| {
            search_acc[m.cands[a].1]
                .total_cmp(&search_acc[m.cands[b].1])
                .then(lat[m.cands[b].1].total_cmp(&lat[m.cands[a].1]))
        })
}

/// `ACC_ALL_SUBNETS=1`: every AdaptiveNet subnet on the test set, summarised per block count
/// (block count is what a latency budget effectively fixes on these kernels).
fn all_subnets_table(
    an: &Method,
    acc_nets: &[Net],
    sns: &[&Supernet],
    models: &[Model],
    test: &Dataset,
    search_acc: &[f64],
    oracle_acc: f64,
) -> Result<()> {
    let nets: Vec<Net> = an.cands.iter().map(|c| acc_nets[c.1].clone()).collect();
    let test_acc = accuracies(&nets, sns, models, test)?;
    let mut by_blocks: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (k, net) in nets.iter().enumerate() {
        if let Net::Path { steps, .. } = net {
            by_blocks.entry(steps.len()).or_default().push(k);
        }
    }
    println!();
    println!("all subnets on the test set, per block count (retained = test acc / oracle's):");
    println!(
        "{:>6} {:>5} | {:>9} {:>8} {:>8} | {:>9} {:>8} | {:>8}",
        "blocks", "n", "chosen", "search", "retained", "best", "retained", "median"
    );
    for (blocks, ks) in &by_blocks {
        let chosen = *ks
            .iter()
            .max_by(|&&a, &&b| search_acc[an.cands[a].1].total_cmp(&search_acc[an.cands[b].1]))
            .expect("non-empty");
        let best = *ks
            .iter()
            .max_by(|&&a, &&b| test_acc[a].total_cmp(&test_acc[b]))
            .expect("non-empty");
        let mut accs: Vec<f64> = ks.iter().map(|&k| test_acc[k]).collect();
        accs.sort_by(f64::total_cmp);
        println!(
            "{:>6} {:>5} | {:>9} {:>7.1}% {:>7.2}% | {:>9} {:>7.2}% | {:>7.2}%",
            blocks,
            ks.len(),
            an.cands[chosen].0,
            100.0 * search_acc[an.cands[chosen].1],
            100.0 * test_acc[chosen] / oracle_acc,
            an.cands[best].0,
            100.0 * test_acc[best] / oracle_acc,
            100.0 * accs[accs.len() / 2] / oracle_acc,
        );
    }
    Ok(())
}

/// The images of `data` as model inputs, in batches of 250 (labels dropped).
fn image_batches(data: &Dataset) -> Result<Vec<Tensor>> {
    let t = eval_transform(&fashion_normalize());
    let idx: Vec<usize> = (0..data.len()).collect();
    idx.chunks(250)
        .map(|c| Ok(data.batch_tensor(c, &t, &Device::Cpu)?.0))
        .collect()
}

/// `ACC_BN_RECAL=1`: 4- and 5-block subnets with and without BN recalibration on the search
/// split; choice on the search split, report on the test set.
fn bn_recal_table(
    sn: &Supernet,
    subnets: &[Subnet],
    search: &Dataset,
    test: &Dataset,
    oracle_acc: f64,
) -> Result<()> {
    let batches = image_batches(search)?;
    println!();
    println!("BN recalibration on the search split (retained = test acc / oracle's):");
    println!(
        "{:>6} {:>4} | {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8} | {:>9} {:>9}",
        "blocks",
        "n",
        "plain",
        "search",
        "retained",
        "recal",
        "search",
        "retained",
        "best plain",
        "best recal"
    );
    for blocks in [4usize, 5] {
        let subs: Vec<&Subnet> = subnets
            .iter()
            .filter(|s| s.steps().count() == blocks)
            .collect();
        let paths: Vec<Vec<ModuleKey>> = subs.iter().map(|s| s.steps().collect()).collect();
        let mut sns: Vec<Supernet> = vec![sn.clone()];
        let mut nets = Vec::new();
        for p in &paths {
            nets.push(Net::Path {
                sn: 0,
                steps: p.clone(),
            });
        }
        for (s, p) in subs.iter().zip(&paths) {
            let mut r = sn.clone();
            r.modules.extend(sn.recalibrate_bn(s, &batches, |_| true)?);
            nets.push(Net::Path {
                sn: sns.len(),
                steps: p.clone(),
            });
            sns.push(r);
        }
        let refs: Vec<&Supernet> = sns.iter().collect();
        let s_acc = accuracies(&nets, &refs, &[], search)?;
        let t_acc = accuracies(&nets, &refs, &[], test)?;
        let n = paths.len();
        let pick = |range: std::ops::Range<usize>, by: &[f64]| {
            range
                .max_by(|&a, &b| by[a].total_cmp(&by[b]))
                .expect("non-empty")
        };
        let (cp, cr) = (pick(0..n, &s_acc), pick(n..2 * n, &s_acc));
        let (bp, br) = (pick(0..n, &t_acc), pick(n..2 * n, &t_acc));
        let code = |k: usize| subs[k % n].to_string();
        println!(
            "{:>6} {:>4} | {:>9} {:>7.1}% {:>7.2}% | {:>9} {:>7.1}% {:>7.2}% | {:>9.2}% {:>9.2}%",
            blocks,
            n,
            code(cp),
            100.0 * s_acc[cp],
            100.0 * t_acc[cp] / oracle_acc,
            code(cr),
            100.0 * s_acc[cr],
            100.0 * t_acc[cr] / oracle_acc,
            100.0 * t_acc[bp] / oracle_acc,
            100.0 * t_acc[br] / oracle_acc,
        );
    }
    Ok(())
}

/// `ACC_BN_RECAL=1`: should the agent recalibrate by default? The chosen subnets served on a
/// device that sees all classes and on one that sees footwear only (sandal, sneaker, ankle
/// boot): BN statistics re-estimated on that device's share of the search split (no labels),
/// accuracy on the same classes of the test set, shipped vs recalibrated (branches; all;
/// `auto`, which keeps `all` only if it is not worse on the device's own images).
fn device_recal_table(
    sn: &Supernet,
    picks: &[(f64, Subnet)],
    search: &Dataset,
    test: &Dataset,
) -> Result<()> {
    use adaptivenet_core::data::split::class_filter;
    println!();
    println!("BN recalibration per device data (test accuracy on the device's classes):");
    println!(
        "{:>24} {:>6} {:>9} {:>6} | {:>8} {:>8} {:>8} | {:>8}",
        "device", "budget", "subnet", "local", "shipped", "branches", "all", "auto"
    );
    let devices: [(&str, Vec<u32>); 2] = [
        ("all classes", (0..10).collect()),
        ("footwear only (5, 7, 9)", vec![5, 7, 9]),
    ];
    for (name, classes) in devices {
        let local = search.subset(&class_filter(&search.labels, &classes))?;
        let held = test.subset(&class_filter(&test.labels, &classes))?;
        let batches = image_batches(&local)?;
        for (budget, s) in picks {
            let net = Net::Path {
                sn: 0,
                steps: s.steps().collect(),
            };
            let one = std::slice::from_ref(&net);
            // Shipped, branches recalibrated, all recalibrated.
            let mut variants = vec![sn.clone()];
            for branches_only in [true, false] {
                let mut r = sn.clone();
                r.modules.extend(sn.recalibrate_bn(s, &batches, |choice| {
                    !branches_only || choice != Choice::Original
                })?);
                variants.push(r);
            }
            let row = variants
                .iter()
                .map(|v| Ok(accuracies(one, &[v], &[], &held)?[0]))
                .collect::<Result<Vec<f64>>>()?;
            // `--bn-recal auto`: `all`, kept only if not worse on the local (labelled) images.
            let kept = accuracies(one, &[&variants[2]], &[], &local)?[0]
                >= accuracies(one, &[sn], &[], &local)?[0];
            println!(
                "{:>24} {:>6.2} {:>9} {:>6} | {:>7.2}% {:>7.2}% {:>7.2}% | {:>7.2}% {}",
                name,
                budget,
                s.to_string(),
                local.len(),
                100.0 * row[0],
                100.0 * row[1],
                100.0 * row[2],
                100.0 * if kept { row[2] } else { row[0] },
                if kept { "kept" } else { "refused" }
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    // As the binaries do: freed feature maps are reused, not unmapped and faulted in again.
    adaptivenet_kernels::alloc::retain_freed_memory();
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "{}",
            include_str!("accuracy_latency.rs")
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .map(|l| l.trim_start_matches("//!").trim_start())
                .collect::<Vec<_>>()
                .join("\n")
        );
        return Ok(());
    }
    // Training and accuracy evaluation run like the cloud's (`cloud-server --threads`
    // default): on every hardware thread. Latency is measured at 1 and 2 threads below.
    let train_threads = match std::env::var("ACC_TRAIN_THREADS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&t: &usize| t >= 1)
            .with_context(|| format!("ACC_TRAIN_THREADS={v}: expected an integer >= 1"))?,
        Err(_) => threads::available(),
    };
    threads::set_max_threads(train_threads);
    // As `cloud-server --threads` does: candle's own pool at the same size, before any op.
    threads::size_candle_pool(train_threads);
    let model = std::env::var("ACC_MODEL").unwrap_or_else(|_| "resnet20".into());
    let dataset = std::env::var("ACC_DATASET");
    match model.as_str() {
        "resnet20" => {
            if let Ok(d) = dataset.as_deref() {
                if d != "fmnist" {
                    bail!("ACC_MODEL=resnet20 runs on ACC_DATASET=fmnist (28x28 grey), not {d}");
                }
            }
        }
        "lite0" => {
            let root = std::env::var("ACC_WORK_DIR").map_or_else(
                |_| {
                    std::env::var("CARGO_TARGET_DIR")
                        .map_or_else(
                            |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
                            PathBuf::from,
                        )
                        .join("accuracy_latency")
                },
                PathBuf::from,
            );
            let d = dataset.unwrap_or_else(|_| "fmnist-rgb64".into());
            return lite0::run(&root, train_threads, &d);
        }
        other => bail!("ACC_MODEL={other}: expected `resnet20` or `lite0`"),
    }
    let p = Preset::from_env()?;
    let dir = adaptivenet_core::assets_dir().join("fashion-mnist");
    if !dir.join("train-images-idx3-ubyte.gz").exists() {
        println!(
            "Fashion-MNIST not found in {} (run scripts/fetch-assets.sh)",
            dir.display()
        );
        println!("BENCH {}", json!({"skipped": "no assets"}));
        return Ok(());
    }
    let wd = work_dir(&p);
    let full = fashion_mnist(&dir, true)?;
    let test = fashion_mnist(&dir, false)?;
    let (train, search) = split_validation(&full, SEARCH_IMAGES, SEED)?;
    eprintln!(
        "preset {}: train {} / search {} / test {} images; work dir {}",
        p.name,
        train.len(),
        search.len(),
        test.len(),
        wd.display()
    );

    // 1. Oracle, supernet, baselines (trained or reused).
    let oracle_steps =
        TrainOracleConfig::steps_for_epochs(p.oracle_epochs, train.len(), p.oracle_batch);
    let (oracle, oracle_report) = match std::env::var("ACC_ORACLE_DIR") {
        Ok(d) => {
            let d = PathBuf::from(d);
            let m = Model::from_files(&d.join("oracle.arch.json"), &d.join("oracle.safetensors"))
                .with_context(|| format!("ACC_ORACLE_DIR={}", d.display()))?;
            (
                m,
                read_json(&d.join("train-report.json")).unwrap_or(Value::Null),
            )
        }
        Err(_) => trained_model(
            &wd.join("oracle"),
            RESNET20_FASHION,
            oracle_steps,
            p.oracle_batch,
            &train,
            "oracle",
        )?,
    };
    let paper = Variant::paper(&p);
    let (mut trained, el_report) = trained_supernet(&paper.dir(&wd), &p, &paper, &oracle, &train)?;
    // Same-host speed against PyTorch on the same recipe and paths (skipped without torch).
    let torch_ratio = if env_flag("ACC_TORCH", true) {
        torch_peer::elastify_ratio(
            &oracle,
            &elastify_config(&p, &paper),
            &train,
            &wd.join("torch-peer"),
        )?
    } else {
        None
    };
    let mut untrained = build_supernet(&oracle, &SupernetConfig::merge_only())?;
    let scratch_steps = p.elastify_samples() / p.oracle_batch as u64;
    let mut scratch = Vec::new();
    let mut scratch_reports = Vec::new();
    let baselines = env_flag("ACC_BASELINES", true);
    if !baselines {
        eprintln!("ACC_BASELINES=0: no scratch baselines");
    }
    let scratch_archs: &[(&str, &str)] = if baselines {
        &[("resnet8", "[1,1,1]"), ("resnet14", "[2,2,2]")]
    } else {
        &[]
    };
    for &(name, layers) in scratch_archs {
        let arch = RESNET20_FASHION.replace("[3,3,3]", layers);
        let (m, r) = trained_model(
            &wd.join(format!("scratch-{name}")),
            &arch,
            scratch_steps,
            p.oracle_batch,
            &train,
            if name == "resnet8" {
                "scratch resnet8"
            } else {
                "scratch resnet14"
            },
        )?;
        scratch.push((name, m.folded()?));
        scratch_reports.push(r);
    }
    let trained_unfolded = trained.clone();
    trained.fold()?;
    untrained.fold()?;
    let sns = [&trained, &untrained];
    let models: Vec<Model> = scratch.iter().map(|(_, m)| m.clone()).collect();

    // 2. Candidates. Latency entries: trained paths (shared with untrained), drop paths,
    // scratch models; the oracle is the all-original trained path.
    let n = trained.spec.num_positions();
    let subnets = trained
        .spec
        .enumerate(1 << 16)
        .context("the merge-only space should be enumerable")?;
    let mut nets: Vec<Net> = Vec::new();
    let mut an = Method {
        name: "adaptivenet",
        cands: Vec::new(),
    };
    let mut un = Method {
        name: "untrained",
        cands: Vec::new(),
    };
    let mut acc_nets: Vec<Net> = Vec::new(); // accuracy table index = position in acc_nets
    let mut lat_of: Vec<usize> = Vec::new(); // acc index -> latency index
    let mut oracle_idx = None;
    for s in &subnets {
        let steps: Vec<ModuleKey> = s.steps().collect();
        let li = nets.len();
        nets.push(Net::Path {
            sn: 0,
            steps: steps.clone(),
        });
        if *s == Subnet::original(n) {
            oracle_idx = Some(acc_nets.len());
        }
        an.cands.push((s.to_string(), acc_nets.len()));
        acc_nets.push(Net::Path {
            sn: 0,
            steps: steps.clone(),
        });
        lat_of.push(li);
        un.cands.push((s.to_string(), acc_nets.len()));
        acc_nets.push(Net::Path { sn: 1, steps });
        lat_of.push(li);
    }
    let oracle_idx = oracle_idx.context("the all-original subnet is enumerated")?;
    let droppable: Vec<usize> = (0..n)
        .filter(|&i| {
            let b = &trained.spec.positions[i][0].block;
            b.cin() == b.cout() && b.stride() == 1
        })
        .collect();
    let mut dr = Method {
        name: "drop",
        cands: Vec::new(),
    };
    for mask in 1u32..(1 << droppable.len()) {
        let dropped: BTreeSet<usize> = droppable
            .iter()
            .enumerate()
            .filter(|(j, _)| mask >> j & 1 == 1)
            .map(|(_, &i)| i)
            .collect();
        let steps: Vec<ModuleKey> = (0..n)
            .filter(|i| !dropped.contains(i))
            .map(|i| ModuleKey::new(i, Choice::Original))
            .collect();
        let label = (0..n)
            .map(|i| if dropped.contains(&i) { '-' } else { '0' })
            .collect::<String>();
        dr.cands.push((label, acc_nets.len()));
        lat_of.push(nets.len());
        nets.push(Net::Path {
            sn: 0,
            steps: steps.clone(),
        });
        acc_nets.push(Net::Path { sn: 0, steps });
    }
    let mut sc = Method {
        name: "scratch",
        cands: Vec::new(),
    };
    for (i, (name, _)) in scratch.iter().enumerate() {
        sc.cands.push((name.to_string(), acc_nets.len()));
        lat_of.push(nets.len());
        nets.push(Net::Model(i));
        acc_nets.push(Net::Model(i));
    }
    let methods = [an, un, dr, sc];

    // 3. Search-split accuracy of every candidate (choice), test accuracy later (report).
    eprintln!(
        "evaluating {} candidates on the search split ...",
        acc_nets.len()
    );
    let t0 = Instant::now();
    let search_acc = accuracies(&acc_nets, &sns, &models, &search)?;
    eprintln!("  {:.1} s", t0.elapsed().as_secs_f64());

    // 4. Latency passes at 1 and 2 threads, two passes each.
    let mut passes: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for t in [1usize, 2] {
        threads::set_max_threads(t);
        for pass in 0..2 {
            eprintln!(
                "latency: {} threads, pass {}: {} nets x {} rounds ...",
                t,
                pass + 1,
                nets.len(),
                p.rounds
            );
            let lat = latency_pass(&nets, &sns, &models, &p, 17 + pass as u64)?;
            // Per accuracy index.
            passes.insert((t, pass), lat_of.iter().map(|&li| lat[li]).collect());
        }
    }
    threads::set_max_threads(train_threads);

    // 5. Choose per budget and method; evaluate the chosen on the test set.
    let mut chosen: BTreeMap<(usize, usize, &str, usize), Option<usize>> = BTreeMap::new();
    for (&(t, pass), lat) in &passes {
        let oracle_ms = lat[oracle_idx];
        for (bi, b) in BUDGETS.iter().enumerate() {
            for m in &methods {
                let pick = choose(m, lat, &search_acc, b * oracle_ms).map(|i| m.cands[i].1);
                chosen.insert((t, pass, m.name, bi), pick);
            }
        }
    }
    let mut need: BTreeSet<usize> = chosen.values().flatten().copied().collect();
    need.insert(oracle_idx);
    let need: Vec<usize> = need.into_iter().collect();
    eprintln!(
        "evaluating {} chosen nets on the 10k test set ...",
        need.len()
    );
    let test_nets: Vec<Net> = need.iter().map(|&i| acc_nets[i].clone()).collect();
    let accs = accuracies(&test_nets, &sns, &models, &test)?;
    let test_acc: BTreeMap<usize, f64> = need.iter().copied().zip(accs).collect();
    let oracle_acc = test_acc[&oracle_idx];
    let label_of = |i: usize| -> String {
        methods
            .iter()
            .flat_map(|m| m.cands.iter())
            .find(|c| c.1 == i)
            .map_or_else(String::new, |c| c.0.clone())
    };

    // With ACC_BN_RECAL=1, the chosen AdaptiveNet subnets also as `edge-agent --bn-recal all`
    // serves them: every BN of the path re-estimated on the search split (the device's data).
    let mut recal_acc: BTreeMap<usize, f64> = BTreeMap::new();
    if env_flag("ACC_BN_RECAL", false) {
        let batches = image_batches(&search)?;
        let picked: BTreeSet<usize> = chosen
            .iter()
            .filter(|(k, _)| k.2 == "adaptivenet")
            .filter_map(|(_, v)| *v)
            .collect();
        eprintln!(
            "BN recalibration of {} chosen subnets on the search split ...",
            picked.len()
        );
        for i in picked {
            let s = Subnet::parse(&label_of(i))?;
            let mut r = trained_unfolded.clone();
            r.modules
                .extend(trained_unfolded.recalibrate_bn(&s, &batches, |_| true)?);
            let net = Net::Path {
                sn: 0,
                steps: s.steps().collect(),
            };
            recal_acc.insert(i, accuracies(&[net], &[&r], &[], &test)?[0]);
        }
    }

    // 6. Tables.
    println!();
    println!(
        "accuracy-latency on Fashion-MNIST, preset {} (search split {} train images, report on {} test images)",
        p.name,
        search.len(),
        test.len()
    );
    println!(
        "oracle ResNet-20: test acc {:.2}%, oracle train {:.0} images/s; elastification {:.0} s at {:.0} samples/s; kernels: {}",
        100.0 * oracle_acc,
        oracle_report["images_per_sec"].as_f64().unwrap_or(f64::NAN),
        el_report["seconds"].as_f64().unwrap_or(f64::NAN),
        el_report["samples_per_sec"].as_f64().unwrap_or(f64::NAN),
        threads::describe()
    );
    let mut headline = BTreeMap::new();
    for (&(t, pass), lat) in &passes {
        let oracle_ms = lat[oracle_idx];
        println!();
        println!(
            "threads {t}, pass {}: oracle {:.3} ms (median of {} interleaved rounds)",
            pass + 1,
            oracle_ms,
            p.rounds
        );
        println!(
            "{:>6} {:>8} | {:>9} {:>7} {:>7} {:>8} {:>8} | {:>8} {:>8} {:>8}",
            "budget",
            "limit ms",
            "subnet",
            "ms",
            "search",
            "retained",
            "recal",
            "untrain",
            "drop",
            "scratch"
        );
        for (bi, b) in BUDGETS.iter().enumerate() {
            let get = |m: &str| chosen[&(t, pass, m, bi)];
            let acc = |m: &str| get(m).map(|i| test_acc[&i]);
            let fmt = |a: Option<f64>| a.map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a));
            let (code, ms, sacc) = match get("adaptivenet") {
                Some(i) => (
                    label_of(i),
                    format!("{:.3}", lat[i]),
                    format!("{:.1}%", 100.0 * search_acc[i]),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let retained = acc("adaptivenet").map(|a| a / oracle_acc);
            let recal = get("adaptivenet")
                .and_then(|i| recal_acc.get(&i))
                .map(|a| a / oracle_acc);
            let pct = |r: Option<f64>| r.map_or("-".into(), |r| format!("{:.2}%", 100.0 * r));
            println!(
                "{:>6.2} {:>8.3} | {:>9} {:>7} {:>7} {:>8} {:>8} | {:>8} {:>8} {:>8}",
                b,
                b * oracle_ms,
                code,
                ms,
                sacc,
                pct(retained),
                pct(recal),
                fmt(acc("untrained")),
                fmt(acc("drop")),
                fmt(acc("scratch")),
            );
            headline.insert(
                (t, pass, bi),
                (
                    retained,
                    acc("untrained"),
                    acc("drop"),
                    acc("scratch"),
                    oracle_ms,
                    recal,
                ),
            );
        }
    }
    if env_flag("ACC_BN_RECAL", false) {
        bn_recal_table(&trained_unfolded, &subnets, &search, &test, oracle_acc)?;
        let picks = [0.50, 0.60]
            .into_iter()
            .filter_map(|b| {
                let bi = BUDGETS.iter().position(|x| (x - b).abs() < 1e-9)?;
                let i = chosen[&(1, 0, "adaptivenet", bi)]?;
                Some(Subnet::parse(&label_of(i)).map(|s| (b, s)))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        device_recal_table(&trained_unfolded, &picks, &search, &test)?;
    }
    if env_flag("ACC_ALL_SUBNETS", false) {
        all_subnets_table(
            &methods[0],
            &acc_nets,
            &sns,
            &models,
            &test,
            &search_acc,
            oracle_acc,
        )?;
    }
    let variants = Variant::from_env(&p)?;
    let ablation = if variants.is_empty() {
        Value::Null
    } else {
        let ctx = AblationCtx {
            wd: &wd,
            p: &p,
            oracle: &oracle,
            train: &train,
            search: &search,
            test: &test,
            an: &methods[0],
            acc_nets: &acc_nets,
            passes: &passes,
            oracle_idx,
            search_acc: &search_acc,
            oracle_acc,
        };
        ablation_table(&ctx, &variants)?
    };
    let h = |t: usize, pass: usize, b: f64| {
        let bi = BUDGETS
            .iter()
            .position(|x| (x - b).abs() < 1e-9)
            .expect("budget");
        headline[&(t, pass, bi)]
    };
    let (r06, u06, d06, s06, oracle_ms, _) = h(1, 0, 0.60);
    let bench = json!({
        "preset": p.name,
        "oracle_acc": oracle_acc,
        "oracle_ms": oracle_ms,
        "threads": 1,
        "retained_at_0_6": r06,
        "retained_at_0_5": h(1, 0, 0.50).0,
        // ACC_BN_RECAL=1 only: the same choices served as `edge-agent --bn-recal all` does.
        "retained_at_0_6_bn_recal": h(1, 0, 0.60).5,
        "retained_at_0_5_bn_recal": h(1, 0, 0.50).5,
        "untrained_at_0_6": u06,
        "drop_at_0_6": d06,
        "scratch_at_0_6": s06,
        "retained_at_0_6_pass2": h(1, 1, 0.60).0,
        "retained_at_0_6_threads2": h(2, 0, 0.60).0,
        "untrained_at_0_6_threads2": h(2, 0, 0.60).1,
        "drop_at_0_6_threads2": h(2, 0, 0.60).2,
        "elastify_s": el_report["seconds"],
        "elastify_samples_per_s": el_report["samples_per_sec"],
        "elastify_stage0_samples_per_s": el_report["stages"][0]["samples_per_sec"],
        "elastify_stage1_samples_per_s": el_report["stages"][1]["samples_per_sec"],
        "train_threads": train_threads,
        "oracle_train_images_per_s": oracle_report["images_per_sec"],
        "scratch_train": scratch_reports,
        "rounds": p.rounds,
        // ACC_ABLATION only: each schedule's retained accuracy per budget and its time.
        "ablation": ablation,
    });
    let mut bench = bench;
    if let Some(Value::Object(t)) = torch_ratio {
        bench.as_object_mut().expect("an object").extend(t);
    }
    println!();
    println!("BENCH {bench}");
    Ok(())
}

/// This program reads Fashion-MNIST explicitly: its training-set statistics on `x / 255`.
fn fashion_normalize() -> Normalize {
    Normalize::MeanStd {
        mean: vec![0.2860],
        std: vec![0.3530],
    }
}

/// The reference recipe's augmentation for Fashion-MNIST: pad-2 random crop + flip.
fn fashion_augment() -> AugmentPolicy {
    AugmentPolicy {
        crop_padding: 2,
        hflip: true,
    }
}
