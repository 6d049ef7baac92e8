//! gRPC-Web against a real server on 127.0.0.1: an HTTP/1.1 client that frames requests by
//! hand (`application/grpc-web+proto`, as a browser library does) and decodes the response's
//! message and trailer frames, compared with native gRPC answers.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use adaptivenet_cloud::domain::Role;
use adaptivenet_proto::v1 as pb;
use bytes::{Buf, Bytes};
use common::{authed, safetensors_bytes, sha256_hex, upload_msgs, Db, Harness};
use http_body_util::{BodyExt, Full};
use prost::Message;

const ALLOWED: &str = "https://dash.example.com";
const OTHER: &str = "https://evil.example.net";

/// A decoded gRPC-Web response.
struct WebResponse {
    http: http::StatusCode,
    headers: http::HeaderMap,
    messages: Vec<Bytes>,
    /// From the trailer frame (flag 0x80) of the body.
    trailers: http::HeaderMap,
}

impl WebResponse {
    /// The call's status: the trailer frame's, or the headers' for a trailers-only response
    /// (both are how gRPC-Web delivers it).
    fn grpc_status(&self) -> Option<i32> {
        self.trailers
            .get("grpc-status")
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok()?.parse().ok())
    }

    fn message<M: Message + Default>(&self) -> M {
        assert_eq!(self.grpc_status(), Some(0), "status {:?}", self.headers);
        assert_eq!(self.messages.len(), 1);
        M::decode(self.messages[0].clone()).expect("decode")
    }
}

async fn send(addr: SocketAddr, req: http::Request<Full<Bytes>>) -> http::Response<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("http/1.1 handshake");
    tokio::spawn(conn);
    let res = sender.send_request(req).await.expect("http/1.1 request");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    http::Response::from_parts(parts, body)
}

/// One gRPC-Web call: `msg` framed as a single uncompressed message.
async fn web_call(
    addr: SocketAddr,
    path: &str,
    msg: &impl Message,
    token: Option<&str>,
    origin: Option<&str>,
    timeout: Option<&str>,
) -> WebResponse {
    let payload = msg.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(&payload);
    let mut b = http::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if let Some(o) = origin {
        b = b.header("origin", o);
    }
    if let Some(t) = timeout {
        b = b.header("grpc-timeout", t);
    }
    let res = send(addr, b.body(Full::new(Bytes::from(framed))).expect("req")).await;
    let (parts, mut body) = res.into_parts();
    let mut messages = Vec::new();
    let mut trailers = http::HeaderMap::new();
    while body.has_remaining() {
        assert!(body.len() >= 5, "truncated frame header");
        let flag = body.get_u8();
        let len = body.get_u32() as usize;
        let frame = body.split_to(len);
        if flag & 0x80 != 0 {
            for line in std::str::from_utf8(&frame)
                .expect("ascii trailers")
                .split("\r\n")
            {
                if let Some((k, v)) = line.split_once(':') {
                    trailers.insert(
                        http::HeaderName::from_bytes(k.trim().as_bytes()).expect("name"),
                        v.trim().parse().expect("value"),
                    );
                }
            }
        } else {
            messages.push(frame);
        }
    }
    WebResponse {
        http: parts.status,
        headers: parts.headers,
        messages,
        trailers,
    }
}

async fn preflight(addr: SocketAddr, origin: &str) -> http::Response<Bytes> {
    let req = http::Request::options("/adaptivenet.v1.DashboardService/GetFleetAggregates")
        .header("host", addr.to_string())
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-grpc-web",
        )
        .body(Full::new(Bytes::new()))
        .expect("req");
    send(addr, req).await
}

fn metrics_count(body: &str, method: &str, code: &str) -> u64 {
    let key = format!("adaptivenet_grpc_requests_total{{method=\"{method}\",code=\"{code}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().expect("count"))
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

const AGGREGATES: &str = "/adaptivenet.v1.DashboardService/GetFleetAggregates";

async fn dashboard_over_grpc_web(db: Db) {
    let Some(h) = Harness::start(db, |c| c.grpc_web_origins = vec![ALLOWED.into()], None).await
    else {
        return;
    };
    let addr = h.handle.as_ref().expect("running").addr;
    let viewer = h.token(Role::Viewer).await;
    let (fleet, _device, _cred) = h.enrolled_device("web").await;

    // The same answers as native gRPC, with CORS headers for the allowed origin.
    let req = pb::GetFleetAggregatesRequest {
        fleet_id: fleet.clone(),
    };
    let native = h
        .dashboard()
        .get_fleet_aggregates(authed(req.clone(), &viewer))
        .await
        .expect("native")
        .into_inner();
    let web = web_call(addr, AGGREGATES, &req, Some(&viewer), Some(ALLOWED), None).await;
    assert_eq!(web.http, http::StatusCode::OK);
    assert_eq!(
        web.headers.get("content-type").expect("content-type"),
        "application/grpc-web+proto"
    );
    assert_eq!(
        web.headers
            .get("access-control-allow-origin")
            .expect("acao"),
        ALLOWED
    );
    assert_eq!(web.message::<pb::FleetAggregates>(), native);
    assert_eq!(native.devices_total, 1, "{native:?}");
    let fleets_native = h
        .dashboard()
        .list_fleets(authed(pb::ListFleetsRequest::default(), &viewer))
        .await
        .expect("native")
        .into_inner();
    let fleets_web = web_call(
        addr,
        "/adaptivenet.v1.DashboardService/ListFleets",
        &pb::ListFleetsRequest::default(),
        Some(&viewer),
        None,
        None,
    )
    .await
    .message::<pb::ListFleetsResponse>();
    assert_eq!(fleets_web, fleets_native);
    assert_eq!(fleets_web.fleets.len(), 1);

    // A read-only developer method works for a viewer too.
    let jobs = web_call(
        addr,
        "/adaptivenet.v1.DeveloperService/ListSupernets",
        &pb::ListSupernetsRequest::default(),
        Some(&h.admin),
        None,
        None,
    )
    .await;
    assert_eq!(jobs.grpc_status(), Some(0));

    // CORS preflight: allowed origin answered, another refused without CORS headers.
    let ok = preflight(addr, ALLOWED).await;
    assert_eq!(ok.status(), http::StatusCode::NO_CONTENT);
    assert_eq!(ok.headers()["access-control-allow-origin"], ALLOWED);
    assert_eq!(ok.headers()["access-control-allow-methods"], "POST");
    let allow_headers = ok.headers()["access-control-allow-headers"]
        .to_str()
        .expect("ascii");
    for name in ["authorization", "content-type", "x-grpc-web"] {
        assert!(allow_headers.contains(name), "{allow_headers}");
    }
    let refused = preflight(addr, OTHER).await;
    assert_eq!(refused.status(), http::StatusCode::FORBIDDEN);
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    // ... and the call itself from that origin is refused, token or not.
    let other = web_call(addr, AGGREGATES, &req, Some(&viewer), Some(OTHER), None).await;
    assert_eq!(other.grpc_status(), Some(7), "{:?}", other.headers);
    assert!(other.headers.get("access-control-allow-origin").is_none());

    // No token: UNAUTHENTICATED from the same auth as native calls.
    let anon = web_call(addr, AGGREGATES, &req, None, Some(ALLOWED), None).await;
    assert_eq!(anon.grpc_status(), Some(16));
    assert!(anon.messages.is_empty());
    let forged = web_call(addr, AGGREGATES, &req, Some("anv1_api_nope"), None, None).await;
    assert_eq!(forged.grpc_status(), Some(16));

    // Write methods are not reachable through gRPC-Web, even for an admin; nothing changes.
    let create = web_call(
        addr,
        "/adaptivenet.v1.AdminService/CreateFleet",
        &pb::CreateFleetRequest {
            name: "from-browser".into(),
        },
        Some(&h.admin),
        Some(ALLOWED),
        None,
    )
    .await;
    assert_eq!(create.grpc_status(), Some(7));
    let msg = create.headers["grpc-message"].to_str().expect("ascii");
    assert!(msg.contains("CreateFleet"), "{msg}");
    let desired = web_call(
        addr,
        "/adaptivenet.v1.DeveloperService/SetDesiredState",
        &pb::SetDesiredStateRequest {
            fleet_id: fleet.clone(),
            ..Default::default()
        },
        Some(&h.admin),
        None,
        None,
    )
    .await;
    assert_eq!(desired.grpc_status(), Some(7));
    let after = h
        .dashboard()
        .list_fleets(authed(pb::ListFleetsRequest::default(), &viewer))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(after, fleets_native, "a refused write changed the fleets");

    // A response stream through the translation, ended by the deadline layer: the status
    // arrives in the body's trailer frame.
    let watch = web_call(
        addr,
        "/adaptivenet.v1.DashboardService/WatchFleet",
        &pb::WatchFleetRequest::default(),
        Some(&viewer),
        Some(ALLOWED),
        Some("300m"),
    )
    .await;
    assert_eq!(
        watch.trailers.get("grpc-status").map(|v| v.to_str().ok()),
        Some(Some("4")),
        "{:?} {:?}",
        watch.headers,
        watch.trailers
    );

    // The ops layer counted the translated calls under their methods.
    let maddr = h
        .handle
        .as_ref()
        .expect("running")
        .metrics_addr
        .expect("metrics");
    let m = http_get(maddr, "/metrics").await;
    assert_eq!(metrics_count(&m, AGGREGATES, "0"), 2, "native + web");
    assert!(metrics_count(&m, AGGREGATES, "16") >= 2, "{m}");
    // A stream is counted when its head is sent (as for native streams).
    assert_eq!(
        metrics_count(&m, "/adaptivenet.v1.DashboardService/WatchFleet", "0"),
        1
    );
    h.finish().await;
}
both_backends!(dashboard, dashboard_over_grpc_web);

/// Load shedding and quotas apply to gRPC-Web calls: with the only slot held by a native
/// upload, a gRPC-Web call is shed with RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_calls_are_shed_like_native_ones() {
    let Some(h) = Harness::start(
        Db::Sqlite,
        |c| {
            c.max_concurrent_requests = 1;
            c.grpc_web_origins = vec!["*".into()];
        },
        None,
    )
    .await
    else {
        return;
    };
    let addr = h.handle.as_ref().expect("running").addr;
    let dev = h.token(Role::Developer).await;
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
    let req = pb::GetFleetAggregatesRequest::default();
    let shed = web_call(
        addr,
        AGGREGATES,
        &req,
        Some(&h.admin),
        Some("https://any.example"),
        None,
    )
    .await;
    assert_eq!(shed.grpc_status(), Some(8), "{:?}", shed.headers);
    assert_eq!(shed.headers["access-control-allow-origin"], "*");
    drop(tx);
    let r = held.await.expect("join").expect_err("truncated upload");
    assert_eq!(r.code(), tonic::Code::InvalidArgument);
    let served = web_call(addr, AGGREGATES, &req, Some(&h.admin), None, None).await;
    assert_eq!(served.grpc_status(), Some(0));
    h.finish().await;
}

/// Without `--grpc-web-cors-origin` the listener speaks HTTP/2 only: an HTTP/1.1 gRPC-Web
/// request gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_is_off_by_default() {
    let Some(h) = Harness::start(Db::Sqlite, |_| {}, None).await else {
        return;
    };
    let addr = h.handle.as_ref().expect("running").addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::post(AGGREGATES)
        .header("host", addr.to_string())
        .header("content-type", "application/grpc-web+proto")
        .header("authorization", format!("Bearer {}", h.admin))
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .expect("req");
    let r = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answered or closed in time");
    assert!(r.is_err(), "an HTTP/1.1 request was served: {r:?}");
    h.finish().await;
}
