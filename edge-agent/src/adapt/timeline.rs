//! The adaptation timeline, `<state>/timeline.jsonl`: one JSON object per controller window,
//! for plots. Fields: `t_s` (seconds since serving started), `p50_ms`, `p95_ms`,
//! `budget_ms`, `subnet` (serving after the window's decision), `event` (null, or
//! `step_down` / `step_up` / `switch_failed` / `resync` / `resync_failed`; events that
//! happen between windows, such as a re-sync, are attached to the next window, joined by
//! `,` in the rare case of two), plus `samples`, `noise` (the controller's per-window
//! log-noise estimate) and `contention` (the load generator's scheduled intensity, 0 when
//! off).
//!
//! Lines are appended and flushed one by one, so a crash loses at most the line being
//! written; a new run appends to the file (a plot can split runs where `t_s` restarts).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::{EdgeError, Result};

/// File name inside the state directory.
pub const TIMELINE_FILE: &str = "timeline.jsonl";

/// One window of the timeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub t_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub budget_ms: f64,
    pub subnet: String,
    pub event: Option<String>,
    pub samples: usize,
    pub noise: f64,
    pub contention: f64,
}

/// An append-only JSON-lines writer with events queued for the next window.
#[derive(Debug)]
pub struct Timeline {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    pending: Mutex<Vec<String>>,
}

impl Timeline {
    /// Opens (creates or appends to) `path`.
    pub fn open(path: &Path) -> Result<Timeline> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| EdgeError::io(dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| EdgeError::io(path, e))?;
        Ok(Timeline {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            pending: Mutex::new(Vec::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues an event for the next window's entry.
    pub fn note(&self, event: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event.to_string());
    }

    /// Appends one window; queued events come first in `event`.
    pub fn record(&self, mut e: TimelineEntry) -> Result<()> {
        let mut events: Vec<String> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        events.extend(e.event.take());
        e.event = (!events.is_empty()).then(|| events.join(","));
        let mut line =
            serde_json::to_vec(&e).map_err(|err| EdgeError::config("timeline", err.to_string()))?;
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(&line)
            .and_then(|_| f.flush())
            .map_err(|err| EdgeError::io(&self.path, err))
    }

    /// Reads a timeline back (for tests and tools); a torn last line is skipped.
    pub fn read(path: &Path) -> Result<Vec<TimelineEntry>> {
        let text = std::fs::read_to_string(path).map_err(|e| EdgeError::io(path, e))?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut out = Vec::with_capacity(lines.len());
        for (i, l) in lines.iter().enumerate() {
            match serde_json::from_str(l) {
                Ok(e) => out.push(e),
                Err(_) if i + 1 == lines.len() => {}
                Err(err) => {
                    return Err(EdgeError::CorruptState {
                        path: path.display().to_string(),
                        reason: format!("line {}: {err}", i + 1),
                    })
                }
            }
        }
        Ok(out)
    }
}
