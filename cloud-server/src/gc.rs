//! Garbage collection of blobs no row references any more: superseded job checkpoints,
//! checkpoints of settled jobs, module blobs of runs that never registered a supernet.
//! Live: oracle weights, supernet modules, job checkpoints of unsettled jobs (see
//! `store::gc`), and uploaded datasets' manifests and shards.
//!
//! A blob is collected only when it is unreferenced and older than the grace period: a
//! running job writes module blobs before it registers the supernet that references them,
//! and an upload commits its blob before its row. The grace must exceed the longest such
//! window (default one day). On local disk a writer that finds its blob already present
//! refreshes the blob's time, and the collector re-checks that time right before deleting.
use std::time::{Duration, SystemTime};

use crate::blobs::BlobStore;
use crate::error::Result;
use crate::store::Store;

/// What one collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs listed in the store.
    pub scanned: usize,
    /// Blobs some row references.
    pub referenced: usize,
    /// Unreferenced but younger than the grace period.
    pub young: usize,
    pub deleted: usize,
    pub deleted_bytes: u64,
}

/// Deletes every blob that is unreferenced and was last written more than `grace` ago.
/// Several collectors may run at once (each replica runs one): deletions are idempotent.
pub async fn collect(store: &Store, blobs: &BlobStore, grace: Duration) -> Result<GcReport> {
    let cutoff = SystemTime::now()
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // List first, then read the references: a blob written and referenced after the
    // listing is not a candidate; one referenced before the query is kept.
    let listed = blobs.list().await?;
    let mut live = store.referenced_blobs().await?;
    // An uploaded dataset references its manifest blob and, through it, every shard.
    for uri in store.uploaded_dataset_uris().await? {
        let Some(digest) = uri.strip_prefix(crate::datasets::BLOB_SCHEME) else {
            continue;
        };
        live.insert(digest.to_string());
        let bytes = match blobs.read(digest).await {
            Ok(b) => b,
            Err(crate::error::CloudError::NotFound { .. }) => continue,
            // Unsure what the dataset holds: collect nothing this round.
            Err(e) => return Err(e),
        };
        let m: crate::datasets::Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            crate::error::CloudError::DataLoss(format!("dataset manifest {digest}: {e}"))
        })?;
        live.extend(m.shards.into_iter().map(|s| s.sha256));
    }
    let mut r = GcReport {
        scanned: listed.len(),
        ..GcReport::default()
    };
    for b in listed {
        if live.contains(&b.sha256) {
            r.referenced += 1;
        } else if b.modified > cutoff {
            r.young += 1;
        } else if blobs.delete_if_older(&b.sha256, cutoff).await? {
            r.deleted += 1;
            r.deleted_bytes += b.size_bytes;
        } else {
            r.young += 1;
        }
    }
    tracing::info!(
        scanned = r.scanned,
        referenced = r.referenced,
        young = r.young,
        deleted = r.deleted,
        deleted_bytes = r.deleted_bytes,
        "blob garbage collection"
    );
    Ok(r)
}

/// Collects every `interval` (the first time one interval after start) until `stop`; a
/// failed round is logged and retried at the next tick.
pub async fn periodic(
    store: Store,
    blobs: BlobStore,
    interval: Duration,
    grace: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = collect(&store, &blobs, grace).await {
            tracing::warn!(error = %e, "blob garbage collection failed");
        }
    }
}
