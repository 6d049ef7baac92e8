//! The crate's one error type. The cloud maps it onto its own (`From<TrainError> for
//! CloudError`), variant for variant, so a job's failure keeps its status code.
use adaptivenet_core::CoreError;
use thiserror::Error;

/// Everything training can fail with.
#[derive(Debug, Error)]
pub enum TrainError {
    /// A setting or the data is malformed or out of range; `field` names it.
    #[error("invalid argument: {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// Valid settings that the current state forbids (e.g. a checkpoint of another run).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The cancellation token fired; the last checkpoint is kept.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A checkpoint failed its format check.
    #[error("data loss: {0}")]
    DataLoss(String),
    /// An I/O error with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A model-core failure, kept whole so that its caller maps it once.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A tensor operation failed (a bug or broken invariant).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A bug or broken invariant.
    #[error("internal: {0}")]
    Internal(String),
    /// The caller's checkpoint store failed: its own error, passed through whole so that the
    /// caller gets it back unchanged.
    #[error(transparent)]
    Checkpoints(Box<dyn std::error::Error + Send + Sync>),
}

/// Result alias of the crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    /// Shorthand for [`TrainError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        TrainError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Wraps an I/O error with its path.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
