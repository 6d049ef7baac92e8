//! Server side of `UploadDataset`, independent of the wire types: the service feeds it the
//! stream's messages in order and calls [`Upload::finish`].
//!
//! Shards go to uncommitted blob writers (scratch files, dropped on any error), so nothing is
//! visible until every entry has been validated; then shards, manifest and row are committed
//! in that order (blobs first: a row never points at a missing blob).
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use super::check::{self, EntrySource};
use super::{
    dataset_row, insert_or_existing, DatasetFormat, DatasetOptions, Entry, Manifest, ShardRef,
    BLOB_SCHEME,
};
use crate::app::App;
use crate::blobs::BlobWriter;
use crate::domain::{check_name, check_sha256, Dataset};
use crate::error::{CloudError, Result};

/// Largest shard accepted (a worker holds one shard in memory while materialising).
pub const MAX_SHARD_BYTES: u64 = 256 << 20;
/// Largest manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;

/// An upload in progress.
#[derive(Debug)]
pub struct Upload {
    app: App,
    name: String,
    format: DatasetFormat,
    options: DatasetOptions,
    declared_total: u64,
    received: u64,
    shards: Vec<(ShardRef, BlobWriter)>,
    manifest: Vec<u8>,
}

impl Upload {
    /// Checks the header: name, format, options and the declared size against the limit.
    pub fn begin(
        app: &App,
        name: &str,
        format: &str,
        total_bytes: u64,
        options: DatasetOptions,
    ) -> Result<Self> {
        check_name("header.name", name)?;
        let format = DatasetFormat::parse("header.format", format)?;
        options.validate()?;
        let limit = app.config().max_dataset_bytes;
        if total_bytes == 0 {
            return Err(CloudError::invalid(
                "header.total_bytes",
                "must be positive",
            ));
        }
        if total_bytes > limit {
            return Err(CloudError::invalid(
                "header.total_bytes",
                format!("{total_bytes} bytes exceeds the dataset limit of {limit} bytes"),
            ));
        }
        Ok(Upload {
            app: app.clone(),
            name: name.to_string(),
            format,
            options,
            declared_total: total_bytes,
            received: 0,
            shards: Vec::new(),
            manifest: Vec::new(),
        })
    }

    /// Checks that the current shard (if any) is complete and matches its digest.
    fn close_shard(&self) -> Result<()> {
        if let Some((r, w)) = self.shards.last() {
            let n = self.shards.len() - 1;
            if w.size() != r.size {
                return Err(CloudError::invalid(
                    format!("shard {n}"),
                    format!("received {} of {} bytes", w.size(), r.size),
                ));
            }
            if w.digest() != r.sha256 {
                return Err(CloudError::invalid(
                    format!("shard {n}"),
                    format!(
                        "declared {} but the content hashes to {}",
                        r.sha256,
                        w.digest()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Announces the next shard.
    pub async fn start_shard(&mut self, sha256: &str, size: u64) -> Result<()> {
        if !self.manifest.is_empty() {
            return Err(CloudError::invalid("shard", "shard after the manifest"));
        }
        self.close_shard()?;
        let n = self.shards.len();
        check_sha256(&format!("shard {n}.sha256"), sha256)?;
        if size == 0 || size > MAX_SHARD_BYTES {
            return Err(CloudError::invalid(
                format!("shard {n}.size_bytes"),
                format!("{size} (1..={MAX_SHARD_BYTES})"),
            ));
        }
        let w = self.app.blobs().writer().await?;
        self.shards.push((
            ShardRef {
                sha256: sha256.to_string(),
                size,
            },
            w,
        ));
        Ok(())
    }

    /// Bytes of the current shard.
    pub async fn chunk(&mut self, data: &[u8]) -> Result<()> {
        let limit = self.app.config().max_dataset_bytes;
        self.received += data.len() as u64;
        if self.received > self.declared_total {
            return Err(CloudError::invalid(
                "chunk",
                format!(
                    "more bytes than the declared header.total_bytes {} (limit {limit})",
                    self.declared_total
                ),
            ));
        }
        let n = self.shards.len().saturating_sub(1);
        let (r, w) = self
            .shards
            .last_mut()
            .ok_or_else(|| CloudError::invalid("chunk", "chunk before any shard"))?;
        if w.size() + data.len() as u64 > r.size {
            return Err(CloudError::invalid(
                format!("shard {n}"),
                format!("more bytes than its declared size {}", r.size),
            ));
        }
        w.write(data).await
    }

    /// A piece of the manifest JSON (after the last shard).
    pub fn manifest_chunk(&mut self, data: &[u8]) -> Result<()> {
        if self.manifest.len() + data.len() > MAX_MANIFEST_BYTES {
            return Err(CloudError::invalid(
                "manifest",
                format!("larger than {MAX_MANIFEST_BYTES} bytes"),
            ));
        }
        self.manifest.extend_from_slice(data);
        Ok(())
    }

    /// Verifies and validates everything, then commits; returns the dataset and whether it
    /// was created (false: the same content was uploaded before).
    pub async fn finish(mut self) -> Result<(Dataset, bool)> {
        self.close_shard()?;
        if self.received != self.declared_total {
            return Err(CloudError::invalid(
                "header.total_bytes",
                format!(
                    "upload truncated: received {} of {} bytes",
                    self.received, self.declared_total
                ),
            ));
        }
        if self.manifest.is_empty() {
            return Err(CloudError::invalid(
                "manifest",
                "stream ended without a manifest",
            ));
        }
        let manifest: Manifest = serde_json::from_slice(&self.manifest)
            .map_err(|e| CloudError::invalid("manifest", e.to_string()))?;
        if manifest.format != self.format {
            return Err(CloudError::invalid(
                "manifest.format",
                format!(
                    "{} but header.format is {}",
                    manifest.format.as_str(),
                    self.format.as_str()
                ),
            ));
        }
        let sent: Vec<ShardRef> = self.shards.iter().map(|(r, _)| r.clone()).collect();
        if manifest.shards != sent {
            return Err(CloudError::invalid(
                "manifest.shards",
                "do not match the shards streamed",
            ));
        }
        let shards = std::mem::take(&mut self.shards);
        commit_validated(
            &self.app,
            &self.name,
            self.format,
            &self.options,
            manifest,
            shards,
        )
        .await
    }
}

/// The last step of every dataset that arrives as shards (an upload, or objects fetched for an
/// `s3://` registration): `shards` are uncommitted blob writers matching `manifest.shards`.
/// Returns the existing dataset if the digest is known; otherwise validates every entry from
/// the scratch files and only then commits shards, manifest and row, in that order (a row
/// never points at a missing blob, and a refusal leaves nothing behind: dropped writers
/// delete their scratch files).
pub(super) async fn commit_validated(
    app: &App,
    name: &str,
    format: DatasetFormat,
    options: &DatasetOptions,
    manifest: Manifest,
    mut shards: Vec<(ShardRef, BlobWriter)>,
) -> Result<(Dataset, bool)> {
    let digest = manifest.digest();
    let store = app.store();
    if let Some(existing) = store.dataset_by_digest(&digest).await? {
        return Ok((existing, false));
    }
    for (_, w) in shards.iter_mut() {
        w.flush().await?;
    }
    let paths: Vec<PathBuf> = shards
        .iter()
        .map(|(_, w)| {
            w.temp_path()
                .map(PathBuf::from)
                .ok_or_else(|| CloudError::Internal("shard already committed".into()))
        })
        .collect::<Result<_>>()?;
    let m2 = manifest.clone();
    let rec = tokio::task::spawn_blocking(move || check::validate(&m2, &ShardSource(paths)))
        .await
        .map_err(|e| CloudError::Internal(format!("dataset validation task: {e}")))??;
    let row = dataset_row(
        name.to_string(),
        format!("{BLOB_SCHEME}{digest}"),
        format,
        digest.clone(),
        &rec,
        options,
    )?;
    if store.dataset_by_name(name).await?.is_some() {
        return Err(CloudError::AlreadyExists {
            kind: "dataset",
            id: name.to_string(),
        });
    }
    // Commit: remember which blobs are new so a failed insert can take them back.
    let blobs = app.blobs().clone();
    let mut new_blobs = Vec::new();
    for (r, w) in shards {
        let existed = blobs.exists(&r.sha256).await;
        w.commit(Some(("shard.sha256", &r.sha256))).await?;
        if !existed {
            new_blobs.push(r.sha256);
        }
    }
    let canonical = manifest.canonical_json();
    if !blobs.exists(&digest).await {
        blobs.put(&canonical).await?;
        new_blobs.push(digest.clone());
    }
    match insert_or_existing(app, &row).await {
        Ok(r) => {
            tracing::info!(dataset = %r.0.id, digest = %digest, created = r.1, "dataset stored");
            Ok(r)
        }
        Err(e) => {
            for b in new_blobs {
                let _ = blobs.delete(&b).await;
            }
            Err(e)
        }
    }
}

/// Reads entries from the uncommitted shard files of an upload.
struct ShardSource(Vec<PathBuf>);

impl EntrySource for ShardSource {
    fn read(&self, e: &Entry) -> Result<Vec<u8>> {
        let p = &self.0[e.shard as usize];
        let mut f = std::fs::File::open(p).map_err(|err| CloudError::io(p, err))?;
        f.seek(SeekFrom::Start(e.offset))
            .map_err(|err| CloudError::io(p, err))?;
        let mut buf = vec![0u8; e.size as usize];
        f.read_exact(&mut buf)
            .map_err(|err| CloudError::io(p, err))?;
        check::verify_entry(e, &buf)?;
        Ok(buf)
    }
}
