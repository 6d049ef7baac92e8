//! Robustness over a real gRPC connection:
//! - a seeded request fuzzer: thousands of schema-generated and byte-mutated protobuf
//!   payloads sent (through a pass-through bytes codec) to every unary RPC of the cloud's
//!   services, each answer must be a client-error status or OK (never INTERNAL, UNKNOWN or a
//!   dropped connection), and the server must still be healthy afterwards;
//! - deadlines: a client's grpc-timeout on a legitimately slow call (an upload whose client
//!   stalls, a watch of a queued job) ends with DEADLINE_EXCEEDED, the abandoned work leaves
//!   nothing behind and the server keeps serving.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use adaptivenet_cloud::domain::Role;
use adaptivenet_cloud::server::SERVICE_NAMES;
use adaptivenet_proto::v1 as pb;
use bytes::{Buf, BufMut, Bytes};
use common::{
    authed, blob_files, job_dataset, job_oracle, make_supernet, safetensors_bytes, sha256_hex,
    upload, Db, Harness,
};
use futures::StreamExt;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

// ------------------------------------------------------------------ pass-through codec

/// Sends and receives message bytes as they are: the fuzzer controls every byte.
#[derive(Debug, Default, Clone, Copy)]
struct RawCodec;
#[derive(Debug)]
struct RawEncoder;
#[derive(Debug)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = buf.remaining();
        Ok(Some(buf.copy_to_bytes(n)))
    }
}

// ------------------------------------------------------------------ schema-driven payloads

/// The request schemas of the cloud's unary RPCs, from the descriptor set reflection serves.
struct Schema {
    messages: HashMap<String, DescriptorProto>,
    /// (gRPC path, fully-qualified input type).
    unary: Vec<(String, String)>,
}

impl Schema {
    fn load() -> Schema {
        let fds = prost_types::FileDescriptorSet::decode(adaptivenet_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut messages = HashMap::new();
        let mut unary = Vec::new();
        for f in &fds.file {
            let pkg = f.package();
            for m in &f.message_type {
                collect(&format!(".{pkg}"), m, &mut messages);
            }
            for s in &f.service {
                let svc = format!("{pkg}.{}", s.name());
                if !SERVICE_NAMES.contains(&svc.as_str()) {
                    continue;
                }
                for m in &s.method {
                    if !m.client_streaming() && !m.server_streaming() {
                        unary.push((format!("/{svc}/{}", m.name()), m.input_type().to_string()));
                    }
                }
            }
        }
        Schema { messages, unary }
    }
}

fn collect(scope: &str, m: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
    let name = format!("{scope}.{}", m.name());
    for n in &m.nested_type {
        collect(&name, n, out);
    }
    out.insert(name, m.clone());
}

/// Values worth trying in string fields: real ids and names of this server, and trouble.
struct Dict {
    strings: Vec<String>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, ((field as u64) << 3) | wire as u64);
}

fn varint_value(rng: &mut ChaCha8Rng) -> u64 {
    const V: [u64; 12] = [
        0,
        1,
        2,
        3,
        7,
        100,
        1000,
        1 << 31,
        u32::MAX as u64,
        i64::MAX as u64,
        u64::MAX,
        u64::MAX - 1000,
    ];
    if rng.random_bool(0.8) {
        V[rng.random_range(0..V.len())]
    } else {
        rng.random()
    }
}

fn double_value(rng: &mut ChaCha8Rng) -> f64 {
    const V: [f64; 12] = [
        0.0,
        1.0,
        0.5,
        -1.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e308,
        5.0,
        1e-9,
        0.999,
        -0.0,
    ];
    if rng.random_bool(0.8) {
        V[rng.random_range(0..V.len())]
    } else {
        rng.random_range(-1e6..1e6)
    }
}

fn string_value(rng: &mut ChaCha8Rng, dict: &Dict) -> Vec<u8> {
    match rng.random_range(0..10) {
        0..=5 => dict.strings[rng.random_range(0..dict.strings.len())]
            .clone()
            .into_bytes(),
        6 => (0..rng.random_range(0..40))
            .map(|_| rng.random_range(0x20u8..0x7f))
            .collect(),
        7 => "é✓\u{0}\u{202e}名前"
            .repeat(rng.random_range(1..4))
            .into_bytes(),
        8 => "x".repeat(rng.random_range(200..5000)).into_bytes(),
        _ => Vec::new(),
    }
}

fn bytes_value(rng: &mut ChaCha8Rng) -> Vec<u8> {
    match rng.random_range(0..5) {
        0 => common::ARCH.to_vec(),
        1 => br#"{"family":"nope"}"#.to_vec(),
        2 => Vec::new(),
        3 => (0..rng.random_range(0..4096))
            .map(|_| rng.random())
            .collect(),
        _ => b"{\"stage0_steps\":1,\"branches\":[]}".to_vec(),
    }
}

/// A random message of type `name` that follows the schema (wire types match).
fn gen_message(
    schema: &Schema,
    name: &str,
    rng: &mut ChaCha8Rng,
    dict: &Dict,
    depth: u32,
) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(d) = schema.messages.get(name) else {
        return out;
    };
    for f in &d.field {
        if rng.random_bool(0.25) {
            continue;
        }
        let n = if f.label() == Label::Repeated {
            rng.random_range(0..4)
        } else {
            1
        };
        for _ in 0..n {
            gen_field(schema, f, rng, dict, depth, &mut out);
        }
    }
    if rng.random_bool(0.05) {
        // An unknown field: must be skipped.
        put_key(&mut out, rng.random_range(100..200), 0);
        put_varint(&mut out, 42);
    }
    out
}

fn gen_field(
    schema: &Schema,
    f: &FieldDescriptorProto,
    rng: &mut ChaCha8Rng,
    dict: &Dict,
    depth: u32,
    out: &mut Vec<u8>,
) {
    let num = f.number() as u32;
    let len_delimited = |out: &mut Vec<u8>, v: Vec<u8>| {
        put_key(out, num, 2);
        put_varint(out, v.len() as u64);
        out.extend_from_slice(&v);
    };
    match f.r#type() {
        Type::Int32 | Type::Int64 | Type::Uint32 | Type::Uint64 | Type::Bool => {
            put_key(out, num, 0);
            put_varint(out, varint_value(rng));
        }
        Type::Enum => {
            put_key(out, num, 0);
            put_varint(out, rng.random_range(-2i64..12) as u64);
        }
        Type::Sint32 | Type::Sint64 => {
            put_key(out, num, 0);
            let v = varint_value(rng) as i64;
            put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
        }
        Type::Double => {
            put_key(out, num, 1);
            out.extend_from_slice(&double_value(rng).to_le_bytes());
        }
        Type::Fixed64 | Type::Sfixed64 => {
            put_key(out, num, 1);
            out.extend_from_slice(&varint_value(rng).to_le_bytes());
        }
        Type::Float => {
            put_key(out, num, 5);
            out.extend_from_slice(&(double_value(rng) as f32).to_le_bytes());
        }
        Type::Fixed32 | Type::Sfixed32 => {
            put_key(out, num, 5);
            out.extend_from_slice(&(varint_value(rng) as u32).to_le_bytes());
        }
        Type::String => len_delimited(out, string_value(rng, dict)),
        Type::Bytes => len_delimited(out, bytes_value(rng)),
        Type::Message => {
            let v = if depth < 4 {
                gen_message(schema, f.type_name(), rng, dict, depth + 1)
            } else {
                Vec::new()
            };
            len_delimited(out, v)
        }
        Type::Group => {}
    }
}

/// Byte-level damage: bit flips, overwrites, truncation, insertion, duplication.
fn mutate(mut v: Vec<u8>, rng: &mut ChaCha8Rng) -> Vec<u8> {
    for _ in 0..rng.random_range(1..5) {
        match rng.random_range(0..6) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = rng.random();
            }
            2 if !v.is_empty() => {
                let n = rng.random_range(0..v.len());
                v.truncate(n);
            }
            3 => {
                let i = rng.random_range(0..=v.len());
                let ins: Vec<u8> = (0..rng.random_range(1..12)).map(|_| rng.random()).collect();
                v.splice(i..i, ins);
            }
            4 if !v.is_empty() => {
                let a = rng.random_range(0..v.len());
                let b = rng.random_range(a..=v.len());
                let dup = v[a..b].to_vec();
                v.extend_from_slice(&dup);
            }
            _ => v.push(0xff),
        }
    }
    v
}

// ------------------------------------------------------------------ the fuzzer

/// Codes a well-behaved server may answer bad or unauthorised input with.
const CLIENT_CODES: [Code; 8] = [
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::Unauthenticated,
    Code::PermissionDenied,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_requests_get_client_errors_and_the_server_survives() {
    let cases: usize = std::env::var("ROBUSTNESS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let seed: u64 = std::env::var("ROBUSTNESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let Some(h) = Harness::start(Db::Sqlite, |_| {}, None).await else {
        return;
    };
    let schema = Schema::load();
    assert!(
        schema.unary.len() >= 25,
        "expected every unary RPC of the four services, found {:?}",
        schema.unary
    );

    // Real objects, so that generated ids reach past "not found".
    let dev = h.token(Role::Developer).await;
    let viewer = h.token(Role::Viewer).await;
    let data = safetensors_bytes(20, 0);
    let o = upload(&h, &dev, "fuzz-oracle", &data)
        .await
        .expect("upload")
        .oracle
        .expect("oracle");
    let supernet = make_supernet(&h, &o.id, &[]).await;
    let (fleet, device, cred) = h.enrolled_device("fuzz-fleet").await;
    let mut strings: Vec<String> = vec![
        o.id.clone(),
        supernet.clone(),
        fleet.clone(),
        device.clone(),
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::nil().to_string(),
        "not-a-uuid".into(),
        "stable".into(),
        "canary".into(),
        "fuzz-fleet".into(),
        "net".into(),
        "idx".into(),
        "file:///nonexistent/data".into(),
        sha256_hex(&data),
        sha256_hex(b"absent"),
        "ABCDEF".repeat(10),
        "admin".into(),
        "developer".into(),
        "0000".into(),
        "2xx1x0P0".into(),
        "{}".into(),
        cred.clone(),
    ];
    strings.push(format!("{}\n", o.id));
    let dict = Dict { strings };
    let auths: Vec<Option<String>> = vec![
        None,
        Some(format!("Bearer {}", h.admin)),
        Some(format!("Bearer {dev}")),
        Some(format!("Bearer {viewer}")),
        Some(format!("Bearer {cred}")),
        Some("Bearer anv1_api_0000".into()),
        Some("Basic Zm9vOmJhcg==".into()),
        Some("Bearer".into()),
    ];

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut requests = Vec::with_capacity(cases);
    for _ in 0..cases {
        let (path, input) = &schema.unary[rng.random_range(0..schema.unary.len())];
        let payload = match rng.random_range(0..10) {
            0 => (0..rng.random_range(0..200))
                .map(|_| rng.random())
                .collect(),
            1..=5 => gen_message(&schema, input, &mut rng, &dict, 0),
            _ => mutate(gen_message(&schema, input, &mut rng, &dict, 0), &mut rng),
        };
        let auth = auths[rng.random_range(0..auths.len())].clone();
        requests.push((path.clone(), payload, auth));
    }

    let start = Instant::now();
    let channel = h.channel.clone();
    let results: Vec<(String, Vec<u8>, Result<Bytes, Status>)> =
        futures::stream::iter(requests.into_iter().map(|(path, payload, auth)| {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            async move {
                let mut req = tonic::Request::new(Bytes::from(payload.clone()));
                if let Some(a) = &auth {
                    if let Ok(v) = a.parse() {
                        req.metadata_mut().insert("authorization", v);
                    }
                }
                let r = async {
                    grpc.ready()
                        .await
                        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
                    let p = http::uri::PathAndQuery::try_from(path.as_str()).expect("path");
                    grpc.unary(req, p, RawCodec).await.map(|r| r.into_inner())
                }
                .await;
                (path, payload, r)
            }
        }))
        .buffer_unordered(8)
        .collect()
        .await;
    let elapsed = start.elapsed();

    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_method: BTreeMap<&str, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for (path, payload, r) in &results {
        *by_method.entry(path.as_str()).or_default() += 1;
        let code = match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        *by_code.entry(format!("{code:?}")).or_default() += 1;
        let ok = CLIENT_CODES.contains(&code)
            && match r {
                Err(s) if code == Code::InvalidArgument => !s.message().is_empty(),
                _ => true,
            };
        if !ok {
            bad.push(format!(
                "{path}: {:?} (payload {})",
                r.as_ref().err(),
                hex::encode(&payload[..payload.len().min(64)])
            ));
        }
    }
    println!(
        "{} requests to {} unary RPCs in {elapsed:.2?}; answers {by_code:?}",
        results.len(),
        by_method.len()
    );
    assert!(
        bad.is_empty(),
        "{} of {} answers were not client errors, e.g.:\n{}",
        bad.len(),
        results.len(),
        bad[..bad.len().min(10)].join("\n")
    );
    assert_eq!(
        by_method.len(),
        schema.unary.len(),
        "every unary RPC was exercised"
    );
    assert!(
        by_code.len() >= 4,
        "the payloads should reach validation, auth and lookups: {by_code:?}"
    );

    // Still healthy, still serving real calls on a fresh connection.
    assert_serving(&h).await;
    h.finish().await;
}

async fn assert_serving(h: &Harness) {
    let ch = tonic::transport::Channel::from_shared(format!(
        "http://{}",
        h.handle.as_ref().expect("running").addr
    ))
    .expect("uri")
    .connect()
    .await
    .expect("reconnect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    pb::developer_service_client::DeveloperServiceClient::new(ch)
        .list_oracles(authed(pb::ListOraclesRequest::default(), &h.admin))
        .await
        .expect("list oracles after the storm");
}

// ------------------------------------------------------------------ deadlines

/// A bare HTTP/2 connection as a gRPC transport: unlike tonic's `Channel` it does not
/// enforce `grpc-timeout` on the client side (which tonic reports as CANCELLED), so the
/// test sees exactly what the server answers.
#[derive(Clone)]
struct BareH2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for BareH2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, hyper::Error>>;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

async fn bare_h2(addr: std::net::SocketAddr) -> (BareH2, http::Uri) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    (BareH2(send), format!("http://{addr}").parse().expect("uri"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_slow_calls_with_deadline_exceeded() {
    let Some(h) = Harness::start(Db::Sqlite, |_| {}, None).await else {
        return;
    };
    let addr = h.handle.as_ref().expect("running").addr;
    let dev = h.token(Role::Developer).await;
    let (bare, origin) = bare_h2(addr).await;
    let deadline = Duration::from_millis(400);

    // 1. A client-streaming upload whose client stalls after the first chunk (a slow
    //    uplink): the server gives up at the deadline and keeps nothing.
    let data = safetensors_bytes(20, 1);
    let msgs = common::upload_msgs("slow", &data, data.len() as u64, &sha256_hex(&data), 64);
    let first_two = futures::stream::iter(msgs.into_iter().take(2));
    let stalled = first_two.chain(futures::stream::pending());
    let mut req = authed(stalled, &dev);
    req.set_timeout(deadline);
    let t = Instant::now();
    let err = pb::developer_service_client::DeveloperServiceClient::with_origin(
        bare.clone(),
        origin.clone(),
    )
    .upload_oracle(req)
    .await
    .expect_err("a stalled upload cannot succeed");
    let took = t.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("deadline"), "{}", err.message());
    assert!(
        took >= deadline - Duration::from_millis(30) && took < deadline * 5,
        "answered after {took:?} for a {deadline:?} deadline"
    );
    // The abandoned upload's temp file is removed and no oracle exists.
    let t = Instant::now();
    while blob_files(&h) != (0, 0) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(blob_files(&h), (0, 0), "nothing stored, no temp file left");
    let list = h
        .developer()
        .list_oracles(authed(pb::ListOraclesRequest::default(), &dev))
        .await
        .expect("list")
        .into_inner();
    assert!(list.oracles.is_empty());

    // 2. A watch of a job that stays queued (no workers): the stream outlives the deadline
    //    and ends with DEADLINE_EXCEEDED trailers after its first event.
    let o = job_oracle(&h, &dev, "o", 1).await;
    let dataset = job_dataset(&h, &dev).await;
    let job = h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: o.id.clone(),
                dataset_id: dataset,
                ..Default::default()
            },
            &dev,
        ))
        .await
        .expect("start")
        .into_inner();
    let mut req = authed(pb::WatchJobRequest { job_id: job.id }, &dev);
    req.set_timeout(deadline);
    let t = Instant::now();
    let mut watch = pb::developer_service_client::DeveloperServiceClient::with_origin(
        bare.clone(),
        origin.clone(),
    )
    .watch_job(req)
    .await
    .expect("watch starts")
    .into_inner();
    let first = watch.message().await.expect("first event").expect("some");
    assert_eq!(first.job.expect("job").state, pb::JobState::Queued as i32);
    let err = loop {
        match watch.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watch ended without a status"),
            Err(e) => break e,
        }
    };
    let took = t.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        took >= deadline - Duration::from_millis(30) && took < deadline * 5,
        "stream ended after {took:?} for a {deadline:?} deadline"
    );

    // 3. tonic's own client: its local timer races the server's answer, so CANCELLED
    //    ("Timeout expired") is accepted too, but the call must end at the deadline.
    let mut req = authed(
        futures::stream::iter(common::upload_msgs(
            "slow2",
            &data,
            data.len() as u64,
            &sha256_hex(&data),
            64,
        ))
        .take(1)
        .chain(futures::stream::pending()),
        &dev,
    );
    req.set_timeout(deadline);
    let t = Instant::now();
    let err = h.developer().upload_oracle(req).await.expect_err("stalled");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(t.elapsed() < deadline * 5);

    // Calls without deadlines and health are unaffected, on the same connections.
    pb::developer_service_client::DeveloperServiceClient::with_origin(bare, origin)
        .list_oracles(authed(pb::ListOraclesRequest::default(), &dev))
        .await
        .expect("same bare connection still serves");
    assert_serving(&h).await;
    h.finish().await;
}

#[test]
fn grpc_timeout_header_values() {
    use adaptivenet_cloud::server::parse_grpc_timeout as p;
    assert_eq!(p("400m"), Some(Duration::from_millis(400)));
    assert_eq!(p("2S"), Some(Duration::from_secs(2)));
    assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(p("5M"), Some(Duration::from_secs(300)));
    assert_eq!(p("10u"), Some(Duration::from_micros(10)));
    assert_eq!(p("99999999n"), Some(Duration::from_nanos(99_999_999)));
    for bad in ["", "m", "123456789S", "1.5S", "-1S", "10x", "10"] {
        assert_eq!(p(bad), None, "{bad:?}");
    }
}
