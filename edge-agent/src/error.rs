//! The one error type of the edge agent. Variants carry the offending path, field or value, so
//! the CLI can print a message a device operator can act on.
use adaptivenet_core::CoreError;
use thiserror::Error;

/// Everything the edge agent library can fail with.
#[derive(Debug, Error)]
pub enum EdgeError {
    /// Model core failures (artifact verification, shapes, data sets).
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A persisted state file exists but cannot be used; callers fall back to recomputing.
    #[error("state file {path} is unusable ({reason}); delete it or let the agent recompute it")]
    CorruptState { path: String, reason: String },
    /// State written for another supernet or other conditions.
    #[error("state file {path} is stale: {reason}")]
    StaleState { path: String, reason: String },
    #[error("latency budget {budget_ms:.3} ms is below the cheapest subnet ({cheapest_ms:.3} ms per the latency table)")]
    BudgetTooLow { budget_ms: f64, cheapest_ms: f64 },
    #[error("invalid {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("latency table has no entry for module {module}")]
    MissingLatency { module: String },
    #[error("no evaluation data: {0}")]
    NoData(String),
    /// The cloud endpoint cannot be reached (bad address, refused, connect timeout).
    #[error("cloud {endpoint} unreachable: {reason}")]
    CloudUnreachable { endpoint: String, reason: String },
    /// A cloud RPC returned an error status.
    #[error("cloud {op} failed ({code:?}): {message}")]
    Cloud {
        op: &'static str,
        code: tonic::Code,
        message: String,
    },
    /// The agent has no stored identity and no enrollment token was given.
    #[error("not enrolled: no device identity in {path} (pass an enrollment token)")]
    NotEnrolled { path: String },
    /// A report whose quality rests on fewer local images than the privacy minimum (the
    /// larger of the cloud's and the local floor): it never leaves the device.
    #[error("report withheld on the device: its quality rests on {samples} local images, below the privacy minimum of {minimum}")]
    ReportWithheld { samples: u64, minimum: u64 },
    /// The stored identity was issued by another cloud endpoint: its credential is not sent
    /// to this one.
    #[error("the device identity in {path} was issued by {stored}, not {given}; its credential is not sent to another endpoint (pass --re-enroll with an enrollment token to enroll with {given})")]
    EndpointChanged {
        path: String,
        stored: String,
        given: String,
    },
    /// A downloaded blob does not match its digest or size; the partial data was deleted.
    #[error("blob {sha256}: {reason}")]
    BlobMismatch { sha256: String, reason: String },
    /// A download stopped before the blob was complete; the `.part` file is kept for resume.
    #[error("download of blob {sha256} interrupted at {held} of {size} bytes: {reason}")]
    Interrupted {
        sha256: String,
        held: u64,
        size: u64,
        reason: String,
    },
}

/// Result alias of the edge agent.
pub type Result<T> = std::result::Result<T, EdgeError>;

impl EdgeError {
    /// Whether retrying the same cloud operation later may succeed (transport failures,
    /// deadlines, server overload or shutdown, interrupted downloads, digest mismatches).
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            EdgeError::CloudUnreachable { .. }
            | EdgeError::Interrupted { .. }
            | EdgeError::BlobMismatch { .. } => true,
            EdgeError::Cloud { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::Internal
            ),
            _ => false,
        }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        EdgeError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub(crate) fn config(field: &str, reason: impl Into<String>) -> Self {
        EdgeError::InvalidConfig {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}
