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
//!
//! A long-running agent writes a line per window forever, so the file is rotated
//! ([`Rotation`]): before a line would take it past `max_bytes` it becomes
//! `timeline.jsonl.1` (older ones shift to `.2` ... `.keep`, the oldest is deleted).
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

/// When the timeline file is rotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Largest size of the current file (a single longer line is still written).
    pub max_bytes: u64,
    /// Rotated files kept (`timeline.jsonl.1` newest); 0 discards the old lines.
    pub keep: usize,
}

impl Default for Rotation {
    /// 8 MiB per file, 4 rotated files: about a week of one-second windows in 40 MiB.
    fn default() -> Self {
        Rotation {
            max_bytes: 8 << 20,
            keep: 4,
        }
    }
}

/// The open file and its size.
#[derive(Debug)]
struct Current {
    file: std::fs::File,
    len: u64,
}

/// An append-only JSON-lines writer with events queued for the next window.
#[derive(Debug)]
pub struct Timeline {
    path: PathBuf,
    rotation: Rotation,
    file: Mutex<Current>,
    pending: Mutex<Vec<String>>,
}

fn open_append(path: &Path) -> Result<Current> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| EdgeError::io(path, e))?;
    let len = file.metadata().map_err(|e| EdgeError::io(path, e))?.len();
    Ok(Current { file, len })
}

impl Timeline {
    /// Opens (creates or appends to) `path` with the default [`Rotation`].
    pub fn open(path: &Path) -> Result<Timeline> {
        Self::open_with(path, Rotation::default())
    }

    /// Opens (creates or appends to) `path`, rotated per `rotation`.
    pub fn open_with(path: &Path, rotation: Rotation) -> Result<Timeline> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| EdgeError::io(dir, e))?;
        }
        Ok(Timeline {
            path: path.to_path_buf(),
            rotation,
            file: Mutex::new(open_append(path)?),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// `timeline.jsonl.{i}`.
    pub fn rotated_path(&self, i: usize) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{i}"));
        PathBuf::from(name)
    }

    /// Shifts the rotated files up by one (dropping the oldest), moves the current file to
    /// `.1` and starts an empty one.
    fn rotate(&self, cur: &mut Current) -> Result<()> {
        let keep = self.rotation.keep;
        let gone = |r: std::io::Result<()>, p: &Path| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EdgeError::io(p, e)),
            _ => Ok(()),
        };
        if keep == 0 {
            gone(std::fs::remove_file(&self.path), &self.path)?;
        } else {
            let oldest = self.rotated_path(keep);
            gone(std::fs::remove_file(&oldest), &oldest)?;
            for i in (1..keep).rev() {
                let from = self.rotated_path(i);
                gone(std::fs::rename(&from, self.rotated_path(i + 1)), &from)?;
            }
            gone(
                std::fs::rename(&self.path, self.rotated_path(1)),
                &self.path,
            )?;
        }
        *cur = open_append(&self.path)?;
        Ok(())
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
        let mut cur = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if cur.len > 0 && cur.len + line.len() as u64 > self.rotation.max_bytes {
            self.rotate(&mut cur)?;
        }
        cur.file
            .write_all(&line)
            .and_then(|_| cur.file.flush())
            .map_err(|err| EdgeError::io(&self.path, err))?;
        cur.len += line.len() as u64;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Window `i` (< 900): lines of one length, so a file holds a fixed number of them.
    fn entry(i: f64) -> TimelineEntry {
        TimelineEntry {
            t_s: 100.0 + i,
            p50_ms: 1.0,
            p95_ms: 2.0,
            budget_ms: 3.0,
            subnet: "0000".into(),
            event: None,
            samples: 10,
            noise: 0.01,
            contention: 0.0,
        }
    }

    #[test]
    fn rotates_at_the_size_limit_and_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TIMELINE_FILE);
        let line = serde_json::to_vec(&entry(0.0)).unwrap().len() as u64 + 1;
        let rot = Rotation {
            max_bytes: 10 * line,
            keep: 2,
        };
        let tl = Timeline::open_with(&path, rot).unwrap();
        for i in 0..45 {
            tl.record(entry(f64::from(i))).unwrap();
        }
        // 45 lines of 10 per file: current holds 40..44, .1 30..39, .2 20..29; older dropped.
        let t = |p: &Path| -> Vec<f64> {
            Timeline::read(p)
                .unwrap()
                .iter()
                .map(|e| e.t_s - 100.0)
                .collect()
        };
        assert_eq!(t(&path), (40..45).map(f64::from).collect::<Vec<_>>());
        assert_eq!(
            t(&tl.rotated_path(1)),
            (30..40).map(f64::from).collect::<Vec<_>>()
        );
        assert_eq!(
            t(&tl.rotated_path(2)),
            (20..30).map(f64::from).collect::<Vec<_>>()
        );
        assert!(!tl.rotated_path(3).exists());
        for p in [path.clone(), tl.rotated_path(1), tl.rotated_path(2)] {
            assert!(std::fs::metadata(&p).unwrap().len() <= rot.max_bytes);
        }
        // A reopened timeline counts the bytes already there.
        drop(tl);
        let tl = Timeline::open_with(&path, rot).unwrap();
        for i in 45..51 {
            tl.record(entry(f64::from(i))).unwrap();
        }
        assert_eq!(t(&path), vec![50.0]);
        assert_eq!(
            t(&tl.rotated_path(1)),
            (40..50).map(f64::from).collect::<Vec<_>>()
        );
        // keep = 0: the old lines are discarded.
        let other = dir.path().join("other.jsonl");
        let tl = Timeline::open_with(
            &other,
            Rotation {
                max_bytes: 2 * line,
                keep: 0,
            },
        )
        .unwrap();
        for i in 0..5 {
            tl.record(entry(f64::from(i))).unwrap();
        }
        assert_eq!(t(&other), vec![4.0]);
        assert!(!tl.rotated_path(1).exists());
    }
}
