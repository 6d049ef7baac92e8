//! Checkpoints of a long training run: one opaque byte string behind [`CheckpointIo`],
//! replaced atomically. [`DirCheckpoints`] keeps it in a directory; the cloud's job worker
//! implements the trait over its blob store so that another worker resumes a job.
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// The metadata of a safetensors checkpoint, checked for its format and for belonging to this
/// run (same fingerprint) before anything is restored from it.
pub(crate) struct CheckpointMeta {
    what: &'static str,
    meta: std::collections::HashMap<String, String>,
}

impl CheckpointMeta {
    /// `mismatch` is the FAILED_PRECONDITION message for a checkpoint of another run.
    pub(crate) fn read(
        bytes: &[u8],
        what: &'static str,
        format: &str,
        fingerprint: &str,
        mismatch: &str,
    ) -> Result<Self> {
        let (_, md) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| TrainError::DataLoss(format!("{what}: {e}")))?;
        let m = CheckpointMeta {
            what,
            meta: md.metadata().clone().unwrap_or_default(),
        };
        if m.get("format")? != format {
            return Err(m.bad(format!("format {:?}", m.get("format")?)));
        }
        if m.get("fingerprint")? != fingerprint {
            return Err(TrainError::FailedPrecondition(mismatch.into()));
        }
        Ok(m)
    }

    /// A metadata value (DATA_LOSS when missing).
    pub(crate) fn get(&self, k: &str) -> Result<String> {
        self.meta
            .get(k)
            .cloned()
            .ok_or_else(|| self.bad(format!("missing {k}")))
    }

    /// A corrupt-checkpoint error naming the checkpoint kind.
    pub(crate) fn bad(&self, reason: String) -> TrainError {
        TrainError::DataLoss(format!("{}: {reason}", self.what))
    }
}

/// JSON for checkpoint metadata.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| TrainError::Internal(format!("json: {e}")))
}

/// Where checkpoints go: one opaque byte string, replaced atomically. The directory
/// implementation is [`DirCheckpoints`]; the cloud's job worker wraps its blob store.
pub trait CheckpointIo {
    /// The latest checkpoint, if any.
    fn load(&self) -> Result<Option<Vec<u8>>>;
    /// Replaces the checkpoint; a crash leaves the old or the new one, never a mix.
    fn save(&self, bytes: &[u8]) -> Result<()>;
}

/// Checkpoints as `<dir>/checkpoint.safetensors`, written with
/// [`adaptivenet_core::artifact::write_atomic`].
#[derive(Clone, Debug)]
pub struct DirCheckpoints {
    pub dir: PathBuf,
}

impl DirCheckpoints {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    /// The checkpoint file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
}

impl CheckpointIo for DirCheckpoints {
    fn load(&self) -> Result<Option<Vec<u8>>> {
        let p = self.path();
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TrainError::io(&p, e)),
        }
    }

    fn save(&self, bytes: &[u8]) -> Result<()> {
        adaptivenet_core::artifact::write_atomic(&self.path(), bytes)?;
        Ok(())
    }
}
