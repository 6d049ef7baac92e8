//! Test harness: a real server on 127.0.0.1:0 over a real database (an SQLite file in a temp
//! dir, or a fresh PostgreSQL database per test), real gRPC clients.
#![allow(dead_code)]
use std::sync::Arc;
use std::time::Duration;

use adaptivenet_cloud::app::{App, Config};
use adaptivenet_cloud::domain::Role;
use adaptivenet_cloud::jobs::JobRunner;
use adaptivenet_cloud::server::{self, ServerHandle};
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

/// A minimal valid safetensors file with `n` f32 values in one tensor (plus a bias).
pub fn safetensors_bytes(n: usize, seed: u8) -> Vec<u8> {
    let header = format!(
        "{{\"conv.weight\":{{\"dtype\":\"F32\",\"shape\":[{n}],\"data_offsets\":[0,{}]}},\"conv.bias\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[{},{}]}}}}",
        n * 4,
        n * 4,
        n * 4 + 4
    );
    let mut h = header.into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for i in 0..=n {
        out.extend_from_slice(&((i as f32) + seed as f32).to_le_bytes());
    }
    out
}

pub fn sha256_hex(b: &[u8]) -> String {
    adaptivenet_cloud::blobs::sha256_hex(b)
}

pub const ARCH: &[u8] = br#"{"family":"resnet_cifar","depth":20}"#;

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

/// Files under the blob store's final area and temp area.
pub fn blob_files(h: &Harness) -> (usize, usize) {
    let root = h.app().blobs().root().to_path_buf();
    let count = |p: std::path::PathBuf| -> usize { walk(&p) };
    (count(root.join("sha256")), count(root.join("tmp")))
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

/// Stores module blobs and registers a supernet whose manifest lists them.
pub async fn make_supernet(h: &Harness, oracle_id: &str, modules: &[Vec<u8>]) -> String {
    let app = h.app();
    let mut entries = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        let r = app.blobs().put(m).await.expect("put blob");
        entries.push(
            serde_json::json!({"name": format!("m{i}"), "sha256": r.sha256, "size": r.size_bytes}),
        );
    }
    let manifest =
        serde_json::to_vec(&serde_json::json!({"format": 1, "modules": entries})).expect("json");
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
