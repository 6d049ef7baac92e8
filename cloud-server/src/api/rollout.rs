//! The rollout methods of `DeveloperService` (the service delegates here): request checks,
//! authorisation by the rollout's fleet, wire conversions, and the watch stream.
use std::time::Duration;

use adaptivenet_proto::v1 as pb;
use tonic::metadata::MetadataMap;
use tonic::Status;
use uuid::Uuid;

use super::{management_fleet, management_one_fleet, ServerStream};
use crate::app::App;
use crate::auth::{authorize_fleet, authorize_management, Access};
use crate::domain::parse_id;
use crate::error::{CloudError, Result};
use crate::rollout::engine::{self, StartRollout};
use crate::rollout::{Decision, Gates, Rollout, RolloutState, Step};

/// How often a watch re-reads its rollout (rollouts change at most once per engine tick).
const WATCH_POLL: Duration = Duration::from_millis(500);

fn step_from_pb(i: usize, s: &pb::RolloutStep) -> Result<Step> {
    use pb::rollout_step::Target;
    let field = format!("steps[{i}]");
    match &s.target {
        Some(Target::Percent(p)) => Ok(Step::Percent(*p)),
        Some(Target::Devices(d)) => d
            .device_ids
            .iter()
            .enumerate()
            .map(|(j, id)| parse_id(&format!("{field}.devices.device_ids[{j}]"), id))
            .collect::<Result<Vec<_>>>()
            .map(Step::Devices),
        Some(Target::DeviceClass(c)) => Ok(Step::Class(*c)),
        None => Err(CloudError::invalid(
            field,
            "set percent, devices or device_class",
        )),
    }
}

fn step_to_pb(s: &Step) -> pb::RolloutStep {
    use pb::rollout_step::Target;
    pb::RolloutStep {
        target: Some(match s {
            Step::Percent(p) => Target::Percent(*p),
            Step::Devices(d) => Target::Devices(pb::DeviceList {
                device_ids: d.iter().map(|d| d.to_string()).collect(),
            }),
            Step::Class(c) => Target::DeviceClass(*c),
        }),
    }
}

fn state_to_pb(s: RolloutState) -> pb::RolloutState {
    match s {
        RolloutState::Running => pb::RolloutState::Running,
        RolloutState::Paused => pb::RolloutState::Paused,
        RolloutState::Succeeded => pb::RolloutState::Succeeded,
        RolloutState::RolledBack => pb::RolloutState::RolledBack,
        RolloutState::Aborted => pb::RolloutState::Aborted,
    }
}

fn decision_to_pb(d: &Decision) -> pb::RolloutDecision {
    pb::RolloutDecision {
        seq: d.seq,
        at_unix_ms: d.at_ms,
        step_index: d.step_index as u32,
        action: d.action.clone(),
        detail_json: d.detail.to_string(),
    }
}

/// A rollout with its decisions, as on the wire.
pub fn rollout_to_pb(r: &Rollout, decisions: &[Decision]) -> pb::Rollout {
    pb::Rollout {
        id: r.id.to_string(),
        fleet_id: r.fleet_id.to_string(),
        from_supernet_id: r.from_supernet_id.to_string(),
        to_supernet_id: r.to_supernet_id.to_string(),
        steps: r.steps.iter().map(step_to_pb).collect(),
        gates: Some(pb::RolloutGates {
            max_quality_drop_points: r.gates.max_quality_drop_points,
            max_budget_share_drop_points: r.gates.max_budget_share_drop_points,
            window_secs: (r.gates.window_ms / 1000) as u64,
            min_reports: r.gates.min_reports,
        }),
        step_index: r.step_index as u32,
        step_started_unix_ms: r.step_started_ms,
        state: state_to_pb(r.state) as i32,
        status: r.status.clone(),
        decisions: decisions.iter().map(decision_to_pb).collect(),
        created_unix_ms: r.created_ms,
        updated_unix_ms: r.updated_ms,
        window_ends_unix_ms: if r.state.is_active() {
            r.step_started_ms + r.gates.window_ms
        } else {
            0
        },
    }
}

async fn full(app: &App, r: &Rollout) -> Result<pb::Rollout> {
    let d = app.store().rollout_decisions(r.id).await?;
    Ok(rollout_to_pb(r, &d))
}

/// Authenticates, checks `access`, then loads the rollout and checks the token may act on
/// its fleet (the id is parsed only after authentication).
async fn authorized(
    app: &App,
    md: &MetadataMap,
    access: Access,
    rollout_id: &str,
) -> Result<Rollout> {
    let p = app.auth().authenticate(md).await?;
    authorize_management(&p, access)?;
    let id = parse_id("rollout_id", rollout_id)?;
    let r = app.store().get_rollout(id).await?;
    authorize_fleet(&p, Some(r.fleet_id))?;
    Ok(r)
}

pub async fn start(app: &App, md: &MetadataMap, r: pb::StartRolloutRequest) -> Result<pb::Rollout> {
    let (_, fleet) =
        management_one_fleet(app, md, Access::Write, || parse_id("fleet_id", &r.fleet_id)).await?;
    let to = parse_id("to_supernet_id", &r.to_supernet_id)?;
    let steps = r
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| step_from_pb(i, s))
        .collect::<Result<Vec<_>>>()?;
    let g = r.gates.unwrap_or_default();
    let gates = Gates::from_request(
        g.max_quality_drop_points,
        g.max_budget_share_drop_points,
        g.window_secs,
        g.min_reports,
    )?;
    let rollout = engine::start(
        app,
        StartRollout {
            fleet_id: fleet,
            to_supernet_id: to,
            steps,
            gates,
        },
    )
    .await?;
    full(app, &rollout).await
}

pub async fn get(app: &App, md: &MetadataMap, id: &str) -> Result<pb::Rollout> {
    let r = authorized(app, md, Access::Read, id).await?;
    full(app, &r).await
}

pub async fn list(
    app: &App,
    md: &MetadataMap,
    r: &pb::ListRolloutsRequest,
) -> Result<pb::ListRolloutsResponse> {
    let (_, fleet) = management_fleet(app, md, Access::Read, || {
        if r.fleet_id.is_empty() {
            Ok(None)
        } else {
            parse_id("fleet_id", &r.fleet_id).map(Some)
        }
    })
    .await?;
    let rollouts = app.store().list_rollouts(fleet).await?;
    Ok(pb::ListRolloutsResponse {
        rollouts: rollouts.iter().map(|(r, d)| rollout_to_pb(r, d)).collect(),
    })
}

/// Pause, resume (`Some(pause)`) or abort (`None`).
pub async fn act(
    app: &App,
    md: &MetadataMap,
    id: &str,
    pause: Option<bool>,
) -> Result<pb::Rollout> {
    let r = authorized(app, md, Access::Write, id).await?;
    let r = match pause {
        Some(p) => engine::pause(app, r.id, p).await?,
        None => engine::abort(app, r.id).await?,
    };
    full(app, &r).await
}

pub async fn watch(app: &App, md: &MetadataMap, id: &str) -> Result<ServerStream<pb::Rollout>> {
    let first = authorized(app, md, Access::Read, id).await?;
    let app = app.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut last: Option<(Rollout, usize)> = None;
        let id: Uuid = first.id;
        loop {
            let snapshot = async {
                let r = app.store().get_rollout(id).await?;
                let d = app.store().rollout_decisions(id).await?;
                Ok::<_, CloudError>((r, d))
            };
            match snapshot.await {
                Ok((r, d)) => {
                    let changed = last
                        .as_ref()
                        .is_none_or(|(lr, ln)| *lr != r || *ln != d.len());
                    if changed {
                        if tx.send(Ok(rollout_to_pb(&r, &d))).await.is_err() {
                            return;
                        }
                        if !r.state.is_active() {
                            return;
                        }
                        last = Some((r, d.len()));
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            }
            tokio::select! {
                _ = app.shutdown_token().cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("server shutting down; watch again"))).await;
                    return;
                }
                _ = tx.closed() => return,
                _ = tokio::time::sleep(WATCH_POLL) => {}
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
