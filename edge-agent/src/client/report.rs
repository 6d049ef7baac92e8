//! What the agent tells the cloud: the closed aggregate schema of reports and heartbeats
//! (nothing per-sample, no identifiers beyond the ids the cloud issued), and the
//! conversions of the agent's domain values into it.
use adaptivenet_core::supernet::Subnet;
use adaptivenet_proto::v1 as pb;

use crate::adapt::AdaptationReason;
use crate::profile::LatencyTable;
use crate::search::Candidate;
use crate::state::SearchRecord;

/// The coarse device class of this machine (CPU only: cores <= 4 is small).
pub fn local_device_class() -> pb::DeviceClass {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cores <= 4 {
        pb::DeviceClass::CpuSmall
    } else {
        pb::DeviceClass::CpuLarge
    }
}

/// The aggregates the agent reports: nothing per-sample, no identifiers beyond the ids the
/// cloud issued.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentAggregates {
    /// The cloud's supernet id (not the manifest's internal id).
    pub supernet_id: String,
    pub active_subnet: Subnet,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub latency_budget_ms: f64,
    /// Local quality in [0, 1].
    pub quality_estimate: f64,
    pub quality_sample_count: u64,
    pub generations: u32,
    pub evaluated_subnets: u32,
    pub search_seconds: f64,
    pub front_size: u32,
    pub table_entries: u32,
    pub stem_ms: f64,
    pub head_ms: f64,
    pub oracle_ms: f64,
    /// Measured/predicted end-to-end latency of the active subnet.
    pub calibration_factor: f64,
    pub device_class: pb::DeviceClass,
}

impl AgentAggregates {
    /// Builds the aggregates from the agent's state. `live` is `(samples, p50, p95)` of the
    /// serving window; without live samples (e.g. right after search) the table's
    /// prediction stands in for both percentiles.
    #[allow(clippy::too_many_arguments)]
    pub fn from_state(
        supernet_id: &str,
        table: &LatencyTable,
        rec: &SearchRecord,
        active: &Candidate,
        budget_ms: f64,
        live: Option<(usize, f64, f64)>,
        quality_samples: u64,
        device_class: pb::DeviceClass,
    ) -> Self {
        let n = active.subnet.len();
        let predicted = table
            .predict_ms(&active.subnet)
            .unwrap_or(active.latency_ms);
        let (p50, p95) = match live {
            Some((k, p50, p95)) if k > 0 && p50.is_finite() && p95.is_finite() => (p50, p95),
            _ => (predicted, predicted),
        };
        let calibration = match live {
            Some((k, p50, _)) if k > 0 && predicted > 0.0 => p50 / predicted,
            _ => table.calibration.scale,
        };
        let sat = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        AgentAggregates {
            supernet_id: supernet_id.to_string(),
            active_subnet: active.subnet.clone(),
            latency_p50_ms: p50,
            latency_p95_ms: p95.max(p50),
            latency_budget_ms: budget_ms,
            quality_estimate: (active.quality / 100.0).clamp(0.0, 1.0),
            quality_sample_count: quality_samples,
            generations: sat(rec.config.generations),
            evaluated_subnets: sat(rec.result.stats.evaluations),
            search_seconds: rec.result.stats.seconds.max(0.0),
            front_size: sat(rec.result.front.len()),
            table_entries: sat(table.modules.len() + 2),
            stem_ms: table.stem.median_ms,
            head_ms: table.head.median_ms,
            oracle_ms: table.predict_ms(&Subnet::original(n)).unwrap_or(0.0),
            calibration_factor: calibration,
            device_class,
        }
    }

    /// The wire report (closed schema).
    pub fn to_report(&self) -> pb::ReportRequest {
        pb::ReportRequest {
            supernet_id: self.supernet_id.clone(),
            active_subnet: self.active_subnet.to_string(),
            latency_p50_ms: self.latency_p50_ms,
            latency_p95_ms: self.latency_p95_ms,
            latency_budget_ms: self.latency_budget_ms,
            quality_estimate: self.quality_estimate,
            quality_sample_count: self.quality_sample_count,
            search: Some(pb::SearchStats {
                generations: self.generations,
                evaluated_subnets: self.evaluated_subnets,
                search_seconds: self.search_seconds,
                front_size: self.front_size,
            }),
            latency_table: Some(pb::LatencyTableSummary {
                num_entries: self.table_entries,
                stem_ms: self.stem_ms,
                head_ms: self.head_ms,
                oracle_ms: self.oracle_ms,
                calibration_factor: self.calibration_factor,
            }),
            device_class: self.device_class as i32,
        }
    }
}

/// What a heartbeat says about the agent.
#[derive(Clone, Debug, PartialEq)]
pub struct HeartbeatInput {
    pub supernet_id: String,
    pub active_subnet: Subnet,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub reason: pb::AdaptationReason,
    pub applied_generation: u64,
    /// Why it serves `supernet_id`, and a supernet it could not serve.
    pub serving: super::Serving,
    /// When this agent process started (a new value tells the cloud it restarted).
    pub started_unix_ms: i64,
    /// The search's cross-generation bound and why (decided when the device was profiled).
    pub search_reuse: Option<crate::profile::ReusePlan>,
}

impl HeartbeatInput {
    /// The wire form (the latency p95 never below the p50).
    pub fn to_request(&self) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            active_supernet_id: self.supernet_id.clone(),
            active_subnet: self.active_subnet.to_string(),
            latency_p50_ms: self.latency_p50_ms,
            latency_p95_ms: self.latency_p95_ms.max(self.latency_p50_ms),
            last_adaptation_reason: self.reason as i32,
            applied_generation: self.applied_generation,
            serving_reason: pb::ServingReason::from(self.serving.reason) as i32,
            failed_supernet_id: self
                .serving
                .failed
                .as_ref()
                .map(|(s, _)| s.clone())
                .unwrap_or_default(),
            install_failure: self
                .serving
                .failed
                .as_ref()
                .map_or(0, |(_, f)| pb::InstallFailure::from(*f) as i32),
            agent_started_unix_ms: self.started_unix_ms,
            search_reuse: self.search_reuse.as_ref().map(|r| pb::SearchReuse {
                cache_mb: (r.bytes >> 20) as u64,
                reason: r.reason.clone(),
            }),
        }
    }
}

impl From<AdaptationReason> for pb::AdaptationReason {
    fn from(r: AdaptationReason) -> Self {
        match r {
            AdaptationReason::Initial => pb::AdaptationReason::Initial,
            AdaptationReason::OverBudget => pb::AdaptationReason::OverBudget,
            AdaptationReason::Slack => pb::AdaptationReason::Slack,
            AdaptationReason::Research => pb::AdaptationReason::Research,
            AdaptationReason::NewSupernet => pb::AdaptationReason::NewSupernet,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::ReusePlan;

    #[test]
    fn heartbeats_carry_the_search_reuse_decision() {
        let mut h = HeartbeatInput {
            supernet_id: "s".into(),
            active_subnet: Subnet::original(3),
            latency_p50_ms: 2.0,
            latency_p95_ms: 1.0,
            reason: pb::AdaptationReason::Initial,
            applied_generation: 4,
            serving: Default::default(),
            started_unix_ms: 7,
            search_reuse: None,
        };
        let r = h.to_request();
        assert_eq!((r.latency_p95_ms, r.applied_generation), (2.0, 4));
        assert_eq!(
            r.search_reuse, None,
            "an agent that does not say sends nothing"
        );
        let decided = ReusePlan::decide(Some(8 << 30), 12.0, 0.05);
        h.search_reuse = Some(decided.clone());
        let sent = h.to_request().search_reuse.unwrap();
        assert_eq!(sent.cache_mb, 2048);
        assert_eq!(sent.reason, decided.reason);
        h.search_reuse = Some(ReusePlan::decide(Some(8 << 30), 12.0, 2.0));
        assert_eq!(h.to_request().search_reuse.unwrap().cache_mb, 0);
    }
}
