//! The blob-store contract (put/get/range/exists/delete, atomicity, corruption detection)
//! against every backend: local disk, and `object_store` over `LocalFileSystem` and
//! `InMemory`; plus a supernet download served end to end from an object-store backend.
mod common;

use std::sync::Arc;

use adaptivenet_cloud::blobs::{BlobStore, BlobUrl};
use adaptivenet_cloud::error::CloudError;
use adaptivenet_proto::v1 as pb;
use common::{authed, make_supernet, safetensors_bytes, sha256_hex, upload, Db, Harness};
use object_store::{ObjectStore, ObjectStoreExt};
use rand::{Rng, SeedableRng};

/// A store under test and a way to look behind its back.
struct Backend {
    store: BlobStore,
    /// The raw object store (object backends).
    raw: Option<Arc<dyn ObjectStore>>,
    _dirs: Vec<tempfile::TempDir>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Local,
    ObjectFs,
    ObjectMemory,
}

async fn backend(kind: Kind) -> Backend {
    let scratch = tempfile::tempdir().expect("tempdir");
    match kind {
        Kind::Local => Backend {
            store: BlobStore::open(scratch.path()).await.expect("open"),
            raw: None,
            _dirs: vec![scratch],
        },
        Kind::ObjectFs => {
            let objects = tempfile::tempdir().expect("tempdir");
            let raw: Arc<dyn ObjectStore> = Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(objects.path())
                    .expect("fs store"),
            );
            Backend {
                store: BlobStore::open_object(raw.clone(), "fleet/blobs", scratch.path())
                    .await
                    .expect("open"),
                raw: Some(raw),
                _dirs: vec![scratch, objects],
            }
        }
        Kind::ObjectMemory => {
            let raw: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
            Backend {
                store: BlobStore::open_object(raw.clone(), "", scratch.path())
                    .await
                    .expect("open"),
                raw: Some(raw),
                _dirs: vec![scratch],
            }
        }
    }
}

impl Backend {
    /// Every stored (final) blob: object keys or files under `sha256/`.
    async fn visible(&self) -> usize {
        match &self.raw {
            Some(raw) => {
                use futures::TryStreamExt;
                let all: Vec<_> = raw.list(None).try_collect().await.expect("list");
                all.len()
            }
            None => files(&self.store.root().join("sha256")),
        }
    }

    /// Files in the local scratch area (writes in progress).
    fn temp_files(&self) -> usize {
        common::part_files(&self.store.root().join("tmp"))
    }

    /// Replaces a stored blob's bytes behind the store's back.
    async fn corrupt(&self, sha: &str, bytes: Vec<u8>) {
        match &self.raw {
            Some(raw) => {
                let key = self.store.object_key(sha).expect("object key");
                raw.put(&key, bytes.into()).await.expect("overwrite");
            }
            None => std::fs::write(self.store.path_of(sha), bytes).expect("overwrite"),
        }
    }
}

fn files(p: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() {
                files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

async fn read_from(store: &BlobStore, sha: &str, offset: u64, chunk: usize) -> Vec<u8> {
    let (mut r, _) = store.open_at(sha, offset).await.expect("open_at");
    let mut out = Vec::new();
    loop {
        let c = BlobStore::read_chunk(&mut r, chunk).await.expect("chunk");
        if c.is_empty() {
            return out;
        }
        assert!(c.len() <= chunk);
        out.extend_from_slice(&c);
    }
}

async fn put_get_exists_delete(kind: Kind) {
    let b = backend(kind).await;
    let data = random_bytes(300_001, 1);
    let sha = sha256_hex(&data);
    assert!(!b.store.exists(&sha).await);
    assert!(matches!(
        b.store.read(&sha).await,
        Err(CloudError::NotFound { .. })
    ));
    assert!(matches!(
        b.store.size(&sha).await,
        Err(CloudError::NotFound { .. })
    ));
    let r = b.store.put(&data).await.expect("put");
    assert_eq!((r.sha256.as_str(), r.size_bytes), (sha.as_str(), 300_001));
    assert!(b.store.exists(&sha).await);
    assert_eq!(b.store.size(&sha).await.expect("size"), 300_001);
    assert_eq!(b.store.read(&sha).await.expect("read"), data);
    // Content-addressed: the same bytes again are the same blob.
    assert_eq!(b.store.put(&data).await.expect("again").sha256, sha);
    assert_eq!(b.visible().await, 1);
    let empty = b.store.put(b"").await.expect("empty blob");
    assert_eq!(b.store.read(&empty.sha256).await.expect("read"), b"");
    assert_eq!(b.visible().await, 2);
    b.store.delete(&sha).await.expect("delete");
    assert!(!b.store.exists(&sha).await);
    b.store.delete(&sha).await.expect("deleting twice is fine");
    assert_eq!(b.visible().await, 1);
    assert_eq!(b.temp_files(), 0);
}

async fn ranged_reads(kind: Kind) {
    let b = backend(kind).await;
    let data = random_bytes(1_000_003, 2);
    let sha = b.store.put(&data).await.expect("put").sha256;
    for (offset, chunk) in [
        (0u64, 65_536usize),
        (1, 1 << 20),
        (999_999, 7),
        (500_000, 333_333),
    ] {
        let got = read_from(&b.store, &sha, offset, chunk).await;
        assert_eq!(
            got,
            &data[offset as usize..],
            "offset {offset} chunk {chunk}"
        );
    }
    // At the end: nothing; beyond: INVALID_ARGUMENT naming the offset; unknown: NOT_FOUND.
    assert!(read_from(&b.store, &sha, data.len() as u64, 10)
        .await
        .is_empty());
    let (_, size) = b.store.open_at(&sha, 5).await.expect("open");
    assert_eq!(size, data.len() as u64);
    match b.store.open_at(&sha, data.len() as u64 + 1).await {
        Err(CloudError::InvalidArgument { field, .. }) => assert_eq!(field, "offset"),
        other => panic!("expected invalid offset, got {other:?}"),
    }
    assert!(matches!(
        b.store.open_at(&sha256_hex(b"absent"), 0).await,
        Err(CloudError::NotFound { .. })
    ));
}

async fn nothing_visible_before_commit(kind: Kind) {
    let b = backend(kind).await;
    let data = random_bytes(200_000, 3);
    let sha = sha256_hex(&data);
    // Written but not committed: invisible; dropped: the temp file is gone too.
    let mut w = b.store.writer().await.expect("writer");
    w.write(&data[..100_000]).await.expect("write");
    assert_eq!(b.temp_files(), 1);
    assert!(!b.store.exists(&sha).await);
    assert_eq!(b.visible().await, 0);
    drop(w);
    assert_eq!((b.visible().await, b.temp_files()), (0, 0));
    // A wrong declared digest fails the commit, naming the field, and stores nothing.
    let mut w = b.store.writer().await.expect("writer");
    w.write(&data).await.expect("write");
    assert_eq!(w.contents().await.expect("contents"), data);
    let wrong = sha256_hex(b"something else");
    match w.commit(Some(("header.weights_sha256", &wrong))).await {
        Err(CloudError::InvalidArgument { field, reason }) => {
            assert_eq!(field, "header.weights_sha256");
            assert!(reason.contains(&sha), "{reason}");
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert_eq!((b.visible().await, b.temp_files()), (0, 0));
    // The right digest commits, and the temp file is gone.
    let mut w = b.store.writer().await.expect("writer");
    w.write(&data).await.expect("write");
    let r = w
        .commit(Some(("header.weights_sha256", &sha)))
        .await
        .expect("commit");
    assert_eq!(r.sha256, sha);
    assert_eq!((b.visible().await, b.temp_files()), (1, 0));
}

async fn large_blob(kind: Kind) {
    // Above the single-put limit of the object backend: a multipart upload.
    let b = backend(kind).await;
    let data = random_bytes((17 << 20) + 5, 4);
    let mut w = b.store.writer().await.expect("writer");
    for c in data.chunks(3 << 20) {
        w.write(c).await.expect("write");
    }
    let r = w.commit(None).await.expect("commit");
    assert_eq!(r.size_bytes, data.len() as u64);
    assert_eq!(b.visible().await, 1);
    let tail = read_from(&b.store, &r.sha256, 16 << 20, 1 << 20).await;
    assert_eq!(tail, &data[16 << 20..]);
    assert_eq!(b.store.read(&r.sha256).await.expect("read"), data);
}

async fn corruption_is_detected(kind: Kind) {
    let b = backend(kind).await;
    let data = random_bytes(50_000, 5);
    let sha = b.store.put(&data).await.expect("put").sha256;
    let mut bad = data.clone();
    bad[12_345] ^= 1;
    b.corrupt(&sha, bad.clone()).await;
    match b.store.read(&sha).await {
        Err(e @ CloudError::DataLoss(_)) => assert_eq!(e.code(), tonic::Code::DataLoss),
        other => panic!("expected DATA_LOSS, got {other:?}"),
    }
    // Ranged reads serve bytes as stored; the digest sent with the last chunk lets the
    // receiver notice.
    let got = read_from(&b.store, &sha, 0, 8192).await;
    assert_eq!(got, bad);
    assert_ne!(sha256_hex(&got), sha);
}

/// Stores of several processes share one scratch root: opening a store removes the temp
/// files of exited processes (their scratch lock is free) and never a live one's.
async fn stale_temp_files_are_cleared(kind: Kind) {
    let b = backend(kind).await;
    let mut w = b.store.writer().await.expect("writer");
    w.write(b"in flight").await.expect("write");
    // A crashed process: a scratch directory with a temp file and nobody holding its lock.
    let dead = b.store.root().join("tmp").join("p-0123456789abcdef");
    std::fs::create_dir_all(&dead).expect("mkdir");
    std::fs::write(dead.join(".lock"), b"").expect("lock file");
    std::fs::write(dead.join("x.part"), b"partial").expect("temp file");
    assert_eq!(b.temp_files(), 2);
    let reopened = match &b.raw {
        Some(raw) => BlobStore::open_object(raw.clone(), "x", b.store.root())
            .await
            .expect("reopen"),
        None => BlobStore::open(b.store.root()).await.expect("reopen"),
    };
    assert!(!dead.exists(), "the dead process's scratch is removed");
    assert_eq!(b.temp_files(), 1, "the live writer's temp file is kept");
    let r = w
        .commit(None)
        .await
        .expect("commit after another store opened");
    assert_eq!(b.store.read(&r.sha256).await.expect("read"), b"in flight");
    drop(reopened);
    assert_eq!(b.temp_files(), 0);
}

macro_rules! contract {
    ($($name:ident),*) => {
        $(mod $name {
            use super::*;
            #[tokio::test]
            async fn local() {
                super::$name(Kind::Local).await
            }
            #[tokio::test]
            async fn object_fs() {
                super::$name(Kind::ObjectFs).await
            }
            #[tokio::test]
            async fn object_memory() {
                super::$name(Kind::ObjectMemory).await
            }
        })*
    };
}

contract!(
    put_get_exists_delete,
    ranged_reads,
    nothing_visible_before_commit,
    large_blob,
    corruption_is_detected,
    stale_temp_files_are_cleared
);

#[test]
fn blob_urls_parse_or_name_the_field() {
    assert_eq!(
        BlobUrl::parse("s3://models/prod/blobs/").expect("s3"),
        BlobUrl::S3 {
            bucket: "models".into(),
            prefix: "prod/blobs".into()
        }
    );
    assert_eq!(
        BlobUrl::parse("s3://models").expect("s3"),
        BlobUrl::S3 {
            bucket: "models".into(),
            prefix: String::new()
        }
    );
    assert_eq!(
        BlobUrl::parse("file:///var/blobs").expect("file"),
        BlobUrl::File("/var/blobs".into())
    );
    for bad in [
        "s3:///prefix",
        "file://relative",
        "gs://b/p",
        "/var/blobs",
        "",
    ] {
        match BlobUrl::parse(bad) {
            Err(CloudError::InvalidArgument { field, .. }) => assert_eq!(field, "blob_url"),
            other => panic!("{bad:?}: expected an invalid blob_url, got {other:?}"),
        }
    }
}

#[cfg(not(feature = "s3"))]
#[tokio::test]
async fn s3_urls_need_the_s3_feature() {
    let dir = tempfile::tempdir().expect("tempdir");
    match BlobStore::open_url("s3://bucket/prefix", dir.path()).await {
        Err(CloudError::InvalidArgument { field, reason }) => {
            assert_eq!(field, "blob_url");
            assert!(reason.contains("s3"), "{reason}");
        }
        other => panic!("expected an error without the s3 feature, got {other:?}"),
    }
}

/// A supernet served from an object store (`--blob-url file:///...`): the module blobs are
/// objects, nothing lands in the local blob directory, and a device downloads a module in
/// two parts (resuming from an offset) and verifies its digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supernet_download_through_object_store() {
    let objects = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", objects.path().display());
    let Some(h) = Harness::start(Db::Sqlite, |c| c.blob_url = Some(url.clone()), None).await else {
        return;
    };
    let dev = h.token(adaptivenet_cloud::domain::Role::Developer).await;
    let o = upload(&h, &dev, "o", &safetensors_bytes(20, 0))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let big = random_bytes(1_500_000, 6);
    let supernet = make_supernet(&h, &o.id, std::slice::from_ref(&big)).await;
    let (fleet, _, cred) = h.enrolled_device("edge").await;
    h.developer()
        .publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: supernet.clone(),
                fleet_id: fleet.clone(),
                label: "stable".into(),
            },
            &dev,
        ))
        .await
        .expect("publish");
    let sha = sha256_hex(&big);
    // Where the bytes are: objects under the URL, nothing final on local disk.
    let key = h.app().blobs().object_key(&sha).expect("object backend");
    let on_disk = objects.path().join(key.as_ref());
    assert_eq!(std::fs::read(&on_disk).expect("object file"), big);
    assert_eq!(files(&h.app().blobs().root().join("sha256")), 0);
    assert_eq!(common::part_files(&h.app().blobs().root().join("tmp")), 0);

    let download = |offset: u64| {
        let mut dev = h.device();
        let req = authed(
            pb::DownloadBlobRequest {
                sha256: sha.clone(),
                offset,
                chunk_size: 256 << 10,
            },
            &cred,
        );
        async move { dev.download_blob(req).await.expect("download").into_inner() }
    };
    let mut got = Vec::new();
    let mut s = download(0).await;
    for _ in 0..2 {
        let c = s.message().await.expect("chunk").expect("some");
        assert_eq!(c.offset, got.len() as u64);
        assert_eq!(c.total_size, big.len() as u64);
        got.extend_from_slice(&c.data);
    }
    drop(s);
    let mut s = download(got.len() as u64).await;
    let mut final_sha = String::new();
    while let Some(c) = s.message().await.expect("chunk") {
        assert_eq!(c.offset, got.len() as u64);
        got.extend_from_slice(&c.data);
        if c.last {
            final_sha = c.sha256;
        }
    }
    assert_eq!(final_sha, sha);
    assert_eq!(sha256_hex(&got), sha);
    assert_eq!(got, big);
    h.finish().await;
}
