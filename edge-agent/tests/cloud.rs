//! The agent's cloud client against the real cloud server, in-process on 127.0.0.1:0 over
//! real gRPC, SQLite in a temp dir.
//!
//! The cloud has no RPC that ingests an artifact directory (supernets come from
//! elastification jobs), so `publish_artifact` uses the cloud's library API the way its own
//! tests do: blobs into the blob store, `App::register_supernet` with the core manifest, then
//! the developer RPCs `PublishSupernet` + `SetDesiredState` over gRPC.
use std::path::{Path, PathBuf};
use std::time::Duration;

use adaptivenet_cloud::app::{App, Config};
use adaptivenet_cloud::domain::{Oracle, Role};
use adaptivenet_cloud::server::{self, ServerHandle};
use adaptivenet_core::artifact::{blob_path, read_manifest, write_artifact, InputSpec, Manifest};
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::{
    branches::build_supernet, Choice, ModuleKey, Subnet, SupernetConfig,
};
use adaptivenet_edge::client::sync::{part_path, BlobSelection, DownloadStats, SyncOptions};
use adaptivenet_edge::client::{
    identity_path, AgentAggregates, CloudClient, HeartbeatInput, DEFAULT_DEADLINE,
};
use adaptivenet_edge::profile::LatencyTable;
use adaptivenet_edge::search::{Candidate, SearchConfig, SearchResult, SearchStats};
use adaptivenet_edge::serve::ArtifactSource;
use adaptivenet_edge::state::SearchRecord;
use adaptivenet_edge::EdgeError;
use adaptivenet_proto::v1 as pb;
use tonic::transport::Channel;

const CHUNK: u32 = 256;

struct Cloud {
    handle: Option<ServerHandle>,
    url: String,
    admin: String,
    developer: String,
    channel: Channel,
    _dir: tempfile::TempDir,
}

impl Cloud {
    async fn start() -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::for_data_dir(dir.path());
        cfg.database_url = format!("sqlite://{}", dir.path().join("cloud.db").display());
        cfg.db_max_connections = 4;
        cfg.drain_grace = Duration::from_millis(100);
        cfg.workers = 1;
        let app = App::open(cfg).await.unwrap();
        let admin = app
            .create_api_token(Role::Admin, "test", None)
            .await
            .unwrap()
            .token;
        let developer = app
            .create_api_token(Role::Developer, "test", None)
            .await
            .unwrap()
            .token;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = server::start(app, listener, None, None, None)
            .await
            .unwrap();
        let url = format!("http://{}", handle.addr);
        let channel = Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Cloud {
            handle: Some(handle),
            url,
            admin,
            developer,
            channel,
            _dir: dir,
        }
    }

    fn app(&self) -> &App {
        self.handle.as_ref().unwrap().app()
    }

    async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await.unwrap();
        }
    }

    /// Fleet + one-use enrollment token.
    async fn fleet(&self, name: &str) -> (String, String) {
        let mut admin = pb::admin_service_client::AdminServiceClient::new(self.channel.clone());
        let fleet = admin
            .create_fleet(authed(
                pb::CreateFleetRequest { name: name.into() },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner();
        let tok = admin
            .create_enrollment_token(authed(
                pb::CreateEnrollmentTokenRequest {
                    fleet_id: fleet.id.clone(),
                    uses: 1,
                    ttl_seconds: 0,
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner();
        (fleet.id, tok.token)
    }

    /// Another one-use enrollment token for `fleet_id`.
    async fn token(&self, fleet_id: &str) -> String {
        let mut admin = pb::admin_service_client::AdminServiceClient::new(self.channel.clone());
        admin
            .create_enrollment_token(authed(
                pb::CreateEnrollmentTokenRequest {
                    fleet_id: fleet_id.into(),
                    uses: 1,
                    ttl_seconds: 0,
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// Registers an artifact directory as a supernet and makes it the fleet's desired state.
    async fn publish_artifact(&self, art: &Path, fleet_id: &str) -> String {
        let app = self.app();
        let m = read_manifest(art).unwrap();
        for (_, e) in m.modules() {
            let bytes = std::fs::read(blob_path(art, &e.sha256)).unwrap();
            let r = app.blobs().put(&bytes).await.unwrap();
            assert_eq!(r.sha256, e.sha256);
        }
        // The cloud reads the blob list from the core manifest itself.
        let manifest = std::fs::read(art.join("manifest.json")).unwrap();
        let oracle = Oracle {
            id: uuid::Uuid::new_v4(),
            name: "oracle".into(),
            family: "adaptivenet.resnet_small".into(),
            weights_sha256: "0".repeat(64),
            size_bytes: 1,
            num_params: m.oracle_params,
            num_tensors: 1,
            arch_json: "{}".into(),
            created_ms: 0,
        };
        let (oracle, _) = app.store().insert_oracle(&oracle).await.unwrap();
        let s = app
            .register_supernet("net", oracle.id, None, &manifest)
            .await
            .unwrap();
        let mut dev =
            pb::developer_service_client::DeveloperServiceClient::new(self.channel.clone());
        dev.publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: s.id.to_string(),
                fleet_id: fleet_id.into(),
                label: "stable".into(),
            },
            &self.developer,
        ))
        .await
        .unwrap();
        dev.set_desired_state(authed(
            pb::SetDesiredStateRequest {
                fleet_id: fleet_id.into(),
                target: Some(pb::set_desired_state_request::Target::Label(
                    "stable".into(),
                )),
                budget: Some(pb::LatencyBudgetPolicy {
                    latency_budget_ms: 0.0,
                    budget_fraction: 0.6,
                    hysteresis: 0.1,
                }),
            },
            &self.developer,
        ))
        .await
        .unwrap();
        s.id.to_string()
    }
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// A small untrained ResNet supernet artifact (merge branches).
fn make_artifact(dir: &Path) -> Manifest {
    let arch = serde_json::json!({
        "family": "adaptivenet.resnet_small", "block": "basic", "layers": [3, 3, 3],
        "widths": [4, 8, 8], "in_channels": 1, "num_classes": 10
    });
    let arch = ArchDescriptor::from_json(arch.to_string().as_bytes()).unwrap();
    let oracle = Model::init(&arch.spec, 7).unwrap();
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.5],
        std: vec![0.5],
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    write_artifact(dir, &sn, input, &"0".repeat(64), vec![]).unwrap()
}

fn opts() -> SyncOptions {
    SyncOptions {
        chunk_size: CHUNK,
        max_attempts: 3,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..SyncOptions::default()
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A running cloud with one published artifact, a fresh agent state dir and an enrolled
/// client.
struct Setup {
    cloud: Cloud,
    art: tempfile::TempDir,
    manifest: Manifest,
    agent: tempfile::TempDir,
    fleet_id: String,
    supernet_id: String,
    client: CloudClient,
}

impl Setup {
    async fn new() -> Setup {
        let cloud = Cloud::start().await;
        let art = tempfile::tempdir().unwrap();
        let manifest = make_artifact(art.path());
        let (fleet_id, token) = cloud.fleet("edge").await;
        let supernet_id = cloud.publish_artifact(art.path(), &fleet_id).await;
        let agent = tempfile::tempdir().unwrap();
        let mut client = CloudClient::connect(&cloud.url, DEFAULT_DEADLINE)
            .await
            .unwrap()
            .with_state_dir(agent.path().join("state"))
            .unwrap();
        assert!(client
            .enroll(Some(&token), pb::DeviceClass::CpuSmall, "0.1.0")
            .await
            .unwrap());
        Setup {
            cloud,
            art,
            manifest,
            agent,
            fleet_id,
            supernet_id,
            client,
        }
    }

    fn cache(&self) -> PathBuf {
        self.agent.path().join("cache")
    }

    fn src_blob(&self, sha: &str) -> Vec<u8> {
        std::fs::read(blob_path(self.art.path(), sha)).unwrap()
    }

    /// The largest module blob (several chunks long).
    fn largest(&self) -> (String, u64) {
        let (_, e) = self
            .manifest
            .modules()
            .into_iter()
            .max_by_key(|(_, e)| e.size)
            .unwrap();
        (e.sha256.clone(), e.size)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_once_sync_all_and_reuse_identity_on_restart() {
    let mut s = Setup::new().await;
    let state = s.agent.path().join("state");
    let id = s.client.identity().unwrap().clone();
    assert_eq!(id.fleet_id, s.fleet_id);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(identity_path(&state))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "identity file must be owner-only");
    }
    // No temp files left behind by the atomic write.
    assert_eq!(files_in(&state), vec!["identity.json".to_string()]);

    let rep = s
        .client
        .sync(&s.cache(), &BlobSelection::All, &opts())
        .await
        .unwrap();
    assert_eq!(rep.supernet_id, s.supernet_id);
    assert_eq!(rep.dir, s.cache().join(&s.supernet_id));
    let distinct: std::collections::BTreeSet<_> = s
        .manifest
        .modules()
        .iter()
        .map(|(_, e)| e.sha256.clone())
        .collect();
    assert_eq!(rep.stats.blobs_needed, distinct.len());
    assert_eq!(rep.stats.blobs_downloaded, distinct.len());
    assert_eq!(rep.stats.restarts_from_zero + rep.stats.cached_corrupt, 0);
    let total: u64 = distinct
        .iter()
        .map(|sha| s.src_blob(sha).len() as u64)
        .sum();
    assert_eq!(
        rep.stats.bytes_received, total,
        "every byte sent exactly once"
    );
    for sha in &distinct {
        assert_eq!(
            std::fs::read(blob_path(&rep.dir, sha)).unwrap(),
            s.src_blob(sha)
        );
    }
    assert!(!files_in(&rep.dir.join("blobs"))
        .iter()
        .any(|f| f.ends_with(".part")));
    // The synced dir is an artifact dir the serving path opens and loads.
    let src = ArtifactSource::open(&rep.dir).unwrap();
    assert_eq!(src.manifest.supernet_id, s.manifest.supernet_id);
    src.load(None).unwrap();

    // Restart: a new client reuses the identity without a token (the one-use token is spent,
    // so a second enrollment could not even succeed) and finds every blob cached.
    let mut again = CloudClient::connect(&s.cloud.url, DEFAULT_DEADLINE)
        .await
        .unwrap()
        .with_state_dir(&state)
        .unwrap();
    assert!(!again
        .enroll(None, pb::DeviceClass::CpuSmall, "0.1.0")
        .await
        .unwrap());
    assert_eq!(again.identity(), Some(id.clone()));
    let rep2 = again
        .sync(&s.cache(), &BlobSelection::All, &opts())
        .await
        .unwrap();
    assert_eq!(rep2.stats.blobs_skipped, distinct.len());
    assert_eq!(rep2.stats.bytes_received, 0);
    assert_eq!(rep2.stats.streams, 0);
    // Only one device exists in the fleet.
    let devices = s
        .cloud
        .app()
        .store()
        .list_devices(
            adaptivenet_cloud::domain::Page {
                offset: 0,
                limit: 100,
            },
            Some(uuid::Uuid::parse_str(&s.fleet_id).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(devices.len(), 1);
    s.cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_downloads_only_the_modules_of_the_needed_subnets() {
    let mut s = Setup::new().await;
    let n = s.manifest.positions.len();
    let orig = Subnet::original(n);
    let rep = s
        .client
        .sync(
            &s.cache(),
            &BlobSelection::Subnets(vec![orig.clone()]),
            &opts(),
        )
        .await
        .unwrap();
    let want: std::collections::BTreeSet<String> = s
        .manifest
        .modules_for(&orig)
        .unwrap()
        .iter()
        .map(|(_, e)| e.sha256.clone())
        .collect();
    let got: std::collections::BTreeSet<String> =
        files_in(&rep.dir.join("blobs")).into_iter().collect();
    assert_eq!(got, want, "exactly stem, head and the subnet's modules");
    assert!(got.len() < s.manifest.modules().len());
    let src = ArtifactSource::open(&rep.dir).unwrap();
    src.load(Some(std::slice::from_ref(&orig))).unwrap();
    // A module outside the selection is absent and fails to load.
    let branch = s.manifest.positions.iter().find_map(|p| {
        p.choices
            .iter()
            .find(|c| c.id != Choice::Original && !want.contains(&c.module.sha256))
            .map(|c| ModuleKey::new(p.index, c.id))
    });
    let key = branch.expect("merge branches exist");
    assert!(src.load_module(key).is_err());
    s.cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_download_resumes_from_the_part_file() {
    let mut s = Setup::new().await;
    let (sha, size) = s.largest();
    let chunks = size.div_ceil(CHUNK as u64);
    assert!(
        chunks >= 6,
        "blob of {size} bytes is too small for the test"
    );
    let dir = s.cache().join("manual");
    // 1. The link breaks after 3 chunks and there is no retry (as a killed process): the
    //    partial data stays in `.part`, nothing under the final name.
    let broken = SyncOptions {
        break_after_chunks: Some(3),
        max_attempts: 1,
        ..opts()
    };
    let mut st = DownloadStats::default();
    let err = s
        .client
        .fetch_blob(&dir, &sha, size, &broken, &mut st)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EdgeError::Interrupted { held, .. } if held == 3 * CHUNK as u64),
        "{err}"
    );
    let held = std::fs::metadata(part_path(&dir, &sha)).unwrap().len();
    assert_eq!(held, 3 * CHUNK as u64);
    assert!(!blob_path(&dir, &sha).exists());
    // 2. The next attempt continues at offset = held: no already-held byte travels again.
    let mut st = DownloadStats::default();
    s.client
        .fetch_blob(&dir, &sha, size, &opts(), &mut st)
        .await
        .unwrap();
    assert_eq!(st.resumed, 1);
    assert_eq!(st.bytes_received, size - held);
    assert_eq!(st.bytes_resent, 0);
    assert!(st.bytes_received <= size - held + CHUNK as u64);
    assert_eq!(
        std::fs::read(blob_path(&dir, &sha)).unwrap(),
        s.src_blob(&sha)
    );
    assert!(!part_path(&dir, &sha).exists());
    eprintln!(
        "resume: blob {size} B, held {held} B, resumed download received {} B (re-sent {} B)",
        st.bytes_received, st.bytes_resent
    );

    // 3. A `.part` pre-filled with the correct first half (process killed mid-way).
    let dir2 = s.cache().join("half");
    let bytes = s.src_blob(&sha);
    std::fs::create_dir_all(dir2.join("blobs")).unwrap();
    let half = bytes.len() / 2;
    std::fs::write(part_path(&dir2, &sha), &bytes[..half]).unwrap();
    let mut st = DownloadStats::default();
    s.client
        .fetch_blob(&dir2, &sha, size, &opts(), &mut st)
        .await
        .unwrap();
    assert_eq!(st.bytes_received, size - half as u64);
    assert_eq!(st.restarts_from_zero, 0);
    assert_eq!(std::fs::read(blob_path(&dir2, &sha)).unwrap(), bytes);

    // 4. Breaks every 2 chunks inside one sync: retries with backoff resume each time and
    //    the whole blob crosses the wire exactly once.
    let dir3 = s.cache().join("flaky");
    let flaky = SyncOptions {
        break_after_chunks: Some(2),
        max_attempts: 100,
        ..opts()
    };
    let mut st = DownloadStats::default();
    s.client
        .fetch_blob(&dir3, &sha, size, &flaky, &mut st)
        .await
        .unwrap();
    assert_eq!(st.bytes_received, size);
    assert_eq!(st.streams as u64, chunks.div_ceil(2));
    assert_eq!(std::fs::read(blob_path(&dir3, &sha)).unwrap(), bytes);
    s.cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_part_or_cached_blob_is_caught_and_refetched() {
    let mut s = Setup::new().await;
    let (sha, size) = s.largest();
    let bytes = s.src_blob(&sha);
    // A `.part` with wrong content: the resumed tail completes it, the digest check fails,
    // the `.part` is deleted and the blob fetched from 0; nothing bad gets the final name.
    let dir = s.cache().join("badpart");
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    let mut garbage = bytes[..bytes.len() / 2].to_vec();
    garbage[10] ^= 0xff;
    std::fs::write(part_path(&dir, &sha), &garbage).unwrap();
    let mut st = DownloadStats::default();
    s.client
        .fetch_blob(&dir, &sha, size, &opts(), &mut st)
        .await
        .unwrap();
    assert_eq!(st.restarts_from_zero, 1);
    assert_eq!(st.retries, 1);
    assert_eq!(st.bytes_received, (size - garbage.len() as u64) + size);
    assert_eq!(std::fs::read(blob_path(&dir, &sha)).unwrap(), bytes);

    // With a single attempt the mismatch is an error and leaves neither file behind.
    let dir1 = s.cache().join("badpart-once");
    std::fs::create_dir_all(dir1.join("blobs")).unwrap();
    std::fs::write(part_path(&dir1, &sha), &garbage).unwrap();
    let once = SyncOptions {
        max_attempts: 1,
        ..opts()
    };
    let err = s
        .client
        .fetch_blob(&dir1, &sha, size, &once, &mut DownloadStats::default())
        .await
        .unwrap_err();
    assert!(matches!(err, EdgeError::BlobMismatch { .. }), "{err}");
    assert!(!part_path(&dir1, &sha).exists());
    assert!(!blob_path(&dir1, &sha).exists());

    // A flipped byte in a cached blob: the next sync re-verifies, deletes and re-fetches it
    // before the manifest is (re)written, so the serving path only ever loads good bytes.
    let rep = s
        .client
        .sync(&s.cache(), &BlobSelection::All, &opts())
        .await
        .unwrap();
    let cached = blob_path(&rep.dir, &sha);
    let mut flipped = std::fs::read(&cached).unwrap();
    let k = flipped.len() / 3;
    flipped[k] ^= 0x01;
    std::fs::write(&cached, &flipped).unwrap();
    let rep2 = s
        .client
        .sync(&s.cache(), &BlobSelection::All, &opts())
        .await
        .unwrap();
    assert_eq!(rep2.stats.cached_corrupt, 1);
    assert_eq!(rep2.stats.blobs_downloaded, 1);
    assert_eq!(rep2.stats.bytes_received, size);
    assert_eq!(std::fs::read(&cached).unwrap(), bytes);
    ArtifactSource::open(&rep2.dir).unwrap().load(None).unwrap();
    s.cloud.stop().await;
}

fn aggregates(s: &Setup) -> AgentAggregates {
    let spec = s.manifest.supernet_spec();
    let table = LatencyTable::from_macs(&spec, 0.01);
    let n = spec.num_positions();
    let orig = Subnet::original(n);
    let cand = Candidate {
        latency_ms: table.predict_ms(&orig).unwrap(),
        subnet: orig,
        quality: 87.5,
    };
    let rec = SearchRecord {
        config: SearchConfig::default(),
        result: SearchResult {
            best: vec![],
            front: vec![cand.clone()],
            stats: SearchStats {
                evaluations: 120,
                raced_out: 0,
                raced_out_later: 0,
                module_applications: 900,
                peak_reuse_bytes: 0,
                rescored: 0,
                seconds: 1.5,
                evals_per_s: 80.0,
                images: 500,
            },
        },
    };
    AgentAggregates::from_state(
        &s.supernet_id,
        &table,
        &rec,
        &cand,
        cand.latency_ms * 1.2,
        Some((50, cand.latency_ms * 1.1, cand.latency_ms * 1.3)),
        500,
        pb::DeviceClass::CpuSmall,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_and_report_carry_aggregates_only() {
    let mut s = Setup::new().await;
    let agg = aggregates(&s);
    let r = agg.to_report();
    // The wire message is the closed aggregate schema: fixed-size fields, no repeated ones.
    assert_eq!(r.quality_estimate, 0.875);
    assert_eq!(r.quality_sample_count, 500);
    assert_eq!(r.search.unwrap().evaluated_subnets, 120);
    assert!((r.latency_table.unwrap().calibration_factor - 1.1).abs() < 1e-9);
    let encoded = prost::Message::encoded_len(&r);
    assert!(encoded < 256, "report is {encoded} bytes");
    let desired = s.client.desired_state().await.unwrap();
    let hb = s
        .client
        .heartbeat(&HeartbeatInput {
            supernet_id: s.supernet_id.clone(),
            active_subnet: agg.active_subnet.clone(),
            latency_p50_ms: agg.latency_p50_ms,
            latency_p95_ms: agg.latency_p95_ms,
            reason: pb::AdaptationReason::Initial,
            applied_generation: desired.generation,
            serving: Default::default(),
            started_unix_ms: 0,
            search_reuse: None,
        })
        .await
        .unwrap();
    assert_eq!(hb.desired_generation, desired.generation);
    s.client.report(&agg).await.unwrap();
    assert!(s.client.pending_report().is_none());
    let app = s.cloud.app();
    let dev = app
        .store()
        .get_device(uuid::Uuid::parse_str(&s.client.identity().unwrap().device_id).unwrap())
        .await
        .unwrap();
    assert_eq!(dev.active_subnet, agg.active_subnet.to_string());
    let fa = app
        .store()
        .fleet_aggregates(Some(uuid::Uuid::parse_str(&s.fleet_id).unwrap()))
        .await
        .unwrap();
    assert_eq!(fa.groups.len(), 1);
    assert_eq!(fa.groups[0].devices, 1);
    // Too few samples behind the quality estimate for the minimum the cloud announced at
    // enrollment: withheld on the device (the cloud sees no request), not queued.
    assert_eq!(s.client.min_quality_samples(), 100);
    let sent = report_calls(app);
    let mut few = agg.clone();
    few.quality_sample_count = 10;
    let err = s.client.report(&few).await.unwrap_err();
    assert!(
        matches!(
            &err,
            EdgeError::ReportWithheld {
                samples: 10,
                minimum: 100
            }
        ),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(s.client.pending_report().is_none());
    assert_eq!(
        report_calls(app),
        sent,
        "a withheld report reached the cloud"
    );
    s.cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cloud_fails_clearly_and_keeps_agent_state() {
    // Nothing listens: connect fails fast with a clear error.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{dead}");
    let t = std::time::Instant::now();
    let err = CloudClient::connect(&url, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(err, EdgeError::CloudUnreachable { .. }), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));

    // An enrolled, synced agent whose cloud goes away.
    let mut s = Setup::new().await;
    let rep = s
        .client
        .sync(&s.cache(), &BlobSelection::All, &opts())
        .await
        .unwrap();
    let state = s.agent.path().join("state");
    let identity_before = std::fs::read(identity_path(&state)).unwrap();
    let agg = aggregates(&s);
    s.cloud.stop().await;
    let short = CloudClient::connect_lazy(&s.cloud.url, Duration::from_millis(500))
        .unwrap()
        .with_state_dir(&state)
        .unwrap();
    for c in [&s.client, &short] {
        let e = c.report(&agg).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().starts_with("cloud Report failed"), "{e}");
        // The latest report is kept for a later retry.
        assert_eq!(c.pending_report(), Some(agg.to_report()));
        assert!(c.flush_pending_report().await.is_err());
        assert_eq!(c.pending_report(), Some(agg.to_report()));
    }
    let e = short
        .sync(&s.cache(), &BlobSelection::All, &opts())
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    // Identity and synced supernet are untouched: the agent keeps serving from the cache.
    assert_eq!(
        std::fs::read(identity_path(&state)).unwrap(),
        identity_before
    );
    let src = ArtifactSource::open(&rep.dir).unwrap();
    src.load(None).unwrap();
}

/// An ImageFolder tree of `per_class` random 28x28 grey images for each of 10 classes.
fn image_folder(dir: &Path, per_class: usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for c in 0..10 {
        let d = dir.join(c.to_string());
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let img = image::GrayImage::from_fn(28, 28, |_, _| image::Luma([rng.random::<u8>()]));
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// Report calls the cloud has answered (any status), from its request metrics.
fn report_calls(app: &App) -> u64 {
    app.metrics()
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("adaptivenet_grpc_requests_total") && l.contains("DeviceService/Report\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn run_agent(args: Vec<String>) -> (i32, String) {
    run_agent_env(args, &[]).await
}

async fn run_agent_env(args: Vec<String>, env: &[(&str, &str)]) -> (i32, String) {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(&args)
            .envs(env)
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_run_in_cloud_mode_enrolls_once_syncs_serves_and_reports() {
    let mut cloud = Cloud::start().await;
    let art = tempfile::tempdir().unwrap();
    make_artifact(art.path());
    let (fleet_id, token) = cloud.fleet("cli").await;
    let supernet_id = cloud.publish_artifact(art.path(), &fleet_id).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    image_folder(&data, 12);
    let state = work.path().join("state");
    let url = cloud.url.clone();
    let args = |token: Option<&str>| {
        let mut v: Vec<String> = [
            "run",
            "--cloud",
            &url,
            "--state",
            state.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--budget",
            "0.8",
            "--rounds",
            "2",
            "--validate",
            "0",
            "--images",
            "100",
            "--population",
            "8",
            "--generations",
            "1",
            "--duration",
            "2",
            "--heartbeat-ms",
            "300",
            "--report-every",
            "1",
            "--interval-ms",
            "200",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(t) = token {
            v.push("--enroll-token".into());
            v.push(t.into());
        }
        v
    };
    let (code, out) = run_agent(args(Some(&token))).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("enrolled") && out.contains("synced supernet"),
        "{out}"
    );
    assert!(out.contains("served"), "{out}");
    assert!(state.join("identity.json").exists());
    assert!(ArtifactSource::open(&state.join("cache").join(&supernet_id)).is_ok());
    let fleet = uuid::Uuid::parse_str(&fleet_id).unwrap();
    let store = cloud.app().store();
    let devices = store
        .list_devices(
            adaptivenet_cloud::domain::Page {
                offset: 0,
                limit: 100,
            },
            Some(fleet),
        )
        .await
        .unwrap();
    assert_eq!(devices.len(), 1);
    assert!(!devices[0].active_subnet.is_empty(), "no heartbeat arrived");
    let fa = store.fleet_aggregates(Some(fleet)).await.unwrap();
    assert_eq!(fa.groups.len(), 1, "no report arrived");

    // Restart without a token: the stored identity is reused, blobs are cached.
    let (code, out) = run_agent(args(None)).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("using the stored device identity"), "{out}");
    assert!(out.contains("0 downloaded"), "{out}");
    let devices = store
        .list_devices(
            adaptivenet_cloud::domain::Page {
                offset: 0,
                limit: 100,
            },
            Some(fleet),
        )
        .await
        .unwrap();
    assert_eq!(devices.len(), 1, "a second enrollment happened");

    // A fresh state dir without a token cannot enroll: clear error, non-zero exit.
    let other = work.path().join("other");
    let mut a = args(None);
    let i = a.iter().position(|x| x == "--state").unwrap();
    a[i + 1] = other.to_str().unwrap().into();
    let (code, out) = run_agent(a).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not enrolled"), "{out}");

    // The cloud goes away: the enrolled agent starts from its cache and keeps serving;
    // heartbeats and reports fail and are retried, the run still ends cleanly.
    cloud.stop().await;
    let mut a = args(None);
    a.extend(["--cloud-timeout-ms".to_string(), "1000".to_string()]);
    let (code, out) = run_agent(a).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("serving the cached supernet"), "{out}");
    assert!(out.contains("served"), "{out}");
    assert!(out.contains("heartbeat failed, still serving"), "{out}");
}

/// Like [`make_artifact`] (same oracle, so the same blobs) with the weights of module
/// `tweak` scaled: a new supernet version that shares every other blob.
fn make_artifact_version(dir: &Path, tweak: ModuleKey) -> Manifest {
    let arch = serde_json::json!({
        "family": "adaptivenet.resnet_small", "block": "basic", "layers": [3, 3, 3],
        "widths": [4, 8, 8], "in_channels": 1, "num_classes": 10
    });
    let arch = ArchDescriptor::from_json(arch.to_string().as_bytes()).unwrap();
    let oracle = Model::init(&arch.spec, 7).unwrap();
    let mut sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    for t in sn.modules.get_mut(&tweak).unwrap().values_mut() {
        *t = (t.clone() * 1.5).unwrap();
    }
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.5],
        std: vec![0.5],
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    write_artifact(dir, &sn, input, &"0".repeat(64), vec![]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_generation_resyncs_only_changed_blobs_and_switches_atomically() {
    use adaptivenet_edge::adapt::plan::{plan, PlanConfig};
    use adaptivenet_edge::adapt::{AdaptConfig, Controller};
    use adaptivenet_edge::agent::resync::{policy_budgets, Applied, Resync};
    use adaptivenet_edge::quality::QualityMode;
    use adaptivenet_edge::serve::Server;
    use adaptivenet_edge::state::StateDir;
    use std::sync::{Arc, Mutex};

    let cloud = Cloud::start().await;
    let art_a = tempfile::tempdir().unwrap();
    make_artifact(art_a.path());
    let (fleet_id, token) = cloud.fleet("resync").await;
    cloud.publish_artifact(art_a.path(), &fleet_id).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    image_folder(&data, 4);
    let state_dir = work.path().join("state");
    let cache = state_dir.join("cache");
    let mut client = CloudClient::connect(&cloud.url, DEFAULT_DEADLINE)
        .await
        .unwrap()
        .with_state_dir(&state_dir)
        .unwrap();
    client
        .enroll(Some(&token), pb::DeviceClass::CpuSmall, "test")
        .await
        .unwrap();
    let rep = client
        .sync(&cache, &BlobSelection::All, &opts())
        .await
        .unwrap();
    let state = StateDir::new(&state_dir);
    let resync = Resync {
        cache: cache.clone(),
        state: state.clone(),
        sync: opts(),
        plan: PlanConfig {
            threads: 1,
            batch: 1,
            rounds: 1,
            validate: 0,
            force_profile: false,
            search: SearchConfig {
                population: 8,
                generations: 1,
                ..SearchConfig::default()
            },
            reuse_from_profile: true,
            budgets: policy_budgets(rep.budget.as_ref()),
            data: data.clone(),
            images: 40,
            mode: QualityMode::OracleAgreement,
            clamp_budgets: true,
            research: false,
        },
        explicit_budgets: false,
    };
    let src = ArtifactSource::open(&rep.dir).unwrap();
    let p = plan(&src, &state, &resync.plan, &mut |_, _, _| {}).unwrap();
    let front = p.record.result.front.clone();
    let idx = Controller::initial_index(&front, p.budget_ms);
    let server = Arc::new(Server::start(src, &front[idx].subnet, 20).unwrap());
    let ctl = Arc::new(Mutex::new(Controller::new(
        AdaptConfig::new(p.budget_ms),
        front,
        idx,
    )));
    let applied = Applied {
        supernet_id: rep.supernet_id.clone(),
        generation: rep.generation,
        plan: p,
    };
    // The same generation: nothing to do.
    let desired = client.desired_state().await.unwrap();
    assert!(resync
        .apply(&client, &desired, &applied, &server, &ctl)
        .await
        .unwrap()
        .is_none());

    // A new version with one module changed, announced by the next heartbeat.
    let art_b = tempfile::tempdir().unwrap();
    let mb = make_artifact_version(art_b.path(), ModuleKey::new(1, Choice::Merge2));
    let sid_b = cloud.publish_artifact(art_b.path(), &fleet_id).await;
    let hb = client
        .heartbeat(&HeartbeatInput {
            supernet_id: applied.supernet_id.clone(),
            active_subnet: server.active().subnet.clone(),
            latency_p50_ms: 1.0,
            latency_p95_ms: 1.0,
            reason: pb::AdaptationReason::Initial,
            applied_generation: applied.generation,
            serving: Default::default(),
            started_unix_ms: 0,
            search_reuse: None,
        })
        .await
        .unwrap();
    assert!(hb.desired_generation > applied.generation);
    let desired = client.desired_state().await.unwrap();
    let before = server.active();
    let r = resync
        .apply(&client, &desired, &applied, &server, &ctl)
        .await
        .unwrap()
        .expect("re-synced");
    assert_eq!(r.applied.supernet_id, sid_b);
    assert_eq!(r.applied.generation, hb.desired_generation);
    let s = &r.sync.as_ref().expect("synced").stats;
    assert_eq!(s.blobs_downloaded, 1, "{s:?}");
    assert_eq!(s.blobs_linked, s.blobs_needed - 1, "{s:?}");
    assert!(!r.applied.plan.reused_table && !r.applied.plan.reused_search);
    let now = server.active();
    assert_eq!(now.supernet_id, mb.supernet_id.to_string());
    assert!(now.version > before.version);
    // The old model is intact for requests still holding it.
    let x =
        candle_core::Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &candle_core::Device::Cpu).unwrap();
    before.supernet.forward(&before.subnet, &x).unwrap();
    // Serving the new version's weights, and the controller adapts over its front.
    let mut full_b = ArtifactSource::open(art_b.path())
        .unwrap()
        .load(None)
        .unwrap();
    full_b.fold().unwrap();
    let got = server
        .infer(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = full_b
        .forward(&now.subnet, &x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, want);
    assert_eq!(
        ctl.lock().unwrap().front,
        r.applied.plan.record.result.front
    );
    let id_b = mb.supernet_id.to_string();
    assert!(state.load_search(&id_b).unwrap().is_some());
    assert_eq!(
        state.load_active(&id_b).unwrap().unwrap().subnet,
        now.subnet
    );

    // A version whose changed blob is corrupt in the cloud: the re-sync fails and the
    // previous version keeps serving.
    let art_c = tempfile::tempdir().unwrap();
    let mc = make_artifact_version(art_c.path(), ModuleKey::new(3, Choice::Merge2));
    cloud.publish_artifact(art_c.path(), &fleet_id).await;
    let have: std::collections::HashSet<String> = mb
        .modules()
        .into_iter()
        .map(|(_, e)| e.sha256.clone())
        .collect();
    let (_, changed) = mc
        .modules()
        .into_iter()
        .find(|(_, e)| !have.contains(&e.sha256))
        .unwrap();
    let path = cloud.app().blobs().path_of(&changed.sha256);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let desired = client.desired_state().await.unwrap();
    let err = resync
        .apply(&client, &desired, &r.applied, &server, &ctl)
        .await
        .unwrap_err();
    assert!(matches!(err, EdgeError::BlobMismatch { .. }), "{err}");
    assert_eq!(server.active().version, now.version);
    assert_eq!(server.active().supernet_id, id_b);
    server.infer(&x).unwrap();
}

/// Issue 25: the plan a device served before a rollout moved it on is kept in the state
/// directory, survives a restart, and a rollback re-installs it from the cache: nothing
/// synced, profiled or searched, the subnet that served before serves again, and its table
/// and search result are the stored ones again (a plan made now reuses both). A rollback
/// that happened while the agent was down restores the kept plan at start; one that no
/// rollout can send back to is dropped. A cache missing a blob falls back to a verifying
/// sync that fetches just that blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_plan_survives_a_restart_and_a_rollback_installs_it_from_the_cache() {
    use adaptivenet_core::artifact::sha256_hex;
    use adaptivenet_edge::adapt::plan::{plan, PlanConfig};
    use adaptivenet_edge::adapt::{AdaptConfig, Controller};
    use adaptivenet_edge::agent::resync::{
        policy_budgets, standby_at_start, Applied, Resync, Standby,
    };
    use adaptivenet_edge::client::{DesiredState, ServingReason};
    use adaptivenet_edge::quality::QualityMode;
    use adaptivenet_edge::serve::Server;
    use adaptivenet_edge::state::StateDir;
    use std::sync::{Arc, Mutex};

    let cloud = Cloud::start().await;
    let art_a = tempfile::tempdir().unwrap();
    let ma = make_artifact(art_a.path());
    let (fleet_id, token) = cloud.fleet("standby").await;
    let sid_a = cloud.publish_artifact(art_a.path(), &fleet_id).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    image_folder(&data, 4);
    let state_dir = work.path().join("state");
    let cache = state_dir.join("cache");
    let mut client = CloudClient::connect(&cloud.url, DEFAULT_DEADLINE)
        .await
        .unwrap()
        .with_state_dir(&state_dir)
        .unwrap();
    client
        .enroll(Some(&token), pb::DeviceClass::CpuSmall, "test")
        .await
        .unwrap();
    let rep = client
        .sync(&cache, &BlobSelection::All, &opts())
        .await
        .unwrap();
    let state = StateDir::new(&state_dir);
    let resync = Resync {
        cache: cache.clone(),
        state: state.clone(),
        sync: opts(),
        plan: PlanConfig {
            // The threads a profile records, so a stored table matches.
            threads: adaptivenet_edge::profile::current_threads(),
            batch: 1,
            rounds: 1,
            validate: 0,
            force_profile: false,
            search: SearchConfig {
                population: 8,
                generations: 1,
                ..SearchConfig::default()
            },
            reuse_from_profile: true,
            budgets: policy_budgets(rep.budget.as_ref()),
            data: data.clone(),
            images: 40,
            mode: QualityMode::OracleAgreement,
            clamp_budgets: true,
            research: false,
        },
        explicit_budgets: false,
    };
    let src_a = ArtifactSource::open(&rep.dir).unwrap();
    let p = plan(&src_a, &state, &resync.plan, &mut |_, _, _| {}).unwrap();
    assert!(!p.reused_search, "the first plan searches");
    let front = p.record.result.front.clone();
    // Serve the front's last subnet, not the one a plan starts from, so that serving it
    // again after the rollback shows the kept subnet was restored.
    let idx = front.len() - 1;
    let subnet_a = front[idx].subnet.clone();
    let server = Arc::new(Server::start(src_a.clone(), &subnet_a, 20).unwrap());
    let ctl = Arc::new(Mutex::new(Controller::new(
        AdaptConfig::new(p.budget_ms),
        front,
        idx,
    )));
    let applied_a = Applied {
        supernet_id: sid_a.clone(),
        generation: rep.generation,
        plan: p,
    };
    let mid_a = ma.supernet_id.to_string();

    // B arrives and is installed: the state's table and search slots now hold B's plan.
    let art_b = tempfile::tempdir().unwrap();
    let mb = make_artifact_version(art_b.path(), ModuleKey::new(1, Choice::Merge2));
    let mid_b = mb.supernet_id.to_string();
    let sid_b = cloud.publish_artifact(art_b.path(), &fleet_id).await;
    let desired_b = client.desired_state().await.unwrap();
    let rb = resync
        .apply(&client, &desired_b, &applied_a, &server, &ctl)
        .await
        .unwrap()
        .expect("B installed");
    assert_eq!(server.active().supernet_id, mid_b);
    assert!(matches!(
        state.load_search(&mid_a),
        Err(EdgeError::StaleState { .. })
    ));

    // The agent keeps A's plan while the rollout is active; a restart reads it back.
    let kept = Standby {
        applied: applied_a.clone(),
        subnet: subnet_a.clone(),
    };
    state.save_standby(&sid_a, &kept.record()).unwrap();
    let back = standby_at_start(&state, &sid_b, &mid_b, Some(true)).expect("kept");
    assert_eq!(back.applied.supernet_id, sid_a);
    assert_eq!(back.applied.generation, applied_a.generation);
    assert_eq!(back.subnet, subnet_a);
    assert_eq!(back.applied.plan.table, applied_a.plan.table);
    assert_eq!(back.applied.plan.record, applied_a.plan.record);
    assert_eq!(back.applied.plan.budget_ms, applied_a.plan.budget_ms);
    assert!(state.standby_path().exists());

    // The rollback, from what the restarted agent read: nothing synced or searched, and the
    // subnet that served before serves again.
    let manifest_a = std::fs::read(art_a.path().join("manifest.json")).unwrap();
    let desired_a = DesiredState {
        supernet_id: sid_a.clone(),
        manifest_sha256: sha256_hex(&manifest_a),
        generation: rb.applied.generation + 1,
        reason: ServingReason::RolledBack,
        ..DesiredState::default()
    };
    let r = resync
        .reinstall(&client, &desired_a, &rb.applied, back, &server, &ctl)
        .await
        .unwrap();
    assert!(r.sync.is_none() && r.kept_plan, "{r:?}");
    assert_eq!(r.applied.supernet_id, sid_a);
    assert_eq!(r.applied.generation, desired_a.generation);
    assert_eq!(server.active().supernet_id, mid_a);
    assert_eq!(server.active().subnet, subnet_a);
    assert_eq!(
        ctl.lock().unwrap().front,
        applied_a.plan.record.result.front
    );
    let again = plan(&src_a, &state, &resync.plan, &mut |_, _, _| {}).unwrap();
    assert!(
        again.reused_table && again.reused_search,
        "table {} search {}",
        again.reused_table,
        again.reused_search
    );
    assert_eq!(again.record, applied_a.plan.record);
    // A cached manifest other than the one the cloud names is not re-installed from.
    let err = resync.cached_source(&sid_a, &"0".repeat(64)).unwrap_err();
    assert!(matches!(err, EdgeError::BlobMismatch { .. }), "{err}");

    // Rolled back while the agent was down: the cloud sends A at start while the slots hold
    // B's plan; the kept plan goes back into them, so the plan made at start is A's.
    state.save_table(&rb.applied.plan.table).unwrap();
    state.save_search(&mid_b, &rb.applied.plan.record).unwrap();
    state.save_standby(&sid_a, &kept.record()).unwrap();
    assert!(standby_at_start(&state, &sid_a, &mid_a, Some(false)).is_none());
    assert!(!state.standby_path().exists());
    let restored = plan(&src_a, &state, &resync.plan, &mut |_, _, _| {}).unwrap();
    assert!(restored.reused_table && restored.reused_search);
    assert_eq!(restored.record, applied_a.plan.record);
    assert_eq!(state.load_active(&mid_a).unwrap().unwrap().subnet, subnet_a);
    // The rollout ended while the agent was down and left it on B: no rollout can send it
    // back, so the kept plan is dropped.
    state.save_standby(&sid_a, &kept.record()).unwrap();
    assert!(standby_at_start(&state, &sid_b, &mid_b, Some(false)).is_none());
    assert!(!state.standby_path().exists());

    // A blob missing from the cache: the re-install falls back to a verifying sync, which
    // fetches just that blob, and B serves again.
    let (_, only_b) = mb
        .modules()
        .into_iter()
        .find(|(_, e)| !ma.modules().iter().any(|(_, a)| a.sha256 == e.sha256))
        .unwrap();
    std::fs::remove_file(blob_path(&cache.join(&sid_b), &only_b.sha256)).unwrap();
    assert!(resync
        .cached_source(&sid_b, &desired_b.manifest_sha256)
        .is_err());
    let kept_b = Standby {
        applied: rb.applied.clone(),
        subnet: rb.applied.plan.record.result.front[0].subnet.clone(),
    };
    let desired_b2 = DesiredState {
        generation: r.applied.generation + 1,
        ..desired_b.clone()
    };
    let r2 = resync
        .reinstall(&client, &desired_b2, &r.applied, kept_b, &server, &ctl)
        .await
        .unwrap();
    let s = &r2.sync.as_ref().expect("a verifying sync").stats;
    assert_eq!(s.blobs_downloaded, 1, "{s:?}");
    assert_eq!(s.blobs_skipped, s.blobs_needed - 1, "{s:?}");
    assert_eq!(server.active().supernet_id, mid_b);
    assert!(resync
        .cached_source(&sid_b, &desired_b.manifest_sha256)
        .is_ok());
}

/// The `quality_samples` the cloud stored per device (the latest report of each).
async fn stored_quality_samples(app: &App) -> Vec<(String, i64)> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT device_id, quality_samples FROM device_reports ORDER BY device_id",
    )
    .fetch_all(app.store().pool())
    .await
    .unwrap()
}

/// Issue 22: the privacy minimum holds on the device. A device whose search evaluated fewer
/// local images than the minimum sends no Report at all (the cloud's request metrics and its
/// report table show nothing), whatever `--images` says; one with enough images reports the
/// number it actually evaluated, not the `--images` setting. Also: the enrollment token comes
/// from `--enroll-token-file` before the flag and the environment, and a stored identity is
/// never sent to a changed `--cloud`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_below_the_privacy_minimum_never_leaves_the_agent() {
    let mut cloud = Cloud::start().await;
    let art = tempfile::tempdir().unwrap();
    make_artifact(art.path());
    let (fleet_id, token_few) = cloud.fleet("privacy").await;
    cloud.publish_artifact(art.path(), &fleet_id).await;
    let token_many = cloud.token(&fleet_id).await;
    let work = tempfile::tempdir().unwrap();
    let url = cloud.url.clone();
    let args = |name: &str, extra: &[&str]| {
        let mut v: Vec<String> = vec![
            "run".into(),
            "--cloud".into(),
            url.clone(),
            "--state".into(),
            work.path().join(name).join("state").display().to_string(),
            "--data".into(),
            work.path().join(name).join("data").display().to_string(),
        ];
        v.extend(
            [
                "--budget",
                "0.8",
                "--rounds",
                "2",
                "--validate",
                "0",
                "--images",
                "500",
                "--population",
                "8",
                "--generations",
                "1",
                "--duration",
                "2",
                "--heartbeat-ms",
                "300",
                "--report-every",
                "1",
                "--interval-ms",
                "200",
            ]
            .iter()
            .chain(extra)
            .map(|s| s.to_string()),
        );
        v
    };
    // 30 local images, --images 500, the cloud's minimum 100: the report is withheld.
    image_folder(&work.path().join("few").join("data"), 3);
    let token_file = work.path().join("few.token");
    std::fs::write(&token_file, format!("{token_few}\n")).unwrap();
    let (code, out) = run_agent_env(
        args(
            "few",
            &[
                "--enroll-token-file",
                token_file.to_str().unwrap(),
                "--enroll-token",
                "anv1_enr_bogus",
            ],
        ),
        &[("ADAPTIVENET_ENROLL_TOKEN", "anv1_enr_bogus_env")],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("enrolled"),
        "the token file comes first:\n{out}"
    );
    assert!(
        out.contains("report withheld on the device") && out.contains("rests on 30 local images"),
        "{out}"
    );
    assert!(out.contains("served"), "{out}");
    let app = cloud.app();
    assert_eq!(report_calls(app), 0, "a withheld report reached the cloud");
    assert!(stored_quality_samples(app).await.is_empty());
    let timeline = std::fs::read_to_string(work.path().join("few/state/timeline.jsonl")).unwrap();
    assert!(timeline.contains("report_withheld"), "{timeline}");

    // 120 local images: reports go out, with the 120 images actually evaluated (not 500).
    // The flag wins over the environment.
    image_folder(&work.path().join("many").join("data"), 12);
    let (code, out) = run_agent_env(
        args("many", &["--enroll-token", &token_many]),
        &[("ADAPTIVENET_ENROLL_TOKEN", "anv1_enr_bogus_env")],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("report withheld"), "{out}");
    assert!(report_calls(app) > 0);
    let stored = stored_quality_samples(app).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].1, 120);

    // The same state pointed at another endpoint (the same server under another name): the
    // credential is not sent, and the operator is told to re-enroll.
    let port = url.rsplit(':').next().unwrap();
    let moved = format!("http://localhost:{port}");
    let mut a = args("many", &[]);
    let i = a.iter().position(|x| x == "--cloud").unwrap();
    a[i + 1] = moved.clone();
    let before = credentialed_calls(app);
    let (code, out) = run_agent(a).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("--re-enroll") && out.contains(&moved) && out.contains(&url),
        "{out}"
    );
    assert_eq!(
        credentialed_calls(app),
        before,
        "the credential went to the new endpoint"
    );
    cloud.stop().await;
}

/// Device calls other than Enroll the cloud has answered: what a credential was sent with.
fn credentialed_calls(app: &App) -> u64 {
    app.metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with("adaptivenet_grpc_requests_total"))
        .filter(|l| l.contains("DeviceService/") && !l.contains("DeviceService/Enroll"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_identity_is_bound_to_its_endpoint_and_re_enroll_replaces_it() {
    let mut s = Setup::new().await;
    let state = s.agent.path().join("state");
    let old = s.client.identity().unwrap().clone();
    assert_eq!(old.endpoint, s.cloud.url);
    // The same server under another name is another endpoint as far as the identity goes.
    let moved = format!(
        "http://localhost:{}",
        s.cloud.url.rsplit(':').next().unwrap()
    );
    let mut c = CloudClient::connect(&moved, DEFAULT_DEADLINE)
        .await
        .unwrap()
        .with_state_dir(&state)
        .unwrap();
    let before = credentialed_calls(s.cloud.app());
    let err = c
        .enroll(None, pb::DeviceClass::CpuSmall, "0.1.0")
        .await
        .unwrap_err();
    assert!(matches!(err, EdgeError::EndpointChanged { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("--re-enroll") && msg.contains(&moved) && msg.contains(&s.cloud.url),
        "{msg}"
    );
    let err = c.desired_state().await.unwrap_err();
    assert!(matches!(err, EdgeError::EndpointChanged { .. }), "{err}");
    assert_eq!(
        credentialed_calls(s.cloud.app()),
        before,
        "the credential was sent to the changed endpoint"
    );
    // --re-enroll: a fresh enrollment with the new endpoint replaces the stored identity.
    let token = s.cloud.token(&s.fleet_id).await;
    let mut c = c.with_re_enroll(true);
    assert!(c
        .enroll(Some(&token), pb::DeviceClass::CpuSmall, "0.1.0")
        .await
        .unwrap());
    let new = c.identity().unwrap().clone();
    assert_eq!(new.endpoint, moved);
    assert_ne!(new.device_id, old.device_id);
    assert_eq!(
        adaptivenet_edge::client::load_identity(&state).unwrap(),
        Some(new)
    );
    c.desired_state().await.unwrap();
    // A trailing slash is the same endpoint.
    let mut same = CloudClient::connect(&format!("{moved}/"), DEFAULT_DEADLINE)
        .await
        .unwrap()
        .with_state_dir(&state)
        .unwrap();
    assert!(!same
        .enroll(None, pb::DeviceClass::CpuSmall, "0.1.0")
        .await
        .unwrap());
    s.cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_rotates_near_expiry_and_is_persisted() {
    let s = Setup::new().await;
    let state = s.agent.path().join("state");
    let old = s.client.identity().unwrap();
    assert!(
        old.credential_expires_unix_ms > 0,
        "the cloud's credentials expire"
    );
    let now = adaptivenet_edge::client::now_unix_ms();
    assert!(!s.client.rotate_credential_if_due(now).await.unwrap());
    // Two thirds of the lifetime gone (time injected): rotated and persisted atomically.
    let lifetime = old.credential_expires_unix_ms - old.credential_issued_unix_ms;
    let due = old.credential_issued_unix_ms + lifetime / 3 * 2;
    assert!(s.client.rotate_credential_if_due(due).await.unwrap());
    let new = s.client.identity().unwrap();
    assert_ne!(new.credential, old.credential);
    assert_eq!(new.device_id, old.device_id);
    assert!(new.credential_expires_unix_ms >= old.credential_expires_unix_ms);
    assert_eq!(
        adaptivenet_edge::client::load_identity(&state).unwrap(),
        Some(new.clone())
    );
    // The client goes on with the new credential; the old one is in its grace period only.
    s.client.desired_state().await.unwrap();
    let auth = s.cloud.app().auth();
    auth.authenticate_token(&new.credential).await.unwrap();
    auth.authenticate_token(&old.credential).await.unwrap();
    // A restarted agent loads the rotated identity.
    let again = CloudClient::connect(&s.cloud.url, DEFAULT_DEADLINE)
        .await
        .unwrap()
        .with_state_dir(&state)
        .unwrap();
    assert_eq!(again.identity(), Some(new));
    again.desired_state().await.unwrap();
}

/// `per_class` 32x32 RGB images for each of 10 classes: a class-coloured patch at a
/// class-specific place on seeded noise (learnable, so elastification has something to fit).
fn rgb_image_folder(dir: &Path, per_class: usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for c in 0..10u32 {
        let d = dir.join(format!("c{c}"));
        std::fs::create_dir_all(&d).unwrap();
        let (py, px) = (2 + (c / 4) * 9, 2 + (c % 4) * 7);
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let on = (py..py + 7).contains(&y) && (px..px + 6).contains(&x);
                image::Rgb(std::array::from_fn(|ch| {
                    let noise = rng.random::<u8>() / 4;
                    if on {
                        [90u8, 220][usize::from(!(c as usize + ch).is_multiple_of(3))] + noise / 2
                    } else {
                        noise
                    }
                }))
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// A MobileNetV2-shaped chain (ReLU6, a first block without expansion, expansion 6 after it,
/// a 1x1 head conv) narrowed for 3x32x32 inputs; as `adaptivenet.chain` JSON.
fn small_mobilenet() -> adaptivenet_core::model::ModelSpec {
    let mb = |cin: usize, hidden: usize, cout: usize, stride: usize| {
        serde_json::json!({
            "type": "mb_conv", "cin": cin, "hidden": hidden, "cout": cout, "kernel": 3,
            "stride": stride, "expand": hidden != cin, "residual": stride == 1 && cin == cout
        })
    };
    let json = serde_json::json!({
        "family": "adaptivenet.chain",
        "spec": {
            "family": "torchvision.mobilenet_v2",
            "numerics": {"bn_eps": 1e-5, "padding": "symmetric", "act": "relu6"},
            "input": [3, 32, 32],
            "stem": {"cin": 3, "cout": 8, "kernel": 3, "stride": 2, "maxpool": false},
            "blocks": [mb(8, 8, 8, 1), mb(8, 48, 12, 2), mb(12, 72, 12, 1),
                       mb(12, 72, 16, 2), mb(16, 96, 16, 1)],
            "head": {"cin": 16, "conv": 64, "classes": 10}
        }
    });
    ArchDescriptor::from_value(json).unwrap().spec
}

/// The MBConv counterpart of the ResNet flows above, end to end: a small MobileNetV2-style
/// oracle elastified with merge and prune branches by the cloud's own pipeline (ImageFolder
/// data → elastify → priors → artifact), published on the real cloud over gRPC, then the real
/// `edge-agent run` process enrolls, downloads, profiles, searches and serves it on its local
/// API. Answers over that API equal the exported standalone subnet's, and the search's
/// choice fits the budget by the agent's own latency table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbconv_supernet_is_synced_profiled_searched_and_served() {
    use adaptivenet_core::data::AugmentPolicy;
    use adaptivenet_edge::state::StateDir;
    use adaptivenet_train::pipeline::{elastify_to_artifact, ElastifyPlan, TrainingData};
    use adaptivenet_train::DatasetFormat;
    use adaptivenet_train::{train_oracle, ElastifyConfig, NoProgress, TrainOracleConfig};
    use std::io::BufRead;
    use tokio_util::sync::CancellationToken;

    let work = tempfile::tempdir().unwrap();
    let data_dir = work.path().join("data");
    rgb_image_folder(&data_dir, 12);
    let data = TrainingData::read(
        &data_dir,
        DatasetFormat::ImageFolder,
        None,
        AugmentPolicy::default(),
        None,
    )
    .unwrap();
    let never = CancellationToken::new();
    let recipe = TrainOracleConfig {
        steps: 12,
        batch: 16,
        lr: 0.05,
        warmup_steps: 2,
        normalize: data.spec.normalize(),
        ..TrainOracleConfig::default()
    };
    let (oracle, _) = train_oracle(
        &small_mobilenet(),
        &recipe,
        &data.train,
        None,
        &mut NoProgress,
        &never,
    )
    .unwrap();
    let plan = ElastifyPlan {
        config: ElastifyConfig {
            branches: ["merge2", "merge3", "prune1", "prune2"]
                .map(String::from)
                .to_vec(),
            stage0_steps: 8,
            stage1_steps: 8,
            batch: 16,
            warmup_steps: 1,
            checkpoint_every: 0,
            ..ElastifyConfig::default()
        },
        val_size: 20,
        priors: 8,
        max_train_images: 0,
        oracle_digest: "0".repeat(64),
    };
    let art = work.path().join("artifact");
    let (manifest, _) =
        elastify_to_artifact(&oracle, &data, &plan, &mut NoProgress, None, &never, &art).unwrap();
    let kinds: std::collections::BTreeSet<Choice> = manifest
        .supernet_spec()
        .positions
        .iter()
        .flatten()
        .map(|c| c.id)
        .collect();
    assert_eq!(
        kinds,
        [
            Choice::Prune2,
            Choice::Prune1,
            Choice::Original,
            Choice::Merge2,
            Choice::Merge3
        ]
        .into_iter()
        .collect()
    );

    let cloud = Cloud::start().await;
    let (fleet_id, token) = cloud.fleet("mbconv").await;
    let supernet_id = cloud.publish_artifact(&art, &fleet_id).await;
    let state = work.path().join("state");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args([
            "run",
            "--cloud",
            &cloud.url,
            "--enroll-token",
            &token,
            "--state",
            state.to_str().unwrap(),
            "--data",
            data_dir.to_str().unwrap(),
            "--budget",
            "0.7",
            "--rounds",
            "3",
            "--validate",
            "0",
            "--images",
            "60",
            "--population",
            "10",
            "--generations",
            "2",
            "--duration",
            "6",
            "--interval-ms",
            "200",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Collect both streams; the local API's address arrives on stdout.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream)
                .lines()
                .map_while(|l| l.ok())
            {
                let _ = tx.send(line);
            }
        }));
    }
    drop(tx);
    let mut log = Vec::new();
    let addr = tokio::task::block_in_place(|| {
        for line in rx.iter() {
            log.push(line.clone());
            if let Some(a) = line.strip_prefix("local inference API listening on ") {
                return Some(a.trim().to_string());
            }
        }
        None
    })
    .unwrap_or_else(|| panic!("the agent never served: {}", log.join("\n")));

    // Eight of the local images, as raw pixels: the agent normalises them with the
    // artifact's mean/std, as the exported model's caller does below.
    let idx: Vec<usize> = (0..8).map(|i| i * 13 % data.train.len()).collect();
    let pixels: Vec<u8> = idx
        .iter()
        .flat_map(|&i| data.train.image(i).to_vec())
        .collect();
    let mut api = adaptivenet_proto::v1::edge_inference_client::EdgeInferenceClient::connect(
        format!("http://{addr}"),
    )
    .await
    .unwrap();
    let answer = api
        .infer(pb::InferRequest {
            images: Some(pb::infer_request::Images::Raw(pb::RawImages {
                shape: vec![8, 3, 32, 32],
                pixels,
            })),
        })
        .await
        .unwrap()
        .into_inner();
    let served = Subnet::parse(&answer.subnet).unwrap();
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    for r in readers {
        r.join().unwrap();
    }
    log.extend(rx.try_iter());
    let log = log.join("\n");
    assert!(status.success(), "{log}");
    assert!(log.contains("synced supernet"), "{log}");

    // The exported standalone subnet (written and read back as a chain model) answers the
    // same images as the agent did: same classes, logits within BN folding's rounding.
    let trained = adaptivenet_core::artifact::load_supernet(&art, &manifest, None).unwrap();
    let model_dir = work.path().join("export");
    std::fs::create_dir_all(&model_dir).unwrap();
    trained
        .materialize(&served)
        .unwrap()
        .save(
            &model_dir.join("arch.json"),
            &model_dir.join("w.safetensors"),
        )
        .unwrap();
    let standalone = Model::from_files(
        &model_dir.join("arch.json"),
        &model_dir.join("w.safetensors"),
    )
    .unwrap();
    let (x, _) = data
        .train
        .batch_tensor(
            &idx,
            &adaptivenet_train::train::eval_transform(&data.spec.normalize()),
            &candle_core::Device::Cpu,
        )
        .unwrap();
    let want = standalone.forward(&x).unwrap();
    let want_top1: Vec<u32> = want.argmax(1).unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(answer.top1, want_top1, "served {served}");
    let diff = answer
        .scores
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "served {served}: logits differ by {diff}");

    // The search's answer fits the budget by the agent's own latency table, and what was
    // served is on the searched front.
    let synced = ArtifactSource::open(&state.join("cache").join(&supernet_id)).unwrap();
    let id = synced.manifest.supernet_id.to_string();
    let sd = StateDir::new(&state);
    let table = sd.load_table(&id).unwrap().expect("latency table");
    let search = sd.load_search(&id).unwrap().expect("search result");
    assert!(!search.result.best.is_empty());
    for b in &search.result.best {
        let ms = table.predict_ms(&b.best.subnet).unwrap();
        assert!(
            ms <= b.budget_ms + 1e-9,
            "{}: {ms} ms over the budget {} ms",
            b.best.subnet,
            b.budget_ms
        );
    }
    assert!(
        search.result.front.iter().any(|c| c.subnet == served),
        "served {served} is not on the front"
    );
}
