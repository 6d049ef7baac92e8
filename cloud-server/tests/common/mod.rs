//! Test harness: a real server on 127.0.0.1:0 over a real database (an SQLite file in a temp
//! dir, or a fresh PostgreSQL database per test), real gRPC clients.
#![allow(dead_code)]
use std::sync::Arc;
use std::time::Duration;

use adaptivenet_cloud::app::{App, Config};
use adaptivenet_cloud::blobs::BlobStore;
use adaptivenet_cloud::domain::Role;
use adaptivenet_cloud::jobs::JobRunner;
use adaptivenet_cloud::server::{self, ServerHandle};
use adaptivenet_core::artifact::{
    params_to_safetensors, write_artifact, InputSpec, Manifest, ModuleEntry,
};
use adaptivenet_core::model::{expected_shapes, ArchDescriptor, Model, ModelSpec, Slot};
use adaptivenet_core::supernet::{branches::build_supernet, SupernetConfig};
use adaptivenet_proto::v1 as pb;
use sqlx::Connection;
use tonic::transport::Channel;

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Runs the same test body against both backends.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::$body($crate::common::Db::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::$body($crate::common::Db::Postgres).await
            }
        }
    };
}

pub struct Harness {
    pub handle: Option<ServerHandle>,
    pub channel: Channel,
    pub admin: String,
    pub dir: tempfile::TempDir,
    pg_db: Option<String>,
}

/// Creates a fresh database for `db`; `None` (after printing why) when PostgreSQL is not
/// reachable and not required.
pub async fn database_url(db: Db, dir: &std::path::Path) -> Option<(String, Option<String>)> {
    match db {
        Db::Sqlite => Some((format!("sqlite://{}", dir.join("cloud.db").display()), None)),
        Db::Postgres => {
            let name = format!("an_{}", uuid::Uuid::new_v4().simple());
            let created = async {
                let mut c = sqlx::PgConnection::connect(PG_ADMIN_URL).await?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut c)
                    .await?;
                c.close().await?;
                Ok::<_, sqlx::Error>(())
            }
            .await;
            match created {
                Ok(()) => Some((
                    format!("postgres://postgres@127.0.0.1:5432/{name}"),
                    Some(name),
                )),
                Err(e) => {
                    if std::env::var("ADAPTIVENET_REQUIRE_PG").as_deref() == Ok("1") {
                        panic!("PostgreSQL required but unreachable at {PG_ADMIN_URL}: {e}");
                    }
                    eprintln!("skipping: PostgreSQL unreachable at {PG_ADMIN_URL}: {e}");
                    None
                }
            }
        }
    }
}

pub async fn drop_pg(name: &str) {
    if let Ok(mut c) = sqlx::PgConnection::connect(PG_ADMIN_URL).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut c)
            .await;
        let _ = c.close().await;
    }
}

/// A config suited to tests (short intervals).
pub fn test_config(dir: &std::path::Path, url: String) -> Config {
    let mut c = Config::for_data_dir(dir);
    c.database_url = url;
    c.db_max_connections = 4;
    c.drain_grace = Duration::from_millis(100);
    c.job_poll = Duration::from_millis(50);
    c.job_lease = Duration::from_millis(600);
    c.workers = 1;
    c
}

impl Harness {
    /// Starts a server; `tweak` adjusts the config; `runner` enables in-process workers.
    pub async fn start(
        db: Db,
        tweak: impl FnOnce(&mut Config),
        runner: Option<Arc<dyn JobRunner>>,
    ) -> Option<Harness> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, pg_db) = database_url(db, dir.path()).await?;
        let mut cfg = test_config(dir.path(), url);
        tweak(&mut cfg);
        let app = App::open(cfg).await.expect("open app");
        let admin = app
            .create_api_token(Role::Admin, "test admin", None)
            .await
            .expect("admin token")
            .token;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let handle = server::start(app, listener, runner, Some(metrics), None)
            .await
            .expect("start server");
        let channel = Channel::from_shared(format!("http://{}", handle.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        Some(Harness {
            handle: Some(handle),
            channel,
            admin,
            dir,
            pg_db,
        })
    }

    pub fn app(&self) -> &App {
        self.handle.as_ref().expect("running").app()
    }

    pub fn developer(&self) -> pb::developer_service_client::DeveloperServiceClient<Channel> {
        pb::developer_service_client::DeveloperServiceClient::new(self.channel.clone())
    }
    pub fn device(&self) -> pb::device_service_client::DeviceServiceClient<Channel> {
        pb::device_service_client::DeviceServiceClient::new(self.channel.clone())
    }
    pub fn dashboard(&self) -> pb::dashboard_service_client::DashboardServiceClient<Channel> {
        pb::dashboard_service_client::DashboardServiceClient::new(self.channel.clone())
    }
    pub fn admin_client(&self) -> pb::admin_service_client::AdminServiceClient<Channel> {
        pb::admin_service_client::AdminServiceClient::new(self.channel.clone())
    }

    /// Creates an API token of a role.
    pub async fn token(&self, role: Role) -> String {
        self.app()
            .create_api_token(role, "test", None)
            .await
            .expect("token")
            .token
    }

    /// Creates a fleet and enrolls one device in it; returns (fleet id, device id, credential).
    pub async fn enrolled_device(&self, fleet_name: &str) -> (String, String, String) {
        let fleet = self
            .admin_client()
            .create_fleet(authed(
                pb::CreateFleetRequest {
                    name: fleet_name.into(),
                },
                &self.admin,
            ))
            .await
            .expect("create fleet")
            .into_inner();
        let tok = self
            .admin_client()
            .create_enrollment_token(authed(
                pb::CreateEnrollmentTokenRequest {
                    fleet_id: fleet.id.clone(),
                    uses: 1,
                    ttl_seconds: 0,
                },
                &self.admin,
            ))
            .await
            .expect("enrollment token")
            .into_inner();
        let e = self
            .device()
            .enroll(pb::EnrollRequest {
                enrollment_token: tok.token,
                device_class: pb::DeviceClass::CpuSmall as i32,
                agent_version: "0.1.0".into(),
            })
            .await
            .expect("enroll")
            .into_inner();
        (fleet.id, e.device_id, e.device_credential)
    }

    /// Shuts the server down and drops the PostgreSQL database.
    pub async fn finish(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await.expect("clean shutdown");
        }
        if let Some(name) = self.pg_db.take() {
            drop_pg(&name).await;
        }
    }
}

/// Wraps a message with `authorization: Bearer <token>`.
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

/// A tiny real oracle descriptor: `adaptivenet.resnet_small`, one basic block of width 8,
/// 1 input channel, 10 classes. [`safetensors_bytes`] are weights that fit it.
pub const ARCH: &[u8] = br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1],"widths":[8],"in_channels":1,"num_classes":10}"#;

/// The descriptor of [`ARCH`] with another width (`arch_json(8) == ARCH`).
pub fn arch_json(width: usize) -> Vec<u8> {
    format!(
        r#"{{"family":"adaptivenet.resnet_small","block":"basic","layers":[1],"widths":[{width}],"in_channels":1,"num_classes":10}}"#
    )
    .into_bytes()
}

/// The spec a descriptor lowers to.
pub fn arch_spec(arch: &[u8]) -> ModelSpec {
    ArchDescriptor::from_json(arch).expect("arch").spec
}

/// What upload validation must report for weights of `arch`: (tensor count, trainable
/// parameter count), from the spec (one tensor per expected shape, as written by
/// [`oracle_fixture`]; BN running statistics are tensors but not parameters).
pub fn expected_oracle_info(arch: &[u8]) -> (u32, u64) {
    let spec = arch_spec(arch);
    (expected_shapes(&spec).len() as u32, spec.num_params())
}

/// The family's (torchvision-style) name of a canonical (slot, local) tensor of a
/// single-stage `adaptivenet.resnet_small` model: stem `conv.X`/`bn.X` → `conv1.X`/`bn1.X`,
/// block i → `layer1.{i}.X`, head `fc.X` as is.
fn resnet_small_name(slot: Slot, local: &str) -> String {
    match slot {
        Slot::Stem => match (local.strip_prefix("conv."), local.strip_prefix("bn.")) {
            (Some(rest), _) => format!("conv1.{rest}"),
            (_, Some(rest)) => format!("bn1.{rest}"),
            _ => panic!("unexpected stem tensor {local}"),
        },
        Slot::Block(i) => format!("layer1.{i}.{local}"),
        Slot::Head => local.to_string(),
    }
}

/// A real oracle: (descriptor of width `width`, safetensors weights of a freshly initialised
/// model for it under the family's key names). Different seeds give different weights.
pub fn oracle_fixture(width: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let arch = arch_json(width);
    let bytes = fixture_weights(&arch, seed);
    (arch, bytes)
}

/// Safetensors weights of a freshly initialised model of a single-stage
/// `adaptivenet.resnet_small` descriptor, under the family's key names.
pub fn fixture_weights(arch: &[u8], seed: u64) -> Vec<u8> {
    let model = Model::init(&arch_spec(arch), seed).expect("init");
    let mut tensors = Vec::new();
    for (n, t) in &model.stem {
        tensors.push((resnet_small_name(Slot::Stem, n), t.clone()));
    }
    for (i, p) in model.blocks.iter().enumerate() {
        for (n, t) in p {
            tensors.push((resnet_small_name(Slot::Block(i), n), t.clone()));
        }
    }
    for (n, t) in &model.head {
        tensors.push((resnet_small_name(Slot::Head, n), t.clone()));
    }
    assert_eq!(tensors.len(), model.canonical_tensors().len());
    params_to_safetensors(tensors).expect("safetensors")
}

/// Weights that fit [`ARCH`]; different (n, seed) give different bytes (and digests).
pub fn safetensors_bytes(n: usize, seed: u8) -> Vec<u8> {
    oracle_fixture(8, ((n as u64) << 8) | seed as u64).1
}

pub fn sha256_hex(b: &[u8]) -> String {
    adaptivenet_cloud::blobs::sha256_hex(b)
}

/// The messages of an upload: header then chunks of `chunk` bytes.
pub fn upload_msgs(
    name: &str,
    data: &[u8],
    declared_size: u64,
    declared_sha: &str,
    chunk: usize,
) -> Vec<pb::UploadOracleRequest> {
    use pb::upload_oracle_request::Msg;
    let mut v = vec![pb::UploadOracleRequest {
        msg: Some(Msg::Header(pb::OracleUploadHeader {
            name: name.into(),
            arch_json: ARCH.to_vec(),
            size_bytes: declared_size,
            weights_sha256: declared_sha.into(),
        })),
    }];
    for c in data.chunks(chunk) {
        v.push(pb::UploadOracleRequest {
            msg: Some(Msg::Chunk(c.to_vec())),
        });
    }
    v
}

/// Uploads an oracle as `token`.
pub async fn upload(
    h: &Harness,
    token: &str,
    name: &str,
    data: &[u8],
) -> Result<pb::UploadOracleResponse, tonic::Status> {
    let msgs = upload_msgs(name, data, data.len() as u64, &sha256_hex(data), 1 << 16);
    h.developer()
        .upload_oracle(authed(futures::stream::iter(msgs), token))
        .await
        .map(|r| r.into_inner())
}

/// Uploads an oracle of descriptor `arch` (e.g. [`arch_json`]) with `weights` (e.g.
/// [`fixture_weights`]) as `token`, in one chunk.
pub async fn upload_arch(
    h: &Harness,
    token: &str,
    name: &str,
    arch: &[u8],
    weights: &[u8],
) -> Result<pb::Oracle, tonic::Status> {
    use pb::upload_oracle_request::Msg;
    let msgs = vec![
        pb::UploadOracleRequest {
            msg: Some(Msg::Header(pb::OracleUploadHeader {
                name: name.into(),
                arch_json: arch.to_vec(),
                size_bytes: weights.len() as u64,
                weights_sha256: sha256_hex(weights),
            })),
        },
        pb::UploadOracleRequest {
            msg: Some(Msg::Chunk(weights.to_vec())),
        },
    ];
    h.developer()
        .upload_oracle(authed(futures::stream::iter(msgs), token))
        .await
        .map(|r| r.into_inner().oracle.expect("oracle"))
}

/// Files under the blob store's final area, and writes in progress (`.part` files) in the
/// temp area (which also holds each process's scratch lock file).
pub fn blob_files(h: &Harness) -> (usize, usize) {
    let root = h.app().blobs().root().to_path_buf();
    (walk(&root.join("sha256")), part_files(&root.join("tmp")))
}

/// `.part` files (writes in progress) under `p`, recursively.
pub fn part_files(p: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() {
                part_files(&e.path())
            } else {
                usize::from(e.file_name().to_string_lossy().ends_with(".part"))
            }
        })
        .sum()
}

fn walk(p: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// A real supernet artifact: the merge-only supernet of a freshly initialised two-block
/// `adaptivenet.resnet_small` (layers [1,1], widths [8,16]); returns its manifest and the
/// bytes of every blob file it wrote. Different seeds give different blobs.
pub fn supernet_artifact(seed: u64) -> (Manifest, Vec<Vec<u8>>) {
    let arch = br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1,1],"widths":[8,16],"in_channels":1,"num_classes":10}"#;
    let oracle = Model::init(&arch_spec(arch), seed).expect("init");
    let digest = sha256_hex(&params_to_safetensors(oracle.canonical_tensors()).expect("st"));
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).expect("supernet");
    let input = InputSpec {
        shape: oracle.spec.input,
        mean: vec![0.5],
        std: vec![0.25],
        class_names: (0..10).map(|c| format!("c{c}")).collect(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = write_artifact(dir.path(), &sn, input, &digest, Vec::new()).expect("artifact");
    let mut blobs = Vec::new();
    for e in std::fs::read_dir(dir.path().join("blobs")).expect("blobs dir") {
        blobs.push(std::fs::read(e.expect("entry").path()).expect("read blob"));
    }
    (manifest, blobs)
}

/// A real supernet artifact whose blobs are all in `store`; returns the manifest JSON.
pub async fn store_supernet_artifact(store: &BlobStore, seed: u64) -> Vec<u8> {
    let (manifest, blobs) = supernet_artifact(seed);
    for b in &blobs {
        store.put(b).await.expect("put blob");
    }
    manifest.to_json().expect("json")
}

/// Every module entry of a manifest, mutably, in [`Manifest::modules`] order (stem, head,
/// then every position's choices).
pub fn module_entries_mut(m: &mut Manifest) -> Vec<&mut ModuleEntry> {
    let mut v = vec![&mut m.stem, &mut m.head];
    for p in &mut m.positions {
        for c in &mut p.choices {
            v.push(&mut c.module);
        }
    }
    v
}

/// The distinct blob digests a manifest lists (what the cloud records for a supernet).
pub fn distinct_blobs(m: &Manifest) -> std::collections::BTreeSet<String> {
    m.modules()
        .into_iter()
        .map(|(_, e)| e.sha256.clone())
        .collect()
}

/// Registers a real supernet artifact (all blobs stored) of `oracle_id`. `substitutes`
/// replace, in order, the module entries of the manifest (stem, head, then the positions'
/// choices) with test blobs (stored too): registration checks only a blob's existence and
/// size, so a test can serve bytes it chose (e.g. a big blob for resumable download).
pub async fn make_supernet(h: &Harness, oracle_id: &str, substitutes: &[Vec<u8>]) -> String {
    let app = h.app();
    let json = store_supernet_artifact(app.blobs(), 7).await;
    let mut manifest = Manifest::from_json(&json).expect("manifest");
    let entries = module_entries_mut(&mut manifest);
    assert!(substitutes.len() <= entries.len(), "too many substitutes");
    for (e, bytes) in entries.into_iter().zip(substitutes) {
        let r = app.blobs().put(bytes).await.expect("put blob");
        e.sha256 = r.sha256;
        e.size = r.size_bytes;
    }
    let manifest = manifest.to_json().expect("json");
    let s = app
        .register_supernet(
            "net",
            uuid::Uuid::parse_str(oracle_id).expect("uuid"),
            None,
            &manifest,
        )
        .await
        .expect("register supernet");
    s.id.to_string()
}

/// `cloud-server client ...` against the harness, off the runtime's threads.
pub async fn cli(h: &Harness, token: &str, args: &[&str]) -> std::process::Output {
    let endpoint = format!("http://{}", h.handle.as_ref().unwrap().addr);
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-server"));
    c.args(["client", "--endpoint", &endpoint, "--token", token]);
    c.args(args);
    tokio::task::spawn_blocking(move || c.output().expect("run cloud-server client"))
        .await
        .unwrap()
}

pub fn stdout_ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The id after "dataset " on the first line of `upload-dataset`'s output.
pub fn dataset_id(out: &str) -> String {
    out.split_whitespace()
        .skip_while(|w| *w != "dataset")
        .nth(1)
        .expect("dataset id")
        .to_string()
}

/// `root/<class>/<i>.png`: 3 classes x 20 RGB 16x16 images whose class is told by colour and
/// by which side is bright (left/right-dependent content).
pub fn write_small_rgb_folder(root: &std::path::Path) {
    for (ci, class) in ["left", "right", "tint"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..20u32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                let bright = match ci {
                    0 => x < 8,
                    1 => x >= 8,
                    _ => (x + y) % 2 == 0,
                };
                let v = if bright { 200 + (i % 5) as u8 * 10 } else { 20 };
                image::Rgb([v, (y * 8) as u8, (ci as u8) * 60 + (i as u8)])
            });
            img.save(dir.join(format!("{i:02}.png"))).unwrap();
        }
    }
}

/// Uploads the directory `dir` as `token` over a raw `UploadDataset` stream, packed into
/// shards as `cloud-server client upload-dataset` packs it.
pub async fn upload_dataset_dir(
    h: &Harness,
    token: &str,
    name: &str,
    format: adaptivenet_cloud::datasets::DatasetFormat,
    dir: &std::path::Path,
) -> Result<pb::UploadDatasetResponse, tonic::Status> {
    use adaptivenet_cloud::datasets::pack;
    use pb::upload_dataset_request::Msg;
    let (files, dirs) = pack::scan_dir(dir, None).expect("scan dataset dir");
    let packed = pack::pack(format, files, dirs, 1 << 20).expect("pack dataset");
    let mut msgs = vec![Msg::Header(pb::DatasetUploadHeader {
        name: name.into(),
        format: format.as_str().into(),
        total_bytes: packed.total_bytes,
        options: None,
    })];
    for s in &packed.shards {
        msgs.push(Msg::Shard(pb::DatasetShard {
            sha256: s.sha256.clone(),
            size_bytes: s.size,
        }));
        for f in &s.files {
            msgs.push(Msg::Chunk(std::fs::read(f).expect("read packed file")));
        }
    }
    msgs.push(Msg::ManifestChunk(packed.manifest.canonical_json()));
    let msgs: Vec<_> = msgs
        .into_iter()
        .map(|m| pb::UploadDatasetRequest { msg: Some(m) })
        .collect();
    h.developer()
        .upload_dataset(authed(futures::stream::iter(msgs), token))
        .await
        .map(|r| r.into_inner())
}

/// The smallest oracle `StartElastification` accepts: [`ARCH`] with two blocks, so a merge2
/// branch fits (a one-block chain has no branch: merges span two or three blocks and the
/// last block is never pruned).
pub const JOB_ARCH: &[u8] = br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[2],"widths":[8],"in_channels":1,"num_classes":10}"#;

/// Weights of [`JOB_ARCH`] under the family's key names; seeds give different bytes.
pub fn job_oracle_weights(seed: u64) -> Vec<u8> {
    fixture_weights(JOB_ARCH, seed)
}

/// Uploads a [`JOB_ARCH`] oracle with [`job_oracle_weights`] of `seed` as `token`: with
/// [`job_dataset`], what a job needs to be queued for a test's own runner.
pub async fn job_oracle(h: &Harness, token: &str, name: &str, seed: u64) -> pb::Oracle {
    upload_arch(h, token, name, JOB_ARCH, &job_oracle_weights(seed))
        .await
        .expect("upload the job oracle")
}

/// Training images in [`job_dataset`]: more than the default `val_size` (1000), so a job on
/// it passes `StartElastification`'s checks whatever parameters a test sends.
pub const JOB_DATASET_IMAGES: usize = 1010;

/// Uploads a small IDX dataset that fits [`JOB_ARCH`] (1 channel, 4x4 images, 10 classes,
/// [`JOB_DATASET_IMAGES`] training images, ~17 KB) as `token` and returns its id. A job is
/// only queued on a registered dataset that fits its oracle, also when the test's runner is
/// a stub that never reads it. The same content again is the same dataset.
pub async fn job_dataset(h: &Harness, token: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = JOB_DATASET_IMAGES;
    let mut images = Vec::with_capacity(16 + n * 16);
    for v in [2051u32, n as u32, 4, 4] {
        images.extend_from_slice(&v.to_be_bytes());
    }
    let mut labels = Vec::with_capacity(8 + n);
    for v in [2049u32, n as u32] {
        labels.extend_from_slice(&v.to_be_bytes());
    }
    for i in 0..n {
        let class = (i % 10) as u8;
        images.extend((0..16u32).map(|p| (p * 13 + i as u32 * 7 + class as u32 * 25) as u8));
        labels.push(class);
    }
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), images).expect("write");
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), labels).expect("write");
    let r = upload_dataset_dir(
        h,
        token,
        "job-data",
        adaptivenet_cloud::datasets::DatasetFormat::Idx,
        dir.path(),
    )
    .await
    .expect("upload the job dataset");
    r.dataset.expect("dataset").id
}
