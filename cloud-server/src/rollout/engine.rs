//! The rollout engine and the operations people start: every API process runs the engine;
//! per rollout, the replica holding its lease judges it each tick (see the module docs of
//! [`crate::rollout`]), and every transition it makes is fenced, so two replicas (or a
//! restarted one) can never both promote or both roll back the same step.
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{judge, normalize_steps, Gates, Rollout, RolloutState, Step, Verdict};
use crate::app::App;
use crate::domain::{now_ms, FleetEventKind};
use crate::error::{CloudError, Result};
use crate::store::Settle;

/// What a person asks for when starting a rollout.
pub struct StartRollout {
    pub fleet_id: Uuid,
    pub to_supernet_id: Uuid,
    pub steps: Vec<Step>,
    pub gates: Gates,
}

/// Starts a rollout from what the fleet serves now (A) to `to_supernet_id` (B).
pub async fn start(app: &App, req: StartRollout) -> Result<Rollout> {
    let store = app.store();
    let steps = normalize_steps(req.steps)?;
    store.get_supernet(req.to_supernet_id).await?;
    let desired = store.desired_state(req.fleet_id).await?;
    let Some(from) = desired.supernet_id else {
        return Err(CloudError::FailedPrecondition(format!(
            "fleet {} serves no supernet yet: publish one (PublishSupernet + SetDesiredState) \
             before rolling out another",
            req.fleet_id
        )));
    };
    if from == req.to_supernet_id {
        return Err(CloudError::invalid(
            "to_supernet_id",
            "the fleet already serves this supernet",
        ));
    }
    let now = now_ms();
    let r = Rollout {
        id: Uuid::new_v4(),
        fleet_id: req.fleet_id,
        from_supernet_id: from,
        to_supernet_id: req.to_supernet_id,
        steps,
        gates: req.gates,
        step_index: 0,
        step_started_ms: now,
        state: RolloutState::Running,
        status: "step 1 started".into(),
        created_ms: now,
        updated_ms: now,
    };
    let detail = serde_json::json!({
        "from": from.to_string(),
        "to": r.to_supernet_id.to_string(),
        "label": desired.label,
        "steps": r.steps,
        "gates": r.gates,
    });
    let r = store.insert_rollout(&r, &detail).await?;
    app.emit_fleet(
        FleetEventKind::DesiredStateChanged,
        r.fleet_id,
        None,
        Some(r.to_supernet_id),
    );
    tracing::info!(rollout = %r.id, fleet = %r.fleet_id, from = %from, to = %r.to_supernet_id, "rollout started");
    Ok(r)
}

/// Pauses (`pause`) or resumes a rollout by hand.
pub async fn pause(app: &App, id: Uuid, pause: bool) -> Result<Rollout> {
    let store = app.store();
    let r = store.get_rollout(id).await?;
    if !store.pause_rollout(&r, pause, now_ms()).await? {
        return Err(CloudError::FailedPrecondition(format!(
            "rollout {id} is {}; only a {} rollout can be {}",
            r.state.as_str(),
            if pause { "running" } else { "paused" },
            if pause { "paused" } else { "resumed" },
        )));
    }
    store.get_rollout(id).await
}

/// Aborts a running or paused rollout: every device goes back to A.
pub async fn abort(app: &App, id: Uuid) -> Result<Rollout> {
    let store = app.store();
    let r = store.get_rollout(id).await?;
    let detail = serde_json::json!({ "by": "operator" });
    if !store
        .settle_rollout(&r, None, Settle::Aborted, &detail, now_ms())
        .await?
    {
        return Err(CloudError::FailedPrecondition(format!(
            "rollout {id} has already settled ({})",
            r.state.as_str()
        )));
    }
    app.emit_fleet(
        FleetEventKind::DesiredStateChanged,
        r.fleet_id,
        None,
        Some(r.from_supernet_id),
    );
    store.get_rollout(id).await
}

/// Judges every running rollout each `Config::rollout_tick` until `stop`.
pub async fn run(app: App, stop: CancellationToken) {
    let owner = format!("rollouts-{}", Uuid::new_v4());
    let tick = app.config().rollout_tick.max(Duration::from_millis(10));
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Err(e) = tick_once(&app, &owner).await {
            tracing::warn!(error = %e, "rollout tick failed");
        }
    }
}

/// One pass over the running rollouts; returns how many this owner judged.
pub async fn tick_once(app: &App, owner: &str) -> Result<usize> {
    let store = app.store();
    let lease = (app.config().rollout_tick * 3).as_millis() as i64;
    let mut judged = 0;
    for id in store.running_rollouts().await? {
        let now = now_ms();
        if !store.lease_rollout(id, owner, now, now + lease).await? {
            continue;
        }
        judged += 1;
        let r = store.get_rollout(id).await?;
        if r.state != RolloutState::Running {
            continue;
        }
        step(app, owner, &r).await?;
    }
    Ok(judged)
}

async fn step(app: &App, owner: &str, r: &Rollout) -> Result<()> {
    let store = app.store();
    let devices = store.fleet_device_classes(r.fleet_id).await?;
    let cohort: Vec<_> = devices
        .into_iter()
        .filter(|(d, c)| r.target_for(*d, *c) == r.to_supernet_id)
        .collect();
    let samples = store.fleet_samples(r.fleet_id).await?;
    let health = store.fleet_device_health(r.fleet_id).await?;
    let k = app.config().min_group_devices as usize;
    let now = now_ms();
    match judge(r, &cohort, &samples, &health, k, now) {
        Verdict::Hold(why) => {
            store.rollout_status(r, owner, &why, now).await?;
        }
        Verdict::Promote(detail) if r.is_last_step() => {
            if store
                .settle_rollout(r, Some(owner), Settle::Succeeded, &detail, now)
                .await?
            {
                tracing::info!(rollout = %r.id, "rollout succeeded");
                app.emit_fleet(
                    FleetEventKind::DesiredStateChanged,
                    r.fleet_id,
                    None,
                    Some(r.to_supernet_id),
                );
            }
        }
        Verdict::Promote(detail) => {
            if store.promote_rollout(r, owner, &detail, now).await? {
                tracing::info!(rollout = %r.id, step = r.step_index + 2, "rollout promoted");
                app.emit_fleet(
                    FleetEventKind::DesiredStateChanged,
                    r.fleet_id,
                    None,
                    Some(r.to_supernet_id),
                );
            }
        }
        Verdict::Rollback(detail) => {
            if store
                .settle_rollout(r, Some(owner), Settle::RolledBack, &detail, now)
                .await?
            {
                tracing::warn!(rollout = %r.id, %detail, "rollout rolled back");
                app.emit_fleet(
                    FleetEventKind::DesiredStateChanged,
                    r.fleet_id,
                    None,
                    Some(r.from_supernet_id),
                );
            }
        }
    }
    Ok(())
}
