//! `RegisterDataset` with `uri = "s3://bucket/prefix"`: the objects under the prefix (an
//! ImageFolder tree or IDX folder) are listed, fetched and stored exactly as an upload is.
//!
//! - Only under an operator-allowed location (`--dataset-s3-prefix`), like `file://` under
//!   `--dataset-root`: the server's credentials may reach buckets a developer should not.
//! - The listing is checked before any byte is fetched: entry names, the per-entry limit of an
//!   upload's shard, the dataset size limit and the entry count.
//! - Objects are fetched a few at a time (at most [`FETCH_CONCURRENCY`] and
//!   [`FETCH_WINDOW_BYTES`] in flight, or one larger object) and packed by the client's
//!   [`ShardPacker`] into uncommitted blob writers, so memory stays within the upload path's
//!   budget and the manifest is the one `client upload-dataset` would send for the same files.
//! - Then [`commit_validated`]: the same validation and commit as an upload. The dataset is
//!   recorded as `blob://<digest>`: a snapshot in the blob store that workers materialise by
//!   digest, unaffected by later changes under the prefix. The same content registered (or
//!   uploaded) again returns the existing dataset.
use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};

use super::check;
use super::pack::{ShardPacker, DEFAULT_SHARD_BYTES};
use super::upload::{commit_validated, MAX_SHARD_BYTES};
use super::{DatasetFormat, DatasetOptions};
use crate::app::App;
use crate::domain::Dataset;
use crate::error::{CloudError, Result};

/// Objects fetched at once.
pub const FETCH_CONCURRENCY: usize = 8;
/// Bytes fetched at once (a single larger object is fetched alone).
pub const FETCH_WINDOW_BYTES: u64 = 64 << 20;

/// A bucket and a key prefix (no leading or trailing `/`; empty: the whole bucket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://bucket[/prefix]`; errors name `field`.
    pub fn parse(field: &str, uri: &str) -> Result<Self> {
        let bad = |why: &str| CloudError::invalid(field, format!("{uri:?}: {why}"));
        let rest = uri
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected s3://bucket/prefix"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("missing bucket name"));
        }
        if bucket.len() > 255
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(bad(
                "bucket names are letters, digits, '.', '-' and '_' (at most 255)",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            Key::parse(prefix).map_err(|e| bad(&format!("bad prefix: {e}")))?;
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// Whether `self` is `allowed` or lies under it (whole path segments only).
    pub fn within(&self, allowed: &S3Location) -> bool {
        self.bucket == allowed.bucket
            && (allowed.prefix.is_empty()
                || self.prefix == allowed.prefix
                || self
                    .prefix
                    .strip_prefix(&allowed.prefix)
                    .is_some_and(|r| r.starts_with('/')))
    }
}

/// Registers the dataset under an `s3://` URI (see the module docs).
pub(super) async fn register(
    app: &App,
    name: &str,
    uri: &str,
    format: DatasetFormat,
    opts: &DatasetOptions,
) -> Result<(Dataset, bool)> {
    let loc = S3Location::parse("uri", uri)?;
    // First, so that a server without S3 support says so whatever its configuration.
    let store = crate::blobs::s3_store(&loc.bucket, "uri")?;
    let allowed = &app.config().dataset_s3_prefixes;
    if allowed.is_empty() {
        return Err(CloudError::FailedPrecondition(
            "registering an s3:// dataset needs the server's --dataset-s3-prefix, and none is \
             configured; upload the dataset instead (client upload-dataset)"
                .into(),
        ));
    }
    let mut permitted = false;
    for a in allowed {
        let a = S3Location::parse("--dataset-s3-prefix", a)?;
        permitted |= loc.within(&a);
    }
    if !permitted {
        return Err(CloudError::invalid(
            "uri",
            format!("{uri} is outside the S3 locations this server may register from"),
        ));
    }
    ingest(app, store, &loc.prefix, uri, name, format, opts).await
}

/// One object to fetch: its name relative to the prefix, key and listed size.
struct Object {
    rel: String,
    key: Key,
    size: u64,
}

/// Lists, fetches, packs, validates and commits the objects under `prefix` of `store`
/// (`uri` names them in errors). Public for tests with other object stores.
pub async fn ingest(
    app: &App,
    store: Arc<dyn ObjectStore>,
    prefix: &str,
    uri: &str,
    name: &str,
    format: DatasetFormat,
    opts: &DatasetOptions,
) -> Result<(Dataset, bool)> {
    opts.validate()?;
    let (objects, dirs) = list(app, store.as_ref(), prefix, uri).await?;
    let mut packer = ShardPacker::new(DEFAULT_SHARD_BYTES);
    let mut writers = Vec::new();
    let mut i = 0;
    while i < objects.len() {
        let mut j = i;
        let mut window = 0;
        while j < objects.len()
            && j - i < FETCH_CONCURRENCY
            && (j == i || window + objects[j].size <= FETCH_WINDOW_BYTES)
        {
            window += objects[j].size;
            j += 1;
        }
        let fetched = futures::future::try_join_all(
            objects[i..j].iter().map(|o| fetch(store.as_ref(), o, uri)),
        )
        .await?;
        for (o, bytes) in objects[i..j].iter().zip(fetched) {
            let shard = packer.add(o.rel.clone(), &bytes) as usize;
            if shard == writers.len() {
                writers.push(app.blobs().writer().await?);
            }
            writers[shard].write(&bytes).await?;
        }
        i = j;
    }
    let manifest = packer.finish(format, dirs);
    let shards: Vec<_> = manifest.shards.iter().cloned().zip(writers).collect();
    tracing::info!(%uri, entries = manifest.entries.len(), shards = shards.len(), "s3 dataset fetched");
    commit_validated(app, name, format, opts, manifest, shards).await
}

/// The objects under `prefix`, sorted by name, and the folders their names imply. Hidden
/// names are skipped (as a local directory scan does) and zero-byte objects are folder
/// markers. Names, sizes and counts are checked here, before anything is fetched.
async fn list(
    app: &App,
    store: &dyn ObjectStore,
    prefix: &str,
    uri: &str,
) -> Result<(Vec<Object>, Vec<String>)> {
    let limit = app.config().max_dataset_bytes;
    let base = if prefix.is_empty() {
        None
    } else {
        Some(Key::parse(prefix).map_err(|e| CloudError::invalid("uri", e.to_string()))?)
    };
    let mut listing = store.list(base.as_ref());
    let mut objects = Vec::new();
    let mut dirs = BTreeSet::new();
    let mut total = 0u64;
    while let Some(m) = listing.next().await {
        let m = m.map_err(|e| store_error(uri, e))?;
        let raw = m.location.as_ref();
        let rel = if prefix.is_empty() {
            Some(raw)
        } else {
            raw.strip_prefix(prefix).and_then(|r| r.strip_prefix('/'))
        };
        let Some(rel) = rel.filter(|r| !r.is_empty()) else {
            continue;
        };
        if rel.split('/').any(|c| c.starts_with('.')) {
            continue;
        }
        let parts: Vec<&str> = rel.split('/').collect();
        for k in 1..parts.len() {
            dirs.insert(parts[..k].join("/"));
        }
        if m.size == 0 {
            dirs.insert(rel.to_string());
            continue;
        }
        check::check_path(rel)?;
        if objects.len() == check::MAX_ENTRIES {
            return Err(CloudError::invalid(
                "uri",
                format!("more than {} objects under {uri}", check::MAX_ENTRIES),
            ));
        }
        if m.size > MAX_SHARD_BYTES {
            return Err(CloudError::invalid(
                format!("entry {rel:?}"),
                format!(
                    "{} bytes (one entry may hold at most {MAX_SHARD_BYTES})",
                    m.size
                ),
            ));
        }
        total += m.size;
        if total > limit {
            return Err(CloudError::invalid(
                "uri",
                format!("more than the dataset limit of {limit} bytes under {uri}"),
            ));
        }
        objects.push(Object {
            rel: rel.to_string(),
            key: m.location.clone(),
            size: m.size,
        });
    }
    if objects.is_empty() {
        return Err(CloudError::invalid(
            "uri",
            format!("no objects under {uri} (expected an ImageFolder tree or IDX folder)"),
        ));
    }
    objects.sort_by(|a, b| a.rel.cmp(&b.rel));
    for d in &dirs {
        check::check_path(d)?;
    }
    Ok((objects, dirs.into_iter().collect()))
}

/// One object's bytes; its size must still be the listed one.
async fn fetch(store: &dyn ObjectStore, o: &Object, uri: &str) -> Result<Vec<u8>> {
    let r = store.get(&o.key).await.map_err(|e| store_error(uri, e))?;
    let bytes = r.bytes().await.map_err(|e| store_error(uri, e))?;
    if bytes.len() as u64 != o.size {
        return Err(CloudError::invalid(
            format!("entry {:?}", o.rel),
            format!(
                "listed as {} bytes but {} were read (changed during registration?)",
                o.size,
                bytes.len()
            ),
        ));
    }
    Ok(bytes.to_vec())
}

/// What the developer can act on is named (`uri`); transient failures are UNAVAILABLE with
/// the detail only in the log.
fn store_error(uri: &str, e: object_store::Error) -> CloudError {
    match e {
        object_store::Error::NotFound { .. } => CloudError::invalid(
            "uri",
            format!("{uri}: the bucket or an object under it does not exist"),
        ),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => CloudError::FailedPrecondition(format!(
            "uri {uri}: the server's S3 credentials may not read it"
        )),
        object_store::Error::InvalidPath { source } => CloudError::invalid(
            "uri",
            format!("{uri}: an object key is not a valid path: {source}"),
        ),
        // S3 reports a missing bucket as an error code in the body, not as a 404 of the key.
        e if e.to_string().contains("NoSuchBucket") => {
            CloudError::invalid("uri", format!("{uri}: the bucket does not exist"))
        }
        e => {
            tracing::warn!(%uri, error = %e, "reading a dataset from the object store failed");
            CloudError::Unavailable("the object store is unavailable; retry later".into())
        }
    }
}
