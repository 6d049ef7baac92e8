//! `ACC_MODEL=lite0`: the real EfficientNet-Lite0 ImageNet weights fine-tuned to Fashion-MNIST
//! rendered as 3x64x64 RGB ImageFolder images, elastified with merge and width-pruned
//! branches, and the chosen subnet's retained accuracy per latency budget beside the
//! untrained-branch baseline (see the header of `accuracy_latency.rs` for the knobs).
//!
//! Lite0's space (16 positions, merge-2/3 and two prune levels) is far too large to
//! enumerate. The candidates are the all-original path, a stratified sample of the space,
//! and what the edge's own search finds: the sample is a seeded pool of random paths
//! (sampled with several original-block weights so that short and long paths are common),
//! from which the path closest to each of `candidates` evenly spaced values of its predicted
//! latency (a measured batch-1 table of every module, as a device profiles one) is taken;
//! then `edge-agent run`'s evolutionary search runs on the trained supernet with that table
//! and the search split, and its 4 best subnets per budget join (`ACC_SEARCH=sample` leaves
//! them out; population and generations per preset: 64 x 8 as the agent's default, 32 x 6,
//! 8 x 2). Both columns choose among the same candidates by search-split accuracy (the
//! ResNet table's protocol) and report on the test images; the untrained column thus scores
//! paths found for the trained branches.
//!
//! With `ACC_BN_RECAL=1`, the `pick` column is `edge-agent run --bn-recal branches
//! --recal-pick K` (`ACC_RECAL_PICK=K`, default 4): per budget the K best fitting candidates
//! by search-split accuracy, each with its branches' BN re-estimated on the search split and
//! re-scored there, the best re-scored one reported on the test images.
//! `ACC_LATENCY_CACHE=FILE` keeps the module table, the candidates and both latency passes
//! in FILE (JSON; measured and written when FILE is absent, read when present), so that
//! recipes are compared on one candidate set: a fresh draw moves the 0.5-0.7 columns more
//! than most recipe changes do.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use adaptivenet_cloud::elastify::params::JobParams;
use adaptivenet_core::artifact::{load_supernet, read_manifest, write_artifact};
use adaptivenet_core::data::{fashion_mnist, shuffled_indices, AugmentPolicy, Dataset, Normalize};
use adaptivenet_core::model::{ArchDescriptor, Model, Params};
use adaptivenet_core::supernet::branches::build_supernet;
use adaptivenet_core::supernet::{Choice, ModuleKey, Subnet, Supernet, SupernetConfig};
use adaptivenet_edge::profile::{LatencyTable, Stat};
use adaptivenet_edge::quality::{EvalSet, QualityMode};
use adaptivenet_edge::search::{search_keeping, top_within, SearchConfig};
use adaptivenet_kernels::threads;
use adaptivenet_train::pipeline::split_validation;
use adaptivenet_train::pipeline::TrainingData;
use adaptivenet_train::train::{correct, eval_transform};
use adaptivenet_train::DatasetFormat;
use adaptivenet_train::{elastify, train_oracle_resumable, ElastifyConfig, TrainOracleConfig};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{checkpoints, env_flag, fresh, read_json, Log, SEED};

const LITE0: &str = "efficientnet-lite0/efficientnet-lite0-57934424.pth";
const BUDGETS: [f64; 5] = [0.5, 0.6, 0.7, 0.8, 0.9];
const BRANCHES: [&str; 4] = ["merge2", "merge3", "prune1", "prune2"];
/// Candidates per budget taken from the edge's search ([`evolved`]): the best few, since the
/// measured latency of the one at the table's limit may land just over the budget.
const EVOLVED_PER_BUDGET: usize = 4;
/// Side of the rendered RGB images.
const SIDE: u32 = 64;

/// Run sizes of one Lite0 preset.
struct LitePreset {
    name: &'static str,
    /// Training images rendered (before the search split is held out) and test images.
    train_images: usize,
    test_images: usize,
    search_images: usize,
    finetune_steps: u64,
    finetune_batch: usize,
    finetune_lr: f64,
    stage_steps: [u64; 2],
    elastify_batch: usize,
    candidates: usize,
    /// The edge's evolutionary search (population, generations) whose best subnets per budget
    /// join the candidates; `None` with `ACC_SEARCH=sample`.
    search: Option<(usize, usize)>,
    rounds: usize,
    warmup_runs: usize,
}

impl LitePreset {
    fn from_env() -> Result<LitePreset> {
        let name = std::env::var("ACC_PRESET").unwrap_or_else(|_| "full".into());
        let mut p = match name.as_str() {
            "full" => LitePreset {
                name: "full",
                train_images: 60_000,
                test_images: 10_000,
                search_images: 1000,
                finetune_steps: 2800,
                finetune_batch: 64,
                finetune_lr: 0.02,
                stage_steps: [2000, 2000],
                elastify_batch: 64,
                candidates: 160,
                search: Some((64, 8)),
                rounds: 30,
                warmup_runs: 3,
            },
            "medium" => LitePreset {
                name: "medium",
                train_images: 12_000,
                test_images: 2000,
                search_images: 1000,
                finetune_steps: 700,
                finetune_batch: 32,
                finetune_lr: 0.02,
                stage_steps: [500, 500],
                elastify_batch: 32,
                candidates: 60,
                search: Some((32, 6)),
                rounds: 15,
                warmup_runs: 2,
            },
            "quick" => LitePreset {
                name: "quick",
                train_images: 2300,
                test_images: 500,
                search_images: 300,
                finetune_steps: 60,
                finetune_batch: 32,
                finetune_lr: 0.02,
                stage_steps: [25, 25],
                elastify_batch: 32,
                candidates: 12,
                search: Some((8, 2)),
                rounds: 5,
                warmup_runs: 1,
            },
            other => bail!("ACC_PRESET={other}: expected `full`, `medium` or `quick`"),
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
        if let Ok(v) = std::env::var("ACC_FINETUNE_STEPS") {
            p.finetune_steps = v
                .parse()
                .ok()
                .filter(|&s: &u64| s >= 1)
                .with_context(|| format!("ACC_FINETUNE_STEPS={v}: expected an integer >= 1"))?;
        }
        if let Ok(v) = std::env::var("ACC_CANDIDATES") {
            p.candidates = v
                .parse()
                .ok()
                .filter(|&s: &usize| s >= 2)
                .with_context(|| format!("ACC_CANDIDATES={v}: expected an integer >= 2"))?;
        }
        match std::env::var("ACC_SEARCH").as_deref() {
            Err(_) | Ok("evolve") => {}
            Ok("sample") => p.search = None,
            Ok(v) => bail!("ACC_SEARCH={v}: expected `evolve` or `sample`"),
        }
        Ok(p)
    }
}

/// Renders Fashion-MNIST (the first `n` images of a seeded order of `split`) as an
/// ImageFolder of 64x64 RGB PNGs (bilinear upscale, grey replicated to three channels) under
/// `dir`; kept when it is already complete.
fn render(src: &Dataset, n: usize, dir: &Path, seed: u64) -> Result<()> {
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let n = n.min(src.len());
    let order = shuffled_indices(src.len(), seed);
    for (k, &i) in order[..n].iter().enumerate() {
        let (h, w) = (src.height as u32, src.width as u32);
        let grey = image::GrayImage::from_raw(w, h, src.image(i).to_vec())
            .context("a Fashion-MNIST image")?;
        let big = image::imageops::resize(&grey, SIDE, SIDE, image::imageops::FilterType::Triangle);
        let rgb = image::DynamicImage::ImageLuma8(big).to_rgb8();
        let class = dir.join(format!("{}", src.labels[i]));
        std::fs::create_dir_all(&class)?;
        rgb.save(class.join(format!("{k:05}.png")))?;
    }
    std::fs::write(&done, n.to_string())?;
    Ok(())
}

/// The EfficientNet-Lite0 ImageNet weights with a fresh 10-class head, fine-tuned on `train`
/// (or reused from `dir`).
fn finetuned_oracle(
    dir: &Path,
    p: &LitePreset,
    weights: &Path,
    train: &TrainingData,
) -> Result<(Model, Value)> {
    let (arch_p, weights_p, report_p) = (
        dir.join("oracle.arch.json"),
        dir.join("oracle.safetensors"),
        dir.join("train-report.json"),
    );
    if !fresh() && weights_p.exists() {
        if let Some(r) = read_json(&report_p) {
            if r["steps"] == json!(p.finetune_steps) {
                eprintln!("lite0 oracle: reusing {}", dir.display());
                return Ok((Model::from_files(&arch_p, &weights_p)?, r));
            }
        }
    }
    let arch = ArchDescriptor::from_json(br#"{"family":"efficientnet_lite","variant":"lite0"}"#)?;
    let pretrained = Model::load(&arch, adaptivenet_core::weights::read_tensors(weights)?)?;
    let mut init = pretrained.with_new_head(train.train.num_classes(), SEED)?;
    init.spec.input = [3, SIDE as usize, SIDE as usize];
    let steps = p.finetune_steps;
    let cfg = TrainOracleConfig {
        steps,
        batch: p.finetune_batch,
        lr: p.finetune_lr,
        warmup_steps: (steps / 20).max(1),
        weight_decay: 4e-5,
        seed: SEED,
        checkpoint_every: 100,
        normalize: train.spec.normalize(),
        augment: train.augment,
        ..TrainOracleConfig::default()
    };
    eprintln!(
        "lite0 oracle: fine-tuning {steps} steps of batch {} from the ImageNet weights ...",
        p.finetune_batch
    );
    let ck = checkpoints(dir)?;
    let (model, r) = train_oracle_resumable(
        &init.spec,
        &cfg,
        &train.train,
        None,
        &mut Log("finetune", 0),
        &CancellationToken::new(),
        Some(&ck),
        Some(&init),
    )?;
    std::fs::create_dir_all(dir)?;
    model.save(&arch_p, &weights_p)?;
    let r = json!({
        "steps": r.steps,
        "batch": p.finetune_batch,
        "images_per_sec": r.images_per_sec,
        "train_seconds": r.train_time.as_secs_f64(),
        "threads": threads::max_threads(),
    });
    std::fs::write(&report_p, r.to_string())?;
    Ok((model, r))
}

/// Elastifies (or reuses) the Lite0 supernet with merge and prune branches.
fn elastified(
    dir: &Path,
    p: &LitePreset,
    oracle: &Model,
    data: &TrainingData,
    train: &Dataset,
) -> Result<(Supernet, Value)> {
    let report = dir.join("elastify-report.json");
    // `ACC_PARAMS`: a JSON object of elastification job params (the keys of
    // `client elastify --params`) over the preset's recipe, e.g. `{"branch_bn":"frozen"}`.
    let extra = std::env::var("ACC_PARAMS").unwrap_or_default();
    let same_recipe =
        |r: &Value| r["stage_steps"] == json!(p.stage_steps) && r["params"] == json!(extra);
    if !fresh() {
        if let (Ok(m), Some(r)) = (read_manifest(dir), read_json(&report)) {
            if same_recipe(&r) {
                eprintln!("lite0 supernet: reusing {}", dir.display());
                return Ok((load_supernet(dir, &m, None)?, r));
            }
        }
    }
    let preset = JobParams {
        branches: BRANCHES.map(String::from).to_vec(),
        seed: SEED,
        stage0_steps: p.stage_steps[0],
        stage1_steps: p.stage_steps[1],
        batch: p.elastify_batch,
        ..JobParams::default()
    };
    let mut merged = serde_json::to_value(&preset)?;
    if !extra.is_empty() {
        let Value::Object(over) = serde_json::from_str::<Value>(&extra)
            .with_context(|| format!("ACC_PARAMS={extra}: not JSON"))?
        else {
            bail!("ACC_PARAMS={extra}: expected a JSON object");
        };
        for (k, v) in over {
            merged[k] = v;
        }
    }
    let params = JobParams::parse(&merged.to_string())
        .map_err(|e| anyhow::anyhow!("ACC_PARAMS={extra}: {e}"))?;
    let cfg = ElastifyConfig {
        checkpoint_every: 100,
        normalize: data.spec.normalize(),
        augment: data.augment,
        warmup_steps: (p.stage_steps[0].min(p.stage_steps[1]) / 30).clamp(1, 100),
        ..params.config()
    };
    eprintln!(
        "lite0 supernet: elastifying, {} + {} steps of batch {} ...",
        cfg.stage0_steps, cfg.stage1_steps, cfg.batch
    );
    let ck = checkpoints(dir)?;
    // A checkpoint of another recipe (other step counts) cannot be resumed: start afresh.
    if fresh() || read_json(&report).is_some_and(|r| !same_recipe(&r)) {
        std::fs::remove_file(ck.path()).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    }
    let t0 = Instant::now();
    let out = elastify(
        oracle,
        &cfg,
        train,
        &mut Log("elastify", 0),
        Some(&ck),
        &CancellationToken::new(),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let (run, t): (u64, f64) = out.report.stages.iter().fold((0, 0.0), |(n, t), s| {
        (n + s.steps_run, t + s.time.as_secs_f64())
    });
    let stages: Vec<Value> = out
        .report
        .stages
        .iter()
        .map(|s| json!({"steps": s.steps, "samples_per_sec": s.samples_per_sec, "seconds": s.time.as_secs_f64()}))
        .collect();
    let r = json!({
        "seconds": secs,
        // Throughput of the steps this run did (a resumed run did only part of them).
        "samples_per_sec": (run * p.elastify_batch as u64) as f64 / t.max(1e-9),
        "stages": stages,
        "stage_steps": p.stage_steps,
        "params": extra,
        "threads": threads::max_threads(),
        "positions": out.supernet.spec.num_positions(),
        "modules": out.supernet.modules.len(),
        "supernet_params": out.supernet.spec.num_params(),
    });
    std::fs::create_dir_all(dir)?;
    write_artifact(
        dir,
        &out.supernet,
        data.artifact_input(),
        "bench",
        Vec::new(),
    )?;
    std::fs::write(&report, r.to_string())?;
    Ok((out.supernet, r))
}

/// Batch-1 latency table of a supernet, as an edge device profiles one: the stem plus head
/// and every module on its input shape, each the median of interleaved rounds (1 thread).
/// A path's predicted latency is the stem-and-head time plus its modules' times.
#[derive(Clone)]
struct ModuleTable {
    fixed_ms: f64,
    module_ms: BTreeMap<ModuleKey, f64>,
}

impl ModuleTable {
    fn measure(sn: &Supernet, rounds: usize) -> Result<ModuleTable> {
        let x = Tensor::randn(
            0f32,
            1.0,
            (1, 3, SIDE as usize, SIDE as usize),
            &Device::Cpu,
        )?;
        // Every position's input: the feature map the all-original path feeds it (a branch
        // at a position sees the same shape).
        let n = sn.spec.num_positions();
        let mut inputs = vec![sn.forward_stem(&x)?];
        for key in Subnet::original(n).steps() {
            let next = sn.forward_module(key, inputs.last().expect("stem"))?;
            inputs.push(next);
        }
        let keys: Vec<ModuleKey> = sn.modules.keys().copied().collect();
        let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
            let t0 = Instant::now();
            let y = f()?;
            let _ = y.dims();
            Ok(t0.elapsed().as_secs_f64() * 1e3)
        };
        let stem_head = || -> Result<Tensor> {
            sn.forward_head(&inputs[n])?;
            Ok(sn.forward_stem(&x)?)
        };
        let mut fixed = Vec::with_capacity(rounds);
        let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); keys.len()];
        let mut order: Vec<usize> = (0..keys.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x7ab1e);
        for round in 0..rounds + 1 {
            order.shuffle(&mut rng);
            let f = time(&stem_head)?;
            for &k in &order {
                let key = keys[k];
                let ms = time(&|| Ok(sn.forward_module(key, &inputs[key.pos])?))?;
                // Round 0 is the warm-up.
                if round > 0 {
                    per[k].push(ms);
                }
            }
            if round > 0 {
                fixed.push(f);
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Ok(ModuleTable {
            fixed_ms: median(fixed),
            module_ms: keys.into_iter().zip(per.into_iter().map(median)).collect(),
        })
    }

    fn predict_ms(&self, s: &Subnet) -> f64 {
        self.fixed_ms + s.steps().map(|k| self.module_ms[&k]).sum::<f64>()
    }
}

/// `ACC_LATENCY_CACHE`: the module table, the candidates (the oracle path first) and the
/// latency passes of one run, reused by later ones on a supernet of the same shape.
struct LatencyCache {
    table: ModuleTable,
    cands: Vec<Subnet>,
    /// How many of `cands` (the last ones) came from the edge's search.
    evolved: usize,
    passes: Vec<Vec<f64>>,
}

impl LatencyCache {
    fn save(
        path: &Path,
        table: &ModuleTable,
        cands: &[Subnet],
        evolved: usize,
        passes: &[Vec<f64>],
    ) -> Result<()> {
        let modules: BTreeMap<String, f64> = table
            .module_ms
            .iter()
            .map(|(k, ms)| (k.name(), *ms))
            .collect();
        let v = json!({
            "fixed_ms": table.fixed_ms,
            "module_ms": modules,
            "candidates": cands.iter().map(Subnet::to_string).collect::<Vec<_>>(),
            "evolved": evolved,
            "passes": passes,
        });
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("ACC_LATENCY_CACHE={}: writing", path.display()))
    }

    /// Reads `path`, checked against `sn`: every module timed, every candidate a valid
    /// path (the first the oracle's), every pass timing every candidate.
    fn load(path: &Path, sn: &Supernet) -> Result<LatencyCache> {
        let what = || format!("ACC_LATENCY_CACHE={}", path.display());
        let v: Value =
            serde_json::from_slice(&std::fs::read(path).with_context(what)?).with_context(what)?;
        let num = |x: &Value| {
            x.as_f64()
                .with_context(|| format!("{}: {x} is not a number", what()))
        };
        let mut module_ms = BTreeMap::new();
        for key in sn.modules.keys() {
            let ms = v["module_ms"].get(key.name()).with_context(|| {
                format!(
                    "{}: no time for module {}: another supernet?",
                    what(),
                    key.name()
                )
            })?;
            module_ms.insert(*key, num(ms)?);
        }
        let cands = v["candidates"]
            .as_array()
            .with_context(|| format!("{}: no candidate list", what()))?
            .iter()
            .map(|c| {
                let s = Subnet::parse(c.as_str().unwrap_or_default())?;
                sn.spec.validate(&s)?;
                Ok(s)
            })
            .collect::<Result<Vec<Subnet>>>()
            .with_context(what)?;
        let n = sn.spec.num_positions();
        if cands.first() != Some(&Subnet::original(n)) {
            bail!("{}: the first candidate is not the oracle path", what());
        }
        let passes = v["passes"]
            .as_array()
            .with_context(|| format!("{}: no latency passes", what()))?
            .iter()
            .map(|p| {
                p.as_array()
                    .filter(|p| p.len() == cands.len())
                    .with_context(|| format!("{}: a pass does not time every candidate", what()))?
                    .iter()
                    .map(num)
                    .collect::<Result<Vec<f64>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        if passes.len() != 2 {
            bail!(
                "{}: expected 2 latency passes, found {}",
                what(),
                passes.len()
            );
        }
        Ok(LatencyCache {
            table: ModuleTable {
                fixed_ms: num(&v["fixed_ms"])?,
                module_ms,
            },
            evolved: v["evolved"].as_u64().unwrap_or(0) as usize,
            cands,
            passes,
        })
    }
}

/// `subnet`'s stem, head and modules with its branches' BN statistics re-estimated on
/// `batches` (as `edge-agent --bn-recal branches` does), folded for inference. `un` holds
/// unfolded weights.
fn recalibrated(un: &Supernet, subnet: &Subnet, batches: &[Tensor]) -> Result<Supernet> {
    let mut modules: BTreeMap<ModuleKey, Params> = subnet
        .steps()
        .map(|k| Ok((k, un.module(k)?.clone())))
        .collect::<Result<_>>()?;
    modules.extend(un.recalibrate_bn(subnet, batches, |c| c != Choice::Original)?);
    let mut r = Supernet {
        spec: un.spec.clone(),
        stem: un.stem.clone(),
        head: un.head.clone(),
        modules,
    };
    r.fold()?;
    Ok(r)
}

/// The `k` best candidates within `limit` ms by search accuracy, best first (ties: the
/// faster, then the lower index), as the agent's recal pick shortlists them.
fn shortlist(lat: &[f64], search_acc: &[f64], limit: f64, k: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..lat.len()).filter(|&i| lat[i] <= limit).collect();
    v.sort_by(|&a, &b| {
        search_acc[b]
            .total_cmp(&search_acc[a])
            .then(lat[a].total_cmp(&lat[b]))
            .then(a.cmp(&b))
    });
    v.truncate(k);
    v
}

/// The stratified candidate subnets (see the module docs); the all-original path first.
/// The stratification key is the path's latency predicted by a measured per-module table
/// (a MAC or block-count proxy put 12 of 13 candidates above 0.9 of the oracle's measured
/// latency on this family: per-block overheads and the depthwise convs do not scale with
/// MACs). Targets are spread evenly over the predicted range, from the fastest path of the
/// pool (at least 0.4 of the oracle) to the oracle.
fn candidates(sn: &Supernet, table: &ModuleTable, k: usize) -> Result<Vec<Subnet>> {
    let n = sn.spec.num_positions();
    let oracle = Subnet::original(n);
    let full = table.predict_ms(&oracle);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x11fe);
    let mut pool: BTreeMap<String, (Subnet, f64)> = BTreeMap::new();
    for i in 0..20_000 {
        let w = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0][i % 7];
        let s = sn.spec.sample_weighted(&mut rng, true, w)?;
        let key = table.predict_ms(&s) / full;
        pool.insert(s.to_string(), (s, key));
    }
    let mut pool: Vec<(Subnet, f64)> = pool.into_values().collect();
    let lo = pool
        .iter()
        .map(|c| c.1)
        .fold(f64::INFINITY, f64::min)
        .max(0.4);
    let mut out = vec![oracle];
    for j in 0..k {
        let target = lo + (1.0 - lo) * j as f64 / k as f64;
        let Some(best) = (0..pool.len()).min_by(|&a, &b| {
            (pool[a].1 - target)
                .abs()
                .total_cmp(&(pool[b].1 - target).abs())
        }) else {
            break;
        };
        out.push(pool.swap_remove(best).0);
    }
    Ok(out)
}

/// Subnets the edge's evolutionary search (`edge-agent run`'s: guided initial population,
/// mutation, crossover, racing; population and generations `pg`) ranks best on the search
/// split, [`EVOLVED_PER_BUDGET`] per budget under `table`'s predicted latency, that are not
/// in `have` yet. The stratified sample alone puts about 20 candidates under 0.6 of the
/// oracle; a device searches its whole space. Kernels run on the caller's thread cap (1, as
/// the agent's search does), `workers` evaluation workers.
fn evolved(
    sn: &Supernet,
    table: &ModuleTable,
    search: &Dataset,
    normalize: &Normalize,
    (population, generations): (usize, usize),
    workers: usize,
    have: &[Subnet],
) -> Result<Vec<Subnet>> {
    // The bench's measured table in the agent's form (stem and head as one fixed part).
    let mut lt = LatencyTable::from_macs(&sn.spec, 0.0);
    lt.stem = Stat::fixed(table.fixed_ms);
    lt.head = Stat::fixed(0.0);
    for m in &mut lt.modules {
        m.stat = Stat::fixed(table.module_ms[&ModuleKey::new(m.position, m.choice)]);
    }
    let t = eval_transform(normalize);
    let idx: Vec<usize> = (0..search.len()).collect();
    let mut inputs = Vec::new();
    let mut labels = Vec::new();
    for c in idx.chunks(100) {
        let (x, y) = search.batch_tensor(c, &t, &Device::Cpu)?;
        inputs.push(x);
        labels.push(y.to_vec1::<u32>()?);
    }
    let set = EvalSet::from_batches(sn, inputs, Some(labels), QualityMode::Labelled)?;
    let oracle_ms = table.predict_ms(&Subnet::original(sn.spec.num_positions()));
    let budgets: Vec<f64> = BUDGETS.iter().map(|b| b * oracle_ms).collect();
    let cfg = SearchConfig {
        population,
        generations,
        seed: SEED,
        threads: workers,
        ..SearchConfig::default()
    };
    // Minutes on the full preset: one line per budget's finished generations.
    let t0 = Instant::now();
    let progress = |done: usize, total: usize| {
        if done.is_multiple_of(generations + 1) {
            eprintln!(
                "  the edge's search: {done}/{total} generations ({:.0} s)",
                t0.elapsed().as_secs_f64()
            );
        }
    };
    let (_, all) = search_keeping(sn, &lt, &set, &budgets, &cfg, &[], progress)?;
    let mut seen: BTreeSet<Subnet> = have.iter().cloned().collect();
    let mut out = Vec::new();
    for b in budgets {
        for c in top_within(&all, b, EVOLVED_PER_BUDGET) {
            if seen.insert(c.subnet.clone()) {
                out.push(c.subnet);
            }
        }
    }
    Ok(out)
}

/// Top-1 accuracy of every (supernet, subnet) pair on `data`; paths of one supernet share the
/// stem and common prefixes per batch.
fn accuracies(
    nets: &[(usize, Subnet)],
    sns: &[&Supernet],
    data: &Dataset,
    normalize: &Normalize,
) -> Result<Vec<f64>> {
    let t = eval_transform(normalize);
    let mut hits = vec![0u64; nets.len()];
    let mut order: Vec<usize> = (0..nets.len()).collect();
    let steps: Vec<Vec<ModuleKey>> = nets.iter().map(|(_, s)| s.steps().collect()).collect();
    order.sort_by(|&a, &b| (nets[a].0, &steps[a]).cmp(&(nets[b].0, &steps[b])));
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(100) {
        let (x, y) = data.batch_tensor(chunk, &t, &Device::Cpu)?;
        let stems: Vec<Tensor> = sns
            .iter()
            .map(|s| s.forward_stem(&x))
            .collect::<Result<_, _>>()?;
        let mut cur = usize::MAX;
        let mut stack: Vec<(ModuleKey, Tensor)> = Vec::new();
        for &k in &order {
            let sn = nets[k].0;
            if sn != cur {
                cur = sn;
                stack.clear();
            }
            let shared = stack
                .iter()
                .zip(&steps[k])
                .take_while(|((a, _), b)| a == *b)
                .count();
            stack.truncate(shared);
            for &key in &steps[k][shared..] {
                let input = stack.last().map_or(&stems[sn], |(_, f)| f);
                let out = sns[sn].forward_module(key, input)?;
                stack.push((key, out));
            }
            let h = stack.last().map_or(&stems[sn], |(_, f)| f);
            hits[k] += correct(&sns[sn].forward_head(h)?, &y)?;
        }
    }
    Ok(hits.iter().map(|&h| h as f64 / data.len() as f64).collect())
}

/// Median batch-1 latency (ms) of each subnet over interleaved, shuffled rounds.
fn latency_pass(sn: &Supernet, subnets: &[Subnet], p: &LitePreset, seed: u64) -> Result<Vec<f64>> {
    let x = Tensor::randn(
        0f32,
        1.0,
        (1, 3, SIDE as usize, SIDE as usize),
        &Device::Cpu,
    )?;
    for s in subnets {
        for _ in 0..p.warmup_runs {
            sn.forward(s, &x)?;
        }
    }
    let mut times = vec![Vec::with_capacity(p.rounds); subnets.len()];
    let mut order: Vec<usize> = (0..subnets.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..p.rounds {
        order.shuffle(&mut rng);
        for &k in &order {
            let t0 = Instant::now();
            let y = sn.forward(&subnets[k], &x)?;
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

/// The candidate with the best search accuracy within `limit` ms (ties: the faster).
fn choose(lat: &[f64], search_acc: &[f64], limit: f64) -> Option<usize> {
    (0..lat.len())
        .filter(|&i| lat[i] <= limit)
        .max_by(|&a, &b| {
            search_acc[a]
                .total_cmp(&search_acc[b])
                .then(lat[b].total_cmp(&lat[a]))
        })
}

/// The Lite0 table (see the module docs); prints it and the `BENCH` line.
pub fn run(work_root: &Path, train_threads: usize, dataset: &str) -> Result<()> {
    if dataset != "fmnist-rgb64" {
        bail!("ACC_MODEL=lite0 runs on ACC_DATASET=fmnist-rgb64 (3x64x64 RGB), not {dataset}");
    }
    let p = LitePreset::from_env()?;
    let fm = adaptivenet_core::assets_dir().join("fashion-mnist");
    let weights = adaptivenet_core::assets::asset(LITE0);
    let (true, Some(weights)) = (fm.join("train-images-idx3-ubyte.gz").exists(), weights) else {
        println!(
            "Fashion-MNIST or {LITE0} not found in {} (run scripts/fetch-assets.sh)",
            adaptivenet_core::assets_dir().display()
        );
        println!("BENCH {}", json!({"skipped": "no assets"}));
        return Ok(());
    };
    let wd: PathBuf = work_root.join(format!("lite0-{}", p.name));
    let data_dir = work_root.join(format!("fmnist-rgb64-{}-{}", p.train_images, p.test_images));
    let t0 = Instant::now();
    render(
        &fashion_mnist(&fm, true)?,
        p.train_images,
        &data_dir.join("train"),
        SEED,
    )?;
    render(
        &fashion_mnist(&fm, false)?,
        p.test_images,
        &data_dir.join("test"),
        SEED,
    )?;
    eprintln!(
        "rendered {} + {} RGB images in {} ({:.0} s)",
        p.train_images,
        p.test_images,
        data_dir.display(),
        t0.elapsed().as_secs_f64()
    );
    // Read as the cloud reads a local ImageFolder: its own shape, mean/std from the training
    // split, the augmentation policy given.
    let augment = AugmentPolicy {
        crop_padding: 4,
        hflip: true,
    };
    let data = TrainingData::read(
        &data_dir.join("train"),
        DatasetFormat::ImageFolder,
        None,
        augment,
        None,
    )?;
    let test = TrainingData::read(
        &data_dir.join("test"),
        DatasetFormat::ImageFolder,
        Some(&data.spec),
        AugmentPolicy::default(),
        None,
    )?
    .train;
    let normalize = data.spec.normalize();
    let (train, search) = split_validation(&data.train, p.search_images, SEED)?;
    let for_training = TrainingData {
        train: train.clone(),
        ..data.clone()
    };
    eprintln!(
        "lite0 preset {}: train {} / search {} / test {} images of {}x{}x{}; work dir {}",
        p.name,
        train.len(),
        search.len(),
        test.len(),
        data.spec.channels,
        data.spec.height,
        data.spec.width,
        wd.display()
    );

    let (oracle, ft_report) = finetuned_oracle(&wd.join("oracle"), &p, &weights, &for_training)?;
    let (mut trained, el_report) = elastified(&wd.join("supernet"), &p, &oracle, &data, &train)?;
    let cfg = SupernetConfig::from_names(&BRANCHES, SEED)?;
    let mut untrained = build_supernet(&oracle, &cfg)?;
    // `ACC_BN_RECAL=1`: the unfolded weights, for recalibrating chosen subnets' branches.
    let trained_unfolded = env_flag("ACC_BN_RECAL", false).then(|| trained.clone());
    trained.fold()?;
    untrained.fold()?;
    let sns = [&trained, &untrained];

    let cache_file = std::env::var_os("ACC_LATENCY_CACHE").map(PathBuf::from);
    let cached = match cache_file.as_deref().filter(|f| f.exists()) {
        Some(f) => {
            let c = LatencyCache::load(f, &trained)?;
            eprintln!(
                "module table, {} candidates and latency passes from {}",
                c.cands.len(),
                f.display()
            );
            Some(c)
        }
        None => None,
    };
    let (table, cands, n_evolved) = match &cached {
        Some(c) => (c.table.clone(), c.cands.clone(), c.evolved),
        None => {
            threads::set_max_threads(1);
            let table = ModuleTable::measure(&trained, p.rounds)?;
            let mut cands = candidates(&trained, &table, p.candidates)?;
            let mut n_evolved = 0;
            if let Some(pg) = p.search {
                let t0 = Instant::now();
                let more = evolved(
                    &trained,
                    &table,
                    &search,
                    &normalize,
                    pg,
                    train_threads,
                    &cands,
                )?;
                eprintln!(
                    "the edge's search (population {}, {} generations) added {} candidates ({:.0} s)",
                    pg.0,
                    pg.1,
                    more.len(),
                    t0.elapsed().as_secs_f64()
                );
                n_evolved = more.len();
                cands.extend(more);
            }
            threads::set_max_threads(train_threads);
            (table, cands, n_evolved)
        }
    };
    eprintln!(
        "{} candidates of {} subnets; search-split accuracy ...",
        cands.len(),
        trained.spec.count()
    );
    let t0 = Instant::now();
    let nets: Vec<(usize, Subnet)> = (0..2)
        .flat_map(|sn| cands.iter().map(move |s| (sn, s.clone())))
        .collect();
    let search_acc = accuracies(&nets, &sns, &search, &normalize)?;
    let (an_search, un_search) = search_acc.split_at(cands.len());
    eprintln!("  {:.0} s", t0.elapsed().as_secs_f64());

    let from_cache = cached.is_some();
    let passes = match cached {
        Some(c) => c.passes,
        None => {
            threads::set_max_threads(1);
            let mut passes = Vec::new();
            for pass in 0..2u64 {
                eprintln!(
                    "latency: 1 thread, pass {}: {} subnets x {} rounds ...",
                    pass + 1,
                    cands.len(),
                    p.rounds
                );
                passes.push(latency_pass(&trained, &cands, &p, 31 + pass)?);
            }
            threads::set_max_threads(train_threads);
            if let Some(f) = &cache_file {
                LatencyCache::save(f, &table, &cands, n_evolved, &passes)?;
                eprintln!("latency cache written to {}", f.display());
            }
            passes
        }
    };
    // How well the table predicted the measured latencies, and how the candidates spread
    // over the budgets (a budget with no candidate under it reports `-`).
    let rel_err: Vec<f64> = cands
        .iter()
        .zip(&passes[0])
        .map(|(s, &ms)| (table.predict_ms(s) - ms).abs() / ms)
        .collect();
    let under: Vec<String> = BUDGETS
        .iter()
        .map(|b| {
            let n = passes[0]
                .iter()
                .filter(|&&ms| ms <= b * passes[0][0])
                .count();
            format!("{b}: {n}")
        })
        .collect();
    eprintln!(
        "module table: stem+head {:.3} ms, {} modules; predicted vs measured: mean error {:.1}%, max {:.1}%; candidates within each budget: {}",
        table.fixed_ms,
        table.module_ms.len(),
        100.0 * rel_err.iter().sum::<f64>() / rel_err.len() as f64,
        100.0 * rel_err.iter().copied().fold(0.0, f64::max),
        under.join(", ")
    );

    // `ACC_VERBOSE=1`: every candidate with its latency and search-split accuracies, to see
    // where along the latency axis the branches stop working.
    if env_flag("ACC_VERBOSE", false) {
        let mut order: Vec<usize> = (0..cands.len()).collect();
        order.sort_by(|&a, &b| passes[0][a].total_cmp(&passes[0][b]));
        eprintln!("  latency  predicted  trained  untrained  subnet");
        for i in order {
            eprintln!(
                "  {:>6.3}  {:>9.3}  {:>6.1}%  {:>8.1}%  {}",
                passes[0][i] / passes[0][0],
                table.predict_ms(&cands[i]) / table.predict_ms(&cands[0]),
                100.0 * an_search[i],
                100.0 * un_search[i],
                cands[i]
            );
        }
        // Each branch alone on the oracle path: which branches work, trained and untrained.
        let n = trained.spec.num_positions();
        let singles: Vec<Subnet> = (0..n)
            .flat_map(|pos| {
                trained.spec.positions[pos]
                    .iter()
                    .filter(move |c| c.id != Choice::Original && pos + c.span <= n)
                    .map(move |c| {
                        let mut v = vec![Choice::Original; n];
                        v[pos] = c.id;
                        for slot in v.iter_mut().skip(pos + 1).take(c.span - 1) {
                            *slot = Choice::Covered;
                        }
                        Subnet(v)
                    })
            })
            .collect();
        let nets: Vec<(usize, Subnet)> = (0..2)
            .flat_map(|sn| singles.iter().map(move |s| (sn, s.clone())))
            .collect();
        let acc = accuracies(&nets, &sns, &search, &normalize)?;
        eprintln!("  single branches: trained  untrained  subnet");
        for (i, s) in singles.iter().enumerate() {
            eprintln!(
                "  {:>6.1}%  {:>8.1}%  {s}",
                100.0 * acc[i],
                100.0 * acc[singles.len() + i]
            );
        }
    }
    let mut chosen: BTreeMap<(usize, &str, usize), Option<usize>> = BTreeMap::new();
    for (pass, lat) in passes.iter().enumerate() {
        for (bi, b) in BUDGETS.iter().enumerate() {
            let limit = b * lat[0];
            chosen.insert((pass, "trained", bi), choose(lat, an_search, limit));
            chosen.insert((pass, "untrained", bi), choose(lat, un_search, limit));
        }
    }
    // `ACC_BN_RECAL=1`: the search split as recalibration batches (no labels), and the
    // recal pick: per pass, the shortlists of every budget pooled, as the agent pools them.
    let recal_k: usize = match std::env::var("ACC_RECAL_PICK") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&k: &usize| k >= 1)
            .with_context(|| format!("ACC_RECAL_PICK={v}: expected an integer >= 1"))?,
        Err(_) => 4,
    };
    let batches: Vec<Tensor> = match &trained_unfolded {
        Some(_) => {
            let t = eval_transform(&normalize);
            let idx: Vec<usize> = (0..search.len()).collect();
            idx.chunks(100)
                .map(|c| Ok(search.batch_tensor(c, &t, &Device::Cpu)?.0))
                .collect::<Result<_>>()?
        }
        None => Vec::new(),
    };
    let mut picked: BTreeMap<(usize, usize), Option<usize>> = BTreeMap::new();
    if let Some(un) = &trained_unfolded {
        let lists: Vec<Vec<usize>> = passes
            .iter()
            .map(|lat| {
                let pool: BTreeSet<usize> = BUDGETS
                    .iter()
                    .flat_map(|b| shortlist(lat, an_search, b * lat[0], recal_k))
                    .collect();
                pool.into_iter().collect()
            })
            .collect();
        let all: BTreeSet<usize> = lists.iter().flatten().copied().collect();
        eprintln!(
            "recal pick (K = {recal_k}): BN recalibration and search-split accuracy of {} shortlisted subnets ...",
            all.len()
        );
        let t0 = Instant::now();
        // The oracle path has no branch to recalibrate: its score stands.
        let mut rescored: BTreeMap<usize, f64> = BTreeMap::new();
        for i in all {
            let acc = if cands[i].uses_branch() {
                let r = recalibrated(un, &cands[i], &batches)?;
                accuracies(&[(0, cands[i].clone())], &[&r], &search, &normalize)?[0]
            } else {
                an_search[i]
            };
            rescored.insert(i, acc);
        }
        eprintln!("  {:.0} s", t0.elapsed().as_secs_f64());
        for (pass, lat) in passes.iter().enumerate() {
            for (bi, b) in BUDGETS.iter().enumerate() {
                let limit = b * lat[0];
                // Best re-scored within the budget; ties: the faster, then the lower index.
                let w = lists[pass]
                    .iter()
                    .copied()
                    .filter(|&i| lat[i] <= limit)
                    .min_by(|&x, &y| {
                        rescored[&y]
                            .total_cmp(&rescored[&x])
                            .then(lat[x].total_cmp(&lat[y]))
                            .then(x.cmp(&y))
                    });
                if let (Some(w), Some(c)) = (w, chosen[&(pass, "trained", bi)]) {
                    eprintln!(
                        "  pass {} budget {b:.2}: {} search {:.1}% -> {:.1}% recalibrated (search's choice {}: {:.1}% -> {:.1}%)",
                        pass + 1,
                        cands[w],
                        100.0 * an_search[w],
                        100.0 * rescored[&w],
                        cands[c],
                        100.0 * an_search[c],
                        100.0 * rescored.get(&c).copied().unwrap_or(an_search[c])
                    );
                }
                picked.insert((pass, bi), w);
            }
        }
    }
    let mut need: BTreeSet<(usize, usize)> = BTreeSet::new();
    need.insert((0, 0));
    for ((_, m, _), c) in &chosen {
        if let Some(i) = c {
            need.insert((usize::from(*m == "untrained"), *i));
        }
    }
    need.extend(picked.values().flatten().map(|&i| (0, i)));
    let need: Vec<(usize, usize)> = need.into_iter().collect();
    eprintln!("test accuracy of {} chosen subnets ...", need.len());
    let test_nets: Vec<(usize, Subnet)> =
        need.iter().map(|&(sn, i)| (sn, cands[i].clone())).collect();
    let accs = accuracies(&test_nets, &sns, &test, &normalize)?;
    let test_acc: BTreeMap<(usize, usize), f64> = need.iter().copied().zip(accs).collect();
    let oracle_acc = test_acc[&(0, 0)];
    // As `edge-agent --bn-recal branches` serves them: each chosen (and recal-picked)
    // trained subnet with its branches' BN statistics re-estimated on the search images,
    // on test images.
    let mut recal_acc: BTreeMap<usize, f64> = BTreeMap::new();
    if let Some(un) = &trained_unfolded {
        let picks: BTreeSet<usize> = chosen
            .iter()
            .filter(|((_, m, _), _)| *m == "trained")
            .filter_map(|(_, c)| *c)
            .chain(picked.values().flatten().copied())
            .filter(|&i| cands[i].uses_branch())
            .collect();
        eprintln!(
            "BN recalibration of {} chosen subnets' branches ...",
            picks.len()
        );
        for i in picks {
            let r = recalibrated(un, &cands[i], &batches)?;
            recal_acc.insert(
                i,
                accuracies(&[(0, cands[i].clone())], &[&r], &test, &normalize)?[0],
            );
        }
    }

    println!();
    println!(
        "EfficientNet-Lite0 on Fashion-MNIST as 3x64x64 RGB, preset {} (fine-tuned from ImageNet; choice on {} search images among {} candidates ({} stratified, {} from the edge's search) of {} subnets, report on {} test images)",
        p.name,
        search.len(),
        cands.len(),
        cands.len() - n_evolved,
        n_evolved,
        trained.spec.count(),
        test.len()
    );
    println!(
        "oracle: test acc {:.2}%; fine-tuning {} steps at {:.1} samples/s; elastification {} + {} steps at {:.1} samples/s ({} modules); train threads {train_threads}",
        100.0 * oracle_acc,
        p.finetune_steps,
        ft_report["images_per_sec"].as_f64().unwrap_or(f64::NAN),
        p.stage_steps[0],
        p.stage_steps[1],
        el_report["samples_per_sec"].as_f64().unwrap_or(f64::NAN),
        el_report["modules"],
    );
    type Retained = (Option<f64>, Option<f64>, Option<f64>, Option<f64>);
    let mut retained: BTreeMap<(usize, usize), Retained> = BTreeMap::new();
    for (pass, lat) in passes.iter().enumerate() {
        println!();
        println!(
            "threads 1, pass {}: oracle {:.3} ms (median of {} interleaved rounds)",
            pass + 1,
            lat[0],
            p.rounds
        );
        println!(
            "{:>6} {:>8} | {:>18} {:>7} {:>7} {:>8} {:>8} | {:>18} {:>8} | {:>18} {:>8}",
            "budget",
            "limit ms",
            "subnet",
            "ms",
            "search",
            "retained",
            "recal",
            "recal pick subnet",
            "pick",
            "untrained subnet",
            "retained"
        );
        for (bi, b) in BUDGETS.iter().enumerate() {
            let t = chosen[&(pass, "trained", bi)];
            let u = chosen[&(pass, "untrained", bi)];
            let r_t = t.map(|i| test_acc[&(0, i)] / oracle_acc);
            let r_u = u.map(|i| test_acc[&(1, i)] / oracle_acc);
            // The oracle path has no branch to recalibrate: its accuracy stands.
            let r_r = t
                .filter(|_| trained_unfolded.is_some())
                .map(|i| recal_acc.get(&i).copied().unwrap_or(test_acc[&(0, i)]) / oracle_acc);
            let w = picked.get(&(pass, bi)).copied().flatten();
            let r_p =
                w.map(|i| recal_acc.get(&i).copied().unwrap_or(test_acc[&(0, i)]) / oracle_acc);
            retained.insert((pass, bi), (r_t, r_u, r_r, r_p));
            let pct = |r: Option<f64>| r.map_or("-".into(), |r| format!("{:.2}%", 100.0 * r));
            println!(
                "{:>6.2} {:>8.3} | {:>18} {:>7} {:>7} {:>8} {:>8} | {:>18} {:>8} | {:>18} {:>8}",
                b,
                b * lat[0],
                t.map_or("-".into(), |i| cands[i].to_string()),
                t.map_or("-".into(), |i| format!("{:.3}", lat[i])),
                t.map_or("-".into(), |i| format!("{:.1}%", 100.0 * an_search[i])),
                pct(r_t),
                pct(r_r),
                w.map_or("-".into(), |i| cands[i].to_string()),
                pct(r_p),
                u.map_or("-".into(), |i| cands[i].to_string()),
                pct(r_u),
            );
        }
    }
    let at = |b: f64| {
        let bi = BUDGETS
            .iter()
            .position(|x| (x - b).abs() < 1e-9)
            .expect("budget");
        retained[&(0, bi)]
    };
    let bench = json!({
        "model": "lite0",
        "dataset": dataset,
        "preset": p.name,
        "lite0_oracle_acc": oracle_acc,
        "lite0_oracle_ms": passes[0][0],
        "lite0_retained_at_0_5": at(0.5).0,
        "lite0_retained_at_0_6": at(0.6).0,
        "lite0_retained_at_0_7": at(0.7).0,
        "lite0_retained_at_0_8": at(0.8).0,
        "lite0_retained_at_0_9": at(0.9).0,
        "lite0_untrained_at_0_6": at(0.6).1,
        "lite0_untrained_at_0_8": at(0.8).1,
        "lite0_retained_at_0_6_bn_recal": at(0.6).2,
        "lite0_retained_at_0_8_bn_recal": at(0.8).2,
        "lite0_retained_at_0_5_recal_pick": at(0.5).3,
        "lite0_retained_at_0_6_recal_pick": at(0.6).3,
        "lite0_retained_at_0_7_recal_pick": at(0.7).3,
        "lite0_retained_at_0_8_recal_pick": at(0.8).3,
        "lite0_retained_at_0_9_recal_pick": at(0.9).3,
        "lite0_recal_pick_k": trained_unfolded.as_ref().map(|_| recal_k),
        "lite0_latency_cached": from_cache,
        "lite0_finetune_samples_per_s": ft_report["images_per_sec"],
        "lite0_elastify_samples_per_s": el_report["samples_per_sec"],
        "lite0_elastify_stage0_samples_per_s": el_report["stages"][0]["samples_per_sec"],
        "lite0_elastify_stage1_samples_per_s": el_report["stages"][1]["samples_per_sec"],
        "lite0_candidates": cands.len(),
        "lite0_candidates_evolved": n_evolved,
        "lite0_subnets": trained.spec.count() as f64,
        "train_threads": train_threads,
        "finetune_steps": p.finetune_steps,
        "stage_steps": p.stage_steps,
        "elastify_params": el_report["params"],
        "rounds": p.rounds,
    });
    println!();
    println!("BENCH {bench}");
    Ok(())
}
