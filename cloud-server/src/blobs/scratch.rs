//! Per-process scratch directories for writes in progress.
//!
//! Several processes may share one blob directory (API replicas, the worker, `migrate`, `gc`).
//! Each takes its own `tmp/p-<uuid>/`, holding an exclusive advisory lock (`flock`) on the
//! `.lock` file inside it for as long as the store lives. Cleaning up after a crashed process
//! is then safe: a scratch directory is removed only by whoever acquires its lock, which the
//! kernel releases when its owner exits, however it exits. A directory is prepared under a
//! hidden name and renamed to `p-<uuid>` only once locked, so no other process can ever see
//! an unlocked live one.
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fs4::FileExt;
use uuid::Uuid;

use crate::error::{CloudError, Result};

const LIVE_PREFIX: &str = "p-";
const INIT_PREFIX: &str = ".init-";
const LOCK_FILE: &str = ".lock";
/// Crash debris that has no lock to ask (a half-prepared directory, a loose temp file of an
/// older release) is removed only once it is this old.
const LOOSE_MAX_AGE: Duration = Duration::from_secs(3600);

/// This process's scratch directory; removed when the last clone of the store drops.
#[derive(Debug)]
pub(super) struct Scratch {
    dir: PathBuf,
    /// Holds the lock; closing it releases the lock.
    _lock: File,
}

impl Scratch {
    /// Creates and locks a fresh scratch directory under `tmp`, then removes the scratch
    /// directories of processes that no longer run.
    pub(super) fn create(tmp: &Path) -> Result<Self> {
        std::fs::create_dir_all(tmp).map_err(|e| CloudError::io(tmp, e))?;
        let id = Uuid::new_v4().simple().to_string();
        let init = tmp.join(format!("{INIT_PREFIX}{id}"));
        std::fs::create_dir(&init).map_err(|e| CloudError::io(&init, e))?;
        let lock_path = init.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| CloudError::io(&lock_path, e))?;
        FileExt::try_lock(&lock).map_err(|e| {
            CloudError::Internal(format!("locking a new scratch directory failed: {e}"))
        })?;
        let dir = tmp.join(format!("{LIVE_PREFIX}{id}"));
        std::fs::rename(&init, &dir).map_err(|e| CloudError::io(&dir, e))?;
        let removed = clean_stale(tmp);
        if removed > 0 {
            tracing::info!(removed, dir = %tmp.display(), "removed scratch of exited processes");
        }
        Ok(Scratch { dir, _lock: lock })
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Still locked here (the lock file closes after this body), so nobody else touches it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes every scratch directory under `tmp` whose lock is free (its process is gone),
/// plus old loose debris; returns how many entries went. Errors are skipped: another
/// process may be cleaning the same entries concurrently.
pub(super) fn clean_stale(tmp: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(tmp) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() && name.starts_with(LIVE_PREFIX) {
            let lock = match File::open(path.join(LOCK_FILE)) {
                Ok(f) => f,
                // Renamed into place only after the lock file exists: a directory without
                // one is debris.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if std::fs::remove_dir_all(&path).is_ok() {
                        removed += 1;
                    }
                    continue;
                }
                Err(_) => continue,
            };
            if FileExt::try_lock(&lock).is_ok() && std::fs::remove_dir_all(&path).is_ok() {
                removed += 1;
            }
        } else if (name.starts_with(INIT_PREFIX) || (ft.is_file() && name.ends_with(".part")))
            && older_than(&path, LOOSE_MAX_AGE)
        {
            let r = if ft.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if r.is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

fn older_than(path: &Path, age: Duration) -> bool {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|d| d > age)
}
