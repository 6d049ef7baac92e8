//! Domain types: what the store persists and the services reason about. Prost types never
//! appear here; `api::convert` maps between the two.
pub mod rollout;

use uuid::Uuid;

use crate::error::{CloudError, Result};

mod serving;
pub use serving::{InstallFailure, ServingReason};

/// Milliseconds since the Unix epoch (the one time representation in the store).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Parses a UUID request field, naming the field on failure.
pub fn parse_id(field: &str, s: &str) -> Result<Uuid> {
    if s.is_empty() {
        return Err(CloudError::invalid(field, "required"));
    }
    Uuid::parse_str(s).map_err(|_| CloudError::invalid(field, "not a UUID"))
}

/// Checks a lowercase-hex sha256 string.
pub fn check_sha256(field: &str, s: &str) -> Result<()> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(CloudError::invalid(
            field,
            "expected 64 lowercase hex characters",
        ));
    }
    Ok(())
}

/// Checks a short human-readable name (fleet, label, supernet, dataset).
pub fn check_name(field: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > 128 {
        return Err(CloudError::invalid(field, "must be 1-128 characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '))
    {
        return Err(CloudError::invalid(
            field,
            "only ASCII letters, digits, '-', '_', '.', ' ' are allowed",
        ));
    }
    Ok(())
}

/// A subnet code in the core's alphabet (`0`, `1`, `2`, `x` covered by a merge, `P`/`p`
/// pruned) with consistent merge spans, at most 512 positions: the only string a report
/// carries, so nothing free-form can ride along.
pub fn check_subnet_code(field: &str, s: &str) -> Result<()> {
    if s.len() > 512 {
        return Err(CloudError::invalid(field, "longer than 512 characters"));
    }
    adaptivenet_core::supernet::Subnet::parse(s)
        .map(|_| ())
        .map_err(|e| CloudError::invalid(field, e.to_string()))
}

/// An uploaded, validated oracle.
#[derive(Debug, Clone, PartialEq)]
pub struct Oracle {
    pub id: Uuid,
    pub name: String,
    pub family: String,
    pub weights_sha256: String,
    pub size_bytes: u64,
    pub num_params: u64,
    pub num_tensors: u32,
    pub arch_json: String,
    pub created_ms: i64,
}

/// A data set the cloud may train on (metadata only).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub id: Uuid,
    pub name: String,
    pub uri: String,
    pub format: String,
    pub num_samples: u64,
    pub created_ms: i64,
    /// The model input every consumer applies; `None` only for rows registered before specs
    /// existed (consumers must then refuse, never guess a dataset's numbers).
    pub input_spec: Option<adaptivenet_core::data::InputSpec>,
    /// Training-only augmentation; off unless the developer asked for it.
    pub augment: adaptivenet_core::data::AugmentPolicy,
    /// Classes, counts and image sizes recorded at registration, when the server read the data.
    pub summary: Option<adaptivenet_core::data::DatasetSummary>,
    /// Content digest (sha256 hex) of uploaded datasets; the cache key of workers.
    pub digest: Option<String>,
}

/// Life cycle of a job: queued -> running -> (succeeded | failed | cancelled); a running job
/// whose lease expires goes back to being claimable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            other => return Err(CloudError::Internal(format!("bad job state {other:?}"))),
        })
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What a job does; the worker dispatches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// An oracle becomes a supernet (`StartElastification`).
    Elastify,
    /// An oracle is trained on a dataset, from scratch or fine-tuned, and stored as a new
    /// oracle (`StartOracleTraining`).
    TrainOracle,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Elastify => "elastify",
            JobKind::TrainOracle => "train_oracle",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "elastify" => JobKind::Elastify,
            "train_oracle" => JobKind::TrainOracle,
            other => return Err(CloudError::Internal(format!("bad job kind {other:?}"))),
        })
    }
}

/// A job row (elastification or oracle training).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Uuid,
    pub kind: JobKind,
    /// Elastify: the input oracle. Train-oracle: the oracle fine-tuned (None from scratch).
    pub oracle_id: Option<Uuid>,
    pub dataset_id: Option<Uuid>,
    /// Name of the result: the supernet sequence (elastify) or the new oracle (train-oracle).
    pub supernet_name: String,
    pub params_json: String,
    /// Train-oracle from scratch: the architecture descriptor.
    pub arch_json: Option<String>,
    pub state: JobState,
    pub stage: String,
    pub progress: f64,
    pub attempts: u32,
    pub max_attempts: u32,
    pub cancel_requested: bool,
    pub lease_owner: Option<String>,
    pub lease_expires_ms: Option<i64>,
    pub checkpoint_sha256: Option<String>,
    pub error: Option<String>,
    pub supernet_id: Option<Uuid>,
    /// Train-oracle, on success: the oracle produced.
    pub result_oracle_id: Option<Uuid>,
    /// Train-oracle, on success: the readable report (JSON).
    pub report_json: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl Job {
    /// A new job as the API queues it: no attempt yet, no lease, no result.
    pub fn queued(
        kind: JobKind,
        oracle_id: Option<Uuid>,
        dataset_id: Option<Uuid>,
        supernet_name: String,
        params_json: String,
        arch_json: Option<String>,
        max_attempts: u32,
    ) -> Self {
        let now = now_ms();
        Job {
            id: Uuid::new_v4(),
            kind,
            oracle_id,
            dataset_id,
            supernet_name,
            params_json,
            arch_json,
            state: JobState::Queued,
            stage: "queued".into(),
            progress: 0.0,
            attempts: 0,
            max_attempts,
            cancel_requested: false,
            lease_owner: None,
            lease_expires_ms: None,
            checkpoint_sha256: None,
            error: None,
            supernet_id: None,
            result_oracle_id: None,
            report_json: None,
            created_ms: now,
            updated_ms: now,
        }
    }
}

/// One immutable supernet version.
#[derive(Debug, Clone, PartialEq)]
pub struct Supernet {
    pub id: Uuid,
    pub name: String,
    pub version: u64,
    pub oracle_id: Uuid,
    pub job_id: Option<Uuid>,
    pub manifest_sha256: String,
    pub num_modules: u32,
    pub total_bytes: u64,
    pub created_ms: i64,
}

/// A content-addressed blob a supernet references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub sha256: String,
    pub size_bytes: u64,
}

/// A label of a fleet pointing at a supernet version.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    pub fleet_id: Uuid,
    pub label: String,
    pub supernet_id: Uuid,
    pub updated_ms: i64,
}

/// Latency budget policy of a fleet.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BudgetPolicy {
    pub latency_budget_ms: f64,
    pub budget_fraction: f64,
    pub hysteresis: f64,
}

impl BudgetPolicy {
    pub fn validate(&self) -> Result<()> {
        let b = self;
        if !(b.latency_budget_ms.is_finite() && (0.0..=3_600_000.0).contains(&b.latency_budget_ms))
        {
            return Err(CloudError::invalid(
                "budget.latency_budget_ms",
                "must be in [0, 3600000]",
            ));
        }
        if !(b.budget_fraction.is_finite() && (0.0..=1.0).contains(&b.budget_fraction)) {
            return Err(CloudError::invalid(
                "budget.budget_fraction",
                "must be in [0, 1]",
            ));
        }
        if !(b.hysteresis.is_finite() && (0.0..0.5).contains(&b.hysteresis)) {
            return Err(CloudError::invalid(
                "budget.hysteresis",
                "must be in [0, 0.5)",
            ));
        }
        Ok(())
    }
}

/// Desired state of a fleet, resolved (label -> supernet) when read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DesiredState {
    pub fleet_id: Uuid,
    pub label: Option<String>,
    pub supernet_id: Option<Uuid>,
    pub supernet_version: u64,
    pub manifest_sha256: String,
    pub budget: BudgetPolicy,
    pub generation: u64,
    /// Why a device gets `supernet_id` (set for one device's desired state only).
    pub reason: ServingReason,
    /// The active rollout that decided it.
    pub rollout_id: Option<Uuid>,
}

/// A fleet of devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    pub id: Uuid,
    pub name: String,
    pub desired: DesiredState,
    pub created_ms: i64,
}

/// Roles of principals. Devices are a separate kind of principal (see `auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Developer,
    Device,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Developer => "developer",
            Role::Device => "device",
            Role::Viewer => "viewer",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "admin" => Role::Admin,
            "developer" => Role::Developer,
            "device" => Role::Device,
            "viewer" => Role::Viewer,
            other => {
                return Err(CloudError::invalid(
                    "role",
                    format!("unknown role {other:?}"),
                ))
            }
        })
    }
}

/// Coarse device class, numbered as on the wire (0 = unspecified, 1..=5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceClass(pub i32);

impl DeviceClass {
    pub const MAX: i32 = 5;
    /// Unset on the wire (proto3 default): an agent that did not or could not classify.
    pub const UNSPECIFIED: DeviceClass = DeviceClass(0);
    /// A class from the wire, 0 (unspecified) included.
    pub fn new(field: &str, v: i32) -> Result<Self> {
        if (0..=Self::MAX).contains(&v) {
            Ok(DeviceClass(v))
        } else {
            Err(CloudError::invalid(
                field,
                format!("unknown device class {v}"),
            ))
        }
    }
}

/// Why the agent last adapted, numbered as on the wire (0..=6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptationReason(pub i32);

impl AdaptationReason {
    pub const MAX: i32 = 6;
    pub fn new(field: &str, v: i32) -> Result<Self> {
        if (0..=Self::MAX).contains(&v) {
            Ok(AdaptationReason(v))
        } else {
            Err(CloudError::invalid(
                field,
                format!("unknown adaptation reason {v}"),
            ))
        }
    }
}

/// Liveness as judged by the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    Online,
    Stale,
    Revoked,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Online => "online",
            DeviceStatus::Stale => "stale",
            DeviceStatus::Revoked => "revoked",
        }
    }
    pub fn parse(s: &str) -> Self {
        match s {
            "stale" => DeviceStatus::Stale,
            "revoked" => DeviceStatus::Revoked,
            _ => DeviceStatus::Online,
        }
    }
}

/// An enrolled device with its last reported state.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: Uuid,
    pub fleet_id: Uuid,
    pub device_class: DeviceClass,
    pub status: DeviceStatus,
    pub agent_version: String,
    pub active_supernet_id: Option<Uuid>,
    pub active_subnet: String,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub last_reason: AdaptationReason,
    pub applied_generation: u64,
    pub enrolled_ms: i64,
    pub last_heartbeat_ms: i64,
    pub serving_reason: ServingReason,
    /// A supernet the device could not serve (it went back to its previous one), and why.
    pub failed_supernet_id: Option<Uuid>,
    pub install_failure: InstallFailure,
    /// Agent restarts seen in heartbeats, counted while less than 10 min apart.
    pub recent_restarts: u32,
}

/// Reported state carried by a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub agent_version: String,
    pub active_supernet_id: Option<Uuid>,
    pub active_subnet: String,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub last_reason: AdaptationReason,
    pub applied_generation: u64,
    pub serving_reason: ServingReason,
    pub failed_supernet_id: Option<Uuid>,
    pub install_failure: InstallFailure,
    /// When the agent process started (0: not said).
    pub agent_started_ms: i64,
}

impl Heartbeat {
    pub fn validate(&self) -> Result<()> {
        if self.agent_started_ms < 0 {
            return Err(CloudError::invalid(
                "agent_started_unix_ms",
                "must not be negative",
            ));
        }
        check_version_string("agent_version", &self.agent_version)?;
        check_subnet_code("active_subnet", &self.active_subnet)?;
        check_latency("latency_p50_ms", self.latency_p50_ms)?;
        check_latency("latency_p95_ms", self.latency_p95_ms)?;
        Ok(())
    }
}

/// An agent version like `0.1.0` or `0.1.0-rc.1+abc`: short, no spaces.
pub fn check_version_string(field: &str, s: &str) -> Result<()> {
    if s.len() > 64
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'))
    {
        return Err(CloudError::invalid(field, "at most 64 of [A-Za-z0-9.+_-]"));
    }
    Ok(())
}

fn check_latency(field: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && (0.0..=600_000.0).contains(&v)) {
        return Err(CloudError::invalid(
            field,
            "must be a finite number in [0, 600000] ms",
        ));
    }
    Ok(())
}

fn check_range(field: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if !(v.is_finite() && v >= lo && v <= hi) {
        return Err(CloudError::invalid(
            field,
            format!("must be in [{lo}, {hi}]"),
        ));
    }
    Ok(())
}

/// Search statistics of a report.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SearchStats {
    pub generations: u32,
    pub evaluated_subnets: u32,
    pub search_seconds: f64,
    pub front_size: u32,
}

/// Latency-table summary of a report.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencyTableSummary {
    pub num_entries: u32,
    pub stem_ms: f64,
    pub head_ms: f64,
    pub oracle_ms: f64,
    pub calibration_factor: f64,
}

/// The closed aggregate schema a device may report (privacy: no free text, no per-sample
/// data; the only string is a subnet code checked against its alphabet).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub supernet_id: Uuid,
    pub active_subnet: String,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub latency_budget_ms: f64,
    pub quality_estimate: f64,
    pub quality_sample_count: u64,
    pub search: SearchStats,
    pub latency_table: LatencyTableSummary,
    /// As claimed by the agent; stored reports carry the class recorded at enrollment.
    pub device_class: DeviceClass,
}

impl Report {
    /// Range checks of every field; `min_samples` is the privacy minimum of samples behind a
    /// quality estimate.
    pub fn validate(&self, min_samples: u64) -> Result<()> {
        if self.active_subnet.is_empty() {
            return Err(CloudError::invalid("active_subnet", "required"));
        }
        check_subnet_code("active_subnet", &self.active_subnet)?;
        check_latency("latency_p50_ms", self.latency_p50_ms)?;
        check_latency("latency_p95_ms", self.latency_p95_ms)?;
        check_latency("latency_budget_ms", self.latency_budget_ms)?;
        if self.latency_p95_ms < self.latency_p50_ms {
            return Err(CloudError::invalid(
                "latency_p95_ms",
                "must not be below latency_p50_ms",
            ));
        }
        check_range("quality_estimate", self.quality_estimate, 0.0, 1.0)?;
        if self.quality_sample_count < min_samples {
            return Err(CloudError::invalid(
                "quality_sample_count",
                format!(
                    "{} is below the minimum of {min_samples} samples",
                    self.quality_sample_count
                ),
            ));
        }
        if self.quality_sample_count > 1_000_000_000 {
            return Err(CloudError::invalid(
                "quality_sample_count",
                "implausibly large",
            ));
        }
        let s = &self.search;
        if s.generations > 10_000 {
            return Err(CloudError::invalid(
                "search.generations",
                "must be at most 10000",
            ));
        }
        if s.evaluated_subnets > 10_000_000 {
            return Err(CloudError::invalid(
                "search.evaluated_subnets",
                "must be at most 10000000",
            ));
        }
        check_range("search.search_seconds", s.search_seconds, 0.0, 31_536_000.0)?;
        if s.front_size > s.evaluated_subnets.max(1) && s.evaluated_subnets > 0 {
            return Err(CloudError::invalid(
                "search.front_size",
                "larger than search.evaluated_subnets",
            ));
        }
        let t = &self.latency_table;
        if t.num_entries > 1_000_000 {
            return Err(CloudError::invalid(
                "latency_table.num_entries",
                "must be at most 1000000",
            ));
        }
        check_latency("latency_table.stem_ms", t.stem_ms)?;
        check_latency("latency_table.head_ms", t.head_ms)?;
        check_latency("latency_table.oracle_ms", t.oracle_ms)?;
        check_range(
            "latency_table.calibration_factor",
            t.calibration_factor,
            0.0,
            100.0,
        )?;
        Ok(())
    }
}

/// Summary statistics of one quantity over devices.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Distribution {
    pub count: u32,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
    pub mean: f64,
    /// min, p90 and max are withheld (0): over few devices they are single devices' values.
    pub extremes_suppressed: bool,
}

impl Distribution {
    /// Withholds the values that belong to single devices in a small group.
    fn suppress_extremes(&mut self) {
        self.min = 0.0;
        self.p90 = 0.0;
        self.max = 0.0;
        self.extremes_suppressed = true;
    }

    /// Nearest-rank quantiles of `values` (any order).
    pub fn of(values: &mut [f64]) -> Self {
        if values.is_empty() {
            return Distribution::default();
        }
        values.sort_by(|a, b| a.total_cmp(b));
        let n = values.len();
        let q = |p: f64| values[(((p * n as f64).ceil() as usize).max(1) - 1).min(n - 1)];
        Distribution {
            count: n as u32,
            min: values[0],
            p50: q(0.5),
            p90: q(0.9),
            max: values[n - 1],
            mean: values.iter().sum::<f64>() / n as f64,
            extremes_suppressed: false,
        }
    }
}

/// Aggregates of one (supernet, device class) group.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateGroup {
    pub supernet_id: Uuid,
    pub device_class: DeviceClass,
    pub devices: u32,
    pub latency_p50_ms: Distribution,
    pub latency_p95_ms: Distribution,
    pub quality: Distribution,
    pub within_budget_fraction: f64,
    /// Fraction of devices whose p50 is within budget: beside the p95 share, so a fleet
    /// whose typical latency is fine but whose tail is not reads as such.
    pub within_budget_p50_fraction: f64,
    /// (subnet code, devices), most common first.
    pub subnets: Vec<(String, u32)>,
    /// Per subnet of the group: the medians of its devices' latency and quality (the
    /// accuracy-latency chart's marks). Floored like groups: under k devices, dropped.
    pub points: Vec<SubnetPoint>,
}

/// The devices of one (supernet, device class) group that serve one subnet.
#[derive(Debug, Clone, PartialEq)]
pub struct SubnetPoint {
    pub subnet: String,
    pub devices: u32,
    pub latency_p50_ms: f64,
    pub quality: f64,
}

/// Fleet-wide aggregates.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FleetAggregates {
    pub devices_total: u32,
    pub devices_online: u32,
    pub devices_stale: u32,
    pub groups: Vec<AggregateGroup>,
    /// Groups below the privacy floor and their devices: counted, values withheld.
    pub suppressed_groups: u32,
    pub suppressed_devices: u32,
}

impl FleetAggregates {
    /// The dashboard's privacy floor `k`: a group of fewer than k devices is removed (only
    /// counted), and below 2k devices min / p90 / max are withheld (with under 10 values the
    /// nearest-rank p90 is the max). What is left of a group mixes at least k devices.
    pub fn apply_floor(&mut self, k: u32) {
        let k = k.max(1);
        let (keep, drop): (Vec<_>, Vec<_>) = std::mem::take(&mut self.groups)
            .into_iter()
            .partition(|g| g.devices >= k);
        self.suppressed_groups += drop.len() as u32;
        self.suppressed_devices += drop.iter().map(|g| g.devices).sum::<u32>();
        self.groups = keep;
        for g in &mut self.groups {
            g.points.retain(|p| p.devices >= k);
            if g.devices < k.saturating_mul(2) {
                g.latency_p50_ms.suppress_extremes();
                g.latency_p95_ms.suppress_extremes();
                g.quality.suppress_extremes();
            }
        }
    }
}

/// What changed in a fleet (for `WatchFleet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetEventKind {
    DeviceEnrolled,
    DeviceHeartbeat,
    DeviceStale,
    DeviceRevoked,
    Report,
    LabelPublished,
    DesiredStateChanged,
}

/// One fleet change.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetEvent {
    pub kind: FleetEventKind,
    pub fleet_id: Uuid,
    pub device_id: Option<Uuid>,
    pub supernet_id: Option<Uuid>,
    pub unix_ms: i64,
}

/// One page of a list (offset-based page tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub offset: i64,
    pub limit: i64,
}

impl Page {
    pub fn new(page_size: u32, token: &str) -> Result<Self> {
        let limit = match page_size {
            0 => 100,
            n => n.min(1000) as i64,
        };
        let offset = if token.is_empty() {
            0
        } else {
            token
                .parse::<i64>()
                .ok()
                .filter(|o| *o >= 0)
                .ok_or_else(|| CloudError::invalid("page.page_token", "malformed"))?
        };
        Ok(Page { offset, limit })
    }
    /// The token of the next page, empty when `got` shows this was the last one.
    pub fn next_token(&self, got: usize) -> String {
        if (got as i64) < self.limit {
            String::new()
        } else {
            (self.offset + self.limit).to_string()
        }
    }
}

/// What a successful oracle-training run produced: the model as a descriptor and safetensors
/// weights (validated and stored by the worker) and a readable report (JSON).
#[derive(Debug, Clone)]
pub struct OracleOutput {
    pub arch_json: String,
    pub weights: Vec<u8>,
    pub report_json: String,
}
