//! The device identity issued at enrollment and its persistence: `identity.json` in the
//! state directory, written atomically with mode 0600 (credentials are secrets), bound to
//! the endpoint that issued it, rotated at two thirds of its lifetime.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{EdgeError, Result};

/// Version of `identity.json`.
pub const IDENTITY_FORMAT: u32 = 1;
/// File name of the persisted identity inside the state directory.
pub const IDENTITY_FILE: &str = "identity.json";

/// The device identity issued at enrollment.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format_version: u32,
    /// The endpoint the identity was issued by.
    pub endpoint: String,
    pub device_id: String,
    pub fleet_id: String,
    pub credential: String,
    /// 0 = does not expire.
    pub credential_expires_unix_ms: i64,
    /// When the credential was received (0: unknown, identities written before rotation).
    #[serde(default)]
    pub credential_issued_unix_ms: i64,
    /// The cloud's privacy minimum of local samples behind a reported quality, as last
    /// announced (enrollment, heartbeats), so a restarted agent holds to it before its first
    /// heartbeat; 0 when never announced.
    #[serde(default)]
    pub min_quality_samples: u64,
}

/// Rotate at the latest this long before expiry when the credential's issue time is unknown.
pub const ROTATE_MARGIN: Duration = Duration::from_secs(7 * 24 * 3600);

impl Identity {
    /// Whether the credential should be rotated at `now`: two thirds of its lifetime have
    /// passed (or it is within [`ROTATE_MARGIN`] of expiry when its issue time is unknown).
    pub fn rotation_due(&self, now_unix_ms: i64) -> bool {
        let expires = self.credential_expires_unix_ms;
        if expires <= 0 {
            return false;
        }
        let issued = self.credential_issued_unix_ms;
        let due = if issued > 0 && issued < expires {
            issued + (expires - issued) / 3 * 2
        } else {
            expires.saturating_sub(ROTATE_MARGIN.as_millis() as i64)
        };
        now_unix_ms >= due
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("endpoint", &self.endpoint)
            .field("device_id", &self.device_id)
            .field("fleet_id", &self.fleet_id)
            .field("credential", &"<redacted>")
            .field("min_quality_samples", &self.min_quality_samples)
            .finish()
    }
}

/// Path of the identity file in a state directory.
pub fn identity_path(state_dir: &Path) -> PathBuf {
    state_dir.join(IDENTITY_FILE)
}

/// Reads a stored identity: `Ok(None)` when absent, `CorruptState` when unusable.
pub fn load_identity(state_dir: &Path) -> Result<Option<Identity>> {
    let path = identity_path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EdgeError::io(&path, e)),
    };
    let corrupt = |reason: String| EdgeError::CorruptState {
        path: path.display().to_string(),
        reason,
    };
    let id: Identity = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if id.format_version != IDENTITY_FORMAT {
        return Err(corrupt(format!(
            "unsupported format_version {}",
            id.format_version
        )));
    }
    if id.credential.is_empty() || id.device_id.is_empty() {
        return Err(corrupt("empty device id or credential".into()));
    }
    Ok(Some(id))
}

/// Endpoints compare without a trailing slash (`http://h:1/` is `http://h:1`).
pub(crate) fn same_endpoint(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Writes `bytes` to `path` atomically with owner-only permissions (0600 on Unix): temp file
/// created 0600 in the same directory, fsync, rename, fsync the directory. On failure (a full
/// disk) the temp file is removed and the old file is untouched.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| EdgeError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(EdgeError::io(path, e));
    }
    sync_dir(dir);
    Ok(())
}

/// Best-effort fsync of a directory (makes a rename durable on Unix).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
