//! Credentials and device inputs over the real gRPC server (SQLite and PostgreSQL):
//! enrollment-token defaults and caps, device-credential expiry and rotation with its grace
//! period, heartbeats naming another fleet's supernet, device-class spoofing, unset device
//! classes, and the dashboard's privacy floor (k) on aggregates, watches and device lists.
mod common;

use std::time::Duration;

use adaptivenet_cloud::domain::{now_ms, Role};
use adaptivenet_proto::v1 as pb;
use common::*;
use tonic::Code;

const DAY_MS: i64 = 24 * 3600 * 1000;

fn report(supernet: &str, p50: f64, quality: f64, class: pb::DeviceClass) -> pb::ReportRequest {
    pb::ReportRequest {
        supernet_id: supernet.into(),
        active_subnet: "2xx0".into(),
        latency_p50_ms: p50,
        latency_p95_ms: p50 * 1.2,
        latency_budget_ms: 10.0,
        quality_estimate: quality,
        quality_sample_count: 500,
        search: Some(pb::SearchStats::default()),
        latency_table: Some(pb::LatencyTableSummary::default()),
        device_class: class as i32,
    }
}

fn heartbeat(supernet: &str, p50: f64) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        agent_version: "0.1.0".into(),
        active_supernet_id: supernet.into(),
        active_subnet: "2xx0".into(),
        latency_p50_ms: p50,
        latency_p95_ms: p50 * 1.2,
        last_adaptation_reason: 0,
        applied_generation: 1,
        ..Default::default()
    }
}

async fn fleet(h: &Harness, name: &str) -> String {
    h.admin_client()
        .create_fleet(authed(
            pb::CreateFleetRequest { name: name.into() },
            &h.admin,
        ))
        .await
        .expect("fleet")
        .into_inner()
        .id
}

async fn enrollment_token(h: &Harness, fleet: &str, uses: u32, ttl_seconds: u64) -> String {
    h.admin_client()
        .create_enrollment_token(authed(
            pb::CreateEnrollmentTokenRequest {
                fleet_id: fleet.into(),
                uses,
                ttl_seconds,
            },
            &h.admin,
        ))
        .await
        .expect("enrollment token")
        .into_inner()
        .token
}

async fn enroll(h: &Harness, token: &str, class: i32) -> Result<pb::EnrollResponse, tonic::Status> {
    h.device()
        .enroll(pb::EnrollRequest {
            enrollment_token: token.into(),
            device_class: class,
            agent_version: "0.1.0".into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A supernet published to `fleet` under "stable".
async fn published_supernet(h: &Harness, fleet: &str) -> String {
    let dev = h.token(Role::Developer).await;
    let o = upload(h, &dev, "o", &safetensors_bytes(20, 0))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let supernet = make_supernet(h, &o.id, &[]).await;
    h.developer()
        .publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: supernet.clone(),
                fleet_id: fleet.into(),
                label: "stable".into(),
            },
            &dev,
        ))
        .await
        .expect("publish");
    supernet
}

fn assert_code(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, field: &str) {
    let e = r.expect_err(field);
    assert_eq!(e.code(), code, "{field}: {}", e.message());
    assert!(e.message().contains(field), "{field}: {}", e.message());
}

// ---------------------------------------------------------------- enrollment tokens

async fn token_defaults_and_caps(db: Db) {
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let f = fleet(&h, "f").await;
    // Unset uses and TTL: one use, 24 h.
    let before = now_ms();
    let t = h
        .admin_client()
        .create_enrollment_token(authed(
            pb::CreateEnrollmentTokenRequest {
                fleet_id: f.clone(),
                uses: 0,
                ttl_seconds: 0,
            },
            &h.admin,
        ))
        .await
        .expect("token")
        .into_inner();
    assert!(
        t.expires_unix_ms >= before + DAY_MS && t.expires_unix_ms <= now_ms() + DAY_MS,
        "expires {} (now {before})",
        t.expires_unix_ms
    );
    enroll(&h, &t.token, 1).await.expect("first use");
    let e = enroll(&h, &t.token, 1).await.expect_err("second use");
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());

    // Caps: the field is named, nothing is issued.
    let create = |uses: u32, ttl_seconds: u64| {
        let mut c = h.admin_client();
        let req = authed(
            pb::CreateEnrollmentTokenRequest {
                fleet_id: f.clone(),
                uses,
                ttl_seconds,
            },
            &h.admin,
        );
        async move { c.create_enrollment_token(req).await }
    };
    assert_code(create(10_001, 60).await, Code::InvalidArgument, "uses");
    assert_code(create(1_000_000, 60).await, Code::InvalidArgument, "uses");
    assert_code(
        create(1, 30 * 24 * 3600 + 1).await,
        Code::InvalidArgument,
        "ttl_seconds",
    );
    assert_code(
        create(1, u64::MAX).await,
        Code::InvalidArgument,
        "ttl_seconds",
    );
    create(10_000, 30 * 24 * 3600).await.expect("at the caps");
    // `now + ttl` that does not fit is refused, not wrapped (API tokens have no cap).
    let r = h
        .admin_client()
        .create_api_token(authed(
            pb::CreateApiTokenRequest {
                role: pb::Role::Viewer as i32,
                description: "huge".into(),
                ttl_seconds: u64::MAX,
                ..Default::default()
            },
            &h.admin,
        ))
        .await;
    assert_code(r, Code::InvalidArgument, "ttl_seconds");
    let r = h
        .admin_client()
        .create_api_token(authed(
            pb::CreateApiTokenRequest {
                role: pb::Role::Viewer as i32,
                description: "huge".into(),
                ttl_seconds: i64::MAX as u64 / 1000 + 1,
                ..Default::default()
            },
            &h.admin,
        ))
        .await;
    assert_code(r, Code::InvalidArgument, "ttl_seconds");
    // Still serving.
    enrollment_token(&h, &f, 1, 60).await;
    assert!(h.app().config().device_credential_ttl.is_some());
    h.finish().await;
}
both_backends!(token_caps, token_defaults_and_caps);

// ---------------------------------------------------------------- device credentials

async fn credential_expiry(db: Db) {
    // The default: device credentials expire after 30 days.
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let f = fleet(&h, "f").await;
    let tok = enrollment_token(&h, &f, 1, 60).await;
    let before = now_ms();
    let e = enroll(&h, &tok, 1).await.expect("enroll");
    assert!(
        e.credential_expires_unix_ms >= before + 30 * DAY_MS
            && e.credential_expires_unix_ms <= now_ms() + 30 * DAY_MS,
        "{}",
        e.credential_expires_unix_ms
    );
    h.finish().await;

    // A short lifetime (config knob): refused once it has passed.
    let Some(h) = Harness::start(
        db,
        |c| c.device_credential_ttl = Some(Duration::from_millis(400)),
        None,
    )
    .await
    else {
        return;
    };
    let f = fleet(&h, "f").await;
    let tok = enrollment_token(&h, &f, 1, 60).await;
    let e = enroll(&h, &tok, 1).await.expect("enroll");
    h.device()
        .heartbeat(authed(heartbeat("", 1.0), &e.device_credential))
        .await
        .expect("fresh credential");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let err = h
        .device()
        .heartbeat(authed(heartbeat("", 1.0), &e.device_credential))
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());
    h.finish().await;
}
both_backends!(expiry, credential_expiry);

async fn rotation_and_grace(db: Db) {
    let Some(h) = Harness::start(
        db,
        |c| c.credential_grace = Duration::from_millis(500),
        None,
    )
    .await
    else {
        return;
    };
    let f = fleet(&h, "f").await;
    let tok = enrollment_token(&h, &f, 1, 60).await;
    let e = enroll(&h, &tok, 1).await.expect("enroll");
    let old = e.device_credential;
    let hb = |cred: String| {
        let mut d = h.device();
        async move { d.heartbeat(authed(heartbeat("", 1.0), &cred)).await }
    };
    // API tokens cannot rotate device credentials.
    let err = h
        .device()
        .rotate_credential(authed(pb::Empty {}, &h.admin))
        .await
        .expect_err("api token");
    assert_eq!(err.code(), Code::PermissionDenied);

    let before = now_ms();
    let r = h
        .device()
        .rotate_credential(authed(pb::Empty {}, &old))
        .await
        .expect("rotate")
        .into_inner();
    assert_ne!(r.device_credential, old);
    assert!(r.credential_expires_unix_ms >= before + 30 * DAY_MS);
    assert!(
        r.previous_valid_until_unix_ms >= before + 500
            && r.previous_valid_until_unix_ms <= now_ms() + 500,
        "{}",
        r.previous_valid_until_unix_ms
    );
    let new = r.device_credential;
    // Both work during the grace period; the old one may not rotate again.
    hb(old.clone()).await.expect("old within grace");
    hb(new.clone()).await.expect("new");
    let err = h
        .device()
        .rotate_credential(authed(pb::Empty {}, &old))
        .await
        .expect_err("rotating with the previous credential");
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let err = hb(old.clone()).await.expect_err("old after grace");
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    hb(new.clone()).await.expect("new after grace");
    // A revoked device's new credential stops at once.
    h.admin_client()
        .revoke_device(authed(
            pb::RevokeDeviceRequest {
                device_id: e.device_id.clone(),
            },
            &h.admin,
        ))
        .await
        .expect("revoke");
    let err = hb(new.clone()).await.expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = h
        .device()
        .rotate_credential(authed(pb::Empty {}, &new))
        .await
        .expect_err("revoked rotates");
    assert_eq!(err.code(), Code::Unauthenticated);
    h.finish().await;
}
both_backends!(rotation, rotation_and_grace);

// ---------------------------------------------------------------- device inputs

async fn device_inputs(db: Db) {
    let Some(h) = Harness::start(db, |c| c.min_group_devices = 1, None).await else {
        return;
    };
    let mine = fleet(&h, "mine").await;
    let other = fleet(&h, "other").await;
    let supernet = published_supernet(&h, &mine).await;

    // Unset class with a bad token: the token decides (UNAUTHENTICATED), nothing enrolled.
    let err = enroll(&h, "anv1_enr_00", 0).await.expect_err("bad token");
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    let err = enroll(&h, "", 0).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    // Unset class with a good token: enrolled as unspecified.
    let tok = enrollment_token(&h, &other, 1, 60).await;
    let foreign = enroll(&h, &tok, 0).await.expect("class 0");
    let tok = enrollment_token(&h, &mine, 1, 60).await;
    let own = enroll(&h, &tok, pb::DeviceClass::CpuSmall as i32)
        .await
        .expect("enroll");

    // A heartbeat naming a supernet of another fleet: accepted, the supernet not recorded.
    let r = h
        .device()
        .heartbeat(authed(
            heartbeat(&supernet, 3.0),
            &foreign.device_credential,
        ))
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(r.active_supernet_ignored);
    let r = h
        .device()
        .heartbeat(authed(heartbeat(&supernet, 3.0), &own.device_credential))
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(!r.active_supernet_ignored);
    let devices = h
        .dashboard()
        .list_devices(authed(pb::ListDevicesRequest::default(), &h.admin))
        .await
        .expect("devices")
        .into_inner()
        .devices;
    let by_id = |id: &str| devices.iter().find(|d| d.id == id).expect("listed").clone();
    let f = by_id(&foreign.device_id);
    assert_eq!(f.active_supernet_id, "", "foreign supernet recorded");
    assert_eq!(f.active_subnet, "");
    assert_eq!(f.device_class, 0);
    assert_eq!(by_id(&own.device_id).active_supernet_id, supernet);

    // A report claiming another class is filed under the enrolled one.
    h.device()
        .report(authed(
            report(&supernet, 4.0, 0.9, pb::DeviceClass::GpuServer),
            &own.device_credential,
        ))
        .await
        .expect("report");
    let agg = h
        .dashboard()
        .get_fleet_aggregates(authed(
            pb::GetFleetAggregatesRequest { fleet_id: mine },
            &h.admin,
        ))
        .await
        .expect("aggregates")
        .into_inner();
    assert_eq!(agg.groups.len(), 1);
    assert_eq!(agg.groups[0].device_class, pb::DeviceClass::CpuSmall as i32);
    h.finish().await;
}
both_backends!(inputs, device_inputs);

// ---------------------------------------------------------------- privacy floor

async fn next_report_events(
    s: &mut tonic::Streaming<pb::FleetEvent>,
    quiet: Duration,
) -> Vec<pb::FleetEvent> {
    let mut out = Vec::new();
    while let Ok(ev) = tokio::time::timeout(quiet, s.message()).await {
        let Some(ev) = ev.expect("event") else { break };
        if ev.kind == pb::fleet_event::Kind::Report as i32 {
            out.push(ev);
        }
    }
    out
}

async fn privacy_floor(db: Db) {
    // Default k = 5.
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let viewer = h.token(Role::Viewer).await;
    let f = fleet(&h, "f").await;
    let supernet = published_supernet(&h, &f).await;
    let tok = enrollment_token(&h, &f, 5, 60).await;
    let mut creds = Vec::new();
    for _ in 0..5 {
        creds.push(
            enroll(&h, &tok, pb::DeviceClass::CpuSmall as i32)
                .await
                .expect("enroll")
                .device_credential,
        );
    }
    let watch = |token: String| {
        let mut d = h.dashboard();
        let f = f.clone();
        async move {
            d.watch_fleet(authed(pb::WatchFleetRequest { fleet_id: f }, &token))
                .await
                .expect("watch")
                .into_inner()
        }
    };
    let mut viewer_watch = watch(viewer.clone()).await;
    let mut admin_watch = watch(h.admin.clone()).await;
    let aggregates = |token: String| {
        let mut d = h.dashboard();
        let f = f.clone();
        async move {
            d.get_fleet_aggregates(authed(
                pb::GetFleetAggregatesRequest { fleet_id: f },
                &token,
            ))
            .await
            .expect("aggregates")
            .into_inner()
        }
    };
    let send = |i: usize, p50: f64, quality: f64| {
        let mut d = h.device();
        let r = authed(
            report(&supernet, p50, quality, pb::DeviceClass::CpuSmall),
            &creds[i],
        );
        async move { d.report(r).await.expect("report") }
    };

    // One device: its group is suppressed for everybody, only counted.
    send(0, 4.0, 0.5).await;
    for token in [h.admin.clone(), viewer.clone()] {
        let a = aggregates(token).await;
        assert!(a.groups.is_empty(), "{a:?}");
        assert_eq!((a.suppressed_groups, a.suppressed_devices), (1, 1));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Five devices: the group shows, without its extremes (below 2k).
    for (i, q) in [(1, 0.6), (2, 0.7), (3, 0.8), (4, 0.9)] {
        send(i, 5.0, q).await;
    }
    let a = aggregates(h.admin.clone()).await;
    assert_eq!(a.suppressed_groups, 0);
    assert_eq!(a.groups.len(), 1);
    let q = a.groups[0].quality.expect("quality");
    assert_eq!(a.groups[0].devices, 5);
    assert!(q.extremes_suppressed);
    assert_eq!((q.min, q.p90, q.max), (0.0, 0.0, 0.0));
    assert!((q.mean - 0.7).abs() < 1e-9, "{q:?}");
    // The viewer's view moves only after k devices reported since it was taken: four have.
    let v = aggregates(viewer.clone()).await;
    assert!(
        v.groups.is_empty(),
        "viewer saw an update of 4 reports: {v:?}"
    );
    assert_eq!(v.suppressed_devices, 1);
    send(0, 4.0, 0.55).await;
    let v = aggregates(viewer.clone()).await;
    assert_eq!(v.groups.len(), 1, "{v:?}");
    assert!((v.groups[0].quality.expect("q").mean - 0.71).abs() < 1e-9);
    // The viewer's next view needs k more devices: one report changes nothing.
    send(3, 9.0, 0.1).await;
    assert_eq!(aggregates(viewer.clone()).await, v);

    // Watches: the admin sees every report with its device; the viewer one event per k
    // reports, without the device.
    let admin_events = next_report_events(&mut admin_watch, Duration::from_millis(300)).await;
    assert_eq!(admin_events.len(), 7);
    assert!(admin_events.iter().all(|e| !e.device_id.is_empty()));
    let viewer_events = next_report_events(&mut viewer_watch, Duration::from_millis(300)).await;
    assert_eq!(viewer_events.len(), 1, "{viewer_events:?}");
    assert_eq!(viewer_events[0].device_id, "");

    // Device lists: no per-device latency for viewers.
    h.device()
        .heartbeat(authed(heartbeat(&supernet, 5.0), &creds[0]))
        .await
        .expect("heartbeat");
    let list = |token: String| {
        let mut d = h.dashboard();
        async move {
            d.list_devices(authed(pb::ListDevicesRequest::default(), &token))
                .await
                .expect("devices")
                .into_inner()
                .devices
        }
    };
    assert!(list(h.admin.clone())
        .await
        .iter()
        .any(|d| d.latency_p50_ms == 5.0));
    assert!(list(viewer.clone())
        .await
        .iter()
        .all(|d| d.latency_p50_ms == 0.0 && d.latency_p95_ms == 0.0));
    // A viewer's filter must name a fleet (snapshots are kept per existing fleet only).
    let err = h
        .dashboard()
        .get_fleet_aggregates(authed(
            pb::GetFleetAggregatesRequest {
                fleet_id: uuid::Uuid::new_v4().to_string(),
            },
            &viewer,
        ))
        .await
        .expect_err("unknown fleet");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    drop((viewer_watch, admin_watch));
    h.finish().await;
}
both_backends!(floor, privacy_floor);
