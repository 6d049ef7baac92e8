//! Fleet benchmark (issue #6 §3): the real cloud server in-process on 127.0.0.1:0, once on an
//! SQLite file and once on a fresh PostgreSQL database, driven by N simulated agents over real
//! gRPC; then blob download throughput and the overhead of resuming an interrupted download.
//!
//! Run from the repo root: `cargo bench --bench fleet`. Knobs (env, or `--name value` args
//! with the same name in lower case without the prefix, e.g. `--agents 200`):
//! - `FLEET_AGENTS` (1000): simulated agents, each enrolled with the shared token.
//! - `FLEET_SECS` (10): length of the steady-load phase per database.
//! - `FLEET_RATE` (2500): offered reports/s over the whole fleet (open loop: each agent
//!   reports every `AGENTS / RATE` s on its own schedule, phases spread evenly), plus one
//!   heartbeat per agent every `FLEET_HB_SECS` (5) s.
//! - `FLEET_PROBE_SECS` (3) and `FLEET_PROBE_INFLIGHT` (64): a closed-loop capacity probe after
//!   the steady phase (max reports/s with that many requests in flight).
//! - `FLEET_CHANNELS` (4): client HTTP/2 connections; agents are spread over them round-robin
//!   and their calls multiplexed (a realistic fleet would hold one connection per device, but
//!   1,000 sockets in one process measure the client more than the server).
//! - `FLEET_BLOB_MIB` (128), `FLEET_CHUNK` (requested chunk bytes; default the server's
//!   maximum, 4 MiB - 4 KiB; 0 = the server default of 1 MiB),
//!   `FLEET_DB` (`both`, `sqlite` or `pg`), `FLEET_THREADS` (tokio workers; default: cores),
//!   `FLEET_DURABLE=1` (PostgreSQL telemetry commits wait for the WAL flush, as the server's
//!   `--durable-telemetry`).
//!
//! Latency is measured per request from send to response, in the client. Reports/s is the
//! number of reports acknowledged OK during the steady phase divided by its length. After the
//! load, the bench checks that the database holds every acknowledged report (sum of
//! `report_count`) and that dashboard aggregates count every reporting device.
//!
//! `FLEET_SCENARIO=cadence` runs the 10,000-agent scenario instead: agents at their real
//! cadence against a `cloud-server serve` child process, then a reconnect storm after a
//! restart (see `fleet/cadence.rs` for its knobs and BENCH keys).
//!
//! PostgreSQL: `postgres://postgres@127.0.0.1:5432/test` is used to create and drop a uniquely
//! named database; when unreachable the reason is printed and the PG figures are null.
#[path = "fleet/cadence.rs"]
mod cadence;
#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adaptivenet_cloud::api::device::MAX_DOWNLOAD_CHUNK;
use adaptivenet_cloud::app::Config;
use adaptivenet_cloud::domain::Role;
use adaptivenet_proto::v1 as pb;
use anyhow::{bail, Context, Result};
use common::{authed, Db, Harness};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone)]
struct Opts {
    agents: usize,
    secs: f64,
    rate: f64,
    hb_secs: f64,
    probe_secs: f64,
    probe_inflight: usize,
    channels: usize,
    blob_mib: usize,
    chunk: u32,
    db: String,
    threads: usize,
    /// `steady` (the default run above) or `cadence` (see `fleet/cadence.rs`).
    scenario: String,
    report_secs: f64,
    storm_secs: f64,
    storm_connections: usize,
}

fn knob(args: &[String], name: &str, default: &str) -> String {
    let flag = format!("--{name}");
    if let Some(i) = args.iter().position(|a| *a == flag) {
        if let Some(v) = args.get(i + 1) {
            return v.clone();
        }
    }
    std::env::var(format!("FLEET_{}", name.to_uppercase().replace('-', "_")))
        .unwrap_or_else(|_| default.to_string())
}

fn num<T: std::str::FromStr>(args: &[String], name: &str, default: &str) -> Result<T> {
    let v = knob(args, name, default);
    v.parse()
        .map_err(|_| anyhow::anyhow!("{name}: cannot parse {v:?}"))
}

impl Opts {
    fn parse() -> Result<Self> {
        let args: Vec<String> = std::env::args().collect();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let scenario = knob(&args, "scenario", "steady");
        let cadence = match scenario.as_str() {
            "steady" => false,
            "cadence" => true,
            other => bail!("FLEET_SCENARIO: {other:?} is neither steady nor cadence"),
        };
        let agents: usize = num(&args, "agents", if cadence { "10000" } else { "1000" })?;
        let o = Opts {
            agents,
            secs: num(&args, "secs", if cadence { "90" } else { "10" })?,
            rate: num(&args, "rate", "2500")?,
            hb_secs: num(&args, "hb-secs", if cadence { "10" } else { "5" })?,
            report_secs: num(&args, "report-secs", "60")?,
            storm_secs: num(&args, "storm-secs", "5")?,
            storm_connections: num(&args, "storm-connections", &agents.to_string())?,
            scenario,
            probe_secs: num(&args, "probe-secs", "3")?,
            probe_inflight: num(&args, "probe-inflight", "64")?,
            channels: num(&args, "channels", "4")?,
            blob_mib: num(&args, "blob-mib", "128")?,
            chunk: num(&args, "chunk", &(MAX_DOWNLOAD_CHUNK as u32).to_string())?,
            db: knob(&args, "db", "both"),
            threads: num(&args, "threads", &cores.to_string())?,
        };
        if o.agents == 0 || o.channels == 0 || o.rate <= 0.0 || o.secs <= 0.0 {
            bail!("agents, channels, rate and secs must be positive");
        }
        if o.hb_secs <= 0.0 || o.report_secs <= 0.0 || o.storm_secs <= 0.0 {
            bail!("hb-secs, report-secs and storm-secs must be positive");
        }
        if o.storm_connections == 0 {
            bail!("storm-connections must be positive");
        }
        Ok(o)
    }
}

/// Results of one database run.
#[derive(Debug, Default, Clone)]
struct DbResult {
    enroll_s: f64,
    reports_ok: u64,
    /// Reports acknowledged OK over the whole run (steady + probe).
    acked_total: u64,
    reports_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    heartbeats_ok: u64,
    hb_p99_ms: f64,
    errors: u64,
    first_error: Option<String>,
    probe_per_s: f64,
    probe_p99_ms: f64,
    stored_reports: u64,
    aggregate_devices: u64,
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// A valid report of the closed aggregate schema.
fn report(supernet: &str, i: usize, k: u64) -> pb::ReportRequest {
    let p50 = 5.0 + (i % 17) as f64 + (k % 5) as f64 * 0.1;
    pb::ReportRequest {
        supernet_id: supernet.to_string(),
        active_subnet: ["0000", "2xx0", "0000", "2xx0"][i % 4].to_string(),
        latency_p50_ms: p50,
        latency_p95_ms: p50 * 1.4,
        latency_budget_ms: 30.0,
        quality_estimate: 0.7 + (i % 10) as f64 * 0.01,
        quality_sample_count: 500,
        search: Some(pb::SearchStats {
            generations: 20,
            evaluated_subnets: 400,
            search_seconds: 3.5,
            front_size: 6,
        }),
        latency_table: Some(pb::LatencyTableSummary {
            num_entries: 12,
            stem_ms: 0.5,
            head_ms: 0.2,
            oracle_ms: 21.0,
            calibration_factor: 1.05,
        }),
        device_class: pb::DeviceClass::CpuSmall as i32,
    }
}

fn heartbeat(supernet: &str, i: usize) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        agent_version: "0.1.0".into(),
        active_supernet_id: supernet.to_string(),
        active_subnet: ["0000", "2xx0", "0000", "2xx0"][i % 4].to_string(),
        latency_p50_ms: 7.0,
        latency_p95_ms: 9.0,
        last_adaptation_reason: 0,
        applied_generation: 1,
        ..Default::default()
    }
}

async fn connect(addr: std::net::SocketAddr, download: bool) -> Result<Channel> {
    let mut e = Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
    if download {
        // Big frames (fewer, larger DATA frames than the 16 KiB default) and a stream window
        // of one maximal chunk: enough to keep loopback busy, and it bounds what is in flight
        // (so thrown away) when a download is aborted to about one chunk.
        e = e
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size((1 << 24) - 1);
    }
    Ok(e.connect().await?)
}

fn device(ch: &Channel) -> pb::device_service_client::DeviceServiceClient<Channel> {
    pb::device_service_client::DeviceServiceClient::new(ch.clone())
}

/// Uploads a tiny real oracle and registers a supernet of it (optionally serving `big` as
/// its stem module), published as `stable` for a new fleet. Returns (fleet, supernet).
async fn setup_fleet(h: &Harness, big: Option<&[u8]>) -> Result<(String, String)> {
    let dev = h.token(Role::Developer).await;
    let weights = common::safetensors_bytes(1, 1);
    let oracle = common::upload(h, &dev, "bench-oracle", &weights)
        .await
        .context("upload oracle")?;
    let subs: Vec<Vec<u8>> = big.map(|b| vec![b.to_vec()]).unwrap_or_default();
    let supernet = common::make_supernet(h, &oracle.oracle.context("oracle")?.id, &subs).await;
    let fleet = h
        .admin_client()
        .create_fleet(authed(
            pb::CreateFleetRequest {
                name: "bench".into(),
            },
            &h.admin,
        ))
        .await?
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
        .await?;
    h.developer()
        .set_desired_state(authed(
            pb::SetDesiredStateRequest {
                fleet_id: fleet.id.clone(),
                target: Some(pb::set_desired_state_request::Target::Label(
                    "stable".into(),
                )),
                budget: None,
            },
            &dev,
        ))
        .await?;
    Ok((fleet.id, supernet))
}

/// Enrolls `n` agents over `channels` (bounded concurrency), with enrollment tokens made by
/// `admin` (one per 10,000 agents, the cap of a token's uses); returns their credentials.
async fn enroll_all(
    admin: (&Channel, &str),
    fleet: &str,
    n: usize,
    channels: &[Channel],
) -> Result<Vec<String>> {
    const USES: usize = 10_000;
    let mut toks = Vec::new();
    for first in (0..n).step_by(USES) {
        let tok = pb::admin_service_client::AdminServiceClient::new(admin.0.clone())
            .create_enrollment_token(authed(
                pb::CreateEnrollmentTokenRequest {
                    fleet_id: fleet.to_string(),
                    uses: (n - first).min(USES) as u32,
                    ttl_seconds: 0,
                },
                admin.1,
            ))
            .await?
            .into_inner()
            .token;
        toks.push(tok);
    }
    use futures::StreamExt;
    let creds: Vec<Result<String>> = futures::stream::iter(0..n)
        .map(|i| {
            let mut c = device(&channels[i % channels.len()]);
            let tok = toks[i / USES].clone();
            async move {
                let e = c
                    .enroll(pb::EnrollRequest {
                        enrollment_token: tok,
                        device_class: pb::DeviceClass::CpuSmall as i32,
                        agent_version: "0.1.0".into(),
                    })
                    .await
                    .with_context(|| format!("enroll agent {i}"))?
                    .into_inner();
                Ok(e.device_credential)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    creds.into_iter().collect()
}

#[derive(Default)]
struct AgentOut {
    /// Every report acknowledged OK (also those finishing after the phase ended).
    acked: u64,
    report_lat_us: Vec<u32>,
    hb_lat_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

/// Steady open-loop phase: each agent reports on its own schedule for `secs`.
async fn steady(
    o: &Opts,
    creds: &[String],
    channels: &[Channel],
    supernet: &str,
) -> (AgentOut, Duration) {
    let n = creds.len();
    let period = Duration::from_secs_f64(n as f64 / o.rate);
    let hb_every = ((o.hb_secs / period.as_secs_f64()).round() as u64).max(1);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(o.secs);
    let mut tasks = Vec::with_capacity(n);
    for (i, cred) in creds.iter().enumerate() {
        let mut c = device(&channels[i % channels.len()]);
        let cred = cred.clone();
        let supernet = supernet.to_string();
        let phase = period.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(async move {
            let mut out = AgentOut::default();
            let mut k = 0u64;
            loop {
                let at = start + phase + period.mul_f64(k as f64);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                if k % hb_every == hb_every / 2 {
                    let t = Instant::now();
                    match c.heartbeat(authed(heartbeat(&supernet, i), &cred)).await {
                        Ok(_) => out.hb_lat_us.push(t.elapsed().as_micros() as u32),
                        Err(e) => {
                            out.errors += 1;
                            out.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                let t = Instant::now();
                match c.report(authed(report(&supernet, i, k), &cred)).await {
                    Ok(_) => {
                        out.acked += 1;
                        if tokio::time::Instant::now() <= end {
                            out.report_lat_us.push(t.elapsed().as_micros() as u32)
                        }
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                k += 1;
            }
            out
        }));
    }
    let mut all = AgentOut::default();
    for t in tasks {
        let o = t.await.expect("agent task");
        all.report_lat_us.extend(o.report_lat_us);
        all.hb_lat_us.extend(o.hb_lat_us);
        all.errors += o.errors;
        all.acked += o.acked;
        if all.first_error.is_none() {
            all.first_error = o.first_error;
        }
    }
    (all, Duration::from_secs_f64(o.secs))
}

/// Closed-loop capacity probe: `inflight` workers report back to back for `secs`.
async fn probe(
    o: &Opts,
    creds: &[String],
    channels: &[Channel],
    supernet: &str,
) -> (f64, f64, u64, u64) {
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(o.probe_secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..o.probe_inflight {
        let mut c = device(&channels[w % channels.len()]);
        let creds: Vec<String> = creds
            .iter()
            .skip(w)
            .step_by(o.probe_inflight)
            .cloned()
            .collect();
        let supernet = supernet.to_string();
        let (acked, errors) = (acked.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = 0usize;
            while Instant::now() < end && !creds.is_empty() {
                let t = Instant::now();
                let r = report(&supernet, w, k as u64);
                match c.report(authed(r, &creds[k % creds.len()])).await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        lat.push(t.elapsed().as_micros() as u32);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                k += 1;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("probe task"));
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let acked = acked.load(Ordering::Relaxed);
    (
        acked as f64 / secs,
        percentile(&lat, 0.99),
        errors.load(Ordering::Relaxed),
        acked,
    )
}

async fn run_db(
    o: &Opts,
    db: Db,
    big: Option<&[u8]>,
) -> Result<Option<(DbResult, Option<Harness>)>> {
    let Some(h) = Harness::start(
        db,
        |c: &mut Config| {
            let d = Config::for_data_dir(".");
            c.db_max_connections = d.db_max_connections;
            c.max_concurrent_requests = d.max_concurrent_requests;
            c.workers = 0;
            c.durable_telemetry = durable();
        },
        None,
    )
    .await
    else {
        return Ok(None);
    };
    let (fleet, supernet) = setup_fleet(&h, big).await?;
    let mut channels = Vec::new();
    for _ in 0..o.channels {
        channels.push(connect(h.handle.as_ref().expect("running").addr, false).await?);
    }
    let mut r = DbResult::default();
    let t = Instant::now();
    let creds = enroll_all((&h.channel, &h.admin), &fleet, o.agents, &channels).await?;
    r.enroll_s = t.elapsed().as_secs_f64();

    let (out, dur) = steady(o, &creds, &channels, &supernet).await;
    let mut lat = out.report_lat_us;
    lat.sort_unstable();
    let mut hb = out.hb_lat_us;
    hb.sort_unstable();
    r.reports_ok = lat.len() as u64;
    r.reports_per_s = lat.len() as f64 / dur.as_secs_f64();
    r.p50_ms = percentile(&lat, 0.50);
    r.p99_ms = percentile(&lat, 0.99);
    r.max_ms = lat.last().map_or(f64::NAN, |v| *v as f64 / 1000.0);
    r.heartbeats_ok = hb.len() as u64;
    r.hb_p99_ms = percentile(&hb, 0.99);
    r.errors = out.errors;
    r.first_error = out.first_error.clone();

    let (per_s, p99, perr, packed) = probe(o, &creds, &channels, &supernet).await;
    r.acked_total = out.acked + packed;
    r.probe_per_s = per_s;
    r.probe_p99_ms = p99;
    r.errors += perr;

    // Every acknowledged report must be stored and visible to the dashboard.
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(report_count), 0) AS BIGINT) AS n FROM device_reports",
    )
    .fetch_one(h.app().store().pool())
    .await?;
    r.stored_reports = row.try_get::<i64, _>("n")? as u64;
    let agg = h
        .dashboard()
        .get_fleet_aggregates(authed(
            pb::GetFleetAggregatesRequest {
                fleet_id: fleet.clone(),
            },
            &h.admin,
        ))
        .await?
        .into_inner();
    r.aggregate_devices =
        agg.groups.iter().map(|g| g.devices as u64).sum::<u64>() + agg.suppressed_devices as u64;
    Ok(Some((r, Some(h))))
}

/// Download throughput (best of 3 full downloads) and the chunks re-sent when a download is
/// aborted halfway and resumed from the offset the client holds.
async fn downloads(o: &Opts, h: &Harness, big: &[u8]) -> Result<(f64, u64, u64)> {
    let addr = h.handle.as_ref().expect("running").addr;
    let ch = connect(addr, true).await?;
    // A device of the bench fleet (enrolled with a fresh token).
    let fleet = h
        .app()
        .store()
        .fleet_by_name("bench")
        .await
        .context("bench fleet")?;
    let tok = h.app().create_enrollment_token(fleet.id, 1, None).await?;
    let cred = device(&ch)
        .enroll(pb::EnrollRequest {
            enrollment_token: tok.token,
            device_class: pb::DeviceClass::CpuSmall as i32,
            agent_version: "0.1.0".into(),
        })
        .await?
        .into_inner()
        .device_credential;
    let sha = common::sha256_hex(big);
    let req = |offset: u64| {
        authed(
            pb::DownloadBlobRequest {
                sha256: sha.clone(),
                offset,
                chunk_size: o.chunk,
            },
            &cred,
        )
    };
    let mut best = 0f64;
    let mut chunk_len = 0u64;
    for _ in 0..3 {
        let t = Instant::now();
        let mut s = device(&ch).download_blob(req(0)).await?.into_inner();
        let mut got = Vec::with_capacity(big.len());
        while let Some(c) = s.message().await? {
            if c.offset != got.len() as u64 {
                bail!("chunk at {} but {} bytes held", c.offset, got.len());
            }
            chunk_len = chunk_len.max(c.data.len() as u64);
            got.extend_from_slice(&c.data);
            if c.last {
                break;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if hex::encode(Sha256::digest(&got)) != sha {
            bail!("downloaded blob fails its digest");
        }
        best = best.max(big.len() as f64 / (1 << 20) as f64 / secs);
    }

    // Interrupted download: read about half, drop the stream, resume from the bytes held.
    let sent = || {
        h.app()
            .metrics()
            .blob_bytes_sent_total
            .load(Ordering::Relaxed)
    };
    let before = sent();
    let mut got = Vec::with_capacity(big.len());
    {
        let mut s = device(&ch).download_blob(req(0)).await?.into_inner();
        while let Some(c) = s.message().await? {
            got.extend_from_slice(&c.data);
            if got.len() >= big.len() / 2 {
                break;
            }
        }
    }
    // Let the server notice the reset before reading its counter.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first_stream = sent() - before;
    let held = got.len() as u64;
    let mut s = device(&ch).download_blob(req(held)).await?.into_inner();
    let mut resumed_chunks = 0u64;
    while let Some(c) = s.message().await? {
        if c.offset != got.len() as u64 {
            bail!("resumed chunk at {} but {} bytes held", c.offset, got.len());
        }
        got.extend_from_slice(&c.data);
        resumed_chunks += 1;
        if c.last {
            if c.sha256 != sha {
                bail!("last chunk names digest {}", c.sha256);
            }
            break;
        }
    }
    if hex::encode(Sha256::digest(&got)) != sha {
        bail!("resumed blob fails its digest");
    }
    // Bytes the server handed to HTTP/2 for the aborted stream beyond what the client kept
    // (the server's `blob_bytes_sent_total`): what the resume has to send again.
    let wasted = first_stream.saturating_sub(held);
    let resent = wasted.div_ceil(chunk_len.max(1));
    let _ = resumed_chunks;
    Ok((best, resent, chunk_len))
}

fn fmt(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "-".into()
    }
}

fn json_num(v: Option<f64>) -> serde_json::Value {
    match v {
        Some(x) if x.is_finite() => serde_json::json!((x * 100.0).round() / 100.0),
        _ => serde_json::Value::Null,
    }
}

fn main() -> Result<()> {
    let o = Opts::parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()?;
    if o.scenario == "cadence" {
        rt.block_on(cadence::run(o))
    } else {
        rt.block_on(run(o))
    }
}

/// `FLEET_DURABLE=1`: the server's `--durable-telemetry` (PostgreSQL waits for the WAL
/// flush on every report batch).
fn durable() -> bool {
    std::env::var("FLEET_DURABLE").is_ok_and(|v| v == "1")
}

async fn run(o: Opts) -> Result<()> {
    println!(
        "telemetry commits on PostgreSQL: {}",
        if durable() {
            "synchronous (FLEET_DURABLE=1, --durable-telemetry)"
        } else {
            "asynchronous (server default; FLEET_DURABLE=1 for --durable-telemetry)"
        }
    );
    println!(
        "fleet bench: {} agents, {} s at {} reports/s offered (+1 heartbeat/agent/{} s), \
         {} HTTP/2 connections, {} tokio worker threads, probe {} in flight for {} s",
        o.agents, o.secs, o.rate, o.hb_secs, o.channels, o.threads, o.probe_inflight, o.probe_secs
    );
    let mut big = vec![0u8; o.blob_mib << 20];
    {
        use rand::{RngCore, SeedableRng};
        rand_chacha::ChaCha8Rng::seed_from_u64(42).fill_bytes(&mut big);
    }
    let mut sqlite = None;
    let mut pg = None;
    let mut dl = None;
    if o.db == "both" || o.db == "sqlite" {
        if let Some((r, h)) = run_db(&o, Db::Sqlite, Some(&big)).await? {
            let h = h.expect("harness");
            dl = Some(downloads(&o, &h, &big).await?);
            h.finish().await;
            sqlite = Some(r);
        }
    }
    if o.db == "both" || o.db == "pg" {
        match run_db(
            &o,
            Db::Postgres,
            if dl.is_none() { Some(&big) } else { None },
        )
        .await?
        {
            Some((r, h)) => {
                let h = h.expect("harness");
                if dl.is_none() {
                    dl = Some(downloads(&o, &h, &big).await?);
                }
                h.finish().await;
                pg = Some(r);
            }
            None => println!("PostgreSQL figures are null (unreachable, see above)"),
        }
    }

    println!();
    println!(
        "{:<10} {:>9} {:>10} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7} {:>10} {:>9} {:>9} {:>8}",
        "db",
        "enroll s",
        "reports/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "hb p99",
        "errors",
        "acked",
        "stored",
        "agg devs",
        "probe/s",
        "probe99"
    );
    for (name, r) in [("sqlite", &sqlite), ("postgres", &pg)] {
        match r {
            Some(r) => {
                println!(
                    "{:<10} {:>9} {:>10} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7} {:>10} {:>9} {:>9} {:>8}",
                    name,
                    fmt(r.enroll_s),
                    fmt(r.reports_per_s),
                    fmt(r.p50_ms),
                    fmt(r.p99_ms),
                    fmt(r.max_ms),
                    fmt(r.hb_p99_ms),
                    r.errors,
                    r.acked_total,
                    r.stored_reports,
                    r.aggregate_devices,
                    fmt(r.probe_per_s),
                    fmt(r.probe_p99_ms),
                );
                if let Some(e) = &r.first_error {
                    println!("  first error ({name}): {e}");
                }
            }
            None => println!("{name:<10} (not run)"),
        }
    }
    if let Some((mib_s, resent, chunk)) = dl {
        println!(
            "download: {} MiB blob at {:.0} MiB/s (best of 3, chunk {} KiB); resume after abort \
             at half: {} chunk(s) re-sent",
            o.blob_mib,
            mib_s,
            chunk >> 10,
            resent
        );
    }
    let target = |r: &Option<DbResult>| {
        r.as_ref()
            .map(|r| r.reports_per_s >= 2000.0 && r.p99_ms < 50.0)
    };
    println!(
        "targets (>= 2000 reports/s, p99 < 50 ms): sqlite {:?}, postgres {:?}",
        target(&sqlite),
        target(&pg)
    );
    let bench = serde_json::json!({
        "agents": o.agents,
        "reports_per_s_sqlite": json_num(sqlite.as_ref().map(|r| r.reports_per_s)),
        "p99_ms_sqlite": json_num(sqlite.as_ref().map(|r| r.p99_ms)),
        "p50_ms_sqlite": json_num(sqlite.as_ref().map(|r| r.p50_ms)),
        "reports_per_s_pg": json_num(pg.as_ref().map(|r| r.reports_per_s)),
        "p99_ms_pg": json_num(pg.as_ref().map(|r| r.p99_ms)),
        "p50_ms_pg": json_num(pg.as_ref().map(|r| r.p50_ms)),
        "max_reports_per_s_sqlite": json_num(sqlite.as_ref().map(|r| r.probe_per_s)),
        "max_reports_per_s_pg": json_num(pg.as_ref().map(|r| r.probe_per_s)),
        "offered_reports_per_s": o.rate,
        "errors": sqlite.as_ref().map_or(0, |r| r.errors) + pg.as_ref().map_or(0, |r| r.errors),
        "download_mib_s": json_num(dl.map(|d| d.0)),
        "resume_resent_chunks": dl.map(|d| d.1),
        "threads": o.threads,
        "client_connections": o.channels,
    });
    println!("BENCH {bench}");
    Ok(())
}
