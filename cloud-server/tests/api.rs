//! The cloud's gRPC API end to end: real server on loopback, real SQLite / PostgreSQL.
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use adaptivenet_cloud::domain::{JobState, Role};
use adaptivenet_cloud::error::CloudError;
use adaptivenet_cloud::jobs::{JobContext, JobOutput, JobRunner, Worker};
use adaptivenet_proto::v1 as pb;
use common::*;
use futures::future::BoxFuture;
use tonic::Code;

// ---------------------------------------------------------------- upload

async fn upload_semantics(db: Db) {
    let Some(h) = Harness::start(db, |c| c.max_oracle_bytes = 64 << 10, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let data = safetensors_bytes(3000, 1); // ~6 KB: the width-8 one-block oracle of ARCH
    let r = upload(&h, &dev, "resnet20", &data).await.expect("upload");
    assert!(r.created);
    let o = r.oracle.expect("oracle");
    assert_eq!(o.family, "adaptivenet.resnet_small");
    let (num_tensors, num_params) = expected_oracle_info(ARCH);
    assert_eq!(o.num_tensors, num_tensors);
    assert_eq!(o.num_params, num_params);
    assert_eq!(o.weights_sha256, sha256_hex(&data));
    // Idempotent: same digest -> same oracle, not created again.
    let again = upload(&h, &dev, "resnet20-again", &data)
        .await
        .expect("re-upload");
    assert!(!again.created);
    assert_eq!(again.oracle.expect("oracle").id, o.id);
    assert_eq!(blob_files(&h), (1, 0));

    let bad = safetensors_bytes(100, 7);
    let sha = sha256_hex(&bad);
    let cases: Vec<(&str, Vec<pb::UploadOracleRequest>, Code, &str)> = vec![
        (
            "truncated",
            upload_msgs("t", &bad[..bad.len() - 10], bad.len() as u64, &sha, 64),
            Code::InvalidArgument,
            "header.size_bytes",
        ),
        (
            "too many bytes",
            upload_msgs("t", &bad, bad.len() as u64 - 10, &sha, 64),
            Code::InvalidArgument,
            "chunk",
        ),
        (
            "wrong digest",
            upload_msgs("t", &bad, bad.len() as u64, &sha256_hex(b"other"), 64),
            Code::InvalidArgument,
            "header.weights_sha256",
        ),
        (
            "malformed digest",
            upload_msgs("t", &bad, bad.len() as u64, "xyz", 64),
            Code::InvalidArgument,
            "header.weights_sha256",
        ),
        (
            "oversized declared",
            upload_msgs("t", &bad, 1 << 30, &sha, 64),
            Code::InvalidArgument,
            "header.size_bytes",
        ),
        (
            "not safetensors",
            upload_msgs("t", b"garbage!", 8, &sha256_hex(b"garbage!"), 64),
            Code::InvalidArgument,
            "chunk",
        ),
        (
            "no header",
            upload_msgs("t", &bad, bad.len() as u64, &sha, 64)[1..].to_vec(),
            Code::InvalidArgument,
            "header",
        ),
        ("empty stream", vec![], Code::InvalidArgument, "header"),
    ];
    for (what, msgs, code, field) in cases {
        let err = h
            .developer()
            .upload_oracle(authed(futures::stream::iter(msgs), &dev))
            .await
            .expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(err.message().contains(field), "{what}: {}", err.message());
    }
    // Bad architecture descriptor.
    let mut msgs = upload_msgs("t", &bad, bad.len() as u64, &sha, 64);
    if let Some(pb::upload_oracle_request::Msg::Header(hd)) = &mut msgs[0].msg {
        hd.arch_json = br#"{"depth":20}"#.to_vec();
    }
    let err = h
        .developer()
        .upload_oracle(authed(futures::stream::iter(msgs), &dev))
        .await
        .expect_err("arch");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("family"), "{}", err.message());
    // Well-formed weights that do not fit the architecture (width 16 against ARCH's 8): the
    // error names the first mismatching tensor (the stem conv, torchvision name).
    let (_, wide) = oracle_fixture(16, 3);
    let err = upload(&h, &dev, "wide", &wide)
        .await
        .expect_err("weights of another width");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("conv1.weight"),
        "names the tensor: {}",
        err.message()
    );
    // Nothing partial is stored; the server keeps serving.
    assert_eq!(blob_files(&h), (1, 0));
    let list = h
        .developer()
        .list_oracles(authed(pb::ListOraclesRequest::default(), &dev))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.oracles.len(), 1);
    // Unknown ids.
    let err = h
        .developer()
        .get_oracle(authed(
            pb::GetOracleRequest {
                oracle_id: uuid::Uuid::new_v4().to_string(),
            },
            &dev,
        ))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = h
        .developer()
        .get_oracle(authed(
            pb::GetOracleRequest {
                oracle_id: "nope".into(),
            },
            &dev,
        ))
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("oracle_id"));
    h.finish().await;
}
both_backends!(upload, upload_semantics);

// ---------------------------------------------------------------- auth

async fn auth_matrix(db: Db) {
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let viewer = h.token(Role::Viewer).await;
    let list = || pb::ListOraclesRequest::default();

    // Missing / wrong tokens.
    let err = h
        .developer()
        .list_oracles(tonic::Request::new(list()))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = h
        .developer()
        .list_oracles(authed(list(), "anv1_api_0000"))
        .await
        .expect_err("wrong");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = h
        .developer()
        .list_oracles(authed(list(), "garbage"))
        .await
        .expect_err("garbage");
    assert_eq!(err.code(), Code::Unauthenticated);

    // Viewer reads but cannot mutate; developer cannot administer.
    h.developer()
        .list_oracles(authed(list(), &viewer))
        .await
        .expect("viewer reads");
    let err = upload(&h, &viewer, "x", &safetensors_bytes(10, 0))
        .await
        .expect_err("viewer upload");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .developer()
        .register_dataset(authed(
            pb::RegisterDatasetRequest {
                name: "d".into(),
                uri: "/d".into(),
                format: "idx".into(),
                num_samples: 1,
                options: None,
            },
            &viewer,
        ))
        .await
        .expect_err("viewer dataset");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .admin_client()
        .create_fleet(authed(pb::CreateFleetRequest { name: "f".into() }, &dev))
        .await
        .expect_err("dev admin");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Enrollment: one-shot token; device credential works only on the device API.
    let (fleet_a, _dev_a, cred_a) = h.enrolled_device("fleet-a").await;
    let tok = h
        .admin_client()
        .create_enrollment_token(authed(
            pb::CreateEnrollmentTokenRequest {
                fleet_id: fleet_a.clone(),
                uses: 1,
                ttl_seconds: 0,
            },
            &h.admin,
        ))
        .await
        .expect("token")
        .into_inner();
    let enroll = |t: String| pb::EnrollRequest {
        enrollment_token: t,
        device_class: 1,
        agent_version: "0.1.0".into(),
    };
    h.device()
        .enroll(enroll(tok.token.clone()))
        .await
        .expect("first use");
    let err = h
        .device()
        .enroll(enroll(tok.token.clone()))
        .await
        .expect_err("second use");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = h
        .device()
        .enroll(enroll("anv1_enr_ffff".into()))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::Unauthenticated);
    let bad_class = pb::EnrollRequest {
        device_class: 99,
        ..enroll(tok.token.clone())
    };
    let err = h.device().enroll(bad_class).await.expect_err("class");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("device_class"));
    // Revoked enrollment token.
    let tok2 = h
        .admin_client()
        .create_enrollment_token(authed(
            pb::CreateEnrollmentTokenRequest {
                fleet_id: fleet_a.clone(),
                uses: 5,
                ttl_seconds: 0,
            },
            &h.admin,
        ))
        .await
        .expect("token")
        .into_inner();
    h.admin_client()
        .revoke_enrollment_token(authed(
            pb::RevokeTokenRequest {
                token_id: tok2.token_id,
            },
            &h.admin,
        ))
        .await
        .expect("revoke");
    let err = h
        .device()
        .enroll(enroll(tok2.token))
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated);

    h.device()
        .get_desired_state(authed(pb::Empty {}, &cred_a))
        .await
        .expect("device reads its state");
    let err = h
        .developer()
        .list_oracles(authed(list(), &cred_a))
        .await
        .expect_err("device on mgmt");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .dashboard()
        .list_devices(authed(pb::ListDevicesRequest::default(), &cred_a))
        .await
        .expect_err("device on dashboard");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .device()
        .get_desired_state(authed(pb::Empty {}, &dev))
        .await
        .expect_err("api token on device api");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Cross-fleet reads are denied.
    let o = upload(&h, &dev, "o", &safetensors_bytes(50, 3))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let module = b"module-bytes-of-fleet-b".to_vec();
    let supernet = make_supernet(&h, &o.id, std::slice::from_ref(&module)).await;
    let (fleet_b, _, cred_b) = h.enrolled_device("fleet-b").await;
    h.developer()
        .publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: supernet.clone(),
                fleet_id: fleet_b.clone(),
                label: "stable".into(),
            },
            &dev,
        ))
        .await
        .expect("publish");
    let dl = |cred: &str| {
        authed(
            pb::DownloadBlobRequest {
                sha256: sha256_hex(&module),
                offset: 0,
                chunk_size: 0,
            },
            cred,
        )
    };
    h.device()
        .download_blob(dl(&cred_b))
        .await
        .expect("own fleet");
    let err = h
        .device()
        .download_blob(dl(&cred_a))
        .await
        .expect_err("other fleet blob");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .device()
        .get_manifest(authed(
            pb::GetManifestRequest {
                supernet_id: supernet.clone(),
            },
            &cred_a,
        ))
        .await
        .expect_err("other fleet manifest");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .device()
        .download_blob(authed(
            pb::DownloadBlobRequest {
                sha256: "0".repeat(64),
                offset: 0,
                chunk_size: 0,
            },
            &cred_b,
        ))
        .await
        .expect_err("unknown blob");
    assert_eq!(err.code(), Code::NotFound);

    // Revocation: API token and device credential stop working at once.
    let (id, victim) = {
        let t = h
            .app()
            .create_api_token(Role::Developer, "victim", None)
            .await
            .expect("token");
        (t.id, t.token)
    };
    h.developer()
        .list_oracles(authed(list(), &victim))
        .await
        .expect("works before revoke");
    h.admin_client()
        .revoke_api_token(authed(
            pb::RevokeTokenRequest {
                token_id: id.to_string(),
            },
            &h.admin,
        ))
        .await
        .expect("revoke");
    let err = h
        .developer()
        .list_oracles(authed(list(), &victim))
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated);
    let dev_b = h
        .dashboard()
        .list_devices(authed(
            pb::ListDevicesRequest {
                fleet_id: fleet_b.clone(),
                ..Default::default()
            },
            &viewer,
        ))
        .await
        .expect("devices")
        .into_inner();
    assert_eq!(dev_b.devices.len(), 1);
    h.admin_client()
        .revoke_device(authed(
            pb::RevokeDeviceRequest {
                device_id: dev_b.devices[0].id.clone(),
            },
            &h.admin,
        ))
        .await
        .expect("revoke device");
    let err = h
        .device()
        .get_desired_state(authed(pb::Empty {}, &cred_b))
        .await
        .expect_err("revoked device");
    assert_eq!(err.code(), Code::Unauthenticated);

    // Expired API token.
    let t = h
        .app()
        .create_api_token(Role::Viewer, "short", Some(Duration::from_millis(1)))
        .await
        .expect("token");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let err = h
        .developer()
        .list_oracles(authed(list(), &t.token))
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::Unauthenticated);
    h.finish().await;
}
both_backends!(auth, auth_matrix);

// ---------------------------------------------------------------- download

async fn resumable_download(db: Db) {
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let o = upload(&h, &dev, "o", &safetensors_bytes(20, 0))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let big: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let small = b"tiny".to_vec();
    // The artifact's stem and head blobs are replaced by `big` and `small`.
    let supernet = make_supernet(&h, &o.id, &[big.clone(), small.clone()]).await;
    let (fleet, _, cred) = h.enrolled_device("edge").await;
    h.developer()
        .set_desired_state(authed(
            pb::SetDesiredStateRequest {
                fleet_id: fleet.clone(),
                target: Some(pb::set_desired_state_request::Target::Label(
                    "stable".into(),
                )),
                budget: Some(pb::LatencyBudgetPolicy {
                    latency_budget_ms: 5.0,
                    budget_fraction: 0.6,
                    hysteresis: 0.1,
                }),
            },
            &dev,
        ))
        .await
        .expect("desired");
    // Label not yet published: the desired state names no supernet.
    let d = h
        .device()
        .get_desired_state(authed(pb::Empty {}, &cred))
        .await
        .expect("desired")
        .into_inner();
    assert!(d.supernet_id.is_empty());
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
    let d = h
        .device()
        .get_desired_state(authed(pb::Empty {}, &cred))
        .await
        .expect("desired")
        .into_inner();
    assert_eq!(d.supernet_id, supernet);
    assert_eq!(d.supernet_version, 1);
    assert!(
        d.generation >= 2,
        "publishing the followed label bumps the generation"
    );
    let m = h
        .device()
        .get_manifest(authed(
            pb::GetManifestRequest {
                supernet_id: supernet.clone(),
            },
            &cred,
        ))
        .await
        .expect("manifest")
        .into_inner();
    let manifest =
        adaptivenet_core::artifact::Manifest::from_json(&m.manifest_json).expect("manifest");
    let digests = distinct_blobs(&manifest);
    assert_eq!(m.blobs.len(), digests.len());
    assert!(
        digests.len() > 2,
        "stem, head and the positions' modules: {digests:?}"
    );
    let listed: std::collections::BTreeSet<String> =
        m.blobs.iter().map(|b| b.sha256.clone()).collect();
    assert_eq!(listed, digests);
    assert_eq!(
        (manifest.stem.sha256.clone(), manifest.head.sha256.clone()),
        (sha256_hex(&big), sha256_hex(&small))
    );

    // Download part, "break", resume from the offset held, verify the digest at the end.
    let sha = sha256_hex(&big);
    let mut got = Vec::new();
    let mut s = h
        .device()
        .download_blob(authed(
            pb::DownloadBlobRequest {
                sha256: sha.clone(),
                offset: 0,
                chunk_size: 100_000,
            },
            &cred,
        ))
        .await
        .expect("download")
        .into_inner();
    let first = s.message().await.expect("chunk").expect("some");
    assert_eq!(first.offset, 0);
    assert_eq!(first.total_size, big.len() as u64);
    assert!(!first.last);
    got.extend_from_slice(&first.data);
    drop(s);
    let mut s = h
        .device()
        .download_blob(authed(
            pb::DownloadBlobRequest {
                sha256: sha.clone(),
                offset: got.len() as u64,
                chunk_size: 0,
            },
            &cred,
        ))
        .await
        .expect("resume")
        .into_inner();
    let mut final_sha = String::new();
    while let Some(c) = s.message().await.expect("chunk") {
        assert_eq!(c.offset, got.len() as u64);
        got.extend_from_slice(&c.data);
        if c.last {
            final_sha = c.sha256;
        }
    }
    assert_eq!(got, big);
    assert_eq!(final_sha, sha);
    assert_eq!(sha256_hex(&got), final_sha);
    // Offset at the end: one empty last chunk; beyond the end: INVALID_ARGUMENT.
    let mut s = h
        .device()
        .download_blob(authed(
            pb::DownloadBlobRequest {
                sha256: sha.clone(),
                offset: big.len() as u64,
                chunk_size: 0,
            },
            &cred,
        ))
        .await
        .expect("at end")
        .into_inner();
    let c = s.message().await.expect("chunk").expect("some");
    assert!(c.last && c.data.is_empty());
    let err = h
        .device()
        .download_blob(authed(
            pb::DownloadBlobRequest {
                sha256: sha.clone(),
                offset: big.len() as u64 + 1,
                chunk_size: 0,
            },
            &cred,
        ))
        .await
        .expect_err("beyond");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("offset"));
    h.finish().await;
}
both_backends!(download, resumable_download);

// ---------------------------------------------------------------- reports + aggregates

fn report(supernet: &str, subnet: &str, p50: f64, quality: f64, samples: u64) -> pb::ReportRequest {
    pb::ReportRequest {
        supernet_id: supernet.into(),
        active_subnet: subnet.into(),
        latency_p50_ms: p50,
        latency_p95_ms: p50 * 1.2,
        latency_budget_ms: 10.0,
        quality_estimate: quality,
        quality_sample_count: samples,
        search: Some(pb::SearchStats {
            generations: 5,
            evaluated_subnets: 300,
            search_seconds: 12.0,
            front_size: 8,
        }),
        latency_table: Some(pb::LatencyTableSummary {
            num_entries: 40,
            stem_ms: 0.1,
            head_ms: 0.05,
            oracle_ms: 3.0,
            calibration_factor: 1.08,
        }),
        device_class: pb::DeviceClass::CpuSmall as i32,
    }
}

async fn reports_and_aggregates(db: Db) {
    // Three devices: a privacy floor of 1 shows their group (the floor has its own tests).
    let Some(h) = Harness::start(db, |c| c.min_group_devices = 1, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let viewer = h.token(Role::Viewer).await;
    let o = upload(&h, &dev, "o", &safetensors_bytes(20, 0))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let supernet = make_supernet(&h, &o.id, &[]).await;
    let fleet = h
        .admin_client()
        .create_fleet(authed(
            pb::CreateFleetRequest {
                name: "fleet".into(),
            },
            &h.admin,
        ))
        .await
        .expect("fleet")
        .into_inner();
    h.developer()
        .publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: supernet.clone(),
                fleet_id: fleet.id.clone(),
                label: "stable".into(),
            },
            &dev,
        ))
        .await
        .expect("publish");
    let tok = h
        .admin_client()
        .create_enrollment_token(authed(
            pb::CreateEnrollmentTokenRequest {
                fleet_id: fleet.id.clone(),
                uses: 3,
                ttl_seconds: 3600,
            },
            &h.admin,
        ))
        .await
        .expect("token")
        .into_inner();
    let mut creds = Vec::new();
    for _ in 0..3 {
        let e = h
            .device()
            .enroll(pb::EnrollRequest {
                enrollment_token: tok.token.clone(),
                device_class: 1,
                agent_version: "0.1.0".into(),
            })
            .await
            .expect("enroll")
            .into_inner();
        assert_eq!(e.fleet_id, fleet.id);
        creds.push(e.device_credential);
    }
    let mut watch = h
        .dashboard()
        .watch_fleet(authed(
            pb::WatchFleetRequest {
                fleet_id: fleet.id.clone(),
            },
            &viewer,
        ))
        .await
        .expect("watch")
        .into_inner();

    // Malformed reports: the right code, the field named, nothing stored.
    let bad: Vec<(pb::ReportRequest, &str)> = vec![
        (
            report(&supernet, "0000", 5.0, 0.9, 99),
            "quality_sample_count",
        ),
        (report(&supernet, "0000", 5.0, 1.5, 500), "quality_estimate"),
        (report(&supernet, "0000", -1.0, 0.9, 500), "latency_p50_ms"),
        (
            report(&supernet, "0000", f64::NAN, 0.9, 500),
            "latency_p50_ms",
        ),
        (
            report(&supernet, "free text!", 5.0, 0.9, 500),
            "active_subnet",
        ),
        (report("not-a-uuid", "0000", 5.0, 0.9, 500), "supernet_id"),
        (
            pb::ReportRequest {
                device_class: 42,
                ..report(&supernet, "0000", 5.0, 0.9, 500)
            },
            "device_class",
        ),
        (
            pb::ReportRequest {
                latency_p95_ms: 1.0,
                ..report(&supernet, "0000", 5.0, 0.9, 500)
            },
            "latency_p95_ms",
        ),
    ];
    for (r, field) in bad {
        let err = h
            .device()
            .report(authed(r, &creds[0]))
            .await
            .expect_err(field);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let other = uuid::Uuid::new_v4().to_string();
    let err = h
        .device()
        .report(authed(report(&other, "0000", 5.0, 0.9, 500), &creds[0]))
        .await
        .expect_err("unassigned supernet");
    assert_eq!(err.code(), Code::PermissionDenied);
    let agg = h
        .dashboard()
        .get_fleet_aggregates(authed(
            pb::GetFleetAggregatesRequest {
                fleet_id: fleet.id.clone(),
            },
            &viewer,
        ))
        .await
        .expect("agg")
        .into_inner();
    assert!(agg.groups.is_empty(), "nothing stored by rejected reports");

    // Valid reports from three devices (the second report of device 0 replaces its first).
    h.device()
        .report(authed(report(&supernet, "2xx0", 50.0, 0.5, 100), &creds[0]))
        .await
        .expect("report");
    h.device()
        .report(authed(report(&supernet, "2xx0", 4.0, 0.90, 100), &creds[0]))
        .await
        .expect("report");
    h.device()
        .report(authed(
            report(&supernet, "2xx0", 6.0, 0.92, 1000),
            &creds[1],
        ))
        .await
        .expect("report");
    h.device()
        .report(authed(report(&supernet, "0000", 9.0, 0.94, 300), &creds[2]))
        .await
        .expect("report");
    let agg = h
        .dashboard()
        .get_fleet_aggregates(authed(
            pb::GetFleetAggregatesRequest {
                fleet_id: fleet.id.clone(),
            },
            &viewer,
        ))
        .await
        .expect("agg")
        .into_inner();
    assert_eq!(agg.devices_total, 3);
    assert_eq!(agg.devices_online, 3);
    assert_eq!(agg.groups.len(), 1);
    let g = &agg.groups[0];
    assert_eq!(g.supernet_id, supernet);
    assert_eq!(g.devices, 3);
    let p50 = g.latency_p50_ms.expect("dist");
    assert_eq!((p50.count, p50.min, p50.p50, p50.max), (3, 4.0, 6.0, 9.0));
    let q = g.quality.expect("dist");
    assert!((q.mean - 0.92).abs() < 1e-9, "{q:?}");
    // p95 = 1.2 * p50: 4.8, 7.2 within budget 10; 10.8 not.
    assert!((g.within_budget_fraction - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(
        g.subnets[0],
        pb::SubnetCount {
            subnet: "2xx0".into(),
            devices: 2
        }
    );
    assert_eq!(
        g.subnets[1],
        pb::SubnetCount {
            subnet: "0000".into(),
            devices: 1
        }
    );

    // Heartbeats feed device state; the watch stream saw the reports.
    let hb = pb::HeartbeatRequest {
        agent_version: "0.1.1".into(),
        active_supernet_id: supernet.clone(),
        active_subnet: "2xx0".into(),
        latency_p50_ms: 4.0,
        latency_p95_ms: 5.0,
        last_adaptation_reason: pb::AdaptationReason::OverBudget as i32,
        applied_generation: 1,
        ..Default::default()
    };
    let r = h
        .device()
        .heartbeat(authed(hb.clone(), &creds[0]))
        .await
        .expect("heartbeat")
        .into_inner();
    assert_eq!((r.desired_generation, r.heartbeat_interval_ms), (0, 30_000));
    let err = h
        .device()
        .heartbeat(authed(
            pb::HeartbeatRequest {
                active_subnet: "a b".into(),
                ..hb
            },
            &creds[0],
        ))
        .await
        .expect_err("bad hb");
    assert_eq!(err.code(), Code::InvalidArgument);
    let devices = h
        .dashboard()
        .list_devices(authed(pb::ListDevicesRequest::default(), &viewer))
        .await
        .expect("devices")
        .into_inner()
        .devices;
    let d0 = devices
        .iter()
        .find(|d| d.agent_version == "0.1.1")
        .expect("heartbeat applied");
    assert_eq!(d0.active_subnet, "2xx0");
    assert_eq!(
        d0.last_adaptation_reason,
        pb::AdaptationReason::OverBudget as i32
    );
    let mut kinds = Vec::new();
    while kinds.len() < 5 {
        let ev = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("event in time")
            .expect("ok")
            .expect("some");
        kinds.push(ev.kind);
    }
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == pb::fleet_event::Kind::Report as i32)
            .count(),
        4
    );
    h.finish().await;
}
both_backends!(reports, reports_and_aggregates);

async fn stale_devices(db: Db) {
    let Some(h) = Harness::start(
        db,
        |c| {
            c.heartbeat_interval = Duration::from_millis(100);
            c.stale_after_missed = 2;
        },
        None,
    )
    .await
    else {
        return;
    };
    let viewer = h.token(Role::Viewer).await;
    let (_, _, _cred) = h.enrolled_device("f").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let agg = h
        .dashboard()
        .get_fleet_aggregates(authed(pb::GetFleetAggregatesRequest::default(), &viewer))
        .await
        .expect("agg")
        .into_inner();
    assert_eq!((agg.devices_total, agg.devices_stale), (1, 1));
    h.finish().await;
}
both_backends!(stale, stale_devices);

// ---------------------------------------------------------------- jobs

/// A test runner: `steps` steps of `step_ms`, a checkpoint (the next step) after each; at
/// `hang_at` it stops heartbeat-independent progress forever (a "crashed" worker once its
/// task is aborted). Records the step each attempt started from.
struct StepRunner {
    steps: u32,
    step_ms: u64,
    hang_at: Option<u32>,
    starts: Arc<Mutex<Vec<u32>>>,
}

impl JobRunner for StepRunner {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<JobOutput, CloudError>> {
        let (steps, step_ms, hang_at, starts) =
            (self.steps, self.step_ms, self.hang_at, self.starts.clone());
        Box::pin(async move {
            let from = match ctx.checkpoints.load().await? {
                Some(b) => u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
                None => 0,
            };
            starts.lock().expect("lock").push(from);
            for step in from..steps {
                if hang_at == Some(step) {
                    std::future::pending::<()>().await;
                }
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return Err(CloudError::Cancelled("runner saw cancel".into())),
                    _ = tokio::time::sleep(Duration::from_millis(step_ms)) => {}
                }
                ctx.checkpoints.save(&(step + 1).to_le_bytes()).await?;
                ctx.progress
                    .send("stage0", (step + 1) as f64 / steps as f64);
            }
            // A real artifact (blobs in the job's store), distinct per job.
            let seed = u64::from_le_bytes(ctx.job.id.as_bytes()[..8].try_into().expect("8"));
            Ok(JobOutput {
                manifest_json: store_supernet_artifact(&ctx.blobs, seed).await,
            })
        })
    }
}

async fn job_lease_takeover(db: Db) {
    let Some(h) = Harness::start(db, |c| c.workers = 0, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let o = job_oracle(&h, &dev, "o", 20).await;
    let dataset = job_dataset(&h, &dev).await;
    let job = h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: o.id.clone(),
                dataset_id: dataset,
                params_json: "{\"seed\":1}".into(),
                ..Default::default()
            },
            &dev,
        ))
        .await
        .expect("start")
        .into_inner();
    assert_eq!(job.state, pb::JobState::Queued as i32);
    let job_id = uuid::Uuid::parse_str(&job.id).expect("uuid");
    let starts = Arc::new(Mutex::new(Vec::new()));
    let runner_a = Arc::new(StepRunner {
        steps: 6,
        step_ms: 10,
        hang_at: Some(3),
        starts: starts.clone(),
    });
    let stop_a = tokio_util::sync::CancellationToken::new();
    let a = tokio::spawn(Worker::new(h.app().clone(), runner_a, "worker-a").run(stop_a.clone()));
    // Wait for A to checkpoint step 3, then "crash" it (no more heartbeats).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let j = h.app().store().get_job(job_id).await.expect("job");
        if j.checkpoint_sha256.is_some() && j.progress >= 0.5 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker A made no progress: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.abort();
    let running = h.app().store().get_job(job_id).await.expect("job");
    assert_eq!(
        (running.state, running.lease_owner.as_deref()),
        (JobState::Running, Some("worker-a"))
    );
    // B cannot claim before the lease expires, then takes over and resumes from step 3.
    let runner_b = Arc::new(StepRunner {
        steps: 6,
        step_ms: 10,
        hang_at: None,
        starts: starts.clone(),
    });
    let b = Worker::new(h.app().clone(), runner_b, "worker-b");
    let stop_b = tokio_util::sync::CancellationToken::new();
    assert!(
        !b.poll_once(&stop_b).await.expect("poll"),
        "lease still held by A"
    );
    tokio::time::sleep(h.app().config().job_lease + Duration::from_millis(100)).await;
    assert!(
        b.poll_once(&stop_b).await.expect("poll"),
        "B claims after expiry"
    );
    let done = h
        .developer()
        .get_job(authed(
            pb::GetJobRequest {
                job_id: job.id.clone(),
            },
            &dev,
        ))
        .await
        .expect("job")
        .into_inner();
    assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempts, 2);
    assert_eq!(done.progress, 1.0);
    assert_eq!(*starts.lock().expect("lock"), vec![0, 3]);
    let s = h
        .developer()
        .get_supernet(authed(
            pb::GetSupernetRequest {
                supernet_id: done.supernet_id.clone(),
            },
            &dev,
        ))
        .await
        .expect("supernet")
        .into_inner();
    assert_eq!(s.supernet.expect("supernet").version, 1);
    let manifest =
        adaptivenet_core::artifact::Manifest::from_json(&s.manifest_json).expect("manifest");
    assert_eq!(s.blobs.len(), distinct_blobs(&manifest).len());
    // A stale worker cannot write to a job it lost.
    assert!(!h
        .app()
        .store()
        .job_progress(job_id, "worker-a", "x", 0.1, 0)
        .await
        .expect("fenced"));
    stop_a.cancel();
    h.finish().await;
}
both_backends!(job_lease, job_lease_takeover);

async fn job_watch_and_cancel(db: Db) {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let runner = Arc::new(StepRunner {
        steps: 10_000,
        step_ms: 5,
        hang_at: None,
        starts,
    });
    let Some(h) = Harness::start(db, |_| {}, Some(runner)).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let o = job_oracle(&h, &dev, "o", 20).await;
    let dataset = job_dataset(&h, &dev).await;
    let job = h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: o.id.clone(),
                dataset_id: dataset.clone(),
                ..Default::default()
            },
            &dev,
        ))
        .await
        .expect("start")
        .into_inner();
    let mut watch = h
        .developer()
        .watch_job(authed(
            pb::WatchJobRequest {
                job_id: job.id.clone(),
            },
            &dev,
        ))
        .await
        .expect("watch")
        .into_inner();
    // Wait until it runs with some progress, then cancel.
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("event")
            .expect("ok")
            .expect("open");
        let j = ev.job.expect("job");
        if j.state == pb::JobState::Running as i32 && j.progress > 0.0 {
            break;
        }
    }
    let c = h
        .developer()
        .cancel_job(authed(
            pb::CancelJobRequest {
                job_id: job.id.clone(),
            },
            &dev,
        ))
        .await
        .expect("cancel")
        .into_inner();
    assert!(c.cancel_requested);
    let mut last = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("event")
        .expect("ok")
    {
        last = ev.job;
    }
    let last = last.expect("final event");
    assert_eq!(last.state, pb::JobState::Cancelled as i32, "{last:?}");
    // Cancelling a queued job is immediate; unknown jobs are NOT_FOUND.
    let err = h
        .developer()
        .cancel_job(authed(
            pb::CancelJobRequest {
                job_id: uuid::Uuid::new_v4().to_string(),
            },
            &dev,
        ))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: o.id.clone(),
                dataset_id: dataset,
                params_json: "[1]".into(),
                ..Default::default()
            },
            &dev,
        ))
        .await
        .expect_err("params");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("params_json"));
    h.finish().await;
}
both_backends!(job_cancel, job_watch_and_cancel);

// ---------------------------------------------------------------- ops

async fn load_shedding_health_metrics(db: Db) {
    let Some(h) = Harness::start(db, |c| c.max_concurrent_requests = 1, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    // Hold the only slot with an upload that never finishes sending.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let data = safetensors_bytes(10, 0);
    for m in upload_msgs("slow", &data, data.len() as u64, &sha256_hex(&data), 8)
        .into_iter()
        .take(2)
    {
        tx.send(m).await.expect("send");
    }
    let mut client = h.developer();
    let held = tokio::spawn(async move {
        client
            .upload_oracle(authed(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                &dev,
            ))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = h
        .dashboard()
        .list_fleets(authed(pb::ListFleetsRequest::default(), &h.admin))
        .await
        .expect_err("shed");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    drop(tx);
    let r = held.await.expect("join").expect_err("truncated upload");
    assert_eq!(r.code(), Code::InvalidArgument);
    // The server keeps serving once the slot is free.
    h.dashboard()
        .list_fleets(authed(pb::ListFleetsRequest::default(), &h.admin))
        .await
        .expect("served again");

    // Health: SERVING, metrics exposed.
    let mut health = tonic_health::pb::health_client::HealthClient::new(h.channel.clone());
    let st = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "adaptivenet.v1.DeviceService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        st.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let maddr = h
        .handle
        .as_ref()
        .expect("running")
        .metrics_addr
        .expect("metrics");
    let body = http_get(maddr, "/metrics").await;
    assert!(body.contains("adaptivenet_grpc_shed_total 1"), "{body}");
    assert!(body.contains("adaptivenet_grpc_requests_total{method=\"/adaptivenet.v1.DashboardService/ListFleets\",code=\"8\"} 1"), "{body}");
    h.finish().await;
}
both_backends!(ops, load_shedding_health_metrics);

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_serving_and_ends_watches() {
    let Some(mut h) = Harness::start(
        Db::Sqlite,
        |c| c.drain_grace = Duration::from_millis(400),
        None,
    )
    .await
    else {
        return;
    };
    let viewer = h.token(Role::Viewer).await;
    let mut watch = h
        .dashboard()
        .watch_fleet(authed(pb::WatchFleetRequest::default(), &viewer))
        .await
        .expect("watch")
        .into_inner();
    let handle = h.handle.take().expect("running");
    let mut health = tonic_health::pb::health_client::HealthClient::new(h.channel.clone());
    let shutdown = tokio::spawn(handle.shutdown());
    tokio::time::sleep(Duration::from_millis(150)).await;
    let st = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health while draining")
        .into_inner();
    assert_eq!(
        st.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("watch ends");
    assert_eq!(end.expect_err("unavailable").code(), Code::Unavailable);
    shutdown.await.expect("join").expect("clean");
    h.finish().await;
}

/// The console's job list: the newest jobs first, even when more jobs exist than it shows.
async fn recent_jobs_newest_first(db: Db) {
    use adaptivenet_cloud::domain::{Job, JobKind};
    let Some(h) = Harness::start(db, |c| c.workers = 0, None).await else {
        return;
    };
    let store = h.app().store();
    let mut ids = Vec::new();
    for i in 0..5i64 {
        let mut job = Job::queued(
            JobKind::TrainOracle,
            None,
            None,
            format!("j{i}"),
            "{}".into(),
            None,
            1,
        );
        job.created_ms = 1_000 + i;
        job.updated_ms = job.created_ms;
        store.insert_job(&job).await.expect("insert");
        ids.push(job.id);
    }
    let recent = store.recent_jobs(3).await.expect("recent");
    let got: Vec<_> = recent.iter().map(|j| j.id).collect();
    assert_eq!(got, vec![ids[4], ids[3], ids[2]]);
    h.finish().await;
}
both_backends!(recent_jobs, recent_jobs_newest_first);
