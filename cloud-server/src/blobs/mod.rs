//! Content-addressed blob storage (oracle weights, supernet modules, job checkpoints).
//!
//! Two backends behind one API: local disk (default) and an object store (`object.rs`:
//! S3/MinIO with the `s3` feature, `file://`, `memory://`).
//!
//! Local disk layout: `ROOT/sha256/ab/abcdef...` (final, immutable) and `ROOT/tmp/p-<id>/`
//! (writes in progress, one locked directory per process: see `scratch.rs`; processes share
//! `ROOT`, so none may touch another live one's files). A write goes to a temp file, is
//! hashed while written, fsynced, checked against the expected digest and renamed into
//! place, then the directory is fsynced: a crash leaves either no blob or the whole blob,
//! never a part. A [`BlobWriter`] dropped before [`BlobWriter::commit`] deletes its temp
//! file, so failed uploads leave nothing behind. With an object store, `ROOT/tmp/` is the
//! same local scratch area and commit uploads the verified file under its final key instead
//! of renaming it, so the guarantee is the same.

mod object;
mod scratch;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use uuid::Uuid;

use crate::domain::BlobRef;
use crate::error::{CloudError, Result};
use object::ObjectBackend;
use scratch::Scratch;

pub use object::{s3_store, BlobUrl, ObjectReader};

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
    /// This process's locked scratch directory under `ROOT/tmp`.
    scratch: Arc<Scratch>,
}

/// A stored blob as listed for garbage collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub sha256: String,
    pub size_bytes: u64,
    /// When it was last written (local disk: also when a writer last found it present).
    pub modified: SystemTime,
}

impl BlobStore {
    /// Opens (creating) a local-disk store under `root` and removes the scratch directories
    /// of processes that exited (never those of live ones sharing `root`).
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let d = root.join("sha256");
        tokio::fs::create_dir_all(&d)
            .await
            .map_err(|e| CloudError::io(&d, e))?;
        Self::with_backend(root, None).await
    }

    /// Opens a store on an object store, blobs under `prefix`; `scratch` is the local
    /// directory for writes in progress (cleared of exited processes' temp files).
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
        let tmp = root.join("tmp");
        let scratch = tokio::task::spawn_blocking(move || Scratch::create(&tmp))
            .await
            .map_err(|e| CloudError::Internal(format!("scratch setup: {e}")))??;
        Ok(BlobStore {
            root,
            object,
            scratch: Arc::new(scratch),
        })
    }

    /// This process's scratch directory (same file system as a local store).
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.dir()
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
        let tmp = self.scratch.dir().join(format!("{}.part", Uuid::new_v4()));
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

    /// Every stored blob with its size and modification time (garbage collection).
    pub async fn list(&self) -> Result<Vec<StoredBlob>> {
        if let Some(o) = &self.object {
            return o.list().await;
        }
        let root = self.root.join("sha256");
        tokio::task::spawn_blocking(move || list_local(&root))
            .await
            .map_err(|e| CloudError::Internal(format!("listing blobs: {e}")))?
    }

    /// Deletes a blob unless it was modified after `cutoff`: a writer that found the blob
    /// present refreshes its time (local disk), so a collector that decided from an older
    /// listing leaves it alone. Returns whether it was deleted.
    pub async fn delete_if_older(&self, sha256: &str, cutoff: SystemTime) -> Result<bool> {
        if self.object.is_none() {
            let p = self.path_of(sha256);
            match tokio::fs::metadata(&p).await.and_then(|m| m.modified()) {
                Ok(t) if t > cutoff => return Ok(false),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(CloudError::io(&p, e)),
            }
        }
        self.delete(sha256).await?;
        Ok(true)
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

/// Whether `name` is a lowercase hex sha256 (the only names the store writes).
fn is_digest(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn list_local(root: &Path) -> Result<Vec<StoredBlob>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(CloudError::io(root, e)),
    };
    for shard in rd.flatten() {
        let Ok(files) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if !is_digest(&name) {
                continue;
            }
            // Deleted concurrently: not listed.
            let Ok(m) = f.metadata() else { continue };
            out.push(StoredBlob {
                sha256: name,
                size_bytes: m.len(),
                modified: m.modified().map_err(|e| CloudError::io(f.path(), e))?,
            });
        }
    }
    Ok(out)
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
        if tokio::fs::metadata(&dst).await.is_ok() {
            // Present already: mark it as just written, so a garbage collector that listed
            // it as old before this writer's reference lands leaves it alone.
            let d = dst.clone();
            let _ = tokio::task::spawn_blocking(move || {
                std::fs::File::options()
                    .write(true)
                    .open(&d)
                    .and_then(|f| f.set_modified(SystemTime::now()))
            })
            .await;
        } else {
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
