//! Staged rollouts over real gRPC on SQLite and PostgreSQL: devices follow their cohort's
//! version, a good version is promoted step by step to every device and its label, a bad one
//! is rolled back by the gates, people can pause, resume and abort, and bad requests change
//! nothing. The devices here are gRPC clients that report what a real agent would.
mod common;

use std::time::{Duration, Instant};

use adaptivenet_cloud::domain::Role;
use adaptivenet_proto::v1 as pb;
use common::*;
use tonic::Code;

/// A fleet on supernet A (through label "stable") with `n` enrolled devices, and a second
/// supernet B.
struct Fleet {
    h: Harness,
    dev: String,
    fleet: String,
    a: String,
    b: String,
    /// (device id, credential)
    devices: Vec<(String, String)>,
}

async fn fleet(db: Db, n: usize) -> Option<Fleet> {
    let h = Harness::start(
        db,
        |c| {
            c.min_group_devices = 1;
            c.rollout_tick = Duration::from_millis(50);
        },
        None,
    )
    .await?;
    let dev = h.token(Role::Developer).await;
    let o = upload(&h, &dev, "o", &safetensors_bytes(20, 0))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let a = make_supernet(&h, &o.id, &[]).await;
    let b = make_supernet(&h, &o.id, &[safetensors_bytes(30, 1)]).await;
    assert_ne!(a, b);
    let fleet = h
        .admin_client()
        .create_fleet(authed(
            pb::CreateFleetRequest { name: "f".into() },
            &h.admin,
        ))
        .await
        .expect("fleet")
        .into_inner()
        .id;
    h.developer()
        .publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: a.clone(),
                fleet_id: fleet.clone(),
                label: "stable".into(),
            },
            &dev,
        ))
        .await
        .expect("publish");
    h.developer()
        .set_desired_state(authed(
            pb::SetDesiredStateRequest {
                fleet_id: fleet.clone(),
                target: Some(pb::set_desired_state_request::Target::Label(
                    "stable".into(),
                )),
                budget: None,
            },
            &dev,
        ))
        .await
        .expect("desired state");
    let tok = h
        .admin_client()
        .create_enrollment_token(authed(
            pb::CreateEnrollmentTokenRequest {
                fleet_id: fleet.clone(),
                uses: n as u32,
                ttl_seconds: 3600,
            },
            &h.admin,
        ))
        .await
        .expect("token")
        .into_inner()
        .token;
    let mut devices = Vec::new();
    for _ in 0..n {
        let e = h
            .device()
            .enroll(pb::EnrollRequest {
                enrollment_token: tok.clone(),
                device_class: pb::DeviceClass::CpuSmall as i32,
                agent_version: "0.1.0".into(),
            })
            .await
            .expect("enroll")
            .into_inner();
        devices.push((e.device_id, e.device_credential));
    }
    Some(Fleet {
        h,
        dev,
        fleet,
        a,
        b,
        devices,
    })
}

impl Fleet {
    /// The supernet a device is told to run.
    async fn desired(&self, cred: &str) -> String {
        self.h
            .device()
            .get_desired_state(authed(pb::Empty {}, cred))
            .await
            .expect("desired state")
            .into_inner()
            .supernet_id
    }

    /// Every device fetches its desired version and reports on it: quality `q_b` on B,
    /// 0.90 on A, both within budget.
    async fn report_round(&self, q_b: f64) -> Vec<String> {
        let mut on = Vec::new();
        for (_, cred) in &self.devices {
            let s = self.desired(cred).await;
            let q = if s == self.b { q_b } else { 0.90 };
            self.h
                .device()
                .report(authed(
                    pb::ReportRequest {
                        supernet_id: s.clone(),
                        active_subnet: "0000".into(),
                        latency_p50_ms: 4.0,
                        latency_p95_ms: 5.0,
                        latency_budget_ms: 10.0,
                        quality_estimate: q,
                        quality_sample_count: 500,
                        search: None,
                        latency_table: None,
                        device_class: pb::DeviceClass::CpuSmall as i32,
                    },
                    cred,
                ))
                .await
                .expect("report");
            on.push(s);
        }
        on
    }

    async fn start(&self, steps: Vec<pb::RolloutStep>, window_secs: u64) -> pb::Rollout {
        self.h
            .developer()
            .start_rollout(authed(
                pb::StartRolloutRequest {
                    fleet_id: self.fleet.clone(),
                    to_supernet_id: self.b.clone(),
                    steps,
                    gates: Some(pb::RolloutGates {
                        max_quality_drop_points: 2.0,
                        max_budget_share_drop_points: 10.0,
                        window_secs,
                        min_reports: 1,
                    }),
                },
                &self.dev,
            ))
            .await
            .expect("start rollout")
            .into_inner()
    }

    async fn get(&self, id: &str, token: &str) -> pb::Rollout {
        self.h
            .developer()
            .get_rollout(authed(
                pb::GetRolloutRequest {
                    rollout_id: id.into(),
                },
                token,
            ))
            .await
            .expect("get rollout")
            .into_inner()
    }

    /// Reports rounds until the rollout settles (bounded).
    async fn drive(&self, id: &str, q_b: f64) -> pb::Rollout {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.report_round(q_b).await;
            let r = self.get(id, &self.dev).await;
            if r.state != pb::RolloutState::Running as i32 {
                return r;
            }
            assert!(Instant::now() < deadline, "rollout did not settle: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn pct(p: f64) -> pb::RolloutStep {
    pb::RolloutStep {
        target: Some(pb::rollout_step::Target::Percent(p)),
    }
}

fn devices(ids: &[&str]) -> pb::RolloutStep {
    pb::RolloutStep {
        target: Some(pb::rollout_step::Target::Devices(pb::DeviceList {
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
        })),
    }
}

async fn good_version_is_promoted(db: Db) {
    let Some(f) = fleet(db, 6).await else { return };
    f.report_round(0.9).await;
    let canary = f.devices[0].0.clone();
    let r = f.start(vec![devices(&[&canary]), pct(50.0)], 1).await;
    assert_eq!(r.from_supernet_id, f.a);
    assert_eq!(
        r.steps.len(),
        3,
        "a final 100 % step is added: {:?}",
        r.steps
    );
    // Step 1: only the canary is told to run B.
    let on = f.report_round(0.9).await;
    assert_eq!(on[0], f.b);
    assert!(on[1..].iter().all(|s| *s == f.a), "{on:?}");
    let mut watch =
        f.h.developer()
            .watch_rollout(authed(
                pb::GetRolloutRequest {
                    rollout_id: r.id.clone(),
                },
                &f.h.token(Role::Viewer).await,
            ))
            .await
            .expect("viewer watches")
            .into_inner();
    let done = f.drive(&r.id, 0.9).await;
    assert_eq!(done.state, pb::RolloutState::Succeeded as i32, "{done:?}");
    let actions: Vec<&str> = done.decisions.iter().map(|d| d.action.as_str()).collect();
    assert_eq!(actions, ["start", "promote", "promote", "succeed"]);
    // The promotions record the numbers that caused them.
    assert!(done.decisions[1]
        .detail_json
        .contains("cohort_reports_on_b"));
    // Every device and the label now point at B.
    assert!(f.report_round(0.9).await.iter().all(|s| *s == f.b));
    let fleets =
        f.h.dashboard()
            .list_fleets(authed(pb::ListFleetsRequest::default(), &f.dev))
            .await
            .expect("fleets")
            .into_inner();
    let desired = fleets.fleets[0].desired.clone().expect("desired");
    assert_eq!(desired.label, "stable");
    assert_eq!(desired.supernet_id, f.b, "the label moved to B");
    // The watch saw the steps and ended with the settled rollout.
    let mut steps = Vec::new();
    let mut last = None;
    while let Some(r) = watch.message().await.expect("watch") {
        steps.push(r.step_index);
        last = Some(r);
    }
    assert_eq!(
        last.expect("events").state,
        pb::RolloutState::Succeeded as i32
    );
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]) && steps.contains(&2),
        "{steps:?}"
    );
    f.h.finish().await;
}
both_backends!(good_version, good_version_is_promoted);

async fn bad_version_is_rolled_back(db: Db) {
    let Some(f) = fleet(db, 6).await else { return };
    f.report_round(0.9).await;
    // A long window: the failing gate must not wait for it. The first step names half the
    // fleet: a percent step over 6 random device ids is empty (or the whole fleet, leaving
    // no baseline on A) once in 32 runs, and then no gate can fail.
    let half: Vec<&str> = f.devices[..3].iter().map(|(id, _)| id.as_str()).collect();
    let r = f.start(vec![devices(&half), pct(50.0)], 600).await;
    let started = Instant::now();
    let done = f.drive(&r.id, 0.6).await;
    assert_eq!(done.state, pb::RolloutState::RolledBack as i32, "{done:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let last = done.decisions.last().expect("decision");
    assert_eq!(last.action, "rollback");
    assert!(last.detail_json.contains("quality"), "{}", last.detail_json);
    assert!(f.report_round(0.6).await.iter().all(|s| *s == f.a));
    // The label still points at A.
    let fleets =
        f.h.dashboard()
            .list_fleets(authed(pb::ListFleetsRequest::default(), &f.dev))
            .await
            .expect("fleets")
            .into_inner();
    assert_eq!(fleets.fleets[0].desired.clone().unwrap().supernet_id, f.a);
    f.h.finish().await;
}
both_backends!(bad_version, bad_version_is_rolled_back);

async fn people_pause_resume_abort(db: Db) {
    let Some(f) = fleet(db, 4).await else { return };
    let viewer = f.h.token(Role::Viewer).await;
    let start_req = |to: &str, steps: Vec<pb::RolloutStep>| pb::StartRolloutRequest {
        fleet_id: f.fleet.clone(),
        to_supernet_id: to.into(),
        steps,
        gates: None,
    };
    // Bad requests: the field named, nothing recorded.
    let bad = [
        (
            start_req(&f.b, vec![pct(50.0), pct(20.0)]),
            Code::InvalidArgument,
            "steps[1]",
        ),
        (
            start_req(&f.b, vec![pct(0.0)]),
            Code::InvalidArgument,
            "steps[0]",
        ),
        (
            start_req(&f.b, vec![pb::RolloutStep { target: None }]),
            Code::InvalidArgument,
            "steps[0]",
        ),
        (
            start_req(&f.a, vec![]),
            Code::InvalidArgument,
            "to_supernet_id",
        ),
        (
            start_req("nope", vec![]),
            Code::InvalidArgument,
            "to_supernet_id",
        ),
        (
            pb::StartRolloutRequest {
                gates: Some(pb::RolloutGates {
                    max_quality_drop_points: 300.0,
                    ..Default::default()
                }),
                ..start_req(&f.b, vec![])
            },
            Code::InvalidArgument,
            "gates.max_quality_drop_points",
        ),
    ];
    for (req, code, field) in bad {
        let e =
            f.h.developer()
                .start_rollout(authed(req, &f.dev))
                .await
                .expect_err("refused");
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let e =
        f.h.developer()
            .start_rollout(authed(start_req(&f.b, vec![]), &viewer))
            .await
            .expect_err("viewers may not start");
    assert_eq!(e.code(), Code::PermissionDenied);
    let list = |token: String| {
        let mut c = f.h.developer();
        let fleet = f.fleet.clone();
        async move {
            c.list_rollouts(authed(pb::ListRolloutsRequest { fleet_id: fleet }, &token))
                .await
                .expect("list")
                .into_inner()
                .rollouts
        }
    };
    assert!(list(viewer.clone()).await.is_empty(), "nothing recorded");

    // A long window holds step 1; pause, resume and abort by hand.
    let r = f.start(vec![pct(50.0)], 600).await;
    let e =
        f.h.developer()
            .start_rollout(authed(start_req(&f.b, vec![]), &f.dev))
            .await
            .expect_err("one active rollout per fleet");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(&r.id), "{}", e.message());
    let before_pause = f.report_round(0.9).await;
    let act = |token: &str| {
        authed(
            pb::RolloutActionRequest {
                rollout_id: r.id.clone(),
            },
            token,
        )
    };
    let e =
        f.h.developer()
            .pause_rollout(act(&viewer))
            .await
            .expect_err("viewer");
    assert_eq!(e.code(), Code::PermissionDenied);
    let p =
        f.h.developer()
            .pause_rollout(act(&f.dev))
            .await
            .expect("pause")
            .into_inner();
    assert_eq!(p.state, pb::RolloutState::Paused as i32);
    let e =
        f.h.developer()
            .pause_rollout(act(&f.dev))
            .await
            .expect_err("twice");
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Paused: every device keeps the version its cohort had.
    assert_eq!(f.report_round(0.9).await, before_pause);
    let p =
        f.h.developer()
            .resume_rollout(act(&f.dev))
            .await
            .expect("resume")
            .into_inner();
    assert_eq!(p.state, pb::RolloutState::Running as i32);
    let a =
        f.h.developer()
            .abort_rollout(act(&f.dev))
            .await
            .expect("abort")
            .into_inner();
    assert_eq!(a.state, pb::RolloutState::Aborted as i32);
    let actions: Vec<&str> = a.decisions.iter().map(|d| d.action.as_str()).collect();
    assert_eq!(actions, ["start", "pause", "resume", "abort"]);
    assert!(
        f.report_round(0.9).await.iter().all(|s| *s == f.a),
        "aborted: all on A"
    );
    let e =
        f.h.developer()
            .abort_rollout(act(&f.dev))
            .await
            .expect_err("settled");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(list(viewer.clone()).await.len(), 1);
    assert_eq!(
        f.get(&r.id, &viewer).await.state,
        pb::RolloutState::Aborted as i32
    );
    // A new rollout may start once the last one settled.
    f.start(vec![], 600).await;
    f.h.finish().await;
}
both_backends!(pause_resume_abort, people_pause_resume_abort);

async fn one_replica_decides(db: Db) {
    let Some(f) = fleet(db, 2).await else { return };
    let r = f.start(vec![], 600).await;
    let id = uuid::Uuid::parse_str(&r.id).unwrap();
    let store = f.h.app().store();
    let now = adaptivenet_cloud::domain::now_ms();
    // The server's own engine may hold the lease already: take it after its expiry.
    let later = now + 3_600_000;
    assert!(store
        .lease_rollout(id, "replica-a", later, later + 1000)
        .await
        .unwrap());
    assert!(!store
        .lease_rollout(id, "replica-b", later + 10, later + 1010)
        .await
        .unwrap());
    assert!(store
        .lease_rollout(id, "replica-a", later + 10, later + 1010)
        .await
        .unwrap());
    assert!(store
        .lease_rollout(id, "replica-b", later + 1011, later + 2000)
        .await
        .unwrap());
    // A decision fenced by a lost lease changes nothing.
    let rollout = store.get_rollout(id).await.unwrap();
    assert!(!store
        .promote_rollout(&rollout, "replica-a", &serde_json::json!({}), later + 1020)
        .await
        .unwrap());
    assert_eq!(store.get_rollout(id).await.unwrap().step_index, 0);
    f.h.finish().await;
}
both_backends!(lease, one_replica_decides);

async fn client_commands(db: Db) {
    let Some(f) = fleet(db, 2).await else { return };
    let canary = f.devices[0].0.clone();
    let steps = format!("device:{canary},50");
    let out = cli(
        &f.h,
        &f.dev,
        &[
            "-q",
            "rollout",
            "start",
            "--fleet",
            &f.fleet,
            "--to",
            &f.b,
            "--steps",
            &steps,
            "--window-secs",
            "600",
        ],
    )
    .await;
    let id = stdout_ok(&out).trim().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    assert_eq!(f.desired(&f.devices[0].1).await, f.b, "the canary is on B");
    let got = stdout_ok(&cli(&f.h, &f.dev, &["rollout", "get", &id]).await);
    assert!(got.contains("step 1/3") && got.contains("running"), "{got}");
    assert!(got.contains("start"), "decisions are listed: {got}");
    let bad = cli(
        &f.h,
        &f.dev,
        &[
            "rollout", "start", "--fleet", &f.fleet, "--to", &f.b, "--steps", "half",
        ],
    )
    .await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--steps half"));
    let aborted = stdout_ok(&cli(&f.h, &f.dev, &["rollout", "abort", &id]).await);
    assert!(aborted.contains("aborted"), "{aborted}");
    let w = cli(&f.h, &f.dev, &["rollout", "watch", &id]).await;
    assert!(
        !w.status.success(),
        "a watched rollout that did not succeed exits non-zero"
    );
    assert!(String::from_utf8_lossy(&w.stderr).contains("aborted"));
    let list = stdout_ok(&cli(&f.h, &f.dev, &["rollout", "list", "--fleet", &f.fleet]).await);
    assert_eq!(list.lines().count(), 1, "{list}");
    f.h.finish().await;
}
both_backends!(client, client_commands);
