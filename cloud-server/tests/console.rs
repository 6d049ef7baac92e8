//! The operator console in a real browser: headless Chromium driven through W3C WebDriver
//! (chromedriver) against a real server on 127.0.0.1 with real enrolled devices, their
//! heartbeats and reports, and a real elastification job running in a worker.
//!
//! Skips (printing why) only when `chromium` or `chromedriver` is absent and
//! `ADAPTIVENET_REQUIRE_BROWSER` is unset; `scripts/test.sh` installs both and sets it.
//! Screenshots of every view at 1280 px and 390 px wide go to `target/console-screenshots/`.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use adaptivenet_cloud::domain::Role;
use adaptivenet_cloud::elastify::runner::ElastifyRunner;
use adaptivenet_cloud::jobs::Worker;
use adaptivenet_proto::v1 as pb;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HttpClient};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The fleet's latency budget; every report names it.
const BUDGET_MS: f64 = 8.0;

/// chromedriver (killed when dropped) and the browser profile's directory.
struct Driver(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn browser_available() -> bool {
    let have = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !have {
        if std::env::var_os("ADAPTIVENET_REQUIRE_BROWSER").is_some() {
            panic!(
                "ADAPTIVENET_REQUIRE_BROWSER is set but {CHROMIUM} or {CHROMEDRIVER} is missing"
            );
        }
        eprintln!(
            "skipping: {CHROMIUM} or {CHROMEDRIVER} not installed \
             (apt-get install chromium chromium-driver)"
        );
    }
    have
}

/// A W3C WebDriver session with chromedriver: the few commands this test needs, as JSON
/// over HTTP/1.1 on loopback.
struct Client {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Client {
    async fn call(&self, method: http::Method, path: &str, body: Value) -> Value {
        let req = http::Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.session))
            .header("content-type", "application/json")
            .body(Full::new(if body.is_null() {
                Bytes::new()
            } else {
                Bytes::from(body.to_string())
            }))
            .unwrap();
        let resp = self.http.request(req).await.expect("webdriver request");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v["value"].clone()
    }
    async fn goto(&self, url: &str) {
        self.call(http::Method::POST, "/url", json!({ "url": url }))
            .await;
    }
    async fn execute(&self, script: &str) -> Value {
        self.call(
            http::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }
    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                http::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        v[ELEMENT].as_str().expect("element id").to_string()
    }
    async fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.call(
            http::Method::POST,
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }
    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.call(
            http::Method::POST,
            &format!("/element/{e}/click"),
            json!({}),
        )
        .await;
    }
    async fn set_window_size(&self, width: u32, height: u32) {
        self.call(
            http::Method::POST,
            "/window/rect",
            json!({ "width": width, "height": height }),
        )
        .await;
    }
    async fn screenshot(&self) -> Vec<u8> {
        let v = self
            .call(http::Method::GET, "/screenshot", Value::Null)
            .await;
        base64_decode(v.as_str().expect("base64 PNG"))
    }
    async fn close(&self) {
        self.call(http::Method::DELETE, "", Value::Null).await;
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

async fn start_browser() -> (Driver, Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromedriver");
    let profile = tempfile::tempdir().unwrap();
    let profile_path = profile.path().to_path_buf();
    let driver = Driver(child, profile);
    let caps = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1280,800",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                format!("--user-data-dir={}", profile_path.display()),
            ]
        }
    }}});
    let base = format!("http://127.0.0.1:{port}/session");
    let http = HttpClient::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let req = http::Request::post(&base)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(caps.to_string())))
            .unwrap();
        match http.request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                assert!(status.is_success(), "new session: {status} {v}");
                let id = v["value"]["sessionId"].as_str().expect("session id");
                let session = format!("{base}/{id}");
                return (driver, Client { http, session });
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "chromedriver did not start: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Runs `return (...)` in the page.
async fn js(c: &Client, expr: &str) -> Value {
    c.execute(&format!("return ({expr});")).await
}

/// Waits until `expr` is truthy in the page (polling), or fails naming it.
async fn until(c: &Client, expr: &str, secs: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let v = js(c, expr).await;
        if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {expr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn shots_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../console-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d.canonicalize().unwrap()
}

/// Screenshots of the current page at desktop (1280 wide) and phone (390 wide) widths, each
/// as tall as the page (at least the 800 / 844 px viewport).
async fn shoot(c: &Client, name: &str) {
    for (label, w, h) in [("desktop", 1280, 800), ("phone", 390, 844)] {
        c.set_window_size(w, h).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let full = js(c, "document.documentElement.scrollHeight").await;
        let full = full.as_u64().unwrap_or(h as u64).clamp(h as u64, 6000) as u32;
        // The window's own frame differs by platform: size it so the viewport is `w` wide.
        let inner = js(c, "window.innerWidth")
            .await
            .as_u64()
            .unwrap_or(w as u64) as u32;
        c.set_window_size(w + (w - inner.min(w)), full + 100).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = c.screenshot().await;
        let path = shots_dir().join(format!("{name}-{label}.png"));
        std::fs::write(&path, png).unwrap();
        println!("screenshot {}", path.display());
    }
    c.set_window_size(1280, 800).await;
}

/// A report as the agent sends it (aggregates only).
fn report(supernet: &str, subnet: &str, p50: f64, quality: f64, class: i32) -> pb::ReportRequest {
    pb::ReportRequest {
        supernet_id: supernet.into(),
        active_subnet: subnet.into(),
        latency_p50_ms: p50,
        latency_p95_ms: p50 * 1.3,
        latency_budget_ms: BUDGET_MS,
        quality_estimate: quality,
        quality_sample_count: 500,
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
            oracle_ms: 9.0,
            calibration_factor: 1.05,
        }),
        device_class: class,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    if !browser_available() {
        return;
    }
    // k = 3: the two mobile devices below form a group under the floor.
    let Some(h) = Harness::start(
        Db::Sqlite,
        |c| {
            c.min_group_devices = 3;
            c.workers = 0;
        },
        None,
    )
    .await
    else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let viewer = h.token(Role::Viewer).await;
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", web.local_addr().unwrap());
    tokio::spawn(adaptivenet_cloud::web::run(h.app().clone(), web));

    // Two real supernet versions, A published and desired; B for a rollout.
    let o = upload(&h, &dev, "o", &safetensors_bytes(20, 0))
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let a = make_supernet(&h, &o.id, &[]).await;
    let b = make_supernet(&h, &o.id, &[safetensors_bytes(30, 1)]).await;
    let fleet = h
        .admin_client()
        .create_fleet(authed(
            pb::CreateFleetRequest {
                name: "shop-floor".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap()
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
        .unwrap();
    h.developer()
        .set_desired_state(authed(
            pb::SetDesiredStateRequest {
                fleet_id: fleet.clone(),
                target: Some(pb::set_desired_state_request::Target::Label(
                    "stable".into(),
                )),
                budget: Some(pb::LatencyBudgetPolicy {
                    latency_budget_ms: BUDGET_MS,
                    budget_fraction: 0.0,
                    hysteresis: 0.1,
                }),
            },
            &dev,
        ))
        .await
        .unwrap();
    let tok = h
        .admin_client()
        .create_enrollment_token(authed(
            pb::CreateEnrollmentTokenRequest {
                fleet_id: fleet.clone(),
                uses: 8,
                ttl_seconds: 3600,
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    // (class, subnet, p50 ms, quality, last adaptation reason): cpu-small on both subnets
    // (one device over budget), two mobile devices below k.
    let small = pb::DeviceClass::CpuSmall as i32;
    let mobile = pb::DeviceClass::Mobile as i32;
    let fleet_devices = [
        (small, "00", 4.0, 0.91, 1),
        (small, "00", 5.0, 0.92, 3),
        (small, "00", 6.5, 0.90, 3),
        (small, "1x", 2.5, 0.86, 2),
        (small, "1x", 3.0, 0.87, 2),
        (small, "1x", 9.5, 0.85, 4),
        (mobile, "1x", 7.0, 0.84, 1),
        (mobile, "1x", 7.5, 0.83, 1),
    ];
    let mut device_ids = Vec::new();
    for (class, subnet, p50, q, reason) in fleet_devices {
        let e = h
            .device()
            .enroll(pb::EnrollRequest {
                enrollment_token: tok.clone(),
                device_class: class,
                agent_version: "0.4.2".into(),
            })
            .await
            .unwrap()
            .into_inner();
        h.device()
            .heartbeat(authed(
                pb::HeartbeatRequest {
                    agent_version: "0.4.2".into(),
                    active_supernet_id: a.clone(),
                    active_subnet: subnet.into(),
                    latency_p50_ms: p50,
                    latency_p95_ms: p50 * 1.3,
                    last_adaptation_reason: reason,
                    applied_generation: 1,
                    ..Default::default()
                },
                &e.device_credential,
            ))
            .await
            .unwrap();
        h.device()
            .report(authed(
                report(&a, subnet, p50, q, class),
                &e.device_credential,
            ))
            .await
            .unwrap();
        device_ids.push(e.device_id);
    }
    // A rollout to B (its decisions appear as the engine judges it).
    h.developer()
        .start_rollout(authed(
            pb::StartRolloutRequest {
                fleet_id: fleet.clone(),
                to_supernet_id: b.clone(),
                steps: vec![],
                gates: None,
            },
            &dev,
        ))
        .await
        .unwrap();

    // A real elastification of a small RGB ImageFolder, long enough to watch it progress
    // (cancelled at the end).
    let data = tempfile::tempdir().unwrap();
    let folder = data.path().join("rgb");
    write_small_rgb_folder(&folder);
    let out = stdout_ok(
        &cli(
            &h,
            &dev,
            &["upload-dataset", folder.to_str().unwrap(), "--name", "rgb3"],
        )
        .await,
    );
    let dataset = dataset_id(&out);
    let arch = br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[2],"widths":[8],"in_channels":3,"num_classes":3}"#;
    let oracle = upload_arch(&h, &dev, "rgb-oracle", arch, &fixture_weights(arch, 7))
        .await
        .unwrap();
    let job = h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: oracle.id.clone(),
                dataset_id: dataset,
                supernet_name: "rgb-net".into(),
                params_json: r#"{"branches":["merge2"],"stage0_steps":20000,"stage1_steps":20000,"batch":8,"val_size":12,"priors":4,"checkpoint_every":0}"#.into(),
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner();
    let (_driver, c) = start_browser().await;

    // A wrong token stays on the sign-in page, with a message saying so.
    c.goto(&base).await;
    until(&c, "document.getElementById('token') !== null", 10).await;
    c.type_into("#token", "anv1_api_not-a-real-token").await;
    c.click("#sign-in-button").await;
    let msg = until(
        &c,
        "document.getElementById('sign-in-error').textContent",
        10,
    )
    .await;
    assert!(
        msg.as_str().unwrap().contains("not accepted"),
        "message: {msg}"
    );
    assert_eq!(
        js(&c, "[document.getElementById('sign-in').hidden, document.getElementById('view').hidden, document.getElementById('nav').hidden]").await,
        json!([false, true, true]),
        "only the sign-in page is shown"
    );
    // The API itself answers 401 without a valid token.
    let status = js(
        &c,
        "fetch('/api/views/overview', {headers: {authorization: 'Bearer nope'}}).then(r => r.status)",
    )
    .await;
    assert_eq!(status, json!(401));
    shoot(&c, "sign-in-wrong-token").await;

    // Signing in with a viewer token shows the overview.
    c.execute("document.getElementById('token').value = '';")
        .await;
    c.type_into("#token", &viewer).await;
    c.click("#sign-in-button").await;
    until(&c, "document.getElementById('devices-total')", 15).await;
    assert_eq!(
        js(&c, "document.getElementById('sign-in').hidden").await,
        json!(true)
    );
    assert_eq!(
        js(&c, "document.getElementById('role').textContent").await,
        json!("viewer")
    );

    // The overview's numbers are GetFleetAggregates' (all fleets, viewer token).
    let agg = h
        .dashboard()
        .get_fleet_aggregates(authed(pb::GetFleetAggregatesRequest::default(), &viewer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((agg.devices_total, agg.groups.len()), (8, 1), "{agg:?}");
    assert_eq!((agg.suppressed_groups, agg.suppressed_devices), (1, 2));
    let value = |id: &str| format!("document.getElementById('{id}').dataset.value");
    for (id, want) in [
        ("devices-total", agg.devices_total),
        ("devices-online", agg.devices_online),
        ("devices-stale", agg.devices_stale),
    ] {
        assert_eq!(js(&c, &value(id)).await, json!(want.to_string()), "{id}");
    }
    let n: u32 = agg.groups.iter().map(|g| g.devices).sum();
    let share = |f: fn(&pb::AggregateGroup) -> f64| {
        agg.groups
            .iter()
            .map(|g| f(g) * g.devices as f64)
            .sum::<f64>()
            / n as f64
    };
    let p50_share = share(|g| g.within_budget_p50_fraction);
    let p95_share = share(|g| g.within_budget_fraction);
    // cpu-small: 5 of 6 p50s within 8 ms; p95 = 1.3 x p50: 4 of 6.
    assert!((p50_share - 5.0 / 6.0).abs() < 1e-9, "{p50_share}");
    assert!((p95_share - 4.0 / 6.0).abs() < 1e-9, "{p95_share}");
    for (id, want) in [("within-p50", p50_share), ("within-p95", p95_share)] {
        let got: f64 = js(&c, &value(id)).await.as_str().unwrap().parse().unwrap();
        assert!((got - want).abs() < 1e-6, "{id}: {got} vs {want}");
    }
    let subnets = js(
        &c,
        "[...document.querySelectorAll('#subnets tbody tr')].map(r => [r.cells[0].textContent, r.cells[2].textContent])",
    )
    .await;
    let want: Vec<Value> = agg.groups[0]
        .subnets
        .iter()
        .map(|s| json!([s.subnet, s.devices.to_string()]))
        .collect();
    assert_eq!(subnets, Value::Array(want));
    shoot(&c, "overview").await;

    // Devices: a row has exactly the listed columns, and a viewer sees no per-device
    // latency (nor any per-sample or raw report field).
    c.goto(&format!("{base}/#devices")).await;
    until(&c, "document.querySelector('#devices tbody tr')", 15).await;
    let headers = js(
        &c,
        "[...document.querySelectorAll('#devices thead th')].map(t => t.textContent)",
    )
    .await;
    assert_eq!(
        headers,
        json!([
            "Device",
            "Class",
            "Agent",
            "Supernet",
            "Subnet",
            "Status",
            "Last seen",
            "p50 / budget",
            "p95 / budget",
            "Last adaptation"
        ])
    );
    let rows = js(
        &c,
        "[...document.querySelectorAll('#devices tbody tr')].map(r => [...r.cells].map(td => td.textContent))",
    )
    .await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 8);
    for r in rows {
        let cells: Vec<&str> = r
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(cells.len(), 10, "{cells:?}");
        assert_eq!((cells[7], cells[8]), ("withheld", "withheld"), "{cells:?}");
        assert_eq!(cells[2], "0.4.2");
        let text = cells.join(" ");
        for raw in [
            "4.00", "5.00", "6.50", "2.50", "9.50", "0.91", "0.86", "500", "samples",
        ] {
            assert!(!text.contains(raw), "row shows {raw:?}: {cells:?}");
        }
    }
    let html = js(&c, "document.getElementById('devices').outerHTML").await;
    for raw in ["quality", "latency_p50", "sample"] {
        assert!(
            !html.as_str().unwrap().contains(raw),
            "device table carries {raw:?}"
        );
    }
    shoot(&c, "devices").await;

    // Supernets: both versions, the label, subnet counts from the manifest, and the
    // accuracy–latency chart: one mark per (class, subnet) with at least k devices.
    c.goto(&format!("{base}/#supernets")).await;
    until(&c, "document.querySelector('#supernets tbody tr')", 15).await;
    let row_a = js(
        &c,
        &format!("document.querySelector('#supernets tr[data-supernet-id=\"{a}\"]').textContent"),
    )
    .await;
    assert!(
        row_a.as_str().unwrap().contains("shop-floor / stable"),
        "{row_a}"
    );
    assert_eq!(
        js(&c, &format!("document.querySelector('#supernets tr[data-supernet-id=\"{a}\"] [data-field=subnets]').textContent")).await,
        json!("2")
    );
    let marks = js(
        &c,
        &format!("document.querySelectorAll('figure[data-supernet-id=\"{a}\"] svg circle.mark title').length"),
    )
    .await;
    assert_eq!(marks, json!(2), "cpu-small x {{00, 1x}}; mobile is below k");
    shoot(&c, "supernets").await;

    // Jobs: the running job's progress changes on the page without a reload.
    c.goto(&format!("{base}/#jobs")).await;
    let sel = format!("#jobs tr[data-job-id=\"{}\"]", job.id);
    until(&c, &format!("document.querySelector('{sel}')"), 15).await;
    c.execute("window.__sameDocument = true;").await;
    // The worker starts only now, so the page sees the job queued, then running.
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(h.app().clone(), Arc::new(ElastifyRunner), "console-w").run(stop.clone()),
    );
    let progress = format!("document.querySelector('{sel} [data-field=progress]').dataset.value");
    let state = format!("document.querySelector('{sel} [data-field=state]').textContent");
    // Wait for the worker to be under way, then for a later value.
    let first = until(
        &c,
        &format!("{state} === 'running' && Number({progress}) > 0 && {progress}"),
        120,
    )
    .await;
    until(
        &c,
        &format!("{progress} !== '{}' && {progress}", first.as_str().unwrap()),
        120,
    )
    .await;
    assert_eq!(
        js(&c, "window.__sameDocument === true").await,
        json!(true),
        "updated in place, not by a reload"
    );
    shoot(&c, "jobs").await;

    // Rollouts: the rollout to B with its state.
    c.goto(&format!("{base}/#rollouts")).await;
    until(&c, "document.querySelector('article.rollout')", 15).await;
    let text = js(&c, "document.querySelector('article.rollout').textContent").await;
    assert!(text.as_str().unwrap().contains("shop-floor"), "{text}");
    shoot(&c, "rollouts").await;

    // The console is read-only.
    let status = js(
        &c,
        &format!(
            "fetch('/api/views/jobs', {{method: 'POST', headers: {{authorization: 'Bearer {viewer}'}}}}).then(r => r.status)"
        ),
    )
    .await;
    assert_eq!(status, json!(405));

    c.close().await;
    h.developer()
        .cancel_job(authed(pb::CancelJobRequest { job_id: job.id }, &dev))
        .await
        .unwrap();
    stop.cancel();
    let _ = worker.await;
    let _ = device_ids;
    h.finish().await;
}
