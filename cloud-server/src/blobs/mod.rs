//! Content-addressed blob storage (oracle weights, supernet modules, job checkpoints).
//!
//! Two backends behind one API: local disk (default) and an object store (`object.rs`:
//! S3/MinIO with the `s3` feature, `file://`, `memory://`).
//!
//! Local disk layout: `ROOT/sha256/ab/abcdef...` (final, immutable) and `ROOT/tmp/` (writes in
//! progress). A write goes to a temp file, is hashed while written, fsynced, checked against
//! the expected digest and renamed into place, then the directory is fsynced: a crash leaves
//! either no blob or the whole blob, never a part. A [`BlobWriter`] dropped before
//! [`BlobWriter::commit`] deletes its temp file, so failed uploads leave nothing behind.
//! With an object store, `ROOT/tmp/` is the same local scratch area and commit uploads the
//! verified file under its final key instead of renaming it, so the guarantee is the same.
mod object;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use uuid::Uuid;

use crate::domain::BlobRef;
use crate::error::{CloudError, Result};
use object::ObjectBackend;

pub use object::{BlobUrl, ObjectReader};

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The blob store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    /// Local backend: the store itself; object backend: the local scratch area.
    root: PathBuf,
    object: Option<ObjectBackend>,
}

impl BlobStore {
    /// Opens (creating) a local-disk store under `root` and clears stale temp files of a
    /// previous run.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let d = root.join("sha256");
        tokio::fs::create_dir_all(&d)
            .await
            .map_err(|e| CloudError::io(&d, e))?;
        Self::with_backend(root, None).await
    }

    /// Opens a store on an object store, blobs under `prefix`; `scratch` is the local
    /// directory for writes in progress (cleared of stale temp files).
    pub async fn open_object(
        store: Arc<dyn object_store::ObjectStore>,
        prefix: &str,
        scratch: impl Into<PathBuf>,
    ) -> Result<Self> {
        Self::with_backend(scratch.into(), Some(ObjectBackend::new(store, prefix))).await
    }

    /// Opens the object store a `--blob-url` names (see [`BlobUrl`]).
    pub async fn open_url(url: &str, scratch: impl Into<PathBuf>) -> Result<Self> {
        let backend = ObjectBackend::from_url(&BlobUrl::parse(url)?)?;
        Self::with_backend(scratch.into(), Some(backend)).await
    }

    async fn with_backend(root: PathBuf, object: Option<ObjectBackend>) -> Result<Self> {
        let d = root.join("tmp");
        tokio::fs::create_dir_all(&d)
            .await
            .map_err(|e| CloudError::io(&d, e))?;
        let store = BlobStore { root, object };
        store.clear_tmp().await?;
        Ok(store)
    }

    /// Where blobs live, for logs.
    pub fn describe(&self) -> String {
        match &self.object {
            None => format!("local disk {}", self.root.display()),
            Some(o) => format!("object store {}", o.describe()),
        }
    }

    /// The object key of a blob (object backend only).
    pub fn object_key(&self, sha256: &str) -> Option<object_store::path::Path> {
        self.object.as_ref().map(|o| o.key(sha256))
    }

    async fn clear_tmp(&self) -> Result<()> {
        let tmp = self.root.join("tmp");
        let mut rd = tokio::fs::read_dir(&tmp)
            .await
            .map_err(|e| CloudError::io(&tmp, e))?;
        while let Ok(Some(e)) = rd.next_entry().await {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
        Ok(())
    }

    /// The local root: the store itself, or the scratch area of an object-backed store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Final path of a blob in a local-disk store.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(&sha256[..2]).join(sha256)
    }

    /// Starts a write.
    pub async fn writer(&self) -> Result<BlobWriter> {
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.part", Uuid::new_v4()));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| CloudError::io(&tmp, e))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp: Some(tmp),
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Writes a whole blob from memory.
    pub async fn put(&self, data: &[u8]) -> Result<BlobRef> {
        let mut w = self.writer().await?;
        w.write(data).await?;
        w.commit(None).await
    }

    pub async fn exists(&self, sha256: &str) -> bool {
        if let Some(o) = &self.object {
            return matches!(o.head(sha256).await, Ok(Some(_)));
        }
        tokio::fs::metadata(self.path_of(sha256)).await.is_ok()
    }

    /// Size of a stored blob.
    pub async fn size(&self, sha256: &str) -> Result<u64> {
        if let Some(o) = &self.object {
            return o
                .head(sha256)
                .await?
                .ok_or_else(|| CloudError::not_found("blob", sha256));
        }
        let p = self.path_of(sha256);
        match tokio::fs::metadata(&p).await {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(CloudError::not_found("blob", sha256))
            }
            Err(e) => Err(CloudError::io(&p, e)),
        }
    }

    /// Reads a whole blob and checks its digest.
    pub async fn read(&self, sha256: &str) -> Result<Vec<u8>> {
        let data = match &self.object {
            Some(o) => o.get(sha256).await?,
            None => {
                let p = self.path_of(sha256);
                match tokio::fs::read(&p).await {
                    Ok(d) => d,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(CloudError::not_found("blob", sha256))
                    }
                    Err(e) => return Err(CloudError::io(&p, e)),
                }
            }
        };
        if sha256_hex(&data) != sha256 {
            return Err(CloudError::DataLoss(format!(
                "blob {sha256} fails its digest"
            )));
        }
        Ok(data)
    }

    /// Opens a blob positioned at `offset` (resumable downloads); returns a reader and the
    /// blob's total size.
    pub async fn open_at(&self, sha256: &str, offset: u64) -> Result<(BlobReader, u64)> {
        if let Some(o) = &self.object {
            let (r, size) = o.open_at(sha256, offset).await?;
            return Ok((BlobReader::Object(r), size));
        }
        let p = self.path_of(sha256);
        let mut f = match tokio::fs::File::open(&p).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CloudError::not_found("blob", sha256))
            }
            Err(e) => return Err(CloudError::io(&p, e)),
        };
        let size = f.metadata().await.map_err(|e| CloudError::io(&p, e))?.len();
        if offset > size {
            return Err(CloudError::invalid(
                "offset",
                format!("{offset} is beyond the blob size {size}"),
            ));
        }
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| CloudError::io(&p, e))?;
        Ok((BlobReader::File(f), size))
    }

    /// Reads up to `max` bytes from an open blob (fewer only at its end).
    pub async fn read_chunk(r: &mut BlobReader, max: usize) -> Result<Vec<u8>> {
        let f = match r {
            BlobReader::File(f) => f,
            BlobReader::Object(o) => return o.read_chunk(max).await,
        };
        let mut buf = vec![0u8; max];
        let mut n = 0;
        while n < max {
            let k = f
                .read(&mut buf[n..])
                .await
                .map_err(|e| CloudError::io("blob", e))?;
            if k == 0 {
                break;
            }
            n += k;
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// Deletes a blob (used when its only owner is deleted).
    pub async fn delete(&self, sha256: &str) -> Result<()> {
        if let Some(o) = &self.object {
            return o.delete(sha256).await;
        }
        let p = self.path_of(sha256);
        match tokio::fs::remove_file(&p).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CloudError::io(&p, e)),
        }
    }
}

/// An open blob positioned for a ranged read ([`BlobStore::open_at`]).
#[derive(Debug)]
pub enum BlobReader {
    File(tokio::fs::File),
    Object(ObjectReader),
}

/// A blob being written; see the module docs for the atomicity protocol.
#[derive(Debug)]
pub struct BlobWriter {
    store: BlobStore,
    tmp: Option<PathBuf>,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| CloudError::Internal("write after commit".into()))?;
        f.write_all(data)
            .await
            .map_err(|e| CloudError::io(self.tmp.as_deref().unwrap_or(Path::new("tmp")), e))?;
        self.hasher.update(data);
        self.size += data.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Digest of what was written so far.
    pub fn digest(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// Completes the writes issued so far, so the temp file can be read by path.
    pub async fn flush(&mut self) -> Result<()> {
        if let (Some(f), Some(tmp)) = (self.file.as_mut(), self.tmp.as_ref()) {
            f.flush().await.map_err(|e| CloudError::io(tmp, e))?;
        }
        Ok(())
    }

    /// The uncommitted temp file (validation reads it in place; call [`Self::flush`] first).
    pub fn temp_path(&self) -> Option<&Path> {
        self.tmp.as_deref()
    }

    /// Reads back what was written so far (to validate it before committing). Flushes
    /// first: tokio's `File` completes writes in the background.
    pub async fn contents(&mut self) -> Result<Vec<u8>> {
        let tmp = self
            .tmp
            .clone()
            .ok_or_else(|| CloudError::Internal("read after commit".into()))?;
        if let Some(f) = self.file.as_mut() {
            f.flush().await.map_err(|e| CloudError::io(&tmp, e))?;
        }
        tokio::fs::read(&tmp)
            .await
            .map_err(|e| CloudError::io(&tmp, e))
    }

    /// Flushes what was written so far and returns the scratch file's path (to validate the
    /// content in place before committing).
    pub async fn flushed_path(&mut self) -> Result<PathBuf> {
        let tmp = self
            .tmp
            .clone()
            .ok_or_else(|| CloudError::Internal("read after commit".into()))?;
        if let Some(f) = self.file.as_mut() {
            f.flush().await.map_err(|e| CloudError::io(&tmp, e))?;
        }
        Ok(tmp)
    }

    /// fsyncs, checks the digest against `expected` (field name, digest) if given, and moves
    /// the blob into place. An existing blob with the same digest is kept as is.
    pub async fn commit(mut self, expected: Option<(&str, &str)>) -> Result<BlobRef> {
        let digest = self.digest();
        if let Some((field, want)) = expected {
            if want != digest {
                return Err(CloudError::invalid(
                    field,
                    format!("declared {want} but the content hashes to {digest}"),
                ));
            }
        }
        let tmp = self.tmp.clone().expect("tmp present until commit");
        let mut f = self.file.take().expect("file present until commit");
        f.flush().await.map_err(|e| CloudError::io(&tmp, e))?;
        f.sync_all().await.map_err(|e| CloudError::io(&tmp, e))?;
        drop(f);
        if let Some(o) = &self.store.object {
            // Verified above: only now does the blob appear under its key. The temp file
            // is removed when `self` drops.
            o.upload(&tmp, &digest, self.size).await?;
            return Ok(BlobRef {
                sha256: digest,
                size_bytes: self.size,
            });
        }
        let dst = self.store.path_of(&digest);
        let dir = dst.parent().expect("blob path has a parent").to_path_buf();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| CloudError::io(&dir, e))?;
        if tokio::fs::metadata(&dst).await.is_err() {
            tokio::fs::rename(&tmp, &dst)
                .await
                .map_err(|e| CloudError::io(&dst, e))?;
            self.tmp = None;
            let d = dir.clone();
            tokio::task::spawn_blocking(move || std::fs::File::open(&d).and_then(|f| f.sync_all()))
                .await
                .map_err(|e| CloudError::Internal(e.to_string()))?
                .map_err(|e| CloudError::io(&dir, e))?;
        }
        Ok(BlobRef {
            sha256: digest,
            size_bytes: self.size,
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            // Synchronous remove: cheap, and must happen even when no runtime is polling.
            let _ = std::fs::remove_file(tmp);
        }
    }
}
