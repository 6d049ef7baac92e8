//! Same-host comparison of elastification speed with PyTorch (`elastify_ratio_torch`).
//!
//! Our side is a short run of the library's own [`elastify`] with the bench's recipe, each
//! step timed from one progress event to the next (path sampling, data loading and
//! augmentation included). The peer (`elastify_peer.py`, run with `$BENCH_PYTHON`, default
//! `python3`) repeats exactly the paths those steps trained, read from the progress events,
//! on the same supernet weights, batch size and thread count, in the same run. Both sides
//! discard their first [`WARMUP`] steps per stage and compare medians of time per step, i.e.
//! per sample: the process's CPU time (the headline: on a shared host other processes' time
//! slices move wall time, and the two sides run one after the other) and wall time. Without
//! torch the comparison is skipped with the reason printed.
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use adaptivenet_core::data::Dataset;
use adaptivenet_core::model::Model;
use adaptivenet_core::supernet::Choice;
use adaptivenet_kernels::threads;
use adaptivenet_train::{elastify, ElastifyConfig, ProgressEvent, ProgressSink};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Steps per stage whose time is discarded on both sides.
pub const WARMUP: usize = 3;
/// Timed steps per stage.
pub const TIMED: usize = 20;

/// CPU time of this process (every thread), seconds.
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_PROCESS_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// One step: wall and CPU seconds, and the path it trained.
struct Step {
    wall: f64,
    cpu: f64,
    path: Vec<String>,
}

/// Each step's times and path, per stage.
struct StepClock {
    last: (Instant, f64),
    stages: [Vec<Step>; 2],
}

impl ProgressSink for StepClock {
    fn report(&mut self, e: &ProgressEvent) {
        let now = (Instant::now(), process_cpu_s());
        let (wall, cpu) = ((now.0 - self.last.0).as_secs_f64(), now.1 - self.last.1);
        self.last = now;
        let stage = usize::from(e.stage == "stage1");
        let path = e
            .paths
            .iter()
            .flat_map(|p| p.subnet.steps().map(|k| k.name()))
            .collect();
        self.stages[stage].push(Step { wall, cpu, path });
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `WARMUP + TIMED` steps of each stage of `config`'s recipe in our trainer and in
/// PyTorch. `Ok(None)` when the peer is unavailable.
pub fn elastify_ratio(
    oracle: &Model,
    config: &ElastifyConfig,
    train: &Dataset,
    work: &Path,
) -> Result<Option<Value>> {
    let steps = (WARMUP + TIMED) as u64;
    let cfg = ElastifyConfig {
        stage0_steps: steps,
        stage1_steps: steps,
        warmup_steps: 1,
        sandwich: false,
        ..config.clone()
    };
    eprintln!(
        "torch comparison: {steps} + {steps} elastification steps of batch {} here, then the same paths in PyTorch",
        cfg.batch
    );
    let mut clock = StepClock {
        last: (Instant::now(), process_cpu_s()),
        stages: [Vec::new(), Vec::new()],
    };
    let out = elastify(
        oracle,
        &cfg,
        train,
        &mut clock,
        None,
        &CancellationToken::new(),
    )?;
    let sn = &out.supernet;
    // The first event of stage 1 also timed the end of stage 0 (its report), so each stage's
    // first steps are discarded.
    let ours = |f: fn(&Step) -> f64| -> Vec<f64> {
        clock
            .stages
            .iter()
            .map(|s| median(s.iter().skip(WARMUP).map(f).collect()))
            .collect()
    };
    let (ours_cpu, ours_wall) = (ours(|s| s.cpu), ours(|s| s.wall));
    if clock
        .stages
        .iter()
        .any(|s| s.iter().any(|st| st.path.is_empty()))
    {
        bail!("a progress event named no trained path");
    }

    std::fs::create_dir_all(work)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (k, t) in &sn.stem {
        tensors.insert(format!("stem.{k}"), t.clone());
    }
    for (k, t) in &sn.head {
        tensors.insert(format!("head.{k}"), t.clone());
    }
    let mut modules = serde_json::Map::new();
    for (key, params) in &sn.modules {
        let c = sn
            .spec
            .choice(*key)
            .with_context(|| format!("module {key} is not in the supernet's spec"))?;
        for (k, t) in params {
            tensors.insert(format!("{key}.{k}"), t.clone());
        }
        modules.insert(
            key.name(),
            json!({"block": c.block, "pos": key.pos, "span": c.span,
                   "branch": key.choice != Choice::Original}),
        );
    }
    let weights = work.join("supernet.safetensors");
    candle_core::safetensors::save(&tensors, &weights)?;
    let classes = sn
        .head
        .get("fc.bias")
        .context("the head has no fc.bias")?
        .dim(0)?;
    let peer_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/accuracy_latency");
    let cfg_json = json!({
        "threads": threads::max_threads(),
        "interpreter_dir": Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/core/benches"),
        "oracle_spec": sn.spec.oracle,
        "input": sn.spec.oracle.input,
        "classes": classes,
        "batch": cfg.batch,
        "modules": modules,
        "weights": weights,
        "temperature": cfg.temperature,
        "ce_weight": cfg.ce_weight,
        "weight_decay": cfg.weight_decay,
        "stage0_detach_inputs": cfg.stage0_detach_inputs,
        "warmup": WARMUP,
        "stages": [
            {"lr": cfg.lr_stage0, "paths": clock.stages[0].iter().map(|s| &s.path).collect::<Vec<_>>()},
            {"lr": cfg.lr_stage1, "paths": clock.stages[1].iter().map(|s| &s.path).collect::<Vec<_>>()},
        ],
    });
    let cfg_path = work.join("peer.json");
    std::fs::write(&cfg_path, cfg_json.to_string())?;
    let py = std::env::var("BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    if py == "none" {
        eprintln!("torch comparison: skipped (BENCH_PYTHON=none)");
        return Ok(None);
    }
    let run = Command::new(&py)
        .arg(peer_dir.join("elastify_peer.py"))
        .arg(&cfg_path)
        .output();
    let run = match run {
        Ok(r) => r,
        Err(e) => {
            eprintln!("torch comparison: skipped ({py} does not start: {e})");
            return Ok(None);
        }
    };
    let stdout = String::from_utf8_lossy(&run.stdout);
    for l in stdout.lines().filter(|l| !l.starts_with("PEER ")) {
        eprintln!("  peer: {l}");
    }
    if !run.status.success() {
        bail!(
            "elastify_peer.py failed ({}): {}",
            run.status,
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let peer: Value = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("PEER "))
        .context("elastify_peer.py printed no PEER line")
        .and_then(|l| Ok(serde_json::from_str(l)?))?;
    if peer["torch"].is_null() {
        eprintln!("torch comparison: skipped (no torch for {py}; set BENCH_PYTHON)");
        return Ok(None);
    }
    let theirs = |key: &str| -> Result<Vec<f64>> {
        (0..2)
            .map(|s| {
                let v: Vec<f64> = peer["stages"][s][key]
                    .as_array()
                    .map(|a| a.iter().skip(WARMUP).filter_map(Value::as_f64).collect())
                    .unwrap_or_default();
                if v.is_empty() {
                    bail!("the peer timed no step of stage {s}");
                }
                Ok(median(v))
            })
            .collect()
    };
    let (theirs_cpu, theirs_wall) = (theirs("step_cpu_s")?, theirs("step_s")?);
    let ratio = |a: &[f64], b: &[f64]| (a[0] + a[1]) / (b[0] + b[1]);
    println!(
        "\n## elastification speed against PyTorch {} on this host ({} thread(s), batch {}, the same {TIMED} paths per stage after {WARMUP} warm-up steps; medians of CPU time per step, wall time in brackets)",
        peer["torch"].as_str().unwrap_or("?"),
        threads::max_threads(),
        cfg.batch
    );
    println!("| stage | ours ms/step | PyTorch ms/step | ours / PyTorch |\n|---|---|---|---|");
    let row = |name: &str, o: [f64; 2], t: [f64; 2]| {
        println!(
            "| {name} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.2} ({:.2}) |",
            1e3 * o[0],
            1e3 * o[1],
            1e3 * t[0],
            1e3 * t[1],
            o[0] / t[0],
            o[1] / t[1]
        );
    };
    for s in 0..2 {
        row(
            &s.to_string(),
            [ours_cpu[s], ours_wall[s]],
            [theirs_cpu[s], theirs_wall[s]],
        );
    }
    row(
        "both",
        [ours_cpu[0] + ours_cpu[1], ours_wall[0] + ours_wall[1]],
        [
            theirs_cpu[0] + theirs_cpu[1],
            theirs_wall[0] + theirs_wall[1],
        ],
    );
    Ok(Some(json!({
        "elastify_ratio_torch": ratio(&ours_cpu, &theirs_cpu),
        "elastify_ratio_torch_wall": ratio(&ours_wall, &theirs_wall),
        "elastify_ratio_torch_stage0": ours_cpu[0] / theirs_cpu[0],
        "elastify_ratio_torch_stage1": ours_cpu[1] / theirs_cpu[1],
        "torch_version": peer["torch"],
    })))
}
