//! What the cloud wants this device to serve, and what the device says about what it serves:
//! the domain side of `DesiredState`, `LatencyBudgetPolicy`, `ServingReason` and
//! `InstallFailure`, with their wire conversions. The runtime (`agent/`) sees only these.
use adaptivenet_proto::v1 as pb;

use crate::EdgeError;

/// The fleet's latency budget policy.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BudgetPolicy {
    /// Budget of one inference in ms (0 = unset: use `budget_fraction`).
    pub latency_budget_ms: f64,
    /// Budget relative to the oracle's latency on this device, in (0, 1].
    pub budget_fraction: f64,
    pub hysteresis: f64,
}

/// Why this device serves its supernet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServingReason {
    /// The cloud did not say (an older cloud), or nothing serves yet.
    #[default]
    Unspecified,
    /// The fleet's label resolves to it.
    Label,
    /// The fleet is pinned to it.
    Pinned,
    /// In an active rollout's cohort (the new version).
    RolloutCohort,
    /// Outside an active rollout's cohort (the version the fleet served before).
    RolloutControl,
    /// The fleet's last rollout was rolled back or aborted.
    RolledBack,
    /// This device could not serve what it was sent and serves its previous supernet.
    InstallFailed,
}

/// Why a device could not serve a supernet it was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallFailure {
    /// A blob or the manifest failed verification (size, sha256, tensor shapes).
    Verification,
    /// No subnet meets the latency budget on this device.
    Budget,
    /// Profiling or search failed otherwise.
    Other,
}

impl InstallFailure {
    /// The failure an error of installing a new supernet stands for; `None` for errors
    /// that say nothing about the supernet (the cloud unreachable, an interrupted download),
    /// which the next heartbeat retries.
    pub fn of(e: &EdgeError) -> Option<InstallFailure> {
        match e {
            EdgeError::BlobMismatch { .. } | EdgeError::Core(_) => {
                Some(InstallFailure::Verification)
            }
            EdgeError::BudgetTooLow { .. } => Some(InstallFailure::Budget),
            EdgeError::Cloud { .. }
            | EdgeError::CloudUnreachable { .. }
            | EdgeError::Interrupted { .. }
            | EdgeError::Io { .. } => None,
            _ => Some(InstallFailure::Other),
        }
    }
}

/// What a device says about what it serves (in every heartbeat).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Serving {
    pub reason: ServingReason,
    /// A supernet it was sent and could not serve, and why.
    pub failed: Option<(String, InstallFailure)>,
}

/// What the cloud wants this device to run.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DesiredState {
    /// The cloud's supernet id (empty: the fleet has none yet).
    pub supernet_id: String,
    pub supernet_version: u64,
    pub manifest_sha256: String,
    pub budget: Option<BudgetPolicy>,
    /// Increases on every change of the fleet's desired state.
    pub generation: u64,
    pub reason: ServingReason,
    /// The active rollout that decided `supernet_id`.
    pub rollout_id: Option<String>,
}

impl From<pb::LatencyBudgetPolicy> for BudgetPolicy {
    fn from(p: pb::LatencyBudgetPolicy) -> Self {
        BudgetPolicy {
            latency_budget_ms: p.latency_budget_ms,
            budget_fraction: p.budget_fraction,
            hysteresis: p.hysteresis,
        }
    }
}

impl From<pb::ServingReason> for ServingReason {
    fn from(r: pb::ServingReason) -> Self {
        match r {
            pb::ServingReason::Unspecified => ServingReason::Unspecified,
            pb::ServingReason::Label => ServingReason::Label,
            pb::ServingReason::Pinned => ServingReason::Pinned,
            pb::ServingReason::RolloutCohort => ServingReason::RolloutCohort,
            pb::ServingReason::RolloutControl => ServingReason::RolloutControl,
            pb::ServingReason::RolledBack => ServingReason::RolledBack,
            pb::ServingReason::InstallFailed => ServingReason::InstallFailed,
        }
    }
}

impl From<ServingReason> for pb::ServingReason {
    fn from(r: ServingReason) -> Self {
        match r {
            ServingReason::Unspecified => pb::ServingReason::Unspecified,
            ServingReason::Label => pb::ServingReason::Label,
            ServingReason::Pinned => pb::ServingReason::Pinned,
            ServingReason::RolloutCohort => pb::ServingReason::RolloutCohort,
            ServingReason::RolloutControl => pb::ServingReason::RolloutControl,
            ServingReason::RolledBack => pb::ServingReason::RolledBack,
            ServingReason::InstallFailed => pb::ServingReason::InstallFailed,
        }
    }
}

impl From<InstallFailure> for pb::InstallFailure {
    fn from(f: InstallFailure) -> Self {
        match f {
            InstallFailure::Verification => pb::InstallFailure::Verification,
            InstallFailure::Budget => pb::InstallFailure::Budget,
            InstallFailure::Other => pb::InstallFailure::Other,
        }
    }
}

impl From<pb::DesiredState> for DesiredState {
    fn from(d: pb::DesiredState) -> Self {
        DesiredState {
            reason: pb::ServingReason::try_from(d.reason)
                .unwrap_or_default()
                .into(),
            rollout_id: Some(d.rollout_id).filter(|s| !s.is_empty()),
            supernet_id: d.supernet_id,
            supernet_version: d.supernet_version,
            manifest_sha256: d.manifest_sha256,
            budget: d.budget.map(BudgetPolicy::from),
            generation: d.generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_reasons_read_as_unspecified_and_ids_as_absent_when_empty() {
        let d = DesiredState::from(pb::DesiredState {
            supernet_id: "s".into(),
            reason: 99,
            ..Default::default()
        });
        assert_eq!(d.reason, ServingReason::Unspecified);
        assert_eq!(d.rollout_id, None);
        assert_eq!(d.budget, None);
        let d = DesiredState::from(pb::DesiredState {
            reason: pb::ServingReason::RolloutCohort as i32,
            rollout_id: "r".into(),
            ..Default::default()
        });
        assert_eq!(d.reason, ServingReason::RolloutCohort);
        assert_eq!(d.rollout_id.as_deref(), Some("r"));
    }

    #[test]
    fn only_failures_about_the_supernet_count_as_failed_installs() {
        let budget = EdgeError::BudgetTooLow {
            budget_ms: 1.0,
            cheapest_ms: 2.0,
        };
        assert_eq!(InstallFailure::of(&budget), Some(InstallFailure::Budget));
        let bad = EdgeError::BlobMismatch {
            sha256: "x".into(),
            reason: "digest".into(),
        };
        assert_eq!(InstallFailure::of(&bad), Some(InstallFailure::Verification));
        let down = EdgeError::CloudUnreachable {
            endpoint: "e".into(),
            reason: "r".into(),
        };
        assert_eq!(InstallFailure::of(&down), None);
    }
}
