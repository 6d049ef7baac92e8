//! Datasets as first-class objects: uploaded over gRPC or registered in place, validated
//! before anything is recorded, and materialised on any worker from the blob store.
//!
//! - Upload ([`upload::Upload`]): the client packs a directory ([`pack`]) into
//!   content-addressed shards (entries concatenated) plus a [`Manifest`] that lists every
//!   entry's path, size, sha256 and place in a shard. Shards stream into uncommitted blob
//!   writers (scratch files, never the whole upload in memory); every entry is validated
//!   ([`check`]) and only then are shards and manifest committed and the row inserted. The
//!   dataset digest is the sha256 of the canonical manifest JSON, so the same content uploads
//!   once.
//! - Registration ([`register`]): `file://` paths under the configured dataset root only
//!   (symlinks and `..` cannot leave it), validated the same way and read in place; or
//!   `s3://bucket/prefix` under an allowed S3 location ([`s3`]): the objects are fetched and
//!   stored as the same shards and manifest an upload of them would produce.
//! - [`materialise`]: a local directory with the dataset's files for a job.
use std::path::{Component, Path, PathBuf};

use adaptivenet_core::data::{AugmentPolicy, InputSpec, ResizePolicy};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::app::App;
use crate::blobs::BlobStore;
use crate::domain::{check_name, now_ms, Dataset};
use crate::error::{CloudError, Result};

pub mod check;
pub mod pack;
pub mod s3;
pub mod upload;

/// URI scheme of uploaded datasets: `blob://<manifest sha256>`.
pub const BLOB_SCHEME: &str = "blob://";

/// How a dataset's files are laid out (the training path reads both).
pub use adaptivenet_train::DatasetFormat;

/// The content of a dataset: its digest is the sha256 of [`Manifest::canonical_json`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// 1.
    pub version: u32,
    pub format: DatasetFormat,
    /// Every directory, relative and `/`-separated, so that an empty class folder is seen.
    #[serde(default)]
    pub dirs: Vec<String>,
    /// Files sorted by path.
    pub entries: Vec<Entry>,
    /// Uploads: the shards in order. Registered data: empty (entries are read in place).
    #[serde(default)]
    pub shards: Vec<ShardRef>,
}

/// One file of a dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Index into [`Manifest::shards`] and byte offset there (0 for registered data).
    #[serde(default)]
    pub shard: u32,
    #[serde(default)]
    pub offset: u64,
}

/// A shard blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRef {
    pub sha256: String,
    pub size: u64,
}

impl Manifest {
    /// The bytes whose sha256 is the dataset digest (serde's field order: deterministic).
    pub fn canonical_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serialises")
    }

    /// The dataset digest.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json()))
    }
}

/// The preprocessing a developer chooses at upload or registration; the rest is computed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatasetOptions {
    pub augment: AugmentPolicy,
    /// Empty: computed over the training split.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Model input `(height, width)`; `None`: the most common image size.
    pub size: Option<(usize, usize)>,
}

impl DatasetOptions {
    /// Checks what can be checked before seeing the data.
    pub fn validate(&self) -> Result<()> {
        self.augment.validate()?;
        if let Some((h, w)) = self.size {
            if !(1..=4096).contains(&h) || !(1..=4096).contains(&w) {
                return Err(CloudError::invalid(
                    "options.height/width",
                    format!("{h}x{w} (1..=4096 each)"),
                ));
            }
        }
        if self.mean.len() != self.std.len() && !self.mean.is_empty() && !self.std.is_empty() {
            return Err(CloudError::invalid(
                "options.std",
                format!("{} values for {} means", self.std.len(), self.mean.len()),
            ));
        }
        Ok(())
    }

    /// The input spec for data that validation recorded as `rec`.
    pub fn input_spec(&self, rec: &check::Recorded) -> Result<InputSpec> {
        let (height, width) = self.size.unwrap_or(rec.common_size);
        let pick = |given: &Vec<f32>, computed: &Vec<f32>| {
            if given.is_empty() {
                computed.clone()
            } else {
                given.clone()
            }
        };
        let spec = InputSpec {
            channels: rec.summary.channels,
            height,
            width,
            resize: ResizePolicy::Stretch,
            mean: pick(&self.mean, &rec.mean),
            std: pick(&self.std, &rec.std),
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// The row for validated content.
fn dataset_row(
    name: String,
    uri: String,
    format: DatasetFormat,
    digest: String,
    rec: &check::Recorded,
    opts: &DatasetOptions,
) -> Result<Dataset> {
    Ok(Dataset {
        id: Uuid::new_v4(),
        name,
        uri,
        format: format.as_str().to_string(),
        num_samples: rec.num_samples,
        created_ms: now_ms(),
        input_spec: Some(opts.input_spec(rec)?),
        augment: opts.augment,
        summary: Some(rec.summary.clone()),
        digest: Some(digest),
    })
}

/// Inserts `d`, or returns the dataset that already has its digest (a concurrent identical
/// upload or registration).
async fn insert_or_existing(app: &App, d: &Dataset) -> Result<(Dataset, bool)> {
    let digest = d.digest.as_deref().unwrap_or_default();
    match app.store().insert_dataset(d).await {
        Ok(()) => Ok((d.clone(), true)),
        Err(e @ CloudError::AlreadyExists { .. }) => {
            match app.store().dataset_by_digest(digest).await? {
                Some(existing) => Ok((existing, false)),
                None => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// The path a `file://` URI (or a plain absolute path) names.
pub fn file_uri_path(uri: &str) -> Option<PathBuf> {
    let p = uri.strip_prefix("file://").unwrap_or(uri);
    let p = Path::new(p);
    p.is_absolute().then(|| p.to_path_buf())
}

/// Registers data by URI, validated and summarised like an upload; idempotent by content.
/// `file://` (or an absolute path) only under the configured dataset root, read in place;
/// `s3://bucket/prefix` only under an allowed S3 location, copied into the blob store as an
/// upload would be ([`s3`]).
pub async fn register(
    app: &App,
    name: &str,
    uri: &str,
    format: &str,
    opts: &DatasetOptions,
) -> Result<(Dataset, bool)> {
    check_name("name", name)?;
    let format = DatasetFormat::parse("format", format)?;
    opts.validate()?;
    if uri.is_empty() || uri.len() > 2048 || uri.chars().any(char::is_control) {
        return Err(CloudError::invalid(
            "uri",
            "must be 1-2048 printable characters",
        ));
    }
    if uri.starts_with("s3://") {
        return s3::register(app, name, uri, format, opts).await;
    }
    if uri.contains("://") && !uri.starts_with("file://") {
        return Err(CloudError::invalid(
            "uri",
            "only file:// and s3:// URIs (or absolute paths) can be registered",
        ));
    }
    let root = app.config().dataset_root.clone().ok_or_else(|| {
        CloudError::FailedPrecondition(
            "registering a file:// dataset needs the server's --dataset-root, and none is \
             configured; upload the dataset instead (client upload-dataset)"
                .into(),
        )
    })?;
    let path = file_uri_path(uri)
        .ok_or_else(|| CloudError::invalid("uri", "must be an absolute path or file:// URI"))?;
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(CloudError::invalid("uri", "'..' is not allowed"));
    }
    let name = name.to_string();
    let opts2 = opts.clone();
    let (canon, manifest, rec) = tokio::task::spawn_blocking(move || -> Result<_> {
        let root = root
            .canonicalize()
            .map_err(|e| CloudError::FailedPrecondition(format!("--dataset-root: {e}")))?;
        let canon = path
            .canonicalize()
            .map_err(|e| CloudError::invalid("uri", format!("{}: {e}", path.display())))?;
        if !canon.starts_with(&root) {
            return Err(CloudError::invalid(
                "uri",
                format!(
                    "{} is outside the dataset root {}",
                    canon.display(),
                    root.display()
                ),
            ));
        }
        if !canon.is_dir() {
            return Err(CloudError::invalid("uri", "not a directory"));
        }
        let (files, dirs) = pack::scan_dir(&canon, Some(&root))?;
        let mut entries = Vec::with_capacity(files.len());
        for (rel, p) in &files {
            check::check_path(rel)?;
            let bytes = std::fs::read(p).map_err(|e| CloudError::io(p, e))?;
            entries.push(Entry {
                path: rel.clone(),
                size: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(&bytes)),
                shard: 0,
                offset: 0,
            });
        }
        let manifest = Manifest {
            version: 1,
            format,
            dirs,
            entries,
            shards: Vec::new(),
        };
        let rec = check::validate(&manifest, &DirSource(canon.clone()))?;
        Ok((canon, manifest, rec))
    })
    .await
    .map_err(|e| CloudError::Internal(format!("dataset validation task: {e}")))??;
    let digest = manifest.digest();
    if let Some(existing) = app.store().dataset_by_digest(&digest).await? {
        return Ok((existing, false));
    }
    let uri = format!("file://{}", canon.display());
    let d = dataset_row(name, uri, format, digest, &rec, &opts2)?;
    insert_or_existing(app, &d).await
}

/// Reads entries of a registered directory, checking each against the manifest.
struct DirSource(PathBuf);

impl check::EntrySource for DirSource {
    fn read(&self, e: &Entry) -> Result<Vec<u8>> {
        let p = self.0.join(&e.path);
        let bytes = std::fs::read(&p).map_err(|err| CloudError::io(&p, err))?;
        check::verify_entry(e, &bytes)?;
        Ok(bytes)
    }
}

/// A local directory holding `dataset`'s files in their original layout (ImageFolder tree or
/// IDX files), for a job to read by the dataset's `format` and `input_spec`.
///
/// - Uploaded (`blob://<digest>`): rebuilt from the manifest and shard blobs into
///   `<blob store root>/datasets/<digest>`, every entry checked against its sha256, and
///   reused while it exists (the digest names immutable content; the directory appears by
///   one rename, so a crash never leaves a half-built cache). A worker on another machine
///   thus needs only the blob store.
/// - Registered `file://`: the directory itself (checked against the dataset root when it
///   was registered).
pub async fn materialise(blobs: &BlobStore, dataset: &Dataset) -> Result<PathBuf> {
    if let Some(digest) = dataset.uri.strip_prefix(BLOB_SCHEME) {
        return materialise_blob(blobs, digest).await;
    }
    let p = file_uri_path(&dataset.uri).ok_or_else(|| {
        CloudError::FailedPrecondition(format!(
            "dataset {}: unsupported URI {}",
            dataset.id, dataset.uri
        ))
    })?;
    if !tokio::fs::metadata(&p).await.is_ok_and(|m| m.is_dir()) {
        return Err(CloudError::FailedPrecondition(format!(
            "dataset {}: {} is not a readable directory on this machine",
            dataset.id,
            p.display()
        )));
    }
    Ok(p)
}

/// The local cache directory of uploaded datasets.
pub fn cache_dir(blobs: &BlobStore) -> PathBuf {
    blobs.root().join("datasets")
}

async fn materialise_blob(blobs: &BlobStore, digest: &str) -> Result<PathBuf> {
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CloudError::Internal(format!("bad dataset digest {digest}")));
    }
    let cache = cache_dir(blobs);
    let dst = cache.join(digest);
    if tokio::fs::metadata(&dst).await.is_ok() {
        return Ok(dst);
    }
    let manifest: Manifest = serde_json::from_slice(&blobs.read(digest).await?)
        .map_err(|e| CloudError::DataLoss(format!("dataset manifest {digest}: {e}")))?;
    check::check_manifest(&manifest)?;
    let tmp = cache.join(format!(".{}.part", Uuid::new_v4()));
    let built = async {
        tokio::fs::create_dir_all(&tmp)
            .await
            .map_err(|e| CloudError::io(&tmp, e))?;
        for d in &manifest.dirs {
            let p = tmp.join(d);
            tokio::fs::create_dir_all(&p)
                .await
                .map_err(|e| CloudError::io(&p, e))?;
        }
        for (i, s) in manifest.shards.iter().enumerate() {
            let bytes = blobs.read(&s.sha256).await?;
            let entries: Vec<Entry> = manifest
                .entries
                .iter()
                .filter(|e| e.shard as usize == i)
                .cloned()
                .collect();
            let tmp = tmp.clone();
            tokio::task::spawn_blocking(move || -> Result<()> {
                for e in entries {
                    let part = &bytes[e.offset as usize..(e.offset + e.size) as usize];
                    check::verify_entry(&e, part)
                        .map_err(|err| CloudError::DataLoss(err.to_string()))?;
                    let p = tmp.join(&e.path);
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent)
                            .map_err(|err| CloudError::io(parent, err))?;
                    }
                    std::fs::write(&p, part).map_err(|err| CloudError::io(&p, err))?;
                }
                Ok(())
            })
            .await
            .map_err(|e| CloudError::Internal(format!("materialise task: {e}")))??;
        }
        Ok::<_, CloudError>(())
    }
    .await;
    if let Err(e) = built {
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        return Err(e);
    }
    if let Err(e) = tokio::fs::rename(&tmp, &dst).await {
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        // Another task materialised the same digest first: its copy is as good.
        if tokio::fs::metadata(&dst).await.is_err() {
            return Err(CloudError::io(&dst, e));
        }
    }
    Ok(dst)
}

/// Drops the blobs of a deleted uploaded dataset that no remaining dataset shares (shards are
/// content-addressed, so two uploads may hold the same one), and its local cache.
pub async fn release_blobs(app: &App, deleted: &Dataset) -> Result<()> {
    let Some(digest) = deleted.uri.strip_prefix(BLOB_SCHEME) else {
        return Ok(());
    };
    let blobs = app.blobs();
    let manifest: Manifest = match blobs.read(digest).await {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| CloudError::DataLoss(format!("dataset manifest {digest}: {e}")))?,
        Err(CloudError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut keep = std::collections::HashSet::new();
    for other in app.store().uploaded_dataset_uris().await? {
        let Some(d) = other.strip_prefix(BLOB_SCHEME) else {
            continue;
        };
        keep.insert(d.to_string());
        if let Ok(b) = blobs.read(d).await {
            if let Ok(m) = serde_json::from_slice::<Manifest>(&b) {
                keep.extend(m.shards.into_iter().map(|s| s.sha256));
            }
        }
    }
    for s in &manifest.shards {
        if !keep.contains(&s.sha256) {
            blobs.delete(&s.sha256).await?;
        }
    }
    if !keep.contains(digest) {
        blobs.delete(digest).await?;
        let _ = tokio::fs::remove_dir_all(cache_dir(blobs).join(digest)).await;
    }
    Ok(())
}
