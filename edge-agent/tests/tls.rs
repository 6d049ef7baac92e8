//! The agent's TLS path (cargo feature `tls`) against the real cloud, in-process, serving
//! TLS on 127.0.0.1 with certificates generated per run: enrollment and a verified supernet
//! sync over https; a cloud certificate from another CA, and missing or non-PEM files, are
//! refused with errors naming the flag; with mutual TLS (`--tls-client-ca`) an agent without
//! a device certificate (or with one from another CA) is refused before it reaches the cloud's
//! services, and one with a certificate works.
//!
//! Run (the cloud's `tls` feature too, in one build):
//! `cargo test -p adaptivenet-cloud -p adaptivenet-edge --features adaptivenet-cloud/tls,adaptivenet-edge/tls --test tls`.
#![cfg(feature = "tls")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use adaptivenet_cloud::app::{App, Config};
use adaptivenet_cloud::domain::{BudgetPolicy, Oracle};
use adaptivenet_cloud::server::{self, ServerHandle, TlsFiles};
use adaptivenet_core::artifact::{blob_path, read_manifest, write_artifact, InputSpec};
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::{branches::build_supernet, SupernetConfig};
use adaptivenet_edge::client::{BlobSelection, CloudClient, SyncOptions, TlsOptions};
use adaptivenet_edge::EdgeError;
use adaptivenet_proto::v1 as pb;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

const DEADLINE: Duration = Duration::from_secs(10);

/// A certificate authority that signs leaf certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// (certificate PEM, key PEM) for `names` (server SANs or a device's name).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
        let cert = p.signed_by(&key, &self.issuer).expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes `text` to `dir/name` and returns the path.
fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write PEM");
    p
}

struct Cloud {
    handle: ServerHandle,
    url: String,
    fleet_id: uuid::Uuid,
    _dir: tempfile::TempDir,
}

impl Cloud {
    /// A TLS cloud on 127.0.0.1 whose certificate `ca` signed, requiring client certificates
    /// signed by `client_ca` when given, with one published supernet for a fleet.
    async fn start(ca: &Ca, client_ca: Option<&Ca>) -> Cloud {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::for_data_dir(dir.path());
        cfg.database_url = format!("sqlite://{}", dir.path().join("cloud.db").display());
        cfg.db_max_connections = 4;
        cfg.drain_grace = Duration::from_millis(100);
        let app = App::open(cfg).await.expect("open app");

        let art = dir.path().join("artifact");
        make_artifact(&art);
        let m = read_manifest(&art).expect("manifest");
        for (_, e) in m.modules() {
            let bytes = std::fs::read(blob_path(&art, &e.sha256)).expect("blob");
            app.blobs().put(&bytes).await.expect("put blob");
        }
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
        let (oracle, _) = app.store().insert_oracle(&oracle).await.expect("oracle");
        let manifest = std::fs::read(art.join("manifest.json")).expect("manifest bytes");
        let s = app
            .register_supernet("net", oracle.id, None, &manifest)
            .await
            .expect("register supernet");
        let fleet = app.store().create_fleet("edge").await.expect("fleet");
        let budget = BudgetPolicy {
            latency_budget_ms: 0.0,
            budget_fraction: 0.6,
            hysteresis: 0.1,
        };
        app.store()
            .set_desired_state(fleet.id, None, Some(s.id), budget)
            .await
            .expect("desired state");

        let (cert_pem, key_pem) = ca.leaf(&["localhost", "127.0.0.1"]);
        let tls = TlsFiles {
            cert_pem: cert_pem.into_bytes(),
            key_pem: key_pem.into_bytes(),
            client_ca_pem: client_ca.map(|c| c.pem.clone().into_bytes()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let handle = server::start(app, listener, None, None, Some(tls))
            .await
            .expect("start the TLS cloud (is adaptivenet-cloud built with its `tls` feature?)");
        Cloud {
            url: format!("https://{}", handle.addr),
            handle,
            fleet_id: fleet.id,
            _dir: dir,
        }
    }

    /// A one-use enrollment token for the fleet.
    async fn token(&self) -> String {
        self.handle
            .app()
            .create_enrollment_token(self.fleet_id, 1, None)
            .await
            .expect("enrollment token")
            .token
    }

    /// Enrolled devices (what actually reached the cloud).
    async fn devices(&self) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM devices")
            .fetch_one(self.handle.app().store().pool())
            .await
            .expect("count devices");
        n
    }
}

/// A small untrained ResNet supernet artifact.
fn make_artifact(dir: &Path) {
    let arch = serde_json::json!({
        "family": "adaptivenet.resnet_small", "block": "basic", "layers": [1, 1, 1],
        "widths": [4, 8, 8], "in_channels": 1, "num_classes": 10
    });
    let arch = ArchDescriptor::from_json(arch.to_string().as_bytes()).expect("arch");
    let oracle = Model::init(&arch.spec, 7).expect("oracle");
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).expect("supernet");
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.5],
        std: vec![0.5],
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    write_artifact(dir, &sn, input, &"0".repeat(64), vec![]).expect("write artifact");
}

/// Connects with `tls`, enrolls with `token` and syncs the fleet's supernet into `agent`.
async fn enroll_and_sync(
    url: &str,
    tls: &TlsOptions,
    token: &str,
    agent: &Path,
) -> Result<(String, usize), EdgeError> {
    let mut c = CloudClient::connect_tls(url, DEADLINE, tls)
        .await?
        .with_state_dir(agent.join("state"))?;
    c.enroll(Some(token), pb::DeviceClass::CpuSmall, "test")
        .await?;
    let rep = c
        .sync(
            &agent.join("cache"),
            &BlobSelection::All,
            &SyncOptions {
                max_attempts: 1,
                ..SyncOptions::default()
            },
        )
        .await?;
    Ok((rep.supernet_id, rep.stats.blobs_downloaded))
}

fn config_field(e: &EdgeError) -> &str {
    match e {
        EdgeError::InvalidConfig { field, .. } => field,
        other => panic!("expected InvalidConfig, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_and_syncs_over_https_and_refuses_a_cloud_from_another_ca() {
    let ca = Ca::new("adaptivenet test CA");
    let cloud = Cloud::start(&ca, None).await;
    let pems = tempfile::tempdir().expect("tempdir");
    let ca_file = file(pems.path(), "ca.pem", &ca.pem);
    let other_ca = file(pems.path(), "other-ca.pem", &Ca::new("some other CA").pem);
    let not_pem = file(pems.path(), "notes.txt", "not a certificate\n");
    let with_ca = |p: &Path| TlsOptions {
        ca_file: Some(p.to_path_buf()),
        ..TlsOptions::default()
    };

    // The cloud's certificate was signed by a CA the agent does not trust: refused at the
    // handshake, the error says which flag to check, nothing reaches the cloud.
    let token = cloud.token().await;
    let agent = tempfile::tempdir().expect("tempdir");
    let e = enroll_and_sync(&cloud.url, &with_ca(&other_ca), &token, agent.path())
        .await
        .expect_err("a cloud certificate from another CA must be refused");
    let msg = e.to_string();
    assert!(
        matches!(e, EdgeError::CloudUnreachable { .. }) && msg.contains("--ca-file"),
        "{msg}"
    );
    assert!(msg.to_ascii_lowercase().contains("certificate"), "{msg}");
    assert!(!agent.path().join("state/identity.json").exists());
    assert_eq!(cloud.devices().await, 0);

    // Missing, non-PEM and misplaced files: configuration errors naming the flag.
    let e = CloudClient::connect_tls(
        &cloud.url,
        DEADLINE,
        &with_ca(&pems.path().join("absent.pem")),
    )
    .await
    .expect_err("missing CA file");
    assert_eq!(config_field(&e), "--ca-file", "{e}");
    assert!(e.to_string().contains("absent.pem"), "{e}");
    let e = CloudClient::connect_tls(&cloud.url, DEADLINE, &with_ca(&not_pem))
        .await
        .expect_err("non-PEM CA file");
    assert_eq!(config_field(&e), "--ca-file", "{e}");
    assert!(e.to_string().contains("not a PEM certificate"), "{e}");
    let e = CloudClient::connect_tls(
        &cloud.url,
        DEADLINE,
        &TlsOptions {
            client_key: Some(not_pem.clone()),
            client_cert: Some(ca_file.clone()),
            ..with_ca(&ca_file)
        },
    )
    .await
    .expect_err("non-PEM key");
    assert_eq!(config_field(&e), "--tls-key", "{e}");
    let plain = cloud.url.replace("https://", "http://");
    let e = CloudClient::connect_tls(&plain, DEADLINE, &with_ca(&ca_file))
        .await
        .expect_err("--ca-file with an http:// endpoint");
    assert_eq!(config_field(&e), "--ca-file", "{e}");

    // The right CA: the same one-use token enrolls (the refused attempt never used it) and
    // the supernet syncs, every blob verified, over TLS.
    let (supernet_id, downloaded) =
        enroll_and_sync(&cloud.url, &with_ca(&ca_file), &token, agent.path())
            .await
            .expect("enroll and sync over https");
    assert!(!supernet_id.is_empty());
    assert!(downloaded > 0, "no blob downloaded");
    assert_eq!(cloud.devices().await, 1);
    cloud.handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_agents_with_a_device_certificate() {
    let ca = Ca::new("adaptivenet test CA");
    let devices_ca = Ca::new("adaptivenet device CA");
    let cloud = Cloud::start(&ca, Some(&devices_ca)).await;
    let pems = tempfile::tempdir().expect("tempdir");
    let ca_file = file(pems.path(), "ca.pem", &ca.pem);
    let (cert, key) = devices_ca.leaf(&["device-1"]);
    let (dev_cert, dev_key) = (
        file(pems.path(), "device.pem", &cert),
        file(pems.path(), "device.key", &key),
    );
    let (cert, key) = Ca::new("rogue CA").leaf(&["device-2"]);
    let (rogue_cert, rogue_key) = (
        file(pems.path(), "rogue.pem", &cert),
        file(pems.path(), "rogue.key", &key),
    );
    let token = cloud.token().await;

    // No device certificate, or one from another CA: refused; the token stays unused.
    for (what, cert, key) in [
        ("no client certificate", None, None),
        (
            "a certificate from another CA",
            Some(rogue_cert),
            Some(rogue_key),
        ),
    ] {
        let agent = tempfile::tempdir().expect("tempdir");
        let tls = TlsOptions {
            ca_file: Some(ca_file.clone()),
            client_cert: cert,
            client_key: key,
        };
        let e = enroll_and_sync(&cloud.url, &tls, &token, agent.path())
            .await
            .expect_err(what);
        let msg = e.to_string();
        assert!(e.is_transient(), "{what}: {msg}");
        assert!(msg.contains("--tls-cert"), "{what}: {msg}");
        assert_eq!(cloud.devices().await, 0, "{what} reached the cloud");
    }

    // With the device certificate: enrolls (with the same token) and syncs.
    let agent = tempfile::tempdir().expect("tempdir");
    let tls = TlsOptions {
        ca_file: Some(ca_file.clone()),
        client_cert: Some(dev_cert),
        client_key: Some(dev_key),
    };
    let (supernet_id, downloaded) = enroll_and_sync(&cloud.url, &tls, &token, agent.path())
        .await
        .expect("enroll and sync with a device certificate");
    assert!(!supernet_id.is_empty());
    assert!(downloaded > 0);
    assert_eq!(cloud.devices().await, 1);
    cloud.handle.shutdown().await.expect("shutdown");
}
