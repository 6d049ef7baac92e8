//! TLS on the gRPC listener (cargo feature `tls`): a test CA and a server certificate for
//! 127.0.0.1 are generated per run; real gRPC calls go over TLS from tonic and from the
//! `cloud-server client` CLI; plaintext and untrusted clients are refused.
//!
//! Run: `cargo test -p adaptivenet-cloud --features tls --test tls`.
#![cfg(feature = "tls")]
mod common;

use adaptivenet_cloud::app::App;
use adaptivenet_cloud::domain::Role;
use adaptivenet_cloud::server::{self, ServerHandle, TlsFiles};
use adaptivenet_proto::v1 as pb;
use common::{authed, safetensors_bytes, test_config, upload_msgs};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A CA and a server certificate it signed for `localhost` and `127.0.0.1`.
fn pki(ca_name: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

struct TlsServer {
    handle: ServerHandle,
    admin: String,
    _dir: tempfile::TempDir,
}

async fn start(pki: &Pki) -> TlsServer {
    start_with(pki, None).await
}

/// A TLS server; `client_ca` (PEM) turns on mutual TLS.
async fn start_with(pki: &Pki, client_ca: Option<&str>) -> TlsServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("cloud.db").display());
    let app = App::open(test_config(dir.path(), url))
        .await
        .expect("open app");
    let admin = app
        .create_api_token(Role::Admin, "tls test", None)
        .await
        .expect("admin")
        .token;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let tls = TlsFiles {
        cert_pem: pki.cert_pem.clone().into_bytes(),
        key_pem: pki.key_pem.clone().into_bytes(),
        client_ca_pem: client_ca.map(|c| c.as_bytes().to_vec()),
    };
    let handle = server::start(app, listener, None, None, Some(tls))
        .await
        .expect("start TLS server");
    TlsServer {
        handle,
        admin,
        _dir: dir,
    }
}

async fn tls_channel(addr: std::net::SocketAddr, ca_pem: &str) -> Result<Channel, String> {
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_from_tonic_and_the_cli() {
    let pki = pki("adaptivenet test CA");
    let s = start(&pki).await;
    let addr = s.handle.addr;

    // tonic client trusting the CA: health and an authenticated client-streaming upload.
    let ch = tls_channel(addr, &pki.ca_pem).await.expect("TLS connect");
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "adaptivenet.v1.DeveloperService".into(),
        })
        .await
        .expect("health over TLS")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let data = safetensors_bytes(20, 3);
    let msgs = upload_msgs(
        "tls-oracle",
        &data,
        data.len() as u64,
        &common::sha256_hex(&data),
        1 << 10,
    );
    let up = pb::developer_service_client::DeveloperServiceClient::new(ch.clone())
        .upload_oracle(authed(futures::stream::iter(msgs), &s.admin))
        .await
        .expect("upload over TLS")
        .into_inner();
    let oracle = up.oracle.expect("oracle");

    // The operator CLI, as a separate process, over TLS with --ca-file.
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).expect("write CA");
    let cli = |ca: Option<std::path::PathBuf>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-server"));
        cmd.args(["client", "--endpoint", &format!("https://{addr}")])
            .args(["--token", &s.admin])
            .env_remove("ADAPTIVENET_CA_FILE");
        if let Some(ca) = ca {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.args(["list", "oracles"]);
        tokio::task::spawn_blocking(move || cmd.output().expect("run cloud-server client"))
    };
    let out = cli(Some(ca_file.clone())).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "CLI over TLS failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&oracle.id), "{stdout}");
    let out = cli(None).await.expect("join");
    assert!(!out.status.success(), "https without --ca-file must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    s.handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_untrusted_clients_are_refused() {
    let pki_a = pki("adaptivenet test CA");
    let s = start(&pki_a).await;
    let addr = s.handle.addr;

    // A client trusting another CA fails the handshake.
    let other = pki("some other CA");
    assert!(
        tls_channel(addr, &other.ca_pem).await.is_err(),
        "an untrusted server certificate must fail the handshake"
    );

    // A plaintext HTTP/2 client gets no gRPC answer from the TLS listener.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = pb::developer_service_client::DeveloperServiceClient::new(ch)
            .list_oracles(authed(pb::ListOraclesRequest::default(), &s.admin))
            .await;
        assert!(r.is_err(), "plaintext call answered by a TLS listener");
    }

    // The server still serves trusted clients afterwards.
    let ch = tls_channel(addr, &pki_a.ca_pem).await.expect("TLS connect");
    pb::developer_service_client::DeveloperServiceClient::new(ch)
        .list_oracles(authed(pb::ListOraclesRequest::default(), &s.admin))
        .await
        .expect("list over TLS");
    s.handle.shutdown().await.expect("shutdown");
}

/// A client certificate signed by a fresh CA: (CA PEM, certificate PEM, key PEM).
fn client_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("client key");
    let cert = CertificateParams::new(vec!["operator".to_string()])
        .expect("client params")
        .signed_by(&key, &issuer)
        .expect("client certificate");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_from_the_cli_and_pem_errors_name_the_flag() {
    let pki = pki("adaptivenet test CA");
    let (client_ca, client_cert, client_key) = client_pki();
    let s = start_with(&pki, Some(&client_ca)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let ca_file = write("ca.pem", &pki.ca_pem);
    let cert = write("client.pem", &client_cert);
    let key = write("client.key", &client_key);
    let not_pem = write("notes.txt", "not PEM\n");
    let endpoint = format!("https://{}", s.handle.addr);
    let cli = |args: Vec<std::ffi::OsString>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-server"));
        cmd.args(args).env_remove("ADAPTIVENET_CA_FILE");
        tokio::task::spawn_blocking(move || cmd.output().expect("run cloud-server"))
    };
    let client = |extra: &[&std::path::Path]| {
        let mut a: Vec<std::ffi::OsString> = vec![
            "client".into(),
            "--endpoint".into(),
            endpoint.clone().into(),
            "--token".into(),
            s.admin.clone().into(),
            "--ca-file".into(),
            ca_file.clone().into(),
        ];
        if let [c, k] = extra {
            a.extend(["--tls-cert".into(), c.into(), "--tls-key".into(), k.into()]);
        }
        a.extend(["list".into(), "oracles".into()]);
        a
    };

    // Without a client certificate the listener refuses the connection.
    let out = cli(client(&[])).await.expect("join");
    assert!(
        !out.status.success(),
        "mTLS server answered a client without a certificate"
    );
    // With one signed by the client CA, the same call succeeds.
    let out = cli(client(&[&cert, &key])).await.expect("join");
    assert!(
        out.status.success(),
        "CLI with a client certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A non-PEM key: refused before connecting, naming the flag.
    let out = cli(client(&[&cert, &not_pem])).await.expect("join");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--tls-key"), "{err}");

    // serve: a non-PEM --tls-client-ca or a missing --tls-cert is refused at start, naming
    // the flag (before the database is opened).
    let serve = |cert: &std::path::Path, client_ca: &std::path::Path| -> Vec<std::ffi::OsString> {
        vec![
            "--data-dir".into(),
            dir.path().join("data").into(),
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            cert.into(),
            "--tls-key".into(),
            key.clone().into(),
            "--tls-client-ca".into(),
            client_ca.into(),
        ]
    };
    let out = cli(serve(&cert, &not_pem)).await.expect("join");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--tls-client-ca") && err.contains("not a PEM"),
        "{err}"
    );
    let out = cli(serve(&dir.path().join("absent.pem"), &ca_file))
        .await
        .expect("join");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--tls-cert") && err.contains("absent.pem"),
        "{err}"
    );
    s.handle.shutdown().await.expect("shutdown");
}
