//! The one error type of the model core. Variants carry structured fields so that callers
//! (the cloud's status mapping, the CLI) can name the offending tensor, field or module.
use thiserror::Error;

/// Everything the model core can fail with.
#[derive(Debug, Error)]
pub enum CoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("missing tensor {name} (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("unexpected tensor {name} with shape {found:?} (not part of this architecture)")]
    UnexpectedTensor { name: String, found: Vec<usize> },
    #[error("unknown model family {0:?}")]
    UnknownFamily(String),
    #[error("invalid architecture: {field}: {reason}")]
    InvalidArch { field: String, reason: String },
    #[error("weight file {path}: {reason}")]
    WeightFormat { path: String, reason: String },
    #[error("dataset {path}: {reason}")]
    Dataset { path: String, reason: String },
    #[error("invalid subnet code at position {position}: {reason}")]
    InvalidSubnet { position: usize, reason: String },
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("artifact module {module}: {reason}")]
    Artifact { module: String, reason: String },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result alias of the model core.
pub type Result<T> = std::result::Result<T, CoreError>;

impl CoreError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
