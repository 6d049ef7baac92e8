//! The crate's one error type and the one table that maps it to gRPC status codes.
//!
//! Every service method returns `Result<_, CloudError>` internally and converts at the edge
//! with `Status::from`; [`CloudError::code`] is that table (tested in `tests/status_map.rs`).
//! Internal details (SQL, I/O) are logged, never sent to clients.
use thiserror::Error;
use tonic::Code;

/// Everything the cloud can fail with.
#[derive(Debug, Error)]
pub enum CloudError {
    /// A request field is malformed or out of range.
    #[error("invalid argument: {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// An id that does not exist (or that the caller may not know exists).
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// A unique name is already taken.
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    /// The request is valid but the current state forbids it.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A size or rate limit was exceeded.
    #[error("resource exhausted: {what}: {detail}")]
    ResourceExhausted { what: String, detail: String },
    /// Missing, malformed, wrong, expired or revoked credential.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is known but its role or fleet does not allow this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The operation was cancelled (job cancel, client gone).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A client took too long (an upload stream that went idle); nothing was stored.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The server is draining or a dependency is temporarily unreachable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Stored data failed its integrity check (e.g. a blob whose digest no longer matches).
    #[error("data loss: {0}")]
    DataLoss(String),
    /// A database error (details logged, not returned).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration error.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// An I/O error with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A bug or broken invariant.
    #[error("internal: {0}")]
    Internal(String),
}

/// Result alias of the cloud crate.
pub type Result<T, E = CloudError> = std::result::Result<T, E>;

impl CloudError {
    /// Shorthand for [`CloudError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CloudError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`CloudError::NotFound`].
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        CloudError::NotFound {
            kind,
            id: id.into(),
        }
    }

    /// Shorthand for [`CloudError::ResourceExhausted`].
    pub fn exhausted(what: impl Into<String>, detail: impl Into<String>) -> Self {
        CloudError::ResourceExhausted {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// Wraps an I/O error with its path. A full file system or exhausted quota becomes
    /// RESOURCE_EXHAUSTED (the client may retry later; nothing partial was stored), with the
    /// path logged rather than returned.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        if is_storage_full(&source) {
            tracing::warn!(path = %path.as_ref().display(), error = %source, "storage full");
            return CloudError::exhausted("storage", "the server's storage is full; retry later");
        }
        CloudError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// The status-code table: the only place that decides which code a failure gets.
    pub fn code(&self) -> Code {
        match self {
            CloudError::InvalidArgument { .. } => Code::InvalidArgument,
            CloudError::NotFound { .. } => Code::NotFound,
            CloudError::AlreadyExists { .. } => Code::AlreadyExists,
            CloudError::FailedPrecondition(_) => Code::FailedPrecondition,
            CloudError::ResourceExhausted { .. } => Code::ResourceExhausted,
            CloudError::Unauthenticated(_) => Code::Unauthenticated,
            CloudError::PermissionDenied(_) => Code::PermissionDenied,
            CloudError::Cancelled(_) => Code::Cancelled,
            CloudError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CloudError::Unavailable(_) => Code::Unavailable,
            CloudError::DataLoss(_) => Code::DataLoss,
            CloudError::Database(e) => match e {
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => Code::Unavailable,
                sqlx::Error::RowNotFound => Code::NotFound,
                _ => Code::Internal,
            },
            CloudError::Migrate(_) | CloudError::Io { .. } | CloudError::Internal(_) => {
                Code::Internal
            }
        }
    }

    /// The message a client sees: the error itself for client-caused failures, a generic
    /// text for internal ones (the details go to the log).
    pub fn client_message(&self) -> String {
        match self.code() {
            Code::Internal => "internal error (see server log)".to_string(),
            Code::Unavailable if matches!(self, CloudError::Database(_)) => {
                "database temporarily unavailable".to_string()
            }
            _ => self.to_string(),
        }
    }
}

/// ENOSPC or EDQUOT, however the platform reports it.
fn is_storage_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
        || matches!(e.raw_os_error(), Some(28) | Some(122))
}

impl From<CloudError> for tonic::Status {
    fn from(e: CloudError) -> Self {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        tonic::Status::new(code, e.client_message())
    }
}

/// Model-core errors: configuration and architecture problems are the caller's (the field is
/// kept), a missing file is I/O, the rest (tensor failures, corrupt internal artifacts) internal.
impl From<adaptivenet_core::CoreError> for CloudError {
    fn from(e: adaptivenet_core::CoreError) -> Self {
        use adaptivenet_core::CoreError;
        match e {
            CoreError::InvalidConfig { field, reason } => {
                CloudError::InvalidArgument { field, reason }
            }
            CoreError::InvalidArch { field, reason } => CloudError::InvalidArgument {
                field: format!("arch.{field}"),
                reason,
            },
            CoreError::UnknownFamily(f) => {
                CloudError::invalid("arch.family", format!("unknown {f:?}"))
            }
            CoreError::Dataset { path, reason } => {
                CloudError::invalid("data", format!("{path}: {reason}"))
            }
            CoreError::Io { path, source } => CloudError::Io { path, source },
            other => CloudError::Internal(other.to_string()),
        }
    }
}

/// Training errors keep their meaning: each variant becomes the cloud's variant of the same
/// name, core errors take the one `From<CoreError>` route above, tensor failures are internal
/// and the checkpoint store's own errors come back as they were.
impl From<adaptivenet_train::TrainError> for CloudError {
    fn from(e: adaptivenet_train::TrainError) -> Self {
        use adaptivenet_train::TrainError;
        match e {
            TrainError::InvalidArgument { field, reason } => {
                CloudError::InvalidArgument { field, reason }
            }
            TrainError::FailedPrecondition(m) => CloudError::FailedPrecondition(m),
            TrainError::Cancelled(m) => CloudError::Cancelled(m),
            TrainError::DataLoss(m) => CloudError::DataLoss(m),
            TrainError::Io { path, source } => CloudError::io(path, source),
            TrainError::Core(e) => CloudError::from(e),
            TrainError::Tensor(e) => CloudError::Internal(format!("tensor: {e}")),
            TrainError::Internal(m) => CloudError::Internal(m),
            TrainError::Checkpoints(e) => match e.downcast::<CloudError>() {
                Ok(e) => *e,
                Err(e) => CloudError::Internal(format!("checkpoints: {e}")),
            },
        }
    }
}
