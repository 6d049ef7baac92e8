//! The maintenance task: the controller's loop ([`crate::adapt::maintain_until`]) plus what
//! the agent does on every tick: feed the drift detector (at most one re-plan queued), log
//! and persist switches, publish the budget, and append the window to the timeline.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::Agent;
use crate::adapt::drift::DriftDetector;
use crate::adapt::timeline::TimelineEntry;
use crate::adapt::{maintain_until, AdaptEvent, Controller, Tick};
use crate::state::ActiveRecord;

/// Runs until the agent is cancelled; returns the controller's events. Drift sends the
/// budget in ms to the drift task.
pub(super) async fn run(agent: Arc<Agent>, drift_tx: mpsc::Sender<f64>) -> Vec<AdaptEvent> {
    let mut drift = DriftDetector::new(agent.cfg.drift);
    let (server, ctl, cancel) = (
        agent.server.clone(),
        agent.ctl.clone(),
        agent.cancel.clone(),
    );
    maintain_until(server, ctl, cancel, move |tick, c| {
        on_tick(&agent, tick, c, &mut drift, &drift_tx)
    })
    .await
}

fn on_tick(
    agent: &Agent,
    tick: &Tick,
    c: &Controller,
    drift: &mut DriftDetector,
    drift_tx: &mpsc::Sender<f64>,
) {
    let event = tick.event.as_ref().map(|ev| ev.name(&c.front));
    let predicted = c.front.get(c.current).map_or(0.0, |x| x.latency_ms);
    if drift.observe(tick.stats.p50_ms, predicted)
        && !agent.replanning.swap(true, Ordering::AcqRel)
        && drift_tx.try_send(c.cfg.budget_ms).is_err()
    {
        agent.replanning.store(false, Ordering::Release);
    }
    match &tick.event {
        Some(ev @ AdaptEvent::Switched(r)) => {
            if let Some(why) = ev.reason(&c.front) {
                agent.set_reason(why);
            }
            let bn = match r.recalibrated {
                Some(true) => ", BN recalibrated",
                Some(false) => ", shipped BN",
                None => "",
            };
            println!(
                "switched {} -> {} at p50 {:.3} ms (budget {:.3} ms; loaded {}, reused {}, {:.1} ms{bn})",
                r.from, r.to, tick.stats.p50_ms, c.cfg.budget_ms, r.loaded, r.reused, r.millis
            );
            let active = agent.server.active();
            let record = ActiveRecord {
                subnet: r.to.clone(),
                budget_ms: c.cfg.budget_ms,
            };
            if let Err(e) = agent.resync.state.save_active(&active.supernet_id, &record) {
                tracing::warn!("active subnet not persisted: {e}");
            }
        }
        Some(AdaptEvent::SwitchFailed { to, error }) => {
            eprintln!("switch to {to} failed, still serving: {error}")
        }
        None => {}
    }
    agent.set_budget(c.cfg.budget_ms);
    let t_s = agent.cfg.started.elapsed().as_secs_f64();
    let entry = TimelineEntry {
        t_s,
        p50_ms: tick.stats.p50_ms,
        p95_ms: tick.stats.p95_ms,
        budget_ms: c.cfg.budget_ms,
        subnet: c
            .front
            .get(c.current)
            .map_or_else(String::new, |x| x.subnet.to_string()),
        event: event.map(str::to_string),
        samples: tick.stats.samples,
        noise: c.noise(),
        contention: agent.cfg.contention.map_or(0.0, |sp| sp.intensity_at(t_s)),
    };
    if let Err(e) = agent.timeline.record(entry) {
        tracing::warn!("timeline: {e}");
    }
}
