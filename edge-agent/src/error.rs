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
}

/// Result alias of the edge agent.
pub type Result<T> = std::result::Result<T, EdgeError>;

impl EdgeError {
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
