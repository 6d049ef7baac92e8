//! The object-storage backend of the blob store (`object_store`): S3 and S3-compatible stores
//! such as MinIO (cargo feature `s3`), a local directory through `LocalFileSystem`
//! (`file:///dir`) and an in-memory store (`memory://`, tests and demos).
//!
//! Key layout: `PREFIX/sha256/ab/abcdef...`. Writes in progress live in a local scratch file
//! (see [`super::BlobWriter`]); only a complete, digest-verified blob is uploaded, with one
//! `put` (atomic on every store) or, when large, a multipart upload, which no reader sees
//! before it completes. Abandoned multipart parts after a crash are the store's business
//! (S3: an `AbortIncompleteMultipartUpload` lifecycle rule).
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::error::{CloudError, Result};

/// Blobs up to this size go up in one `put`; larger ones as a multipart upload.
const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Multipart part size (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 << 20;
/// Parts uploading at once per blob (bounds memory to about this many parts).
const PART_CONCURRENCY: usize = 2;

/// An object store plus the key prefix the blobs live under.
#[derive(Debug, Clone)]
pub(super) struct ObjectBackend {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

/// What a `--blob-url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobUrl {
    /// `s3://bucket/prefix`.
    S3 { bucket: String, prefix: String },
    /// `file:///absolute/dir`.
    File(std::path::PathBuf),
    /// `memory://` (contents vanish with the process).
    Memory,
}

impl BlobUrl {
    /// Parses a blob URL; errors name the `blob_url` field.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |why: &str| CloudError::invalid("blob_url", format!("{url:?}: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected s3://bucket/prefix or file:///dir"))?;
        match scheme {
            "s3" | "s3a" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("missing bucket name"));
                }
                Ok(BlobUrl::S3 {
                    bucket: bucket.to_string(),
                    prefix: prefix.trim_matches('/').to_string(),
                })
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("file URLs need an absolute path (file:///dir)"));
                }
                Ok(BlobUrl::File(rest.into()))
            }
            "memory" => Ok(BlobUrl::Memory),
            _ => Err(bad(
                "unsupported scheme; use s3://bucket/prefix or file:///dir",
            )),
        }
    }
}

impl ObjectBackend {
    pub(super) fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        ObjectBackend {
            store,
            prefix: prefix.trim_matches('/').to_string(),
        }
    }

    /// Connects the store a URL names. S3 credentials, region and endpoint come from the
    /// standard `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for MinIO).
    pub(super) fn from_url(url: &BlobUrl) -> Result<Self> {
        match url {
            BlobUrl::S3 { bucket, prefix } => s3(bucket, prefix),
            BlobUrl::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| CloudError::io(dir, e))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| CloudError::invalid("blob_url", e.to_string()))?
                    .with_fsync(true);
                Ok(Self::new(Arc::new(fs), ""))
            }
            BlobUrl::Memory => Ok(Self::new(
                Arc::new(object_store::memory::InMemory::new()),
                "",
            )),
        }
    }

    /// The key of a blob.
    pub(super) fn key(&self, sha256: &str) -> Key {
        let rel = format!("sha256/{}/{sha256}", &sha256[..2]);
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    pub(super) fn describe(&self) -> String {
        format!("{} (prefix {:?})", self.store, self.prefix)
    }

    /// Size of a stored blob, `None` if absent.
    pub(super) async fn head(&self, sha256: &str) -> Result<Option<u64>> {
        let key = self.key(sha256);
        match self.store.head(&key).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage_error(&key, e)),
        }
    }

    pub(super) async fn get(&self, sha256: &str) -> Result<Vec<u8>> {
        let key = self.key(sha256);
        let r = self
            .store
            .get(&key)
            .await
            .map_err(|e| not_found_or(sha256, &key, e))?;
        let b = r.bytes().await.map_err(|e| not_found_or(sha256, &key, e))?;
        Ok(b.to_vec())
    }

    /// Every blob under the prefix (keys that are not digests are skipped).
    pub(super) async fn list(&self) -> Result<Vec<super::StoredBlob>> {
        let base = if self.prefix.is_empty() {
            Key::from("sha256")
        } else {
            Key::from(format!("{}/sha256", self.prefix))
        };
        let mut s = self.store.list(Some(&base));
        let mut out = Vec::new();
        while let Some(m) = s.next().await {
            let m = m.map_err(|e| storage_error(&base, e))?;
            let Some(name) = m.location.filename() else {
                continue;
            };
            if !super::is_digest(name) {
                continue;
            }
            out.push(super::StoredBlob {
                sha256: name.to_string(),
                size_bytes: m.size,
                modified: m.last_modified.into(),
            });
        }
        Ok(out)
    }

    pub(super) async fn delete(&self, sha256: &str) -> Result<()> {
        let key = self.key(sha256);
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_error(&key, e)),
        }
    }

    /// Uploads a complete, verified local file under its digest's key (skipped when the
    /// key exists: same digest, same bytes).
    pub(super) async fn upload(&self, file: &Path, sha256: &str, size: u64) -> Result<()> {
        if self.head(sha256).await?.is_some() {
            return Ok(());
        }
        let key = self.key(sha256);
        if size <= SINGLE_PUT_MAX {
            let data = tokio::fs::read(file)
                .await
                .map_err(|e| CloudError::io(file, e))?;
            self.store
                .put(&key, data.into())
                .await
                .map_err(|e| storage_error(&key, e))?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(&key)
            .await
            .map_err(|e| storage_error(&key, e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut f = match tokio::fs::File::open(file).await {
            Ok(f) => f,
            Err(e) => {
                let _ = w.abort().await;
                return Err(CloudError::io(file, e));
            }
        };
        loop {
            let mut buf = vec![0u8; PART_SIZE];
            let n = match read_full(&mut f, &mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(CloudError::io(file, e));
                }
            };
            if n == 0 {
                break;
            }
            buf.truncate(n);
            if let Err(e) = w.wait_for_capacity(PART_CONCURRENCY).await {
                let _ = w.abort().await;
                return Err(storage_error(&key, e));
            }
            w.put(Bytes::from(buf));
        }
        // `finish` aborts the upload itself when a part or the completion fails.
        w.finish().await.map_err(|e| storage_error(&key, e))?;
        Ok(())
    }

    /// A reader from `offset` to the end: one ranged GET streamed in whatever pieces the
    /// store delivers (re-chunked by [`ObjectReader::read_chunk`]).
    pub(super) async fn open_at(&self, sha256: &str, offset: u64) -> Result<(ObjectReader, u64)> {
        let key = self.key(sha256);
        let size = self
            .head(sha256)
            .await?
            .ok_or_else(|| CloudError::not_found("blob", sha256))?;
        if offset > size {
            return Err(CloudError::invalid(
                "offset",
                format!("{offset} is beyond the blob size {size}"),
            ));
        }
        let stream = if offset == size {
            None
        } else {
            let opts = GetOptions {
                range: Some(GetRange::Offset(offset)),
                ..Default::default()
            };
            let r = self
                .store
                .get_opts(&key, opts)
                .await
                .map_err(|e| not_found_or(sha256, &key, e))?;
            check_range(&key, &r.range, offset..size)?;
            Some(r.into_stream())
        };
        Ok((
            ObjectReader {
                key,
                stream,
                pending: Bytes::new(),
            },
            size,
        ))
    }
}

/// An open ranged read (see [`ObjectBackend::open_at`]).
pub struct ObjectReader {
    key: Key,
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    pending: Bytes,
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectReader")
            .field("key", &self.key)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl ObjectReader {
    /// Up to `max` bytes; fewer only at the end of the blob.
    pub(super) async fn read_chunk(&mut self, max: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(max.min(self.pending.len().max(1 << 16)));
        while out.len() < max {
            if self.pending.is_empty() {
                let Some(s) = self.stream.as_mut() else { break };
                match s.next().await {
                    Some(Ok(b)) => self.pending = b,
                    Some(Err(e)) => return Err(storage_error(&self.key, e)),
                    None => {
                        self.stream = None;
                        break;
                    }
                }
                continue;
            }
            let k = (max - out.len()).min(self.pending.len());
            out.extend_from_slice(&self.pending.split_to(k));
        }
        Ok(out)
    }
}

fn check_range(key: &Key, got: &Range<u64>, want: Range<u64>) -> Result<()> {
    if *got != want {
        return Err(CloudError::Internal(format!(
            "object store returned range {got:?} of {key} for {want:?}"
        )));
    }
    Ok(())
}

async fn read_full(f: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn not_found_or(sha256: &str, key: &Key, e: object_store::Error) -> CloudError {
    match e {
        object_store::Error::NotFound { .. } => CloudError::not_found("blob", sha256),
        e => storage_error(key, e),
    }
}

/// Store failures (network, credentials, throttling) are logged with detail and reach
/// clients as UNAVAILABLE without it: retrying later is the right reaction.
fn storage_error(key: &Key, e: object_store::Error) -> CloudError {
    tracing::warn!(%key, error = %e, "object store request failed");
    CloudError::Unavailable("blob storage is unavailable; retry later".into())
}

fn s3(bucket: &str, prefix: &str) -> Result<ObjectBackend> {
    Ok(ObjectBackend::new(s3_store(bucket, "blob_url")?, prefix))
}

/// An S3 client for `bucket`, configured from the standard `AWS_*` variables (endpoint,
/// region, credentials); errors name `field`. The blob store and `s3://` dataset
/// registration share it, so one set of variables configures both.
#[cfg(feature = "s3")]
pub fn s3_store(bucket: &str, field: &str) -> Result<Arc<dyn ObjectStore>> {
    let s3 = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()
        .map_err(|e| CloudError::invalid(field, format!("S3 configuration: {e}")))?;
    Ok(Arc::new(s3))
}

/// Without the `s3` feature there is no S3 client: refused naming `field`.
#[cfg(not(feature = "s3"))]
pub fn s3_store(_bucket: &str, field: &str) -> Result<Arc<dyn ObjectStore>> {
    Err(CloudError::invalid(
        field,
        "this server was built without S3 support (rebuild with cargo feature `s3`)",
    ))
}
