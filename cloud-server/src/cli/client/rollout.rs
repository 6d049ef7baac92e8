//! Rollout commands: start, show, list, pause / resume / abort, and a watch that prints each
//! step and decision as it happens.
use adaptivenet_proto::v1 as pb;
use anyhow::Context;
use clap::Subcommand;

use super::Client;

#[derive(Subcommand, Debug)]
pub(super) enum RolloutCmd {
    /// Move a fleet from the supernet it serves (A) to another (B) in steps; each step holds
    /// for a window, then its gates compare the cohort on B with the devices still on A:
    /// passing promotes, failing rolls every device back to A.
    Start {
        #[arg(long)]
        fleet: String,
        /// The supernet version to roll out (B).
        #[arg(long)]
        to: String,
        /// Comma-separated steps: percents of the fleet (`5,25,100`, the default),
        /// `device:ID` (canaries) or `class:N` (a device class). A final 100 % step is added.
        #[arg(long, value_delimiter = ',')]
        steps: Vec<String>,
        /// Largest allowed drop of mean quality on B against A, in points (0: the server's
        /// default, 2).
        #[arg(long, default_value_t = 0.0)]
        max_quality_drop: f64,
        /// Largest allowed drop of the share within budget by p95, in points (0: default 10).
        #[arg(long, default_value_t = 0.0)]
        max_budget_share_drop: f64,
        /// Minimum hold of each step, seconds (0: default 600).
        #[arg(long, default_value_t = 0)]
        window_secs: u64,
        /// Cohort devices that must report on B during a step (0: default 5; capped at the
        /// cohort's size).
        #[arg(long, default_value_t = 0)]
        min_reports: u64,
        /// Follow the rollout until it settles; exits non-zero unless it succeeds.
        #[arg(long)]
        watch: bool,
    },
    /// Show a rollout with its decisions.
    Get { rollout_id: String },
    /// List rollouts, newest first.
    List {
        /// Only this fleet's.
        #[arg(long, default_value = "")]
        fleet: String,
    },
    /// Freeze a running rollout where it is.
    Pause { rollout_id: String },
    /// Resume a paused rollout (the step's window starts again).
    Resume { rollout_id: String },
    /// End a rollout and put every device back on A.
    Abort { rollout_id: String },
    /// Follow a rollout until it settles; exits non-zero unless it succeeds.
    Watch { rollout_id: String },
}

fn parse_step(s: &str) -> anyhow::Result<pb::RolloutStep> {
    use pb::rollout_step::Target;
    let s = s.trim();
    let target = if let Some(id) = s.strip_prefix("device:") {
        Target::Devices(pb::DeviceList {
            device_ids: vec![id.to_string()],
        })
    } else if let Some(c) = s.strip_prefix("class:") {
        Target::DeviceClass(c.parse().with_context(|| format!("--steps {s}: class:N"))?)
    } else {
        let p = s.trim_end_matches('%');
        Target::Percent(
            p.parse()
                .with_context(|| format!("--steps {s}: a percent, device:ID or class:N"))?,
        )
    };
    Ok(pb::RolloutStep {
        target: Some(target),
    })
}

fn step_text(s: &pb::RolloutStep) -> String {
    use pb::rollout_step::Target;
    match &s.target {
        Some(Target::Percent(p)) => format!("{p} %"),
        Some(Target::Devices(d)) => format!("devices {}", d.device_ids.join(" ")),
        Some(Target::DeviceClass(c)) => format!("class {c}"),
        None => "?".into(),
    }
}

fn state_text(s: i32) -> &'static str {
    match pb::RolloutState::try_from(s) {
        Ok(pb::RolloutState::Running) => "running",
        Ok(pb::RolloutState::Paused) => "paused",
        Ok(pb::RolloutState::Succeeded) => "succeeded",
        Ok(pb::RolloutState::RolledBack) => "rolled back",
        Ok(pb::RolloutState::Aborted) => "aborted",
        _ => "unknown",
    }
}

fn summary(r: &pb::Rollout) -> String {
    let step = r
        .steps
        .get(r.step_index as usize)
        .map(step_text)
        .unwrap_or_default();
    // The server states the window's end once; the time left is computed here.
    let left_ms = r.window_ends_unix_ms - adaptivenet_cloud::domain::now_ms();
    let window = if r.window_ends_unix_ms > 0 && left_ms > 0 {
        format!(" (window ends in {} s)", (left_ms + 999) / 1000)
    } else {
        String::new()
    };
    format!(
        "rollout {} fleet {}: {} -> {}, step {}/{} ({step}), {}: {}{window}",
        r.id,
        r.fleet_id,
        r.from_supernet_id,
        r.to_supernet_id,
        r.step_index + 1,
        r.steps.len(),
        state_text(r.state),
        r.status
    )
}

fn print_decision(d: &pb::RolloutDecision) {
    println!(
        "  #{} step {} {}: {}",
        d.seq,
        d.step_index + 1,
        d.action,
        d.detail_json
    );
}

pub(super) async fn run(c: &mut Client, cmd: RolloutCmd, quiet: bool) -> anyhow::Result<()> {
    let act = |id: String| pb::RolloutActionRequest { rollout_id: id };
    let r = match cmd {
        RolloutCmd::Start {
            fleet,
            to,
            steps,
            max_quality_drop,
            max_budget_share_drop,
            window_secs,
            min_reports,
            watch,
        } => {
            let steps = steps
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| parse_step(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let r = c
                .start_rollout(pb::StartRolloutRequest {
                    fleet_id: fleet,
                    to_supernet_id: to,
                    steps,
                    gates: Some(pb::RolloutGates {
                        max_quality_drop_points: max_quality_drop,
                        max_budget_share_drop_points: max_budget_share_drop,
                        window_secs,
                        min_reports,
                    }),
                })
                .await?
                .into_inner();
            if quiet {
                println!("{}", r.id);
            } else {
                println!("{}", summary(&r));
                let g = r.gates.unwrap_or_default();
                println!(
                    "  steps: {}; gates: quality drop <= {} points, within-budget drop <= {} points, window {} s, {} report(s)",
                    r.steps.iter().map(step_text).collect::<Vec<_>>().join(" -> "),
                    g.max_quality_drop_points,
                    g.max_budget_share_drop_points,
                    g.window_secs,
                    g.min_reports
                );
            }
            if !watch {
                return Ok(());
            }
            return follow(c, r.id, quiet).await;
        }
        RolloutCmd::Get { rollout_id } => {
            let r = c
                .get_rollout(pb::GetRolloutRequest { rollout_id })
                .await?
                .into_inner();
            println!("{}", summary(&r));
            r.decisions.iter().for_each(print_decision);
            return Ok(());
        }
        RolloutCmd::List { fleet } => {
            let l = c
                .list_rollouts(pb::ListRolloutsRequest { fleet_id: fleet })
                .await?
                .into_inner();
            for r in &l.rollouts {
                println!("{}", summary(r));
            }
            if l.rollouts.is_empty() && !quiet {
                println!("no rollouts");
            }
            return Ok(());
        }
        RolloutCmd::Watch { rollout_id } => return follow(c, rollout_id, quiet).await,
        RolloutCmd::Pause { rollout_id } => c.pause_rollout(act(rollout_id)).await?,
        RolloutCmd::Resume { rollout_id } => c.resume_rollout(act(rollout_id)).await?,
        RolloutCmd::Abort { rollout_id } => c.abort_rollout(act(rollout_id)).await?,
    }
    .into_inner();
    println!("{}", summary(&r));
    Ok(())
}

/// Prints each change and each new decision until the rollout settles.
async fn follow(c: &mut Client, rollout_id: String, quiet: bool) -> anyhow::Result<()> {
    let mut s = c
        .watch_rollout(pb::GetRolloutRequest { rollout_id })
        .await?
        .into_inner();
    let mut seen = 0usize;
    let mut last = None;
    while let Some(r) = s.message().await? {
        if !quiet {
            println!("{}", summary(&r));
            r.decisions.iter().skip(seen).for_each(print_decision);
        }
        seen = r.decisions.len();
        last = Some(r);
    }
    let r = last.context("the watch ended without a snapshot")?;
    match pb::RolloutState::try_from(r.state) {
        Ok(pb::RolloutState::Succeeded) => Ok(()),
        Ok(pb::RolloutState::Running | pb::RolloutState::Paused) => {
            anyhow::bail!("the watch ended early (server shutting down?); watch again")
        }
        _ => anyhow::bail!("rollout {} {}: {}", r.id, state_text(r.state), r.status),
    }
}
