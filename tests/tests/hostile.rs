//! The hostile-client suite: attacks on the real cloud over loopback, each against the limit
//! that should stop it (see "Limits" and "Threat model" in ARCHITECTURE.md), with limits
//! shrunk through the cloud's configuration or `serve` flags so every attack is cheap:
//! 1. slow-body streams past the slot count, while health and another caller still answer;
//! 2. 100k requests to random unknown paths: bounded server memory and `/metrics`;
//! 3. 1,000 idle `WatchJob` streams from one principal, cut to its stream quota;
//! 4. a decompression-bomb `.pth` oracle, refused within a stated memory bound;
//! 5. an upload that stalls mid-stream, ended by the upload idle timeout, nothing stored;
//! 6. replayed enrollment tokens and expired credentials;
//! 7. cross-fleet reads by a device;
//! 8. a report below the privacy minimum, which never leaves the edge agent.
//!
//! Every test prints its row of the table (attack | expected | observed) before it asserts,
//! so a failing case shows what it saw: `cargo test -p adaptivenet-tests --test hostile --
//! --nocapture` prints the whole table. Memory is measured on `cloud-server` child processes
//! (`/proc/<pid>/status`), never on this test process, whose other tests run in parallel.
use std::convert::Infallible;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use adaptivenet_cloud::app::{App, Config};
use adaptivenet_cloud::domain::{Oracle, Page, Role};
use adaptivenet_cloud::server::{self, ServerHandle};
use adaptivenet_core::artifact::sha256_hex;
use adaptivenet_proto::v1 as pb;
use adaptivenet_tests::{
    authed, binary, channel, demo_artifact, field_after, http_get, metric, proc_status_bytes,
    register_artifact, run_ok, write_synthetic_idx, CloudProcess,
};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use tonic::Code;

// ---------------------------------------------------------------------------- shared parts

/// Prints one row of the suite's table (attack, expected, observed).
fn row(attack: &str, expected: &str, observed: &str) {
    println!(
        "\n| attack | expected | observed |\n|---|---|---|\n| {attack} | {expected} | {observed} |\n"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The real cloud, in-process on 127.0.0.1:0 (SQLite + blob dir in a temp dir, no job
/// workers, so jobs stay queued).
struct InProcCloud {
    handle: ServerHandle,
    url: String,
    admin: String,
    developer: String,
}

impl InProcCloud {
    async fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut cfg = Config::for_data_dir(dir);
        cfg.drain_grace = Duration::from_millis(50);
        cfg.workers = 0;
        tweak(&mut cfg);
        let app = App::open(cfg).await.expect("open cloud");
        let admin = app
            .create_api_token(Role::Admin, "admin", None)
            .await
            .expect("admin")
            .token;
        let developer = app
            .create_api_token(Role::Developer, "dev", None)
            .await
            .expect("dev")
            .token;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let handle = server::start(app, listener, None, None, None)
            .await
            .expect("start");
        InProcCloud {
            url: format!("http://{}", handle.addr),
            handle,
            admin,
            developer,
        }
    }

    fn app(&self) -> &App {
        self.handle.app()
    }

    fn addr(&self) -> String {
        self.handle.addr.to_string()
    }

    fn dev(
        &self,
    ) -> pb::developer_service_client::DeveloperServiceClient<tonic::transport::Channel> {
        pb::developer_service_client::DeveloperServiceClient::new(channel(&self.url))
    }

    fn device(&self) -> pb::device_service_client::DeviceServiceClient<tonic::transport::Channel> {
        pb::device_service_client::DeviceServiceClient::new(channel(&self.url))
    }

    /// A fleet and an enrollment token with `uses` uses: (fleet id, token).
    async fn fleet(&self, name: &str, uses: u32) -> (String, String) {
        let mut admin = pb::admin_service_client::AdminServiceClient::new(channel(&self.url));
        let fleet = admin
            .create_fleet(authed(
                pb::CreateFleetRequest { name: name.into() },
                &self.admin,
            ))
            .await
            .expect("fleet")
            .into_inner();
        let tok = admin
            .create_enrollment_token(authed(
                pb::CreateEnrollmentTokenRequest {
                    fleet_id: fleet.id.clone(),
                    uses,
                    ttl_seconds: 0,
                },
                &self.admin,
            ))
            .await
            .expect("token")
            .into_inner();
        (fleet.id, tok.token)
    }

    /// Publishes a supernet as the fleet's `stable` label and makes it the desired state.
    async fn publish(&self, supernet: &str, fleet: &str) {
        let mut dev = self.dev();
        dev.publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: supernet.into(),
                fleet_id: fleet.into(),
                label: "stable".into(),
            },
            &self.developer,
        ))
        .await
        .expect("publish");
        dev.set_desired_state(authed(
            pb::SetDesiredStateRequest {
                fleet_id: fleet.into(),
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
        .expect("desired");
    }

    /// Requests the server answered for `method` (a full gRPC path), any status.
    fn calls(&self, method: &str) -> u64 {
        calls_in(&self.app().metrics().render(), method)
    }

    async fn oracles(&self) -> usize {
        self.app()
            .store()
            .list_oracles(Page::new(0, "").expect("page"))
            .await
            .expect("oracles")
            .len()
    }

    async fn devices(&self) -> usize {
        self.app()
            .store()
            .list_devices(Page::new(0, "").expect("page"), None)
            .await
            .expect("devices")
            .len()
    }

    async fn stop(self) {
        self.handle.shutdown().await.expect("shutdown");
    }
}

/// Sum of `adaptivenet_grpc_requests_total` over every code of `method` in an exposition.
fn calls_in(text: &str, method: &str) -> u64 {
    let label = format!("method=\"{method}\"");
    text.lines()
        .filter(|l| l.starts_with("adaptivenet_grpc_requests_total") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn enroll_req(token: &str) -> pb::EnrollRequest {
    pb::EnrollRequest {
        enrollment_token: token.into(),
        device_class: 1,
        agent_version: "0.1.0".into(),
    }
}

/// Blob files in a blob store's final area, and `.part` files (writes in progress) in its
/// scratch area (which also holds each process's lock file, not content).
fn blob_files(root: &Path) -> (usize, usize) {
    fn walk(p: &Path, only_part: bool) -> usize {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| {
                if e.path().is_dir() {
                    walk(&e.path(), only_part)
                } else {
                    usize::from(!only_part || e.file_name().to_string_lossy().ends_with(".part"))
                }
            })
            .sum()
    }
    (
        walk(&root.join("sha256"), false),
        walk(&root.join("tmp"), true),
    )
}

/// An architecture descriptor the oracle uploads below declare.
const ARCH: &[u8] = br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1],"widths":[8],"in_channels":1,"num_classes":10}"#;

/// An oracle upload: header, then `data` in `chunk`-byte messages.
fn upload_msgs(
    name: &str,
    data: &[u8],
    declared: u64,
    chunk: usize,
) -> Vec<pb::UploadOracleRequest> {
    use pb::upload_oracle_request::Msg;
    let mut v = vec![pb::UploadOracleRequest {
        msg: Some(Msg::Header(pb::OracleUploadHeader {
            name: name.into(),
            arch_json: ARCH.to_vec(),
            size_bytes: declared,
            weights_sha256: sha256_hex(data),
        })),
    }];
    v.extend(data.chunks(chunk).map(|c| pb::UploadOracleRequest {
        msg: Some(Msg::Chunk(c.to_vec())),
    }));
    v
}

// ------------------------------------------------------------------- raw HTTP/2 requests

type RawBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type Sender = hyper::client::conn::http2::SendRequest<RawBody>;

/// A bare HTTP/2 connection: requests whose body never ends and paths tonic would not send.
async fn h2(addr: &str) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

fn grpc_request(
    addr: &str,
    path: http::uri::PathAndQuery,
    token: Option<&str>,
    body: RawBody,
) -> http::Request<RawBody> {
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(addr)
        .path_and_query(path)
        .build()
        .expect("uri");
    let mut b = http::Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(body).expect("request")
}

/// A body that sends the first bytes of a gRPC message and then nothing, forever.
fn stalled_body() -> RawBody {
    // A 5-byte message prefix announcing 64 bytes, and 2 of them.
    let head = Bytes::from_static(&[0, 0, 0, 0, 64, 0x0a, 0x01]);
    let s = futures::stream::iter([Ok::<_, Infallible>(hyper::body::Frame::data(head))])
        .chain(futures::stream::pending());
    BodyExt::boxed(http_body_util::StreamBody::new(s))
}

fn empty_body() -> RawBody {
    BodyExt::boxed(http_body_util::Empty::new())
}

/// The gRPC status of a raw response (trailers-only head, else the trailers); `None` with a
/// reason when the stream was reset without one.
async fn grpc_status(
    res: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<i32, String> {
    let res = res.map_err(|e| format!("request failed: {e}"))?;
    let code = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
    };
    if let Some(c) = code(res.headers()) {
        return Ok(c);
    }
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("stream reset: {e}"))?;
    body.trailers()
        .and_then(code)
        .ok_or_else(|| "no grpc-status".to_string())
}

// ------------------------------------------------------------------------- 1. slow body

/// Slow-body (slowloris) streams, anonymous and from one token, well past the slot count:
/// each holder is cut to its pool or quota at once (RESOURCE_EXHAUSTED), the admitted ones
/// end with DEADLINE_EXCEEDED at the body timeout, and meanwhile health and another
/// principal's call answer within their deadline.
#[test]
fn slow_body_streams_past_the_slot_count_leave_health_and_other_callers_served() {
    const SLOTS: usize = 32;
    const ANON: usize = 8;
    const UNARY: usize = 8;
    const BODY_TIMEOUT: Duration = Duration::from_millis(3000);
    const EACH: usize = 40; // stalled streams per attacker, 80 in all (> SLOTS)
    let dir = tempfile::tempdir().expect("tmp");
    runtime().block_on(async {
        let cloud = InProcCloud::start(dir.path(), |c| {
            c.max_concurrent_requests = SLOTS;
            c.net.max_anonymous_requests = ANON;
            c.net.max_unary_per_principal = UNARY;
            c.net.body_timeout_ms = BODY_TIMEOUT.as_millis() as u64;
        })
        .await;
        let addr = cloud.addr();
        let conns = [h2(&addr).await, h2(&addr).await];
        let mut stalled = Vec::new();
        for i in 0..2 * EACH {
            let mut send = conns[i % 2].clone();
            let (path, token) = if i % 2 == 0 {
                ("/adaptivenet.v1.DeviceService/Enroll", None)
            } else {
                (
                    "/adaptivenet.v1.DeveloperService/ListOracles",
                    Some(cloud.developer.clone()),
                )
            };
            let req = grpc_request(
                &addr,
                path.parse().expect("path"),
                token.as_deref(),
                stalled_body(),
            );
            stalled.push(tokio::spawn(async move {
                let t = Instant::now();
                send.ready().await.expect("ready");
                let code = grpc_status(send.send_request(req).await).await;
                (code, t.elapsed())
            }));
        }
        // The admitted ones hold their slots now.
        let t = Instant::now();
        let in_flight = || {
            cloud
                .app()
                .metrics()
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        while in_flight() < (ANON + UNARY) as u64 && t.elapsed() < BODY_TIMEOUT / 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let held = in_flight();

        // Health and another principal's call, each within a 2 s deadline.
        let deadline = Duration::from_secs(2);
        let t = Instant::now();
        let health = tokio::time::timeout(
            deadline,
            tonic_health::pb::health_client::HealthClient::new(channel(&cloud.url)).check(
                tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                },
            ),
        )
        .await;
        let health_ms = t.elapsed().as_millis();
        let t = Instant::now();
        let other = tokio::time::timeout(
            deadline,
            cloud
                .dev()
                .list_oracles(authed(pb::ListOraclesRequest::default(), &cloud.admin)),
        )
        .await;
        let other_ms = t.elapsed().as_millis();
        let still_held = in_flight();

        let mut deadline_exceeded = 0;
        let mut exhausted = 0;
        let mut other_outcomes = Vec::new();
        let mut shortest_cut = Duration::MAX;
        for h in stalled {
            let (code, took) = tokio::time::timeout(Duration::from_secs(20), h)
                .await
                .expect("a stalled stream outlived the body timeout")
                .expect("task");
            match code {
                Ok(4) => {
                    deadline_exceeded += 1;
                    shortest_cut = shortest_cut.min(took);
                }
                Ok(8) => exhausted += 1,
                other => other_outcomes.push(format!("{other:?}")),
            }
        }
        let health_ok = matches!(&health, Ok(Ok(r)) if r.get_ref().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        let other_ok = matches!(&other, Ok(Ok(_)));
        row(
            &format!(
                "slow body: {} stalled unary streams ({EACH} anonymous, {EACH} from one token) vs {SLOTS} slots",
                2 * EACH
            ),
            &format!(
                "{} admitted (pool {ANON} + quota {UNARY}) cut by DEADLINE_EXCEEDED at the {BODY_TIMEOUT:?} body timeout, the rest RESOURCE_EXHAUSTED; health and another token answer < {deadline:?}",
                ANON + UNARY
            ),
            &format!(
                "{held} held slots; {deadline_exceeded} DEADLINE_EXCEEDED (first after {shortest_cut:?}), {exhausted} RESOURCE_EXHAUSTED, other {other_outcomes:?}; health {} in {health_ms} ms, other token {} in {other_ms} ms",
                if health_ok { "SERVING" } else { "FAILED" },
                if other_ok { "OK" } else { "FAILED" },
            ),
        );
        assert_eq!(held, (ANON + UNARY) as u64, "admitted slow bodies");
        assert!(
            still_held >= (ANON + UNARY) as u64,
            "the stalled streams still held their slots while health and the other caller ran"
        );
        assert!(health_ok, "health during the attack: {health:?}");
        assert!(other_ok, "another principal during the attack: {other:?}");
        assert_eq!(deadline_exceeded, ANON + UNARY, "others: {other_outcomes:?}");
        assert_eq!(exhausted, 2 * EACH - ANON - UNARY, "others: {other_outcomes:?}");
        assert!(shortest_cut >= BODY_TIMEOUT - Duration::from_millis(50));
        // Everything released: the slots are back.
        let t = Instant::now();
        while in_flight() != 0 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(in_flight(), 0, "slots released after the attack");
        cloud
            .dev()
            .list_oracles(authed(pb::ListOraclesRequest::default(), &cloud.developer))
            .await
            .expect("the attacker's token works again once its streams are gone");
        cloud.stop().await;
    });
}

// -------------------------------------------------------------------- 2. unknown paths

/// A random path: sometimes under a real service, with `"`, braces, spaces-as-%20 and
/// random bytes (percent-encoded where a URI cannot carry them raw).
fn hostile_path(state: &mut u64, i: usize) -> http::uri::PathAndQuery {
    let mut next = || {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    };
    let mut s = String::from(match i % 4 {
        0 => "/adaptivenet.v1.DeviceService/",
        1 => "/evil\"} 1\n",
        2 => "/",
        _ => "/a\"b{c}/",
    });
    let n = 8 + (next() % 24) as usize;
    for _ in 0..n {
        let b = (next() & 0xff) as u8;
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'"' | b'{' | b'}' | b'.' | b'/' => {
                s.push(b as char)
            }
            _ => s.push_str(&format!("%{b:02X}")),
        }
    }
    if let Ok(p) = http::uri::PathAndQuery::try_from(s.as_str()) {
        return p;
    }
    // Characters a URI cannot carry raw (the newline above): percent-encode them.
    let enc: String = s
        .bytes()
        .map(|b| {
            if b.is_ascii_graphic() && !matches!(b, b'#' | b'?') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    http::uri::PathAndQuery::try_from(enc.as_str())
        .or_else(|_| {
            let safe: String = enc
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b == b'/' || b == b'%' {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            http::uri::PathAndQuery::try_from(safe.as_str())
        })
        .expect("percent-encoded path")
}

/// Checks the Prometheus text format line by line: comments, or `name{labels} value` with
/// quoted, escaped label values. Returns the number of samples.
fn parse_exposition(text: &str) -> Result<usize, String> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut samples = 0;
    for (no, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}: {line:?}", no + 1);
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let v = value.trim();
        if v.parse::<f64>().is_err() && !matches!(v, "+Inf" | "-Inf" | "NaN") {
            return Err(bad("value is not a number"));
        }
        let (name, labels) = match series.find('{') {
            Some(i) => (&series[..i], Some(&series[i..])),
            None => (series, None),
        };
        if !name_ok(name) {
            return Err(bad("bad metric name"));
        }
        if let Some(l) = labels {
            let inner = l
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .ok_or_else(|| bad("labels not in braces"))?;
            let mut rest = inner;
            while !rest.is_empty() {
                let (k, after) = rest
                    .split_once("=\"")
                    .ok_or_else(|| bad("label without =\""))?;
                if !name_ok(k) {
                    return Err(bad("bad label name"));
                }
                // The value runs to the first unescaped quote.
                let mut end = None;
                let mut esc = false;
                for (i, c) in after.char_indices() {
                    match (esc, c) {
                        (true, '\\' | '"' | 'n') => esc = false,
                        (true, _) => return Err(bad("bad escape in a label value")),
                        (false, '\\') => esc = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        (false, '\n') => return Err(bad("raw newline in a label value")),
                        _ => {}
                    }
                }
                let end = end.ok_or_else(|| bad("unterminated label value"))?;
                rest = &after[end + 1..];
                rest = match rest.strip_prefix(',') {
                    Some(r) => r,
                    None if rest.is_empty() => rest,
                    None => return Err(bad("junk after a label value")),
                };
            }
        }
        samples += 1;
    }
    Ok(samples)
}

#[test]
fn exposition_parser_rejects_broken_lines() {
    assert_eq!(
        parse_exposition("# HELP a b\na 1\nb{c=\"d\\\"\"} 2.5\n"),
        Ok(2)
    );
    for bad in [
        "a{c=\"d\"e\"} 1",
        "a{c=\"d} 1",
        "a{c=\"d\"} x",
        "1a 1",
        "a{c=d} 1",
    ] {
        assert!(parse_exposition(bad).is_err(), "{bad}");
    }
}

/// 100k requests to random unknown paths (with `"`, braces and random bytes) over four
/// HTTP/2 connections: the server's RSS grows by less than 20 MB, `/metrics` stays under
/// 1 MB and parses, and every request is answered UNIMPLEMENTED under one `unknown` label.
#[test]
fn random_unknown_paths_leave_memory_and_metrics_bounded() {
    const N: usize = 100_000;
    const WARMUP: usize = 5_000;
    const CONNS: usize = 4;
    const PER_CONN: usize = 16;
    let dir = tempfile::tempdir().expect("tmp");
    let mut cloud = CloudProcess::new(&dir.path().join("cloud"), None);
    run_ok(&mut cloud.cmd(&["migrate"]));
    // More anonymous permits than the 64 requests kept in flight: every request is served.
    cloud.start_with(&["--max-anonymous-requests", "256"]);
    let pid = cloud.pid().expect("running").to_string();
    let addr = format!("127.0.0.1:{}", cloud.port);
    let rt = runtime();
    let fire = |count: usize, seed: u64| {
        rt.block_on(async {
            let mut tasks = Vec::new();
            for c in 0..CONNS {
                let send = h2(&addr).await;
                for w in 0..PER_CONN {
                    let mut send = send.clone();
                    let addr = addr.clone();
                    let k = c * PER_CONN + w;
                    let share =
                        count / (CONNS * PER_CONN) + usize::from(k < count % (CONNS * PER_CONN));
                    tasks.push(tokio::spawn(async move {
                        let mut state = seed ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        let mut codes = std::collections::BTreeMap::<String, usize>::new();
                        for i in 0..share {
                            let path = hostile_path(&mut state, i);
                            if path.as_str().contains('"') {
                                *codes.entry("raw-quote-paths".into()).or_default() += 1;
                            }
                            let req = grpc_request(&addr, path, None, empty_body());
                            send.ready().await.expect("ready");
                            let code = match grpc_status(send.send_request(req).await).await {
                                Ok(c) => c.to_string(),
                                Err(e) => e,
                            };
                            *codes.entry(code).or_default() += 1;
                        }
                        codes
                    }));
                }
            }
            let mut all = std::collections::BTreeMap::<String, usize>::new();
            for t in tasks {
                for (k, v) in t.await.expect("task") {
                    *all.entry(k).or_default() += v;
                }
            }
            all
        })
    };
    let warm = fire(WARMUP, 1);
    let rss_before = proc_status_bytes(&pid, "VmRSS");
    let t = Instant::now();
    let codes = fire(N, 2);
    let took = t.elapsed();
    let rss_after = proc_status_bytes(&pid, "VmRSS");
    let text = http_get(&cloud.metrics_addr(), "/metrics").expect("/metrics reachable");
    let parsed = parse_exposition(&text);
    let unknown = metric(
        &text,
        r#"adaptivenet_grpc_requests_total{method="unknown",code="12"}"#,
    );
    let grown = rss_after as i64 - rss_before as i64;
    row(
        &format!("{N} requests to random unknown paths (\" {{}} random bytes), {CONNS} HTTP/2 connections"),
        "UNIMPLEMENTED each; server RSS grows < 20 MB; /metrics < 1 MB and parses",
        &format!(
            "{codes:?} in {:.1} s; RSS {} -> {} MiB ({:+.1} MB); /metrics {} bytes, {}; method=\"unknown\" count {unknown}",
            took.as_secs_f64(),
            rss_before >> 20,
            rss_after >> 20,
            grown as f64 / 1e6,
            text.len(),
            match &parsed {
                Ok(n) => format!("{n} samples parse"),
                Err(e) => format!("does not parse: {e}"),
            }
        ),
    );
    assert_eq!(warm.get("12"), Some(&WARMUP), "warm-up: {warm:?}");
    assert_eq!(
        codes.get("12"),
        Some(&N),
        "every request answered UNIMPLEMENTED: {codes:?}"
    );
    assert!(
        codes.get("raw-quote-paths").is_some_and(|&n| n >= N / 4),
        "paths with a raw quote were sent: {codes:?}"
    );
    assert!(grown < 20_000_000, "RSS grew by {grown} bytes");
    assert!(text.len() < 1 << 20, "/metrics is {} bytes", text.len());
    parsed.expect("/metrics parses");
    assert!(
        unknown >= (N + WARMUP) as f64,
        "unknown paths share one label"
    );
    assert!(!text.contains("evil"), "an attacker's path became a label");
}

// ------------------------------------------------------------------------ 3. idle watches

/// 1,000 idle `WatchJob` streams from one token: exactly its stream quota (32) open, the
/// rest RESOURCE_EXHAUSTED at once; another token still watches and calls; closing the
/// streams gives the quota back.
#[test]
fn a_thousand_idle_watches_from_one_principal_are_cut_to_its_quota() {
    const WATCHES: usize = 1000;
    const CONNS: usize = 10;
    let quota = adaptivenet_cloud::ops::net::NetLimits::default().max_streams_per_principal;
    let dir = tempfile::tempdir().expect("tmp");
    runtime().block_on(async {
        let cloud = InProcCloud::start(&dir.path().join("cloud"), |_| {}).await;
        // A queued job (no workers) to watch: an oracle row whose descriptor has a branch
        // (two blocks; no weights are read) and an uploaded dataset that fits it, so the job
        // passes StartElastification's checks.
        let oracle = Oracle {
            id: uuid::Uuid::new_v4(),
            name: "o".into(),
            family: "adaptivenet.resnet_small".into(),
            weights_sha256: "ab".repeat(32),
            size_bytes: 1,
            num_params: 1,
            num_tensors: 1,
            arch_json: r#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[2],"widths":[8],"in_channels":1,"num_classes":10}"#.into(),
            created_ms: 0,
        };
        cloud
            .app()
            .store()
            .insert_oracle(&oracle)
            .await
            .expect("oracle");
        let data = dir.path().join("data");
        write_synthetic_idx(&data, 40, 10);
        let mut upload = Command::new(binary("cloud-server"));
        upload
            .args(["client", "--endpoint", &cloud.url, "--token", &cloud.developer])
            .args(["-q", "upload-dataset", "--name", "data"])
            .arg(&data);
        let dataset = tokio::task::spawn_blocking(move || run_ok(&mut upload))
            .await
            .expect("upload-dataset")
            .trim()
            .to_string();
        let job = cloud
            .dev()
            .start_elastification(authed(
                pb::StartElastificationRequest {
                    oracle_id: oracle.id.to_string(),
                    dataset_id: dataset,
                    params_json: r#"{"val_size":10}"#.into(),
                    ..Default::default()
                },
                &cloud.developer,
            ))
            .await
            .expect("job")
            .into_inner();
        let chans: Vec<_> = (0..CONNS).map(|_| channel(&cloud.url)).collect();
        // The token's credential is cached from the call above; fire all watches at once.
        let t = Instant::now();
        let calls = (0..WATCHES).map(|i| {
            let mut c = pb::developer_service_client::DeveloperServiceClient::new(
                chans[i % CONNS].clone(),
            );
            let req = authed(
                pb::WatchJobRequest {
                    job_id: job.id.clone(),
                },
                &cloud.developer,
            );
            async move {
                match c.watch_job(req).await {
                    Ok(s) => {
                        let mut s = s.into_inner();
                        match s.message().await {
                            Ok(Some(_)) => Ok(s),
                            other => Err(format!("no first event: {other:?}")),
                        }
                    }
                    Err(e) => Err(format!("{:?}", e.code())),
                }
            }
        });
        let results = futures::future::join_all(calls).await;
        let took = t.elapsed();
        let mut open = Vec::new();
        let mut refused = std::collections::BTreeMap::<String, usize>::new();
        for r in results {
            match r {
                Ok(s) => open.push(s),
                Err(e) => *refused.entry(e).or_default() += 1,
            }
        }
        // Another principal gets service while the quota is full.
        let other = cloud
            .app()
            .create_api_token(Role::Viewer, "other", None)
            .await
            .expect("viewer")
            .token;
        let mut dev = cloud.dev();
        let other_watch = dev
            .watch_job(authed(
                pb::WatchJobRequest {
                    job_id: job.id.clone(),
                },
                &other,
            ))
            .await;
        let other_first = match other_watch {
            Ok(s) => s.into_inner().message().await.map(|m| m.is_some()),
            Err(e) => Err(e),
        };
        let other_unary = dev
            .get_job(authed(
                pb::GetJobRequest {
                    job_id: job.id.clone(),
                },
                &other,
            ))
            .await;
        // Past the quota, the same token is still refused; after closing its streams it is not.
        let again = dev
            .watch_job(authed(
                pb::WatchJobRequest {
                    job_id: job.id.clone(),
                },
                &cloud.developer,
            ))
            .await
            .map(drop);
        let held = open.len();
        drop(open);
        let t2 = Instant::now();
        let after = loop {
            let r = dev
                .watch_job(authed(
                    pb::WatchJobRequest {
                        job_id: job.id.clone(),
                    },
                    &cloud.developer,
                ))
                .await;
            match r {
                Ok(s) => break Ok(s),
                Err(e) if t2.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => break Err(e),
            }
        };
        row(
            &format!("{WATCHES} idle WatchJob streams from one token over {CONNS} connections"),
            &format!("{quota} open (the per-principal stream quota), the rest RESOURCE_EXHAUSTED; another token served"),
            &format!(
                "{held} open, refused {refused:?} in {:.2} s; other token: watch {}, GetJob {}; same token past quota {:?}; after closing: {}",
                took.as_secs_f64(),
                if matches!(other_first, Ok(true)) { "OK" } else { "FAILED" },
                if other_unary.is_ok() { "OK" } else { "FAILED" },
                again.as_ref().map_err(|e| e.code()),
                if after.is_ok() { "served again" } else { "still refused" },
            ),
        );
        assert_eq!(held, quota, "open watches");
        assert_eq!(
            refused.get("ResourceExhausted"),
            Some(&(WATCHES - quota)),
            "{refused:?}"
        );
        assert!(matches!(other_first, Ok(true)), "{other_first:?}");
        other_unary.expect("another principal's unary call");
        assert_eq!(
            again.expect_err("past the quota").code(),
            Code::ResourceExhausted
        );
        after.expect("the quota comes back when the streams close");
        cloud.stop().await;
    });
}

// ----------------------------------------------------------------- 4. decompression bomb

/// Inflated size of the bomb's storage entry: 256 MiB of zeros, ~1000x its compressed size.
const BOMB_BYTES: u64 = 256 << 20;
/// What refusing a bomb may add to the server's peak RSS (VmHWM): the archive's inflation
/// budget (16x the archive + 16 MiB) plus slack, far below the 256 MiB it inflates to.
const BOMB_RSS_BOUND: u64 = 64 << 20;

/// The core's `.pth` zip fixture with storage `0` replaced by `BOMB_BYTES` deflated zeros;
/// also returns the fixture's honest size of that entry.
fn pth_bomb() -> (Vec<u8>, u64) {
    use std::io::{Read, Write};
    use zip::write::SimpleFileOptions;
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/core/tests/data/tiny_zip.pth"
    ))
    .expect("tiny_zip.pth fixture");
    let mut src = zip::ZipArchive::new(std::io::Cursor::new(fixture)).expect("fixture zip");
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let deflated = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(9));
    let mut honest = 0;
    for i in 0..src.len() {
        let mut f = src.by_index(i).expect("entry");
        let name = f.name().replacen("tiny_zip/", "bomb/", 1);
        if name == "bomb/data/0" {
            honest = f.size();
            out.start_file(name, deflated).expect("start");
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..BOMB_BYTES >> 20 {
                out.write_all(&zeros).expect("write");
            }
        } else {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).expect("read");
            out.start_file(name, stored).expect("start");
            out.write_all(&bytes).expect("write");
        }
    }
    (out.finish().expect("finish").into_inner(), honest)
}

/// Rewrites the uncompressed size of entry `name` in its local header and central directory
/// entry: an archive that lies about how much the entry inflates to.
fn claim_size(zip: &mut [u8], name: &str, size: u32) {
    let le16 = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let mut patched = 0;
    let mut i = 0;
    while i + 46 <= zip.len() {
        let (name_at, size_at, len_at) = match &zip[i..i + 4] {
            b"PK\x03\x04" => (i + 30, i + 22, i + 26),
            b"PK\x01\x02" => (i + 46, i + 24, i + 28),
            _ => {
                i += 1;
                continue;
            }
        };
        let len = le16(zip, len_at);
        if zip.get(name_at..name_at + len) == Some(name.as_bytes()) {
            zip[size_at..size_at + 4].copy_from_slice(&size.to_le_bytes());
            patched += 1;
        }
        i += 4;
    }
    assert_eq!(
        patched, 2,
        "local header and central directory entry of {name}"
    );
}

/// A decompression-bomb `.pth` uploaded as an oracle (once honest about its size in the zip
/// directory, once lying): INVALID_ARGUMENT, nothing stored, and the server process's peak
/// RSS rises by less than `BOMB_RSS_BOUND`.
#[test]
fn decompression_bomb_oracle_is_refused_within_a_memory_bound() {
    let (bomb, honest) = pth_bomb();
    assert!(
        (bomb.len() as u64) * 500 < BOMB_BYTES,
        "a bomb: {} bytes",
        bomb.len()
    );
    let mut lying = bomb.clone();
    claim_size(&mut lying, "bomb/data/0", honest as u32);
    let dir = tempfile::tempdir().expect("tmp");
    let mut cloud = CloudProcess::new(&dir.path().join("cloud"), None);
    run_ok(&mut cloud.cmd(&["migrate"]));
    let dev = field_after(
        &run_ok(&mut cloud.cmd(&["token", "create-api", "--role", "developer"])),
        "token:",
    );
    cloud.start();
    let pid = cloud.pid().expect("running").to_string();
    let rt = runtime();
    let (outcomes, peak_before, peak_after, stored) = rt.block_on(async {
        let mut client =
            pb::developer_service_client::DeveloperServiceClient::new(channel(&cloud.url()));
        // One ordinary call first, so the baseline includes a served request.
        client
            .list_oracles(authed(pb::ListOraclesRequest::default(), &dev))
            .await
            .expect("list");
        let peak_before = proc_status_bytes(&pid, "VmHWM");
        let mut outcomes = Vec::new();
        for (name, data) in [("bomb", &bomb), ("lying-bomb", &lying)] {
            let msgs = upload_msgs(name, data, data.len() as u64, 64 << 10);
            let r = client
                .upload_oracle(authed(futures::stream::iter(msgs), &dev))
                .await;
            outcomes.push(r.map(drop));
        }
        let peak_after = proc_status_bytes(&pid, "VmHWM");
        let stored = client
            .list_oracles(authed(pb::ListOraclesRequest::default(), &dev))
            .await
            .expect("list")
            .into_inner()
            .oracles
            .len();
        (outcomes, peak_before, peak_after, stored)
    });
    let blobs = blob_files(&cloud.data_dir.join("blobs"));
    let rise = peak_after.saturating_sub(peak_before);
    row(
        &format!(
            "decompression-bomb .pth oracle ({} bytes inflating to {} MiB; honest and lying zip directory)",
            bomb.len(),
            BOMB_BYTES >> 20
        ),
        &format!("INVALID_ARGUMENT twice, nothing stored, server peak RSS rises < {} MiB", BOMB_RSS_BOUND >> 20),
        &format!(
            "{:?}; {stored} oracles, {blobs:?} blob/part files; VmHWM {} -> {} MiB (+{:.1} MiB)",
            outcomes
                .iter()
                .map(|o| match o {
                    Ok(()) => "stored!".to_string(),
                    Err(e) => format!("{:?}", e.code()),
                })
                .collect::<Vec<_>>(),
            peak_before >> 20,
            peak_after >> 20,
            rise as f64 / (1u64 << 20) as f64
        ),
    );
    for o in &outcomes {
        let e = o.as_ref().expect_err("a bomb must be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message().contains("decompression bomb") || e.message().contains("inflates beyond"),
            "{}",
            e.message()
        );
    }
    assert_eq!(stored, 0);
    assert_eq!(blobs, (0, 0), "nothing stored, no scratch left");
    assert!(rise < BOMB_RSS_BOUND, "peak RSS rose by {rise} bytes");
}

// ---------------------------------------------------------------------- 5. stalled upload

/// An oracle upload that stalls after its first chunk, with no client deadline: the upload
/// idle timeout (shrunk to 600 ms) ends it with DEADLINE_EXCEEDED and nothing is stored.
#[test]
fn upload_stalled_mid_stream_times_out_and_stores_nothing() {
    const IDLE: Duration = Duration::from_millis(600);
    let dir = tempfile::tempdir().expect("tmp");
    runtime().block_on(async {
        let cloud = InProcCloud::start(dir.path(), |c| {
            c.net.upload_idle_timeout_ms = IDLE.as_millis() as u64;
        })
        .await;
        let data = vec![7u8; 1 << 20];
        let msgs = upload_msgs("stalled", &data, data.len() as u64, 64 << 10);
        let stalled =
            futures::stream::iter(msgs.into_iter().take(2)).chain(futures::stream::pending());
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            cloud.dev().upload_oracle(authed(stalled, &cloud.developer)),
        )
        .await
        .expect("the server ended the stalled upload");
        let took = t.elapsed();
        let root = cloud.app().blobs().root().to_path_buf();
        let t2 = Instant::now();
        while blob_files(&root) != (0, 0) && t2.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let blobs = blob_files(&root);
        let oracles = cloud.oracles().await;
        row(
            "oracle upload stalls after its first 64 KiB chunk (no client deadline)",
            &format!(
                "DEADLINE_EXCEEDED after the {IDLE:?} upload idle timeout; no oracle row, no blob"
            ),
            &format!(
                "{:?} after {took:?}; {oracles} oracle rows, {blobs:?} blob/part files",
                r.as_ref().map(drop).map_err(|e| e.code())
            ),
        );
        let err = r.expect_err("a stalled upload cannot succeed");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
        assert!(took >= IDLE - Duration::from_millis(50), "{took:?}");
        assert_eq!(oracles, 0);
        assert_eq!(blobs, (0, 0));
        cloud.stop().await;
    });
}

// ------------------------------------------------------------------- 6. credentials

/// An enrollment token replayed past its uses, an expired enrollment token, an expired
/// device credential and a revoked one: UNAUTHENTICATED, no device added, nothing changed.
#[test]
fn replayed_and_expired_credentials_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    runtime().block_on(async {
        let cloud = InProcCloud::start(dir.path(), |c| {
            c.device_credential_ttl = Some(Duration::from_millis(400));
            c.auth_cache_ttl = Duration::ZERO;
        })
        .await;
        let (fleet, token) = cloud.fleet("creds", 2).await;
        let mut device = cloud.device();
        let mut creds = Vec::new();
        for _ in 0..2 {
            creds.push(
                device
                    .enroll(enroll_req(&token))
                    .await
                    .expect("enroll within the token's uses")
                    .into_inner()
                    .device_credential,
            );
        }
        let devices_before = cloud.devices().await;
        let mut observed = Vec::new();
        let mut codes = Vec::new();
        // 1. Replay past its uses, several times.
        for _ in 0..3 {
            let c = device.enroll(enroll_req(&token)).await.map(drop);
            codes.push(("replayed enrollment token", c.map_err(|e| e.code())));
        }
        // 2. An enrollment token past its lifetime.
        let short = cloud
            .app()
            .create_enrollment_token(
                uuid::Uuid::parse_str(&fleet).expect("uuid"),
                5,
                Some(Duration::from_millis(50)),
            )
            .await
            .expect("token");
        tokio::time::sleep(Duration::from_millis(450)).await;
        let c = device.enroll(enroll_req(&short.token)).await.map(drop);
        codes.push(("expired enrollment token", c.map_err(|e| e.code())));
        // 3. Device credentials past their lifetime (400 ms), on every device call.
        let c = device
            .get_desired_state(authed(pb::Empty {}, &creds[0]))
            .await
            .map(drop);
        codes.push(("expired device credential: GetDesiredState", c.map_err(|e| e.code())));
        let c = device
            .heartbeat(authed(
                pb::HeartbeatRequest {
                    agent_version: "0.1.0".into(),
                    ..Default::default()
                },
                &creds[1],
            ))
            .await
            .map(drop);
        codes.push(("expired device credential: Heartbeat", c.map_err(|e| e.code())));
        // 4. A forged credential in the right format.
        let c = device
            .get_desired_state(authed(pb::Empty {}, "anv1_dev_forged"))
            .await
            .map(drop);
        codes.push(("forged device credential", c.map_err(|e| e.code())));
        for (what, c) in &codes {
            observed.push(format!("{what}: {c:?}"));
        }
        let devices_after = cloud.devices().await;
        let heartbeats = cloud.calls("/adaptivenet.v1.DeviceService/Heartbeat");
        row(
            "enrollment token (2 uses) replayed 3x; expired enrollment token; expired and forged device credentials",
            "UNAUTHENTICATED each; no device added, no heartbeat recorded",
            &format!(
                "{}; devices {devices_before} -> {devices_after}",
                observed.join(", ")
            ),
        );
        for (what, c) in &codes {
            assert_eq!(c, &Err(Code::Unauthenticated), "{what}");
        }
        assert_eq!(devices_before, 2);
        assert_eq!(devices_after, devices_before, "no device added");
        assert_eq!(heartbeats, 1, "the one refused heartbeat call, nothing else");
        let listed = cloud
            .app()
            .store()
            .list_devices(Page::new(0, "").expect("page"), None)
            .await
            .expect("devices");
        assert!(
            listed.iter().all(|d| d.last_heartbeat_ms <= d.enrolled_ms),
            "a refused heartbeat was recorded"
        );
        cloud.stop().await;
    });
}

// ------------------------------------------------------------------------ 7. cross-fleet

/// A device of fleet A asks for fleet B's supernet manifest and blobs, and for the
/// developer API: refused (NOT_FOUND / PERMISSION_DENIED), nothing of B sent; its own
/// fleet's supernet is served.
#[test]
fn cross_fleet_reads_by_a_device_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    runtime().block_on(async {
        let cloud = InProcCloud::start(&dir.path().join("cloud"), |_| {}).await;
        let art_a = dir.path().join("art-a");
        let art_b = dir.path().join("art-b");
        let ma = demo_artifact(&art_a, [4, 8, 8], 1);
        let mb = demo_artifact(&art_b, [4, 8, 8], 2);
        let sa = register_artifact(cloud.app(), &art_a).await;
        let sb = register_artifact(cloud.app(), &art_b).await;
        let (fa, ta) = cloud.fleet("a", 1).await;
        let (fb, _) = cloud.fleet("b", 1).await;
        cloud.publish(&sa, &fa).await;
        cloud.publish(&sb, &fb).await;
        let blobs_a: std::collections::BTreeSet<String> =
            ma.modules().into_iter().map(|(_, e)| e.sha256.clone()).collect();
        let only_b = mb
            .modules()
            .into_iter()
            .map(|(_, e)| e.sha256.clone())
            .find(|s| !blobs_a.contains(s))
            .expect("a blob only fleet B's supernet holds");
        let own_blob = blobs_a.iter().next().expect("a blob of A").clone();
        let mut device = cloud.device();
        let cred = device
            .enroll(enroll_req(&ta))
            .await
            .expect("enroll in A")
            .into_inner()
            .device_credential;
        let sent_before = cloud.app().metrics().blob_bytes_sent_total.load(std::sync::atomic::Ordering::Relaxed);
        let manifest = |id: &str| pb::GetManifestRequest {
            supernet_id: id.into(),
        };
        let own = device
            .get_manifest(authed(manifest(&sa), &cred))
            .await
            .map(drop)
            .map_err(|e| e.code());
        let other = device
            .get_manifest(authed(manifest(&sb), &cred))
            .await
            .map(drop)
            .map_err(|e| e.code());
        async fn download(
            device: &mut pb::device_service_client::DeviceServiceClient<tonic::transport::Channel>,
            sha: &str,
            cred: &str,
        ) -> Result<usize, Code> {
            let mut s = device
                .download_blob(authed(
                    pb::DownloadBlobRequest {
                        sha256: sha.into(),
                        offset: 0,
                        chunk_size: 0,
                    },
                    cred,
                ))
                .await
                .map_err(|e| e.code())?
                .into_inner();
            let mut n = 0;
            while let Some(c) = s.message().await.map_err(|e| e.code())? {
                n += c.data.len();
            }
            Ok(n)
        }
        let sent_mid = cloud.app().metrics().blob_bytes_sent_total.load(std::sync::atomic::Ordering::Relaxed);
        let other_blob = download(&mut device, &only_b, &cred).await;
        let sent_after_b = cloud.app().metrics().blob_bytes_sent_total.load(std::sync::atomic::Ordering::Relaxed);
        let own_download = download(&mut device, &own_blob, &cred).await;
        let dev_api = cloud
            .dev()
            .list_supernets(authed(pb::ListSupernetsRequest::default(), &cred))
            .await
            .map(drop)
            .map_err(|e| e.code());
        let desired = device
            .get_desired_state(authed(pb::Empty {}, &cred))
            .await
            .expect("desired state")
            .into_inner();
        let desired_dbg = format!("{desired:?}");
        row(
            "device of fleet A reads fleet B's manifest and blob, and the developer API",
            "refused (NOT_FOUND / PERMISSION_DENIED), no byte of B sent; A's own supernet served",
            &format!(
                "B manifest {other:?}, B blob {other_blob:?} ({} bytes sent), ListSupernets {dev_api:?}; A manifest {own:?}, A blob {own_download:?}; desired state names B: {}",
                sent_after_b - sent_mid,
                desired_dbg.contains(&sb)
            ),
        );
        fn refused<T>(r: &Result<T, Code>) -> bool {
            matches!(
                r,
                Err(Code::NotFound | Code::PermissionDenied | Code::Unauthenticated)
            )
        }
        assert_eq!(own, Ok(()));
        assert!(refused(&other), "{other:?}");
        assert!(refused(&other_blob), "{other_blob:?}");
        assert_eq!(sent_after_b, sent_mid, "bytes of fleet B's blob were sent");
        assert!(own_download.expect("own blob") > 0);
        assert!(refused(&dev_api), "{dev_api:?}");
        assert!(!desired_dbg.contains(&sb), "{desired_dbg}");
        assert!(sent_before <= sent_mid);
        let _ = fb;
        cloud.stop().await;
    });
}

// -------------------------------------------------------------------- 8. privacy minimum

/// The real `edge-agent` with 30 local images (`--images 500`) against a cloud whose privacy
/// minimum is 100: the report is withheld on the device (timeline `report_withheld`), the
/// cloud answers heartbeats but sees zero Report calls and stores no report.
#[test]
fn report_below_the_privacy_minimum_never_leaves_the_agent() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let rt = runtime();
    let (cloud, token) = rt.block_on(async {
        let cloud = InProcCloud::start(&d.join("cloud"), |c| c.min_report_samples = 100).await;
        let art = d.join("art");
        demo_artifact(&art, [4, 8, 8], 5);
        let sid = register_artifact(cloud.app(), &art).await;
        let (fleet, token) = cloud.fleet("privacy", 1).await;
        cloud.publish(&sid, &fleet).await;
        (cloud, token)
    });
    let data = d.join("data");
    write_synthetic_idx(&data, 20, 30);
    let state = d.join("agent");
    let state_s = state.display().to_string();
    let data_s = data.display().to_string();
    let args = [
        "run",
        "--cloud",
        &cloud.url,
        "--enroll-token",
        &token,
        "--state",
        &state_s,
        "--data",
        &data_s,
        "--images",
        "500",
        "--population",
        "6",
        "--generations",
        "1",
        "--rounds",
        "2",
        "--validate",
        "0",
        "--label-free",
        "--duration",
        "2",
        "--heartbeat-ms",
        "300",
        "--report-every",
        "1",
        "--interval-ms",
        "200",
    ];
    let out = Command::new(binary("edge-agent"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("spawn edge-agent");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let timeline = std::fs::read_to_string(state.join("timeline.jsonl")).unwrap_or_default();
    let reports = cloud.calls("/adaptivenet.v1.DeviceService/Report");
    let heartbeats = cloud.calls("/adaptivenet.v1.DeviceService/Heartbeat");
    let withheld = timeline.matches("report_withheld").count();
    row(
        "edge agent with 30 local images (--images 500) vs a privacy minimum of 100",
        "report withheld on the device (timeline report_withheld); the cloud sees 0 Report calls",
        &format!(
            "agent exit {:?}; {withheld} report_withheld in the timeline; cloud: {reports} Report calls, {heartbeats} heartbeats",
            out.status.code()
        ),
    );
    assert!(out.status.success(), "edge-agent failed:\n{log}");
    assert!(
        log.contains("report withheld on the device") && log.contains("30 local images"),
        "{log}"
    );
    assert!(withheld >= 1, "{timeline}");
    assert!(heartbeats >= 1, "the agent did talk to the cloud:\n{log}");
    assert_eq!(reports, 0, "a withheld report reached the cloud");
    rt.block_on(cloud.stop());
}
