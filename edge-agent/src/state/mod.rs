//! The agent's persisted state: latency table, search result (front and best per budget),
//! the active subnet and, during a staged rollout, the plan kept for a rollback
//! ([`StandbyRecord`]), one JSON file each under a state directory, written atomically (temp
//! file, fsync, rename), so a crash leaves the old or the new file, never a mix.
//!
//! Loading distinguishes three cases: absent (`Ok(None)`), unusable (`CorruptState`: not
//! JSON, wrong schema, unknown version) and stale (`StaleState`: written for another
//! supernet). Callers fall back to recomputing; nothing here panics on bad bytes.
use std::path::{Path, PathBuf};

use adaptivenet_core::artifact::write_atomic;
use adaptivenet_core::supernet::Subnet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::profile::{LatencyTable, TABLE_FORMAT};
use crate::search::{SearchConfig, SearchResult};
use crate::{EdgeError, Result};

/// Version of the state files this code writes and reads.
pub const STATE_FORMAT: u32 = 1;
/// Larger state files are refused rather than parsed.
const MAX_STATE_BYTES: u64 = 64 << 20;

/// A state file's envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned<T> {
    pub format_version: u32,
    /// The manifest's `supernet_id` the data belongs to.
    pub supernet_id: String,
    pub data: T,
}

/// The search outcome with the settings that produced it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchRecord {
    pub config: SearchConfig,
    pub result: SearchResult,
}

/// The subnet being served and its budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActiveRecord {
    pub subnet: Subnet,
    pub budget_ms: f64,
}

/// The plan a device served before a rollout moved it to another supernet, kept so that a
/// rollback (also one after a restart) installs it again with no download and no search:
/// the table and search result hold what profiling and search would recompute, and the
/// table and search slots of [`StateDir`] hold only the serving supernet's, so this is the
/// one copy of them. The envelope's `supernet_id` is the kept supernet as the cloud names it
/// (its cache directory), which is not the manifest's id the other files carry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StandbyRecord {
    /// The desired-state generation it was applied at.
    pub generation: u64,
    /// The subnet it served when it was set aside (re-installed if still on the front).
    pub subnet: Subnet,
    /// The served budget, ms.
    pub budget_ms: f64,
    pub table: LatencyTable,
    pub search: SearchRecord,
}

/// A state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    pub dir: PathBuf,
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EdgeError::io(path, e)),
    };
    let corrupt = |reason: String| EdgeError::CorruptState {
        path: path.display().to_string(),
        reason,
    };
    if meta.len() > MAX_STATE_BYTES {
        return Err(corrupt(format!(
            "{} bytes is larger than any state file",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| EdgeError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| corrupt(e.to_string()))
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    pub fn table_path(&self) -> PathBuf {
        self.dir.join("latency.json")
    }
    pub fn search_path(&self) -> PathBuf {
        self.dir.join("search.json")
    }
    pub fn active_path(&self) -> PathBuf {
        self.dir.join("active.json")
    }
    pub fn standby_path(&self) -> PathBuf {
        self.dir.join("standby.json")
    }

    fn write<T: Serialize>(&self, path: &Path, v: &T) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(v).map_err(|e| EdgeError::config("state", e.to_string()))?;
        Ok(write_atomic(path, &bytes)?)
    }

    fn check_version(&self, path: &Path, version: u32, id: Option<&str>, want: &str) -> Result<()> {
        if version != STATE_FORMAT && version != TABLE_FORMAT {
            return Err(EdgeError::CorruptState {
                path: path.display().to_string(),
                reason: format!("unsupported format_version {version}"),
            });
        }
        match id {
            Some(id) if id != want => Err(EdgeError::StaleState {
                path: path.display().to_string(),
                reason: format!("written for supernet {id}, the artifact is {want}"),
            }),
            _ => Ok(()),
        }
    }

    pub fn save_table(&self, t: &LatencyTable) -> Result<()> {
        self.write(&self.table_path(), t)
    }

    /// The table for supernet `supernet_id`, if one was saved.
    pub fn load_table(&self, supernet_id: &str) -> Result<Option<LatencyTable>> {
        let p = self.table_path();
        let Some(t) = read_json::<LatencyTable>(&p)? else {
            return Ok(None);
        };
        self.check_version(&p, t.format_version, t.supernet_id.as_deref(), supernet_id)?;
        Ok(Some(t))
    }

    fn save_versioned<T: Serialize>(&self, path: &Path, supernet_id: &str, data: &T) -> Result<()> {
        self.write(
            path,
            &Versioned {
                format_version: STATE_FORMAT,
                supernet_id: supernet_id.to_string(),
                data,
            },
        )
    }

    fn load_versioned<T: DeserializeOwned>(
        &self,
        path: &Path,
        supernet_id: &str,
    ) -> Result<Option<T>> {
        let Some(v) = read_json::<Versioned<T>>(path)? else {
            return Ok(None);
        };
        self.check_version(path, v.format_version, Some(&v.supernet_id), supernet_id)?;
        Ok(Some(v.data))
    }

    pub fn save_search(&self, supernet_id: &str, r: &SearchRecord) -> Result<()> {
        self.save_versioned(&self.search_path(), supernet_id, r)
    }

    pub fn load_search(&self, supernet_id: &str) -> Result<Option<SearchRecord>> {
        self.load_versioned(&self.search_path(), supernet_id)
    }

    pub fn save_active(&self, supernet_id: &str, a: &ActiveRecord) -> Result<()> {
        self.save_versioned(&self.active_path(), supernet_id, a)
    }

    pub fn load_active(&self, supernet_id: &str) -> Result<Option<ActiveRecord>> {
        self.load_versioned(&self.active_path(), supernet_id)
    }

    /// Keeps `r` as the plan of supernet `supernet_id` to roll back to (replacing any).
    pub fn save_standby(&self, supernet_id: &str, r: &StandbyRecord) -> Result<()> {
        self.save_versioned(&self.standby_path(), supernet_id, r)
    }

    /// The kept plan and its supernet, if one is stored.
    pub fn load_standby(&self) -> Result<Option<(String, StandbyRecord)>> {
        let p = self.standby_path();
        let Some(v) = read_json::<Versioned<StandbyRecord>>(&p)? else {
            return Ok(None);
        };
        self.check_version(&p, v.format_version, None, &v.supernet_id)?;
        // The table names the manifest's supernet id, the envelope the cloud's.
        self.check_version(&p, v.data.table.format_version, None, &v.supernet_id)?;
        Ok(Some((v.supernet_id, v.data)))
    }

    /// Forgets the kept plan (no rollout can send the device back to it any more).
    pub fn clear_standby(&self) -> Result<()> {
        let p = self.standby_path();
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EdgeError::io(&p, e)),
        }
    }
}
