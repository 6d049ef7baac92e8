//! Fleet-scoped API tokens over the real gRPC server (SQLite and PostgreSQL): a developer or
//! viewer token limited to one fleet reads and writes only that fleet's devices, labels,
//! desired state, aggregates and events; naming another fleet is PERMISSION_DENIED naming
//! that fleet and stores nothing; calls that are not about one fleet are refused; creation
//! checks its inputs; and `cloud-server token create-api --fleet` makes such a token.
mod common;

use std::time::Duration;

use adaptivenet_cloud::domain::Role;
use adaptivenet_proto::v1 as pb;
use common::*;
use tonic::Code;

fn report(supernet: &str) -> pb::ReportRequest {
    pb::ReportRequest {
        supernet_id: supernet.into(),
        active_subnet: "2xx0".into(),
        latency_p50_ms: 5.0,
        latency_p95_ms: 6.0,
        latency_budget_ms: 10.0,
        quality_estimate: 0.8,
        quality_sample_count: 500,
        search: Some(pb::SearchStats::default()),
        latency_table: Some(pb::LatencyTableSummary::default()),
        device_class: pb::DeviceClass::CpuSmall as i32,
    }
}

fn heartbeat(supernet: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        agent_version: "0.1.0".into(),
        active_supernet_id: supernet.into(),
        active_subnet: "2xx0".into(),
        latency_p50_ms: 5.0,
        latency_p95_ms: 6.0,
        last_adaptation_reason: 0,
        applied_generation: 1,
        ..Default::default()
    }
}

fn denied(r: Result<impl std::fmt::Debug, tonic::Status>, fleet: &str, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::PermissionDenied, "{what}: {}", e.message());
    assert!(
        e.message().contains(fleet),
        "{what}: message does not name fleet {fleet}: {}",
        e.message()
    );
}

async fn create_token(
    h: &Harness,
    role: pb::Role,
    fleet: &str,
) -> Result<pb::CreateApiTokenResponse, tonic::Status> {
    h.admin_client()
        .create_api_token(authed(
            pb::CreateApiTokenRequest {
                role: role as i32,
                description: "fleet-scoped".into(),
                ttl_seconds: 0,
                fleet_id: fleet.into(),
            },
            &h.admin,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn publish(
    h: &Harness,
    token: &str,
    supernet: &str,
    fleet: &str,
    label: &str,
) -> Result<pb::Label, tonic::Status> {
    h.developer()
        .publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: supernet.into(),
                fleet_id: fleet.into(),
                label: label.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn desired(
    h: &Harness,
    token: &str,
    fleet: &str,
    label: &str,
) -> Result<pb::DesiredState, tonic::Status> {
    h.developer()
        .set_desired_state(authed(
            pb::SetDesiredStateRequest {
                fleet_id: fleet.into(),
                target: Some(pb::set_desired_state_request::Target::Label(label.into())),
                budget: None,
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn devices(h: &Harness, token: &str, fleet: &str) -> Result<Vec<String>, tonic::Status> {
    h.dashboard()
        .list_devices(authed(
            pb::ListDevicesRequest {
                fleet_id: fleet.into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .map(|r| {
            let mut v: Vec<String> = r
                .into_inner()
                .devices
                .into_iter()
                .map(|d| d.fleet_id)
                .collect();
            v.sort();
            v
        })
}

async fn aggregates(
    h: &Harness,
    token: &str,
    fleet: &str,
) -> Result<pb::FleetAggregates, tonic::Status> {
    h.dashboard()
        .get_fleet_aggregates(authed(
            pb::GetFleetAggregatesRequest {
                fleet_id: fleet.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

/// Fleet ids of the events a watch delivers until it has been quiet for `quiet`.
async fn event_fleets(s: &mut tonic::Streaming<pb::FleetEvent>, quiet: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(ev) = tokio::time::timeout(quiet, s.message()).await {
        let Some(ev) = ev.expect("event") else { break };
        out.push(ev.fleet_id);
    }
    out
}

async fn fleet_scoped_tokens(db: Db) {
    // k = 1 so one device's aggregates show and the narrowing is visible.
    let Some(h) = Harness::start(db, |c| c.min_group_devices = 1, None).await else {
        return;
    };
    let (fa, _, dev_a) = h.enrolled_device("fleet-a").await;
    let (fb, _, dev_b) = h.enrolled_device("fleet-b").await;
    let dev = h.token(Role::Developer).await;
    let o = upload(&h, &dev, "o", &safetensors_bytes(20, 0))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let supernet = make_supernet(&h, &o.id, &[]).await;
    for f in [&fa, &fb] {
        publish(&h, &dev, &supernet, f, "stable")
            .await
            .expect("publish");
        desired(&h, &dev, f, "stable").await.expect("desired state");
    }
    for cred in [&dev_a, &dev_b] {
        h.device()
            .heartbeat(authed(heartbeat(&supernet), cred))
            .await
            .expect("heartbeat");
        h.device()
            .report(authed(report(&supernet), cred))
            .await
            .expect("report");
    }

    // Creation: admin tokens cannot be scoped; the fleet must exist and be an id.
    let e = create_token(&h, pb::Role::Admin, &fa)
        .await
        .expect_err("admin");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("fleet_id"), "{}", e.message());
    let e = create_token(&h, pb::Role::Developer, "not-a-uuid")
        .await
        .expect_err("malformed");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("fleet_id"), "{}", e.message());
    let e = create_token(&h, pb::Role::Viewer, &uuid::Uuid::new_v4().to_string())
        .await
        .expect_err("unknown fleet");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let scoped_dev = create_token(&h, pb::Role::Developer, &fa)
        .await
        .expect("dev")
        .token;
    let scoped_viewer = create_token(&h, pb::Role::Viewer, &fa)
        .await
        .expect("viewer")
        .token;

    // Labels and desired state: its own fleet only; the other fleet's stay as they were.
    publish(&h, &scoped_dev, &supernet, &fa, "canary")
        .await
        .expect("own fleet");
    denied(
        publish(&h, &scoped_dev, &supernet, &fb, "canary").await,
        &fb,
        "publish to B",
    );
    desired(&h, &scoped_dev, &fa, "canary")
        .await
        .expect("own desired state");
    denied(
        desired(&h, &scoped_dev, &fb, "stable").await,
        &fb,
        "desired state of B",
    );
    let fleets = h
        .dashboard()
        .list_fleets(authed(pb::ListFleetsRequest::default(), &h.admin))
        .await
        .expect("fleets")
        .into_inner()
        .fleets;
    let b = fleets.iter().find(|f| f.id == fb).expect("fleet B");
    let a = fleets.iter().find(|f| f.id == fa).expect("fleet A");
    assert_eq!(
        b.desired.as_ref().map(|d| d.label.as_str()),
        Some("stable"),
        "{b:?}"
    );
    assert_eq!(
        a.desired.as_ref().map(|d| d.label.as_str()),
        Some("canary"),
        "{a:?}"
    );
    // The refused publish stored no label: "canary" resolves to nothing in B until an
    // unscoped developer publishes it there.
    let d = desired(&h, &dev, &fb, "canary")
        .await
        .expect("unscoped desired state of B");
    assert_eq!(d.supernet_id, "", "{d:?}");
    publish(&h, &dev, &supernet, &fb, "canary")
        .await
        .expect("unscoped publish to B");
    let d = desired(&h, &dev, &fb, "canary")
        .await
        .expect("unscoped desired state of B");
    assert_eq!(d.supernet_id, supernet, "{d:?}");

    for (who, tok) in [("developer", &scoped_dev), ("viewer", &scoped_viewer)] {
        // Devices: unfiltered lists narrow to the token's fleet; B is refused.
        assert_eq!(
            devices(&h, tok, "").await.expect(who),
            vec![fa.clone()],
            "{who}"
        );
        assert_eq!(
            devices(&h, tok, &fa).await.expect(who),
            vec![fa.clone()],
            "{who}"
        );
        denied(devices(&h, tok, &fb).await, &fb, who);
        // Aggregates: A's device only, whether A is named or not.
        for f in ["", fa.as_str()] {
            let agg = aggregates(&h, tok, f).await.expect(who);
            let n: u32 = agg.groups.iter().map(|g| g.devices).sum::<u32>() + agg.suppressed_devices;
            assert_eq!(n, 1, "{who} fleet {f:?}: {agg:?}");
        }
        denied(aggregates(&h, tok, &fb).await, &fb, who);
        // Fleets: only its own.
        let fleets = h
            .dashboard()
            .list_fleets(authed(pb::ListFleetsRequest::default(), tok))
            .await
            .expect(who)
            .into_inner()
            .fleets;
        assert_eq!(
            fleets.iter().map(|f| f.id.clone()).collect::<Vec<_>>(),
            vec![fa.clone()],
            "{who}"
        );
        // The supernet catalogue is readable (what a developer publishes comes from it).
        h.developer()
            .get_supernet(authed(
                pb::GetSupernetRequest {
                    supernet_id: supernet.clone(),
                },
                tok,
            ))
            .await
            .expect(who);
        // Calls that are not about one fleet are refused, naming the token's fleet.
        denied(
            h.developer()
                .list_oracles(authed(pb::ListOraclesRequest::default(), tok))
                .await,
            &fa,
            who,
        );
        denied(
            h.dashboard()
                .list_jobs(authed(pb::ListJobsForDashboardRequest::default(), tok))
                .await,
            &fa,
            who,
        );
        // Watches: B refused; an unfiltered watch sees A's events only.
        denied(
            h.dashboard()
                .watch_fleet(authed(
                    pb::WatchFleetRequest {
                        fleet_id: fb.clone(),
                    },
                    tok,
                ))
                .await,
            &fb,
            who,
        );
    }
    // A scoped developer cannot change what every fleet shares.
    denied(
        upload(&h, &scoped_dev, "o2", &safetensors_bytes(20, 1)).await,
        &fa,
        "upload oracle",
    );
    denied(
        h.developer()
            .delete_oracle(authed(
                pb::DeleteOracleRequest {
                    oracle_id: o.id.clone(),
                },
                &scoped_dev,
            ))
            .await,
        &fa,
        "delete oracle",
    );
    // A scoped viewer is still a viewer.
    let e = publish(&h, &scoped_viewer, &supernet, &fa, "v")
        .await
        .expect_err("viewer write");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());

    let mut watch = h
        .dashboard()
        .watch_fleet(authed(pb::WatchFleetRequest::default(), &scoped_viewer))
        .await
        .expect("watch")
        .into_inner();
    let mut admin_watch = h
        .dashboard()
        .watch_fleet(authed(pb::WatchFleetRequest::default(), &h.admin))
        .await
        .expect("watch")
        .into_inner();
    for cred in [&dev_b, &dev_a, &dev_b] {
        h.device()
            .heartbeat(authed(heartbeat(&supernet), cred))
            .await
            .expect("heartbeat");
    }
    let seen = event_fleets(&mut watch, Duration::from_millis(300)).await;
    assert_eq!(seen, vec![fa.clone()], "scoped watch");
    let all = event_fleets(&mut admin_watch, Duration::from_millis(300)).await;
    assert_eq!(all, vec![fb.clone(), fa.clone(), fb.clone()], "admin watch");
    drop((watch, admin_watch));

    h.finish().await;
}
both_backends!(scoped, fleet_scoped_tokens);

/// `cloud-server token create-api --fleet NAME` on the server's database makes a token that
/// the running server confines to that fleet; an admin token cannot be scoped.
async fn cli_fleet_flag(db: Db) {
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let (fa, _, _) = h.enrolled_device("cli-a").await;
    let (fb, _, _) = h.enrolled_device("cli-b").await;
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cloud-server"))
            .arg("--data-dir")
            .arg(h.dir.path())
            .args(["--database-url", &h.app().config().database_url])
            .args(args)
            .output()
            .expect("run cloud-server")
    };
    let out = cli(&[
        "token",
        "create-api",
        "--role",
        "viewer",
        "--fleet",
        "cli-a",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .expect("token line")
        .trim()
        .to_string();
    assert_eq!(
        devices(&h, &token, "").await.expect("list"),
        vec![fa.clone()]
    );
    denied(devices(&h, &token, &fb).await, &fb, "cli token, fleet B");
    let list = cli(&["token", "list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains(&format!("fleet={fa}")),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    let out = cli(&["token", "create-api", "--role", "admin", "--fleet", &fa]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fleet_id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    h.finish().await;
}
both_backends!(cli, cli_fleet_flag);
