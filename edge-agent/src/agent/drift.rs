//! The drift task: when the maintenance tick reports that the latency table drifted (see
//! [`crate::adapt::drift`]), re-profile and re-search warm-started at the same budget in ms
//! ([`super::Resync::replan_after_drift`]) while serving goes on. One re-plan at a time:
//! the tick drops signals while one runs; cancellation drops the one in progress.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::Agent;
use crate::adapt::AdaptationReason;

/// Runs until the agent is cancelled or the maintenance task ends.
pub(super) async fn run(agent: Arc<Agent>, mut budgets: mpsc::Receiver<f64>) {
    while let Some(Some(budget)) = agent.cancel.run_until_cancelled(budgets.recv()).await {
        agent
            .cancel
            .run_until_cancelled(replan(&agent, budget))
            .await;
        agent.replanning.store(false, Ordering::Release);
    }
}

async fn replan(agent: &Arc<Agent>, budget: f64) {
    println!(
        "latency table drifted (live latency off the table for {} windows): re-profiling and re-searching at {budget:.3} ms",
        agent.cfg.drift.windows
    );
    agent.timeline.note("drift_reprofile");
    match agent
        .resync
        .replan_after_drift(budget, &agent.server, &agent.ctl)
        .await
    {
        Ok((plan, switch)) => {
            println!(
                "re-planned after drift: serving {} (front of {}, budget {:.3} ms){}",
                agent.server.active().subnet,
                plan.record.result.front.len(),
                plan.budget_ms,
                super::loaded_note(switch.as_ref()),
            );
            agent.set_budget(plan.budget_ms);
            agent.set_reason(AdaptationReason::Research);
            agent.applied().plan = plan;
        }
        Err(e) => {
            eprintln!("re-planning after drift failed, still serving the old plan: {e}");
            agent.timeline.note("drift_reprofile_failed");
        }
    }
}
