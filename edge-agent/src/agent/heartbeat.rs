//! The heartbeat task (cloud mode): one report of the search outcome at start, then every
//! interval a heartbeat (rotating a credential nearing expiry first), a re-sync started at
//! once when the cloud's desired generation moved, a retry of an undelivered report, and
//! every `report_every` beats an aggregate report. A re-sync that changed what heartbeats
//! report asks for the next heartbeat at once, so the cloud sees a rollback (or a failed
//! install) one round trip after the heartbeat that announced it, not an interval later;
//! the interval counts from the start of a heartbeat, so slow calls do not stretch it. A
//! failing cloud is logged; serving goes on.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use adaptivenet_core::supernet::Subnet;

use super::{resync, Agent};
use crate::adapt::timeline::Timeline;
use crate::client::{
    local_device_class, now_unix_ms, AgentAggregates, CloudClient, HeartbeatInput,
};
use crate::EdgeError;

/// Runs until the agent is cancelled (a re-sync in progress is dropped then).
pub(super) async fn run(agent: Arc<Agent>, client: Arc<CloudClient>) {
    let first = aggregates(&agent, &agent.server.active().subnet, None);
    if send_report(&client, &first, &agent.timeline).await {
        tracing::info!("reported the search outcome to the cloud");
    }
    let mut interval = agent.cfg.heartbeat_ms.unwrap_or(30_000).max(100);
    // Fixed for the process: a new value in heartbeats is how the cloud counts restarts.
    let started_unix_ms = now_unix_ms() - agent.cfg.started.elapsed().as_millis() as i64;
    let report_every = agent.cfg.report_every.max(1);
    let mut beats = 0u32;
    let mut next = tokio::time::Instant::now() + Duration::from_millis(interval);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = agent.beat.notified() => {}
            _ = agent.cancel.cancelled() => break,
        }
        let began = tokio::time::Instant::now();
        next = began + Duration::from_millis(interval);
        let active = agent.server.active().subnet.clone();
        let (n, p50, p95) = agent.server.window_stats();
        let cur = agent.applied().clone();
        let hb = HeartbeatInput {
            supernet_id: cur.supernet_id.clone(),
            active_subnet: active.clone(),
            latency_p50_ms: if n > 0 { p50 } else { 0.0 },
            latency_p95_ms: if n > 0 { p95 } else { 0.0 },
            reason: agent.reason().into(),
            applied_generation: cur.generation,
            serving: agent.serving(),
            started_unix_ms,
            search_reuse: Some(cur.plan.reuse.clone()),
        };
        // Rotate a credential nearing expiry before using it again; a failure is retried at
        // the next heartbeat (the old one works until it expires).
        if let Err(e) = client.rotate_credential_if_due(now_unix_ms()).await {
            tracing::warn!("credential rotation failed: {e}");
        }
        match client.heartbeat(&hb).await {
            Ok(r) => {
                if agent.cfg.heartbeat_ms.is_none() && r.heartbeat_interval_ms > 0 {
                    interval = u64::from(r.heartbeat_interval_ms);
                }
                next = began + Duration::from_millis(interval);
                if r.desired_generation != cur.generation
                    && !agent.resyncing.swap(true, Ordering::AcqRel)
                {
                    // What is applied now: a re-sync may have finished during the call.
                    let now = agent.applied().clone();
                    if now.generation == r.desired_generation {
                        agent.resyncing.store(false, Ordering::Release);
                    } else {
                        // Re-sync in the background: heartbeats and serving go on.
                        let (agent, client) = (agent.clone(), client.clone());
                        let cancel = agent.cancel.clone();
                        tokio::spawn(async move {
                            cancel
                                .run_until_cancelled(resync::task(agent, client, now))
                                .await
                        });
                    }
                }
                if let Err(e) = client.flush_pending_report().await {
                    tracing::warn!("pending report not delivered: {e}");
                }
            }
            Err(e) => tracing::warn!("heartbeat failed, still serving: {e}"),
        }
        beats += 1;
        if beats.is_multiple_of(report_every) && n > 0 {
            let agg = aggregates(&agent, &active, Some((n, p50, p95)));
            send_report(&client, &agg, &agent.timeline).await;
        }
    }
}

/// Sends a report; one below the privacy minimum stays on the device and is noted in the
/// timeline.
async fn send_report(client: &CloudClient, agg: &AgentAggregates, timeline: &Timeline) -> bool {
    match client.report(agg).await {
        Ok(()) => true,
        Err(e @ EdgeError::ReportWithheld { .. }) => {
            println!("{e}");
            timeline.note("report_withheld");
            false
        }
        Err(e) => {
            tracing::warn!("report not delivered (kept for retry): {e}");
            false
        }
    }
}

/// The aggregates of the applied plan with `active` serving; `live` is `(samples, p50,
/// p95)` of the serving window.
fn aggregates(agent: &Agent, active: &Subnet, live: Option<(usize, f64, f64)>) -> AgentAggregates {
    let cur = agent.applied();
    let rec = &cur.plan.record;
    // The images the quality was measured on (older stored results did not record them).
    let samples = match rec.result.stats.images {
        0 => agent.cfg.samples,
        n => n as u64,
    };
    let cand = rec
        .result
        .front
        .iter()
        .find(|c| &c.subnet == active)
        .cloned()
        .unwrap_or_else(|| rec.result.front[0].clone());
    AgentAggregates::from_state(
        &cur.supernet_id,
        &cur.plan.table,
        rec,
        &cand,
        cur.plan.budget_ms,
        live,
        samples,
        local_device_class(),
    )
}
