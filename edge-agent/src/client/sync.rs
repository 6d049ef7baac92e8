//! Supernet sync: desired state → manifest → only the needed blobs, into a local directory
//! laid out as an artifact directory (`<cache>/<supernet id>/manifest.json` + `blobs/`).
//!
//! Download protocol per blob (content-addressed by sha256):
//! - a blob already under its final name is re-verified (size + sha256) and skipped; a bad
//!   one is deleted and fetched again (counted in [`DownloadStats::cached_corrupt`]);
//! - partial data lives in `blobs/<sha256>.part`; every attempt asks for `offset` = the
//!   `.part` file's length, so after a break (stream error, deadline, process kill) only the
//!   missing bytes travel;
//! - when the last chunk arrives, size and sha256 of the whole file are verified and the file
//!   is renamed atomically to `blobs/<sha256>`; a mismatch deletes the `.part` and the next
//!   attempt starts from 0 ([`DownloadStats::restarts_from_zero`]): a bad blob never sits
//!   under its final name, so it is never loaded;
//! - transient failures are retried with jittered exponential backoff, at most
//!   [`SyncOptions::max_attempts`] times per blob.
//!
//! `manifest.json` is written (atomically) after the selected blobs are all in place, so a
//! reader never sees a manifest whose selected blobs are missing.
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use adaptivenet_core::artifact::{blob_path, sha256_hex, write_atomic, Manifest};
use adaptivenet_core::supernet::Subnet;
use adaptivenet_proto::v1 as pb;
use rand::Rng;
use sha2::{Digest, Sha256};

use super::{status_err, sync_dir, CloudClient};
use crate::{EdgeError, Result};

/// Which module blobs to fetch.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum BlobSelection {
    /// Every module (what search and profiling use: any choice at any position).
    #[default]
    All,
    /// Stem, head and the modules of these subnets only.
    Subnets(Vec<Subnet>),
}

/// Download tuning.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// Preferred chunk size (0 = server default).
    pub chunk_size: u32,
    /// Attempts per blob (and per manifest fetch), at least 1.
    pub max_attempts: u32,
    /// First backoff; doubles per attempt up to `backoff_max`, jittered in [50%, 100%].
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Deadline of one download stream (`grpc-timeout`); each chunk must also arrive within
    /// the client's per-request deadline.
    pub stream_deadline: Duration,
    /// Drop every download stream after this many chunks, as a broken link would (fault
    /// injection for tests and drills; `None` in production).
    pub break_after_chunks: Option<usize>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            chunk_size: 0,
            max_attempts: 6,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            stream_deadline: Duration::from_secs(600),
            break_after_chunks: None,
        }
    }
}

impl SyncOptions {
    /// Backoff before retry number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.backoff_max);
        exp.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// What a sync did (all counters are totals over the sync).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DownloadStats {
    /// Distinct blobs the selection needs.
    pub blobs_needed: usize,
    /// Already present and verified.
    pub blobs_skipped: usize,
    /// Found (verified) in another supernet version's directory of the same cache and
    /// linked, not downloaded: a new version fetches only the modules that changed.
    pub blobs_linked: usize,
    /// Downloaded (fully or partly) in this sync.
    pub blobs_downloaded: usize,
    /// Payload bytes received over the wire.
    pub bytes_received: u64,
    /// Bytes received that were already held (a server answering from an earlier offset).
    pub bytes_resent: u64,
    /// Downloads that continued from a non-empty `.part` file.
    pub resumed: usize,
    /// Download streams opened.
    pub streams: usize,
    /// `.part` files deleted after a size/digest mismatch and fetched again from 0.
    pub restarts_from_zero: usize,
    /// Blobs under their final name that failed verification (deleted, re-fetched).
    pub cached_corrupt: usize,
    /// Retries after transient failures.
    pub retries: usize,
}

/// The outcome of a sync.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// The local artifact directory (open it with `ArtifactSource::open`).
    pub dir: PathBuf,
    /// The cloud's supernet id.
    pub supernet_id: String,
    pub supernet_version: u64,
    /// The desired-state generation this sync applied.
    pub generation: u64,
    pub budget: Option<super::BudgetPolicy>,
    /// Why the cloud sends this device this supernet.
    pub reason: super::ServingReason,
    /// The active rollout that decided the supernet, if any.
    pub rollout_id: Option<String>,
    pub manifest: Manifest,
    pub stats: DownloadStats,
}

/// The supernet the last successful sync installed (`<cache>/current.json`), so an agent
/// can start from its cache while the cloud is unreachable.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurrentSupernet {
    pub supernet_id: String,
    pub generation: u64,
}

/// Path of the record of the last synced supernet.
pub fn current_path(cache: &Path) -> PathBuf {
    cache.join("current.json")
}

/// The last synced supernet and its directory, if the record exists and the directory still
/// holds a readable manifest (blobs are verified again when loaded).
pub fn cached_current(cache: &Path) -> Option<(CurrentSupernet, PathBuf)> {
    let bytes = std::fs::read(current_path(cache)).ok()?;
    let cur: CurrentSupernet = serde_json::from_slice(&bytes).ok()?;
    uuid::Uuid::parse_str(&cur.supernet_id).ok()?;
    let dir = cache.join(&cur.supernet_id);
    adaptivenet_core::artifact::read_manifest(&dir).ok()?;
    Some((cur, dir))
}

/// Records `supernet_id` at `generation` as the one to start from (`current.json`): after
/// a sync, or when a device goes back to the supernet it served before.
pub fn write_current(cache: &Path, supernet_id: &str, generation: u64) -> Result<()> {
    let cur = CurrentSupernet {
        supernet_id: supernet_id.to_string(),
        generation,
    };
    let cur = serde_json::to_vec(&cur).map_err(|e| EdgeError::config("cache", e.to_string()))?;
    Ok(write_atomic(&current_path(cache), &cur)?)
}

/// Path of a blob's partial download.
pub fn part_path(dir: &Path, sha256: &str) -> PathBuf {
    dir.join("blobs").join(format!("{sha256}.part"))
}

/// (length, sha256) of a file, streamed.
pub fn file_digest(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| EdgeError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| EdgeError::io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex::encode(h.finalize())))
}

fn file_len(path: &Path) -> Result<u64> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(EdgeError::io(path, e)),
    }
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EdgeError::io(path, e)),
    }
}

/// Looks for blob `sha` in the other supernet directories of the cache (`dir`'s siblings),
/// hard-links (or copies) it in under a temporary name, verifies it and renames it into
/// place. `Ok(false)` when no verified copy exists.
fn link_from_siblings(dir: &Path, sha: &str, size: u64) -> Result<bool> {
    let (Some(cache), Some(own)) = (dir.parent(), dir.file_name()) else {
        return Ok(false);
    };
    let Ok(entries) = std::fs::read_dir(cache) else {
        return Ok(false);
    };
    let final_path = blob_path(dir, sha);
    let tmp = dir.join("blobs").join(format!("{sha}.link"));
    for e in entries.flatten() {
        if e.file_name() == own || !e.path().is_dir() {
            continue;
        }
        let other = blob_path(&e.path(), sha);
        if !other.is_file() {
            continue;
        }
        remove(&tmp)?;
        if std::fs::hard_link(&other, &tmp).is_err() && std::fs::copy(&other, &tmp).is_err() {
            continue;
        }
        match file_digest(&tmp) {
            Ok((n, d)) if n == size && d == sha => {
                std::fs::rename(&tmp, &final_path).map_err(|e| EdgeError::io(&final_path, e))?;
                sync_dir(&dir.join("blobs"));
                return Ok(true);
            }
            _ => remove(&tmp)?,
        }
    }
    Ok(false)
}

/// The distinct (sha256, size) blobs a selection needs, stem and head first.
pub fn needed_blobs(m: &Manifest, sel: &BlobSelection) -> Result<Vec<(String, u64)>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut add = |sha: &str, size: u64| {
        if seen.insert(sha.to_string()) {
            out.push((sha.to_string(), size));
        }
    };
    match sel {
        BlobSelection::All => {
            for (_, e) in m.modules() {
                add(&e.sha256, e.size);
            }
        }
        BlobSelection::Subnets(list) => {
            add(&m.stem.sha256, m.stem.size);
            add(&m.head.sha256, m.head.size);
            for s in list {
                for (_, e) in m.modules_for(s)? {
                    add(&e.sha256, e.size);
                }
            }
        }
    }
    Ok(out)
}

impl CloudClient {
    /// Desired state, then [`CloudClient::sync_supernet`] on it.
    pub async fn sync(
        &self,
        cache: &Path,
        sel: &BlobSelection,
        opts: &SyncOptions,
    ) -> Result<SyncReport> {
        let desired = self.desired_state().await?;
        self.sync_supernet(&desired, cache, sel, opts).await
    }

    /// Fetches the desired supernet's manifest and the selected blobs into
    /// `<cache>/<supernet id>/` (see the module docs) and returns that directory.
    pub async fn sync_supernet(
        &self,
        desired: &super::DesiredState,
        cache: &Path,
        sel: &BlobSelection,
        opts: &SyncOptions,
    ) -> Result<SyncReport> {
        if desired.supernet_id.is_empty() {
            return Err(EdgeError::Cloud {
                op: "GetDesiredState",
                code: tonic::Code::FailedPrecondition,
                message: "the fleet has no desired supernet yet".into(),
            });
        }
        uuid::Uuid::parse_str(&desired.supernet_id).map_err(|_| {
            EdgeError::config(
                "desired supernet_id",
                format!("{:?} is not a UUID", desired.supernet_id),
            )
        })?;
        let mut attempt = 0;
        let resp = loop {
            match self.manifest(&desired.supernet_id).await {
                Ok(r) => break r,
                Err(e) if e.is_transient() && attempt + 1 < opts.max_attempts.max(1) => {
                    attempt += 1;
                    tracing::warn!("fetching the manifest: {e}; retrying");
                    tokio::time::sleep(opts.backoff(attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let digest = sha256_hex(&resp.manifest_json);
        let expected = resp
            .supernet
            .as_ref()
            .map(|s| s.manifest_sha256.as_str())
            .filter(|s| !s.is_empty())
            .or(Some(desired.manifest_sha256.as_str()).filter(|s| !s.is_empty()));
        if let Some(want) = expected {
            if want != digest {
                return Err(EdgeError::BlobMismatch {
                    sha256: want.to_string(),
                    reason: format!("manifest digest is {digest}"),
                });
            }
        }
        let manifest = Manifest::from_json(&resp.manifest_json)?;
        let dir = cache.join(&desired.supernet_id);
        let blobs_dir = dir.join("blobs");
        std::fs::create_dir_all(&blobs_dir).map_err(|e| EdgeError::io(&blobs_dir, e))?;
        let needed = needed_blobs(&manifest, sel)?;
        let mut stats = DownloadStats {
            blobs_needed: needed.len(),
            ..DownloadStats::default()
        };
        for (sha, size) in &needed {
            if let Some(r) = resp.blobs.iter().find(|b| &b.sha256 == sha) {
                if r.size_bytes != *size {
                    return Err(EdgeError::BlobMismatch {
                        sha256: sha.clone(),
                        reason: format!(
                            "manifest says {size} bytes, the cloud lists {}",
                            r.size_bytes
                        ),
                    });
                }
            }
            if !blob_path(&dir, sha).exists() && link_from_siblings(&dir, sha, *size)? {
                stats.blobs_linked += 1;
                continue;
            }
            self.fetch_blob(&dir, sha, *size, opts, &mut stats).await?;
        }
        let mpath = dir.join("manifest.json");
        let same = std::fs::read(&mpath).is_ok_and(|b| b == resp.manifest_json);
        if !same {
            write_atomic(&mpath, &resp.manifest_json)?;
        }
        write_current(cache, &desired.supernet_id, desired.generation)?;
        Ok(SyncReport {
            dir,
            supernet_id: desired.supernet_id.clone(),
            supernet_version: resp.supernet.as_ref().map_or(0, |s| s.version),
            generation: desired.generation,
            budget: desired.budget,
            reason: desired.reason,
            rollout_id: desired.rollout_id.clone(),
            manifest,
            stats,
        })
    }

    /// Ensures `blobs/<sha256>` holds the verified blob (see the module docs).
    pub async fn fetch_blob(
        &self,
        dir: &Path,
        sha: &str,
        size: u64,
        opts: &SyncOptions,
        stats: &mut DownloadStats,
    ) -> Result<()> {
        let final_path = blob_path(dir, sha);
        let blobs_dir = dir.join("blobs");
        std::fs::create_dir_all(&blobs_dir).map_err(|e| EdgeError::io(&blobs_dir, e))?;
        if final_path.exists() {
            let (n, d) = file_digest(&final_path)?;
            if n == size && d == sha {
                stats.blobs_skipped += 1;
                return Ok(());
            }
            tracing::warn!(
                "cached blob {sha} is corrupt ({n} bytes, sha256 {d}); fetching it again"
            );
            remove(&final_path)?;
            stats.cached_corrupt += 1;
        }
        stats.blobs_downloaded += 1;
        let part = part_path(dir, sha);
        let mut attempt = 0u32;
        loop {
            match self.download_once(&part, sha, size, opts, stats).await {
                Ok(()) => {
                    std::fs::rename(&part, &final_path)
                        .map_err(|e| EdgeError::io(&final_path, e))?;
                    sync_dir(&dir.join("blobs"));
                    return Ok(());
                }
                Err(e) if e.is_transient() && attempt + 1 < opts.max_attempts.max(1) => {
                    attempt += 1;
                    stats.retries += 1;
                    let wait = opts.backoff(attempt);
                    tracing::warn!("blob {sha}: {e}; retry {attempt} in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: continue `.part` from its length, then verify it whole.
    async fn download_once(
        &self,
        part: &Path,
        sha: &str,
        size: u64,
        opts: &SyncOptions,
        stats: &mut DownloadStats,
    ) -> Result<()> {
        let mut held = file_len(part)?;
        if held > size {
            remove(part)?;
            stats.restarts_from_zero += 1;
            held = 0;
        }
        if held < size {
            if held > 0 {
                stats.resumed += 1;
            }
            let req = self.request(
                pb::DownloadBlobRequest {
                    sha256: sha.to_string(),
                    offset: held,
                    chunk_size: opts.chunk_size,
                },
                true,
                opts.stream_deadline,
            )?;
            let mut c = self.raw();
            let interrupted = |held: u64, reason: String| EdgeError::Interrupted {
                sha256: sha.to_string(),
                held,
                size,
                reason,
            };
            let mut stream = match tokio::time::timeout(self.deadline(), c.download_blob(req)).await
            {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => return Err(status_err("DownloadBlob", s)),
                Err(_) => return Err(interrupted(held, "no answer within the deadline".into())),
            };
            stats.streams += 1;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(part)
                .map_err(|e| EdgeError::io(part, e))?;
            let mut chunks = 0usize;
            loop {
                if opts.break_after_chunks.is_some_and(|k| chunks >= k) {
                    drop(stream);
                    f.sync_all().map_err(|e| EdgeError::io(part, e))?;
                    return Err(interrupted(
                        held,
                        format!("stream dropped after {chunks} chunks"),
                    ));
                }
                let msg = match tokio::time::timeout(self.deadline(), stream.message()).await {
                    Err(_) => {
                        f.sync_all().map_err(|e| EdgeError::io(part, e))?;
                        return Err(interrupted(held, "no chunk within the deadline".into()));
                    }
                    Ok(Err(s)) => {
                        f.sync_all().map_err(|e| EdgeError::io(part, e))?;
                        return Err(status_err("DownloadBlob", s));
                    }
                    Ok(Ok(None)) => {
                        f.sync_all().map_err(|e| EdgeError::io(part, e))?;
                        return Err(interrupted(
                            held,
                            "stream ended before the last chunk".into(),
                        ));
                    }
                    Ok(Ok(Some(m))) => m,
                };
                chunks += 1;
                stats.bytes_received += msg.data.len() as u64;
                if msg.total_size != size {
                    drop(f);
                    remove(part)?;
                    stats.restarts_from_zero += 1;
                    return Err(EdgeError::BlobMismatch {
                        sha256: sha.to_string(),
                        reason: format!("cloud says {} bytes, manifest {size}", msg.total_size),
                    });
                }
                if msg.offset > held {
                    f.sync_all().map_err(|e| EdgeError::io(part, e))?;
                    return Err(interrupted(
                        held,
                        format!("chunk at offset {} leaves a gap", msg.offset),
                    ));
                }
                let skip = (held - msg.offset).min(msg.data.len() as u64);
                stats.bytes_resent += skip;
                let fresh = &msg.data[skip as usize..];
                if held + fresh.len() as u64 > size {
                    drop(f);
                    remove(part)?;
                    stats.restarts_from_zero += 1;
                    return Err(EdgeError::BlobMismatch {
                        sha256: sha.to_string(),
                        reason: "more data than the declared size".into(),
                    });
                }
                f.write_all(fresh).map_err(|e| EdgeError::io(part, e))?;
                held += fresh.len() as u64;
                if msg.last {
                    if !msg.sha256.is_empty() && msg.sha256 != sha {
                        drop(f);
                        remove(part)?;
                        stats.restarts_from_zero += 1;
                        return Err(EdgeError::BlobMismatch {
                            sha256: sha.to_string(),
                            reason: format!("the cloud's last chunk names sha256 {}", msg.sha256),
                        });
                    }
                    break;
                }
            }
            f.sync_all().map_err(|e| EdgeError::io(part, e))?;
        }
        let (n, d) = file_digest(part)?;
        if n != size || d != sha {
            remove(part)?;
            stats.restarts_from_zero += 1;
            return Err(EdgeError::BlobMismatch {
                sha256: sha.to_string(),
                reason: format!(
                    "downloaded {n} bytes with sha256 {d}; partial data deleted, fetching from 0"
                ),
            });
        }
        Ok(())
    }
}
