//! Job commands: start an elastification or an oracle training, follow a job to its end,
//! cancel it.
use adaptivenet_proto::v1 as pb;
use anyhow::Context;

use super::Client;

pub(super) async fn elastify(
    c: &mut Client,
    oracle_id: String,
    dataset_id: String,
    params: String,
    supernet_name: String,
    watch: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let j = c
        .start_elastification(pb::StartElastificationRequest {
            oracle_id,
            dataset_id,
            supernet_name,
            params_json: params,
        })
        .await?
        .into_inner();
    if !watch {
        println!("{}{}", if quiet { "" } else { "job " }, j.id);
    } else {
        if !quiet {
            println!("job {}", j.id);
        }
        let j = watch_job(c, j.id).await?;
        print_finished(&j, quiet)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn train_oracle(
    c: &mut Client,
    dataset: String,
    arch: Option<std::path::PathBuf>,
    from_oracle: Option<String>,
    name: String,
    params: String,
    watch: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let arch_json = match arch {
        Some(p) => std::fs::read_to_string(&p)
            .with_context(|| format!("reading --arch {}", p.display()))?,
        None => String::new(),
    };
    let j = c
        .start_oracle_training(pb::StartOracleTrainingRequest {
            name,
            dataset_id: dataset,
            arch_json,
            base_oracle_id: from_oracle.unwrap_or_default(),
            params_json: params,
        })
        .await?
        .into_inner();
    if !watch {
        println!("{}{}", if quiet { "" } else { "job " }, j.id);
    } else {
        if !quiet {
            println!("job {}", j.id);
        }
        let j = watch_job(c, j.id).await?;
        print_finished(&j, quiet)?;
    }
    Ok(())
}

pub(super) async fn watch(c: &mut Client, job_id: String, quiet: bool) -> anyhow::Result<()> {
    let j = watch_job(c, job_id).await?;
    print_finished(&j, quiet)?;
    Ok(())
}

pub(super) async fn cancel(c: &mut Client, job_id: String) -> anyhow::Result<()> {
    let j = c
        .cancel_job(pb::CancelJobRequest { job_id })
        .await?
        .into_inner();
    println!(
        "job {} state {:?}",
        j.id,
        pb::JobState::try_from(j.state).unwrap_or_default()
    );
    Ok(())
}

/// Prints a finished job (with `quiet`, only its result's id) and fails unless it succeeded,
/// so that a script stops at a failed job.
fn print_finished(j: &pb::Job, quiet: bool) -> anyhow::Result<()> {
    let st = pb::JobState::try_from(j.state).unwrap_or_default();
    if st != pb::JobState::Succeeded {
        anyhow::bail!("job {} ended {:?}: {}", j.id, st, j.error);
    }
    // An oracle-training job's result is an oracle; an elastification's a supernet.
    let result = if j.kind == "train_oracle" {
        &j.result_oracle_id
    } else {
        &j.supernet_id
    };
    if quiet {
        println!("{result}");
    } else if j.kind == "train_oracle" {
        println!("job {} {:?} oracle {result}", j.id, st);
        if let Some(r) = train_report_summary(&j.report_json) {
            println!("{r}");
        }
    } else {
        println!("job {} {:?} {result}", j.id, st);
    }
    Ok(())
}

/// Follows a job with a progress bar (stderr) until it ends; returns its last snapshot.
async fn watch_job(c: &mut Client, job_id: String) -> anyhow::Result<pb::Job> {
    let mut s = c
        .watch_job(pb::WatchJobRequest { job_id })
        .await?
        .into_inner();
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {percent}% {msg}")
            .expect("valid template"),
    );
    let mut last = None;
    while let Some(ev) = s.message().await? {
        if let Some(j) = ev.job {
            bar.set_position((j.progress * 1000.0) as u64);
            bar.set_message(j.stage.clone());
            last = Some(j);
        }
    }
    bar.finish_and_clear();
    last.context("the job stream ended without a snapshot")
}

/// A train-oracle job's report as readable lines (None when there is none).
pub fn train_report_summary(report_json: &str) -> Option<String> {
    let r: serde_json::Value = serde_json::from_str(report_json).ok()?;
    let acc = match (r["accuracy"].as_f64(), r["accuracy_split"].as_str()) {
        (Some(a), Some(split)) => format!(
            "{:.2} % on {} {split} images",
            a * 100.0,
            r["accuracy_images"]
        ),
        _ => "not measured (nothing held out)".to_string(),
    };
    Some(format!(
        "  {} to {} classes: {} steps of batch {} at lr {} in {:.1} s, {:.0} images/s on {} threads\n  accuracy: {acc}\n  loss: {:.4} -> {:.4} (mean of the last steps)",
        r["mode"].as_str().unwrap_or("?"),
        r["classes"],
        r["steps"],
        r["batch"],
        r["lr"],
        r["train_seconds"].as_f64().unwrap_or(0.0),
        r["images_per_sec"].as_f64().unwrap_or(0.0),
        r["threads"],
        r["first_loss"].as_f64().unwrap_or(f64::NAN),
        r["final_mean_loss"].as_f64().unwrap_or(f64::NAN),
    ))
}
