//! Domain -> wire conversions (one function per type). Wire -> domain conversions of
//! requests live next to their handlers, where the field names for errors are known.
use adaptivenet_proto::v1 as pb;
use uuid::Uuid;

use crate::domain::{
    AggregateGroup, BlobRef, BudgetPolicy, Dataset, DesiredState, Device, DeviceStatus,
    Distribution, Fleet, FleetAggregates, FleetEvent, FleetEventKind, Job, JobState, Label, Oracle,
    Supernet,
};

fn opt_id(id: Option<Uuid>) -> String {
    id.map(|i| i.to_string()).unwrap_or_default()
}

pub fn oracle(o: &Oracle) -> pb::Oracle {
    pb::Oracle {
        id: o.id.to_string(),
        name: o.name.clone(),
        family: o.family.clone(),
        weights_sha256: o.weights_sha256.clone(),
        size_bytes: o.size_bytes,
        num_params: o.num_params,
        num_tensors: o.num_tensors,
        created_unix_ms: o.created_ms,
        arch_json: o.arch_json.clone().into_bytes(),
    }
}

pub fn dataset(d: &Dataset) -> pb::Dataset {
    pb::Dataset {
        id: d.id.to_string(),
        name: d.name.clone(),
        uri: d.uri.clone(),
        format: d.format.clone(),
        num_samples: d.num_samples,
        created_unix_ms: d.created_ms,
        input_spec_json: json_or_empty(d.input_spec.as_ref()),
        augment_json: json_or_empty(Some(&d.augment)),
        summary_json: json_or_empty(d.summary.as_ref()),
        digest: d.digest.clone().unwrap_or_default(),
    }
}

/// JSON of a recorded value ("" when absent).
fn json_or_empty<T: serde::Serialize>(v: Option<&T>) -> String {
    v.and_then(|v| serde_json::to_string(v).ok())
        .unwrap_or_default()
}

/// The developer's dataset options (wire -> domain).
pub fn dataset_options(o: Option<&pb::DatasetOptions>) -> crate::datasets::DatasetOptions {
    let o = o.cloned().unwrap_or_default();
    crate::datasets::DatasetOptions {
        augment: adaptivenet_core::data::AugmentPolicy {
            crop_padding: o.crop_padding as usize,
            hflip: o.hflip,
        },
        mean: o.mean,
        std: o.std,
        size: (o.height != 0 || o.width != 0).then_some((o.height as usize, o.width as usize)),
    }
}

pub fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn job_state_from_pb(s: pb::JobState) -> Option<JobState> {
    Some(match s {
        pb::JobState::Unspecified => return None,
        pb::JobState::Queued => JobState::Queued,
        pb::JobState::Running => JobState::Running,
        pb::JobState::Succeeded => JobState::Succeeded,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Cancelled => JobState::Cancelled,
    })
}

pub fn job(j: &Job) -> pb::Job {
    pb::Job {
        id: j.id.to_string(),
        oracle_id: opt_id(j.oracle_id),
        dataset_id: opt_id(j.dataset_id),
        state: job_state(j.state) as i32,
        stage: j.stage.clone(),
        progress: j.progress,
        attempts: j.attempts,
        cancel_requested: j.cancel_requested,
        error: j.error.clone().unwrap_or_default(),
        supernet_id: opt_id(j.supernet_id),
        created_unix_ms: j.created_ms,
        updated_unix_ms: j.updated_ms,
        params_json: j.params_json.clone(),
        kind: j.kind.as_str().to_string(),
        result_oracle_id: opt_id(j.result_oracle_id),
        report_json: j.report_json.clone().unwrap_or_default(),
    }
}

pub fn supernet(s: &Supernet) -> pb::Supernet {
    pb::Supernet {
        id: s.id.to_string(),
        name: s.name.clone(),
        version: s.version,
        oracle_id: s.oracle_id.to_string(),
        job_id: opt_id(s.job_id),
        manifest_sha256: s.manifest_sha256.clone(),
        num_modules: s.num_modules,
        total_bytes: s.total_bytes,
        created_unix_ms: s.created_ms,
    }
}

pub fn blob_ref(b: &BlobRef) -> pb::BlobRef {
    pb::BlobRef {
        sha256: b.sha256.clone(),
        size_bytes: b.size_bytes,
    }
}

pub fn label(l: &Label) -> pb::Label {
    pb::Label {
        fleet_id: l.fleet_id.to_string(),
        label: l.label.clone(),
        supernet_id: l.supernet_id.to_string(),
        updated_unix_ms: l.updated_ms,
    }
}

pub fn budget(b: &BudgetPolicy) -> pb::LatencyBudgetPolicy {
    pb::LatencyBudgetPolicy {
        latency_budget_ms: b.latency_budget_ms,
        budget_fraction: b.budget_fraction,
        hysteresis: b.hysteresis,
    }
}

pub fn budget_from_pb(b: Option<&pb::LatencyBudgetPolicy>) -> BudgetPolicy {
    b.map(|b| BudgetPolicy {
        latency_budget_ms: b.latency_budget_ms,
        budget_fraction: b.budget_fraction,
        hysteresis: b.hysteresis,
    })
    .unwrap_or_default()
}

pub fn desired(d: &DesiredState) -> pb::DesiredState {
    pb::DesiredState {
        fleet_id: d.fleet_id.to_string(),
        label: d.label.clone().unwrap_or_default(),
        supernet_id: opt_id(d.supernet_id),
        supernet_version: d.supernet_version,
        manifest_sha256: d.manifest_sha256.clone(),
        budget: Some(budget(&d.budget)),
        generation: d.generation,
        reason: d.reason.0,
        rollout_id: opt_id(d.rollout_id),
    }
}

pub fn fleet(f: &Fleet) -> pb::Fleet {
    pb::Fleet {
        id: f.id.to_string(),
        name: f.name.clone(),
        desired: Some(desired(&f.desired)),
        created_unix_ms: f.created_ms,
    }
}

pub fn device_status(s: DeviceStatus) -> pb::DeviceStatus {
    match s {
        DeviceStatus::Online => pb::DeviceStatus::Online,
        DeviceStatus::Stale => pb::DeviceStatus::Stale,
        DeviceStatus::Revoked => pb::DeviceStatus::Revoked,
    }
}

pub fn device(d: &Device) -> pb::Device {
    pb::Device {
        id: d.id.to_string(),
        fleet_id: d.fleet_id.to_string(),
        device_class: d.device_class.0,
        status: device_status(d.status) as i32,
        agent_version: d.agent_version.clone(),
        active_subnet: d.active_subnet.clone(),
        active_supernet_id: opt_id(d.active_supernet_id),
        latency_p50_ms: d.latency_p50_ms,
        latency_p95_ms: d.latency_p95_ms,
        last_adaptation_reason: d.last_reason.0,
        enrolled_unix_ms: d.enrolled_ms,
        last_heartbeat_unix_ms: d.last_heartbeat_ms,
        serving_reason: d.serving_reason.0,
        failed_supernet_id: opt_id(d.failed_supernet_id),
        install_failure: d.install_failure.0,
        recent_restarts: d.recent_restarts,
    }
}

pub fn distribution(d: &Distribution) -> pb::Distribution {
    pb::Distribution {
        count: d.count,
        min: d.min,
        p50: d.p50,
        p90: d.p90,
        max: d.max,
        mean: d.mean,
        extremes_suppressed: d.extremes_suppressed,
    }
}

pub fn aggregate_group(g: &AggregateGroup) -> pb::AggregateGroup {
    pb::AggregateGroup {
        supernet_id: g.supernet_id.to_string(),
        device_class: g.device_class.0,
        devices: g.devices,
        latency_p50_ms: Some(distribution(&g.latency_p50_ms)),
        latency_p95_ms: Some(distribution(&g.latency_p95_ms)),
        quality: Some(distribution(&g.quality)),
        within_budget_fraction: g.within_budget_fraction,
        within_budget_p50_fraction: g.within_budget_p50_fraction,
        points: g
            .points
            .iter()
            .map(|p| pb::SubnetPoint {
                subnet: p.subnet.clone(),
                devices: p.devices,
                latency_p50_ms: p.latency_p50_ms,
                quality: p.quality,
            })
            .collect(),
        subnets: g
            .subnets
            .iter()
            .map(|(s, n)| pb::SubnetCount {
                subnet: s.clone(),
                devices: *n,
            })
            .collect(),
    }
}

pub fn aggregates(a: &FleetAggregates) -> pb::FleetAggregates {
    pb::FleetAggregates {
        devices_total: a.devices_total,
        devices_online: a.devices_online,
        devices_stale: a.devices_stale,
        groups: a.groups.iter().map(aggregate_group).collect(),
        suppressed_groups: a.suppressed_groups,
        suppressed_devices: a.suppressed_devices,
    }
}

pub fn fleet_event(e: &FleetEvent) -> pb::FleetEvent {
    use pb::fleet_event::Kind;
    let kind = match e.kind {
        FleetEventKind::DeviceEnrolled => Kind::DeviceEnrolled,
        FleetEventKind::DeviceHeartbeat => Kind::DeviceHeartbeat,
        FleetEventKind::DeviceStale => Kind::DeviceStale,
        FleetEventKind::DeviceRevoked => Kind::DeviceRevoked,
        FleetEventKind::Report => Kind::Report,
        FleetEventKind::LabelPublished => Kind::LabelPublished,
        FleetEventKind::DesiredStateChanged => Kind::DesiredStateChanged,
    };
    pb::FleetEvent {
        kind: kind as i32,
        fleet_id: e.fleet_id.to_string(),
        device_id: opt_id(e.device_id),
        supernet_id: opt_id(e.supernet_id),
        unix_ms: e.unix_ms,
    }
}
