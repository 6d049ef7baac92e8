//! The one-shot commands (`profile`, `search`, `evaluate`, `demo-artifact`) and their
//! printouts.
use std::path::Path;

use adaptivenet_core::artifact::{write_artifact, InputSpec};
use adaptivenet_core::data::FASHION_MNIST_CLASSES;
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::{branches::build_supernet, SupernetConfig};
use adaptivenet_edge::adapt::plan;
use adaptivenet_edge::evaluate::{evaluate_plan, PlanEval};
use adaptivenet_edge::profile::LatencyTable;
use adaptivenet_edge::quality::{load_local_data, QualityMode};
use adaptivenet_edge::serve::ArtifactSource;
use adaptivenet_edge::state::{SearchRecord, StateDir};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{plan_config, profile_config, EvaluateArgs, ProfileArgs, SearchArgs};

fn bar(len: u64, msg: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(msg);
    pb
}

/// Draws one progress bar per stage of a plan (profile, search).
pub fn progress_bars() -> impl FnMut(&'static str, usize, usize) {
    let mut cur: Option<(&'static str, ProgressBar)> = None;
    move |stage, done, total| {
        if cur.as_ref().map(|(s, _)| *s) != Some(stage) {
            if let Some((_, b)) = cur.take() {
                b.finish_and_clear();
            }
            cur = Some((stage, bar(total as u64, stage)));
        }
        if let Some((_, b)) = &cur {
            b.set_position(done as u64);
            if done >= total {
                b.finish_and_clear();
            }
        }
    }
}

pub fn ensure_table(src: &ArtifactSource, a: &ProfileArgs) -> Result<LatencyTable> {
    let state = StateDir::new(&a.common.state);
    let (t, _) = plan::ensure_table(src, &state, &profile_config(a), &mut progress_bars())
        .context("profiling")?;
    Ok(t)
}

pub fn print_table(t: &LatencyTable) {
    let c = &t.conditions;
    println!(
        "conditions: threads={} batch={} cpu={:?} governor={}",
        c.threads,
        c.batch,
        c.cpu_model,
        c.governor.as_deref().unwrap_or("unreadable")
    );
    println!(
        "stem {:.4} ms  head {:.4} ms",
        t.stem.median_ms, t.head.median_ms
    );
    println!(
        "{:>4} {:>6} {:>10} {:>10} {:>5}",
        "pos", "choice", "median_ms", "p95_ms", "runs"
    );
    for m in &t.modules {
        println!(
            "{:>4} {:>6} {:>10.4} {:>10.4} {:>5}",
            m.position, m.choice, m.stat.median_ms, m.stat.p95_ms, m.stat.runs
        );
    }
    if let Some(v) = &t.validation {
        println!(
            "validation on {} subnets: bias x{:.3}; raw median {:.1}% p90 {:.1}%; calibrated median {:.1}% p90 {:.1}%",
            v.subnets,
            v.bias,
            100.0 * v.raw_median_err,
            100.0 * v.raw_p90_err,
            100.0 * v.calibrated_median_err,
            100.0 * v.calibrated_p90_err
        );
    }
}

pub fn ensure_search(src: &ArtifactSource, a: &SearchArgs) -> Result<(LatencyTable, SearchRecord)> {
    let state = StateDir::new(&a.profile.common.state);
    let p = plan::plan(src, &state, &plan_config(a), &mut progress_bars())?;
    Ok((p.table, p.record))
}

pub fn print_search(rec: &SearchRecord) {
    let r = &rec.result;
    println!(
        "search: {} evaluations in {:.2} s ({:.1} evals/s, {} module applications)",
        r.stats.evaluations, r.stats.seconds, r.stats.evals_per_s, r.stats.module_applications
    );
    for b in &r.best {
        println!(
            "budget {:.3} ms: {} latency {:.3} ms quality {:.2}%",
            b.budget_ms, b.best.subnet, b.best.latency_ms, b.best.quality
        );
    }
    println!("pareto front ({} points):", r.front.len());
    for c in &r.front {
        println!("  {} {:.3} ms {:.2}%", c.subnet, c.latency_ms, c.quality);
    }
}

/// `edge-agent evaluate`: the stored plan scored against the labels of local data.
pub fn evaluate(a: &EvaluateArgs) -> Result<()> {
    let dir = match &a.artifact {
        Some(d) => d.clone(),
        None => {
            let cache = a.cache.clone().unwrap_or_else(|| a.state.join("cache"));
            adaptivenet_edge::client::sync::cached_current(&cache)
                .map(|(_, d)| d)
                .with_context(|| {
                    format!(
                        "no synced supernet in {} (give --artifact or --cache)",
                        cache.display()
                    )
                })?
        }
    };
    let src = ArtifactSource::open(&dir).context("opening the artifact")?;
    let state = StateDir::new(&a.state);
    let rec = state
        .load_search(&src.manifest.supernet_id.to_string())?
        .with_context(|| {
            format!(
                "no search result in {} (run `edge-agent search` or `run` first)",
                a.state.display()
            )
        })?;
    let data = load_local_data(&a.data, &src.manifest.input)?;
    let mode = if a.label_free {
        QualityMode::OracleAgreement
    } else {
        QualityMode::Labelled
    };
    let e = evaluate_plan(&src, &rec, &data, a.bn_recal.setting(mode))?;
    if a.json {
        println!("{}", serde_json::to_string(&e)?);
    } else {
        print_evaluation(&e, mode);
    }
    Ok(())
}

fn print_evaluation(e: &PlanEval, mode: QualityMode) {
    let what = match mode {
        QualityMode::OracleAgreement => "agreement with the oracle",
        QualityMode::Labelled => "labelled accuracy",
    };
    println!(
        "{} labelled local images ({} of them scored by the search, by {what})",
        e.images, e.search_images
    );
    println!("oracle accuracy {:.2}%", e.oracle_accuracy);
    for b in &e.budgets {
        let c = &b.chosen;
        println!(
            "budget {:.3} ms: chosen {} ({:.3} ms) search quality {:.2}%, agreement {:.2}%, accuracy {:.2}%, retained {:.3}",
            b.budget_ms, c.subnet, c.latency_ms, c.search_quality, c.agreement, c.accuracy, b.retained
        );
        let p = &b.labelled_pick;
        if p.subnet == c.subnet {
            println!("  best of the front by labels: the same subnet");
        } else {
            println!(
                "  best of the front by labels: {} ({:.3} ms) accuracy {:.2}% ({:+.2} points)",
                p.subnet,
                p.latency_ms,
                p.accuracy,
                p.accuracy - c.accuracy
            );
        }
    }
}

pub fn demo_artifact(out: &Path, widths: &[usize], seed: u64) -> Result<()> {
    if widths.len() != 3 || widths.contains(&0) {
        bail!("--widths needs three positive stage widths, e.g. 16,32,64");
    }
    let arch = serde_json::json!({
        "family": "adaptivenet.resnet_small", "block": "basic", "layers": [3, 3, 3],
        "widths": widths, "in_channels": 1, "num_classes": 10
    });
    let arch = ArchDescriptor::from_json(arch.to_string().as_bytes())?;
    let oracle = Model::init(&arch.spec, seed)?;
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only())?;
    let input = InputSpec {
        shape: [1, 28, 28],
        // Untrained weights learnt no statistics: centre x / 255 generically.
        mean: vec![0.5],
        std: vec![0.25],
        class_names: FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let m = write_artifact(out, &sn, input, &"0".repeat(64), vec![])?;
    println!(
        "wrote {} ({} subnets, supernet {})",
        out.display(),
        m.subnet_count,
        m.supernet_id
    );
    Ok(())
}
