//! Group-committed reports and heartbeats (`store/writer.rs`) and the cached fleet
//! assignment check, over real gRPC on both databases: concurrent reports land in shared
//! batches, yet a bad report is still rejected on its own, a failing write does not fail
//! the others of its batch, and every acknowledged report is in the aggregates.
mod common;

use std::collections::HashMap;

use adaptivenet_cloud::domain::{
    DeviceClass, LatencyTableSummary, Page, Report, Role, SearchStats,
};
use adaptivenet_proto::v1 as pb;
use common::{authed, make_supernet, safetensors_bytes, upload, Db, Harness};
use futures::future::join_all;
use tonic::Code;

fn report(supernet: &str, p50: f64, samples: u64) -> pb::ReportRequest {
    pb::ReportRequest {
        supernet_id: supernet.into(),
        active_subnet: "0000".into(),
        latency_p50_ms: p50,
        latency_p95_ms: p50 * 1.5,
        latency_budget_ms: 20.0,
        quality_estimate: 0.8,
        quality_sample_count: samples,
        search: Some(pb::SearchStats::default()),
        latency_table: Some(pb::LatencyTableSummary::default()),
        device_class: pb::DeviceClass::CpuSmall as i32,
    }
}

/// A fleet following `stable` -> a fresh supernet, with `n` enrolled devices.
async fn fleet(h: &Harness, n: u32) -> (String, String, String, Vec<String>) {
    let dev = h.token(Role::Developer).await;
    let o = upload(h, &dev, "o", &safetensors_bytes(3, 3))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let supernet = make_supernet(h, &o.id, &[]).await;
    let fleet = h
        .admin_client()
        .create_fleet(authed(
            pb::CreateFleetRequest {
                name: "writes".into(),
            },
            &h.admin,
        ))
        .await
        .expect("fleet")
        .into_inner()
        .id;
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
    let tok = h
        .app()
        .create_enrollment_token(fleet.parse().expect("uuid"), n, None)
        .await
        .expect("token")
        .token;
    let mut creds = Vec::new();
    for _ in 0..n {
        creds.push(
            h.device()
                .enroll(pb::EnrollRequest {
                    enrollment_token: tok.clone(),
                    device_class: 1,
                    agent_version: "0.1.0".into(),
                })
                .await
                .expect("enroll")
                .into_inner()
                .device_credential,
        );
    }
    (fleet, supernet, dev, creds)
}

async fn batched_writes(db: Db) {
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let (fleet, supernet, dev, creds) = fleet(&h, 8).await;

    // 8 devices x 6 reports at once, every third one below the privacy minimum.
    let calls = (0..48).map(|k| {
        let mut c = h.device();
        let cred = creds[k % creds.len()].clone();
        let r = report(&supernet, 1.0 + k as f64, if k % 3 == 2 { 5 } else { 200 });
        async move { (k, c.report(authed(r, &cred)).await) }
    });
    let mut acked: HashMap<usize, i64> = HashMap::new();
    for (k, r) in join_all(calls).await {
        if k % 3 == 2 {
            let e = r.expect_err("below the sample minimum");
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("quality_sample_count"), "{e:?}");
        } else {
            r.unwrap_or_else(|e| panic!("report {k}: {e:?}"));
            *acked.entry(k % creds.len()).or_default() += 1;
        }
    }
    assert_eq!(acked.values().sum::<i64>(), 32);

    // Every acknowledged report is stored and counted, per device.
    use sqlx::Row;
    let rows = sqlx::query("SELECT report_count FROM device_reports")
        .fetch_all(h.app().store().pool())
        .await
        .expect("rows");
    let mut counts: Vec<i64> = rows.iter().map(|r| r.get("report_count")).collect();
    counts.sort_unstable();
    let mut want: Vec<i64> = acked.values().copied().collect();
    want.sort_unstable();
    assert_eq!(counts, want);
    let agg = h
        .dashboard()
        .get_fleet_aggregates(authed(
            pb::GetFleetAggregatesRequest {
                fleet_id: fleet.clone(),
            },
            &h.admin,
        ))
        .await
        .expect("aggregates")
        .into_inner();
    assert_eq!(
        agg.groups.iter().map(|g| g.devices).sum::<u32>() + agg.suppressed_devices,
        8
    );

    // A write that fails in the database (unknown device) fails alone, even when it shares
    // a batch with valid writes.
    let store = h.app().store();
    let fleet_id = fleet.parse().expect("uuid");
    let devices = store
        .list_devices(
            Page {
                offset: 0,
                limit: 100,
            },
            Some(fleet_id),
        )
        .await
        .expect("devices");
    let domain_report = Report {
        supernet_id: supernet.parse().expect("uuid"),
        active_subnet: "0000".into(),
        latency_p50_ms: 2.0,
        latency_p95_ms: 3.0,
        latency_budget_ms: 20.0,
        quality_estimate: 0.5,
        quality_sample_count: 500,
        search: SearchStats::default(),
        latency_table: LatencyTableSummary::default(),
        device_class: DeviceClass(1),
    };
    let ghost = uuid::Uuid::new_v4();
    let writes = (0..12).map(|k| {
        let id = if k == 5 {
            ghost
        } else {
            devices[k % devices.len()].id
        };
        let r = domain_report.clone();
        async move { (k, store.upsert_report(id, fleet_id, &r, 1).await) }
    });
    for (k, r) in join_all(writes).await {
        if k == 5 {
            assert!(r.is_err(), "a report of an unknown device must fail");
        } else {
            r.unwrap_or_else(|e| panic!("write {k}: {e}"));
        }
    }
    let n: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(report_count), 0) AS BIGINT) AS n FROM device_reports",
    )
    .fetch_one(store.pool())
    .await
    .expect("sum")
    .get("n");
    assert_eq!(n, 32 + 11);

    // Heartbeats return the fleet's generation; a revoked device is refused at once.
    let generation = store
        .get_fleet(fleet_id)
        .await
        .expect("fleet")
        .desired
        .generation;
    h.app().revoke_device(devices[0].id).await.expect("revoke");
    let hb = |cred: String| {
        let mut c = h.device();
        async move {
            c.heartbeat(authed(
                pb::HeartbeatRequest {
                    agent_version: "0.1.0".into(),
                    active_supernet_id: String::new(),
                    active_subnet: "0000".into(),
                    latency_p50_ms: 1.0,
                    latency_p95_ms: 2.0,
                    last_adaptation_reason: 0,
                    applied_generation: 0,
                    ..Default::default()
                },
                &cred,
            ))
            .await
        }
    };
    let results = join_all(creds.iter().cloned().map(hb)).await;
    let mut refused = 0;
    let mut live = None;
    for (cred, r) in creds.iter().zip(results) {
        match r {
            Ok(r) => {
                assert_eq!(r.into_inner().desired_generation, generation);
                live = Some(cred.clone());
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 1, "exactly the revoked device is refused");
    let live = live.expect("a device that is not revoked");

    // Moving the label unassigns the old supernet at once (the assignment cache is cleared).
    let o2 = upload(&h, &dev, "o2", &safetensors_bytes(4, 4))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let supernet2 = make_supernet(&h, &o2.id, &[]).await;
    h.developer()
        .publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: supernet2.clone(),
                fleet_id: fleet.clone(),
                label: "stable".into(),
            },
            &dev,
        ))
        .await
        .expect("publish");
    let e = h
        .device()
        .report(authed(report(&supernet, 1.0, 200), &live))
        .await
        .expect_err("old supernet no longer assigned");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    h.device()
        .report(authed(report(&supernet2, 1.0, 200), &live))
        .await
        .expect("new supernet");
    h.finish().await;
}
both_backends!(writes, batched_writes);
