//! Credential lookups under a reconnect storm, over the real gRPC server (SQLite and
//! PostgreSQL): concurrent cache misses for many credentials cost a few batched queries
//! (counted by the store), a revocation through this process applies at once and only to
//! its device, and one made by another process (`cloud-server token revoke-api`) applies
//! within the cache TTL.
mod common;

use std::time::Duration;

use adaptivenet_cloud::auth::QUERIES_IN_FLIGHT;
use adaptivenet_cloud::domain::Role;
use adaptivenet_cloud::store::MAX_LOOKUP_BATCH;
use adaptivenet_proto::v1 as pb;
use common::*;
use tonic::transport::Channel;
use tonic::Code;

/// Distinct devices reconnecting at once, and heartbeats each sends concurrently.
const DEVICES: usize = 100;
const COPIES: usize = 2;

fn heartbeat() -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        agent_version: "0.1.0".into(),
        applied_generation: 0,
        ..Default::default()
    }
}

/// Enrolls `n` devices into a new fleet; returns (device id, credential) of each.
async fn enroll_devices(h: &Harness, n: usize) -> Vec<(String, String)> {
    let fleet = h
        .admin_client()
        .create_fleet(authed(
            pb::CreateFleetRequest {
                name: "storm".into(),
            },
            &h.admin,
        ))
        .await
        .expect("fleet")
        .into_inner()
        .id;
    let token = h
        .admin_client()
        .create_enrollment_token(authed(
            pb::CreateEnrollmentTokenRequest {
                fleet_id: fleet,
                uses: n as u32,
                ttl_seconds: 0,
            },
            &h.admin,
        ))
        .await
        .expect("enrollment token")
        .into_inner()
        .token;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let e = h
            .device()
            .enroll(pb::EnrollRequest {
                enrollment_token: token.clone(),
                device_class: pb::DeviceClass::CpuSmall as i32,
                agent_version: "0.1.0".into(),
            })
            .await
            .expect("enroll")
            .into_inner();
        out.push((e.device_id, e.device_credential));
    }
    out
}

async fn heartbeat_as(channel: Channel, credential: String) -> Result<(), tonic::Status> {
    pb::device_service_client::DeviceServiceClient::new(channel)
        .heartbeat(authed(heartbeat(), &credential))
        .await
        .map(drop)
}

/// The storm: while the database is busy (every pooled connection taken), `DEVICES` devices
/// whose credentials this process has never seen each send `COPIES` heartbeats at once. When
/// the database frees up, every heartbeat is answered and all of them cost at most one query
/// per running query task plus one per full batch, not one per device. Then one device is
/// revoked: it is refused at once, while the others still hit the cache (no query).
async fn storm_is_batched(db: Db) {
    let Some(h) = Harness::start(
        db,
        |c| {
            // Every heartbeat of the storm waits for a lookup at once.
            c.net.max_anonymous_requests = DEVICES * COPIES + 16;
            // Long enough that no entry is refreshed in the background during the test.
            c.auth_cache_ttl = Duration::from_secs(3600);
        },
        None,
    )
    .await
    else {
        return;
    };
    let devices = enroll_devices(&h, DEVICES).await;
    let app = h.app().clone();
    // Requests spread over a few connections (each allows 128 concurrent streams).
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(
            Channel::from_shared(format!("http://{}", h.handle.as_ref().unwrap().addr))
                .unwrap()
                .connect()
                .await
                .expect("connect"),
        );
    }

    // The database is busy: hold every connection of the pool.
    let mut held = Vec::new();
    for _ in 0..app.config().db_max_connections {
        held.push(app.store().pool().acquire().await.expect("acquire"));
    }
    let before = app.store().credential_queries();
    let mut calls = Vec::new();
    for copy in 0..COPIES {
        for (i, (_, cred)) in devices.iter().enumerate() {
            let ch = channels[(i + copy) % channels.len()].clone();
            calls.push(tokio::spawn(heartbeat_as(ch, cred.clone())));
        }
    }
    // Wait until every credential's lookup is queued or running: the condition decides;
    // the limit only keeps a broken build from hanging.
    let queued = async {
        while app.auth().lookups_in_flight() < DEVICES {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(300), queued)
        .await
        .expect("every credential's lookup queued");
    drop(held);
    for c in calls {
        c.await.expect("task").expect("heartbeat in the storm");
    }
    let queries = app.store().credential_queries() - before;
    let bound = QUERIES_IN_FLIGHT + DEVICES.div_ceil(MAX_LOOKUP_BATCH);
    println!(
        "{db:?}: {} heartbeats of {DEVICES} new credentials resolved with {queries} lookup \
         queries (bound {bound})",
        DEVICES * COPIES
    );
    assert!(
        queries <= bound as u64,
        "{queries} lookup queries for {DEVICES} credentials (at most {bound} expected)"
    );

    // Every credential is cached now: another round costs no query.
    let before = app.store().credential_queries();
    for (_, cred) in &devices {
        heartbeat_as(h.channel.clone(), cred.clone())
            .await
            .expect("cached heartbeat");
    }
    assert_eq!(
        app.store().credential_queries(),
        before,
        "cache hits query nothing"
    );

    // A revocation through this process: refused at once, and only that device.
    let (revoked_id, revoked_cred) = &devices[0];
    h.admin_client()
        .revoke_device(authed(
            pb::RevokeDeviceRequest {
                device_id: revoked_id.clone(),
            },
            &h.admin,
        ))
        .await
        .expect("revoke");
    let e = heartbeat_as(h.channel.clone(), revoked_cred.clone())
        .await
        .expect_err("revoked device refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{}", e.message());
    let before = app.store().credential_queries();
    for (_, cred) in &devices[1..] {
        heartbeat_as(h.channel.clone(), cred.clone())
            .await
            .expect("other devices unaffected");
    }
    assert_eq!(
        app.store().credential_queries(),
        before,
        "revoking one device keeps the others cached"
    );
    h.finish().await;
}
both_backends!(storm_batched, storm_is_batched);

/// A token revoked by another process (the break-glass `token revoke-api` command) is
/// refused by this server once the TTL has passed, however recently it was cached.
async fn revoked_elsewhere_within_ttl(db: Db) {
    const TTL: Duration = Duration::from_secs(2);
    let Some(h) = Harness::start(db, |c| c.auth_cache_ttl = TTL, None).await else {
        return;
    };
    let viewer = h
        .app()
        .create_api_token(Role::Viewer, "revoked elsewhere", None)
        .await
        .expect("viewer token");
    let list = |token: String| {
        let mut d = h.dashboard();
        async move {
            d.list_devices(authed(pb::ListDevicesRequest::default(), &token))
                .await
                .map(drop)
        }
    };
    list(viewer.token.clone()).await.expect("viewer reads");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-server"))
        .arg("--data-dir")
        .arg(h.dir.path())
        .args(["--database-url", &h.app().config().database_url])
        .args(["token", "revoke-api", &viewer.id.to_string()])
        .output()
        .expect("run cloud-server token revoke-api");
    assert!(
        out.status.success(),
        "token revoke-api: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Whatever this process cached was read before the revocation finished, so it has
    // expired once the TTL has passed since then.
    tokio::time::sleep(TTL).await;
    let e = list(viewer.token.clone())
        .await
        .expect_err("revoked elsewhere, refused after the TTL");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{}", e.message());
    h.finish().await;
}
both_backends!(revoked_elsewhere, revoked_elsewhere_within_ttl);
