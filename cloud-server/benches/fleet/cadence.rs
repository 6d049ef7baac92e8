//! `FLEET_SCENARIO=cadence` (issue #22): a fleet of `FLEET_AGENTS` (10,000) simulated agents
//! at an agent's real cadence against the real `cloud-server serve` binary, run as a child
//! process so its memory and threads are its own (`/proc/<pid>/status`), then a reconnect
//! storm after a restart. Once on an SQLite file and once on a fresh PostgreSQL database:
//!
//! 1. Setup in-process (oracle, a supernet published as `stable`, the fleet's desired state),
//!    then that server is shut down and `serve` started on the same data directory and
//!    database; every agent enrolls through it over `FLEET_CHANNELS` shared connections.
//! 2. Cadence, `FLEET_SECS` (90) long: each agent heartbeats every `FLEET_HB_SECS` (10) and
//!    reports every `FLEET_REPORT_SECS` (60), open loop; heartbeat phases are spread evenly
//!    over the interval, report phases over theirs in another order. Latency is measured in
//!    the client from send to response, with the agent's 10 s per-call deadline.
//! 3. Reconnect storm: SIGTERM (the server's graceful drain), `serve` again on the same port
//!    and database, and every agent opens a new connection (`FLEET_STORM_CONNECTIONS`,
//!    default one per agent, as a real fleet holds) at a random moment within
//!    `FLEET_STORM_SECS` (5) of the listener being back, and heartbeats. The retry policy is
//!    the agent's heartbeat loop (`edge-agent`'s main loop): a failed heartbeat is not retried
//!    at once (the agent keeps serving), the next one goes out an interval later; here at most
//!    3 attempts. A storm error is any heartbeat attempt that was not OK.
//! 4. Check: every acknowledged report is stored (sum of `report_count`, read after the
//!    server stopped).
//!
//! The simulated agents are tasks on the bench's one tokio runtime (`FLEET_THREADS` workers),
//! sharing its 2 cores with the server on the reference box: what the table shows is a lower
//! bound of what the server does alone.
//!
//! BENCH keys: `agents_10k_p99_ms_sqlite` / `_pg` (heartbeat p99 of the cadence phase),
//! `agents_10k_report_p99_ms_*`, `agents_10k_reports_per_s_*`, `agents_10k_errors`,
//! `reconnect_storm_errors` (both databases) and `reconnect_storm_errors_*` (each),
//! `reconnect_storm_lookup_queries_*` / `cadence_lookup_queries_*` (credential lookup queries
//! the server sent, from its `/metrics`), `reconnect_all_s_*` (restart listening → every
//! agent's heartbeat OK), `server_rss_mb_10k` (the server's largest sampled RSS during the
//! cadence phase, the larger of both databases), `server_rss_mb_storm`, `server_threads`.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adaptivenet_cloud::app::Config;
use adaptivenet_cloud::App;
use anyhow::{bail, Context, Result};
use tonic::transport::{Channel, Endpoint};

use super::common::{authed, Db, Harness};
use super::{
    connect, device, durable, enroll_all, fmt, heartbeat, json_num, percentile, report,
    setup_fleet, Opts,
};

/// Per-call deadline of the agent's cloud client (`edge-agent --cloud-timeout-ms` default),
/// also its connect timeout.
const AGENT_DEADLINE: Duration = Duration::from_secs(10);
/// Heartbeat attempts per agent in the storm: the first and two more, an interval apart.
const STORM_ATTEMPTS: u32 = 3;

/// A `cloud-server serve` child on a fixed loopback port, killed if the bench fails.
struct Server {
    child: Option<Child>,
    port: u16,
    /// `--metrics-listen` port (credential lookup queries are read from `/metrics`).
    metrics_port: u16,
    dir: PathBuf,
    url: String,
    log: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Server {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut c = Command::new(env!("CARGO_BIN_EXE_cloud-server"));
        c.arg("--data-dir")
            .arg(&self.dir)
            .args(["--database-url", &self.url, "serve"])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(["--workers", "0", "--gc-interval-secs", "0"]);
        if durable() {
            c.arg("--durable-telemetry");
        }
        let child = c
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn cloud-server serve")?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the port accepts connections; returns how long that took.
    async fn wait_listening(&mut self) -> Result<Duration> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "cloud-server exited ({st}):\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("cloud-server did not listen within 60 s")
    }

    /// The server's `adaptivenet_credential_lookup_queries_total` since it started (None:
    /// unreadable, e.g. a server from before the counter existed).
    async fn lookup_queries(&self) -> Option<u64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: bench\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix("adaptivenet_credential_lookup_queries_total "))
            .and_then(|v| v.trim().parse().ok())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM (graceful drain) and waits for the exit; returns how long it took.
    async fn stop(&mut self) -> Result<Duration> {
        let Some(mut c) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let t = Instant::now();
        let st = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        if !st.success() {
            bail!("kill -TERM {} failed", c.id());
        }
        while t.elapsed() < Duration::from_secs(60) {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    bail!("cloud-server exited with {st} after SIGTERM");
                }
                return Ok(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("cloud-server did not stop within 60 s of SIGTERM")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A numeric field of `/proc/<pid>/status` (`VmRSS` in kB, `Threads`), 0 if unreadable.
fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples a process's RSS every 250 ms until stopped; returns the largest sample (bytes).
struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut max = 0;
            while !s.load(Ordering::Relaxed) {
                max = max.max(proc_status(pid, "VmRSS") * 1024);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            max.max(proc_status(pid, "VmRSS") * 1024)
        });
        RssSampler { stop, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or(0)
    }
}

#[derive(Default)]
struct Calls {
    hb_us: Vec<u32>,
    report_us: Vec<u32>,
    /// How late the client sent calls after their scheduled moment (its own lag).
    lag_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

impl Calls {
    fn merge(&mut self, o: Calls) {
        self.hb_us.extend(o.hb_us);
        self.report_us.extend(o.report_us);
        self.lag_us.extend(o.lag_us);
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn fail(&mut self, e: tonic::Status) {
        self.errors += 1;
        self.first_error
            .get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
    }
}

fn with_deadline<T>(msg: T, cred: &str) -> tonic::Request<T> {
    let mut r = authed(msg, cred);
    r.set_timeout(AGENT_DEADLINE);
    r
}

/// The cadence phase: every agent heartbeats and reports on its own schedule for `secs`.
async fn cadence(o: &Opts, creds: &[String], channels: &[Channel], supernet: &str) -> Calls {
    let n = creds.len();
    let hb = Duration::from_secs_f64(o.hb_secs);
    let rp = Duration::from_secs_f64(o.report_secs);
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(o.secs);
    let mut tasks = Vec::with_capacity(n);
    for (i, cred) in creds.iter().enumerate() {
        let mut c = device(&channels[i % channels.len()]);
        let (cred, supernet) = (cred.clone(), supernet.to_string());
        let hb_phase = hb.mul_f64(i as f64 / n as f64);
        // Another order than the heartbeats' (7919 is prime, so this permutes 0..n unless n
        // is a multiple of it).
        let rp_phase = rp.mul_f64(((i * 7919) % n) as f64 / n as f64);
        tasks.push(tokio::spawn(async move {
            let mut out = Calls::default();
            let (mut next_hb, mut next_rp) = (start + hb_phase, start + rp_phase);
            let mut k = 0u64;
            loop {
                let is_hb = next_hb <= next_rp;
                let at = if is_hb { next_hb } else { next_rp };
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                out.lag_us.push(at.elapsed().as_micros() as u32);
                let t = Instant::now();
                if is_hb {
                    next_hb += hb;
                    match c
                        .heartbeat(with_deadline(heartbeat(&supernet, i), &cred))
                        .await
                    {
                        Ok(_) => out.hb_us.push(t.elapsed().as_micros() as u32),
                        Err(e) => out.fail(e),
                    }
                } else {
                    next_rp += rp;
                    k += 1;
                    match c
                        .report(with_deadline(report(&supernet, i, k), &cred))
                        .await
                    {
                        Ok(_) => out.report_us.push(t.elapsed().as_micros() as u32),
                        Err(e) => out.fail(e),
                    }
                }
            }
            out
        }));
    }
    let mut all = Calls::default();
    for t in tasks {
        all.merge(t.await.expect("agent task"));
    }
    all
}

#[derive(Default)]
struct Storm {
    errors: u64,
    first_error: Option<String>,
    /// Agents whose every attempt failed.
    never_back: u64,
    hb_us: Vec<u32>,
    /// From the listener being back to the last agent's first OK heartbeat.
    all_back: Duration,
}

/// Every agent opens a new connection at a random moment within `storm_secs` and heartbeats,
/// retrying as the agent does (next interval, at most [`STORM_ATTEMPTS`]).
async fn storm(o: &Opts, creds: &[String], port: u16, supernet: &str) -> Result<Storm> {
    use rand::{Rng, SeedableRng};
    let n = creds.len();
    let url = format!("http://127.0.0.1:{port}");
    let channels: Vec<Channel> = (0..o.storm_connections.min(n))
        .map(|_| {
            Ok(Endpoint::from_shared(url.clone())?
                .connect_timeout(AGENT_DEADLINE)
                .tcp_nodelay(true)
                .connect_lazy())
        })
        .collect::<Result<_>>()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(22);
    let t0 = tokio::time::Instant::now();
    let hb = Duration::from_secs_f64(o.hb_secs);
    let mut tasks = Vec::with_capacity(n);
    for (i, cred) in creds.iter().enumerate() {
        let mut c = device(&channels[i % channels.len()]);
        let (cred, supernet) = (cred.clone(), supernet.to_string());
        let at = t0 + Duration::from_secs_f64(o.storm_secs * rng.random::<f64>());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let mut errors = 0u64;
            let mut first_error = None;
            for _ in 0..STORM_ATTEMPTS {
                let t = Instant::now();
                match c
                    .heartbeat(with_deadline(heartbeat(&supernet, i), &cred))
                    .await
                {
                    Ok(_) => {
                        let lat = t.elapsed().as_micros() as u32;
                        return (errors, first_error, Some((lat, t0.elapsed())));
                    }
                    Err(e) => {
                        errors += 1;
                        first_error
                            .get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
                        tokio::time::sleep(hb).await;
                    }
                }
            }
            (errors, first_error, None)
        }));
    }
    let mut s = Storm::default();
    for t in tasks {
        let (errors, first, ok) = t.await.expect("storm task");
        s.errors += errors;
        if s.first_error.is_none() {
            s.first_error = first;
        }
        match ok {
            Some((lat, back)) => {
                s.hb_us.push(lat);
                s.all_back = s.all_back.max(back);
            }
            None => s.never_back += 1,
        }
    }
    drop(channels);
    Ok(s)
}

/// One database's figures.
#[derive(Default)]
struct DbRun {
    enroll_s: f64,
    reports_per_s: f64,
    heartbeats_per_s: f64,
    hb_p50_ms: f64,
    hb_p99_ms: f64,
    hb_max_ms: f64,
    report_p99_ms: f64,
    lag_p99_ms: f64,
    errors: u64,
    first_error: Option<String>,
    rss_mb: f64,
    threads: u64,
    stop_s: f64,
    restart_s: f64,
    storm: Storm,
    storm_rss_mb: f64,
    /// Credential lookup queries the server sent in the cadence phase (from its start) and
    /// in the storm (from its restart).
    cadence_lookup_queries: Option<u64>,
    storm_lookup_queries: Option<u64>,
    acked_reports: u64,
    stored_reports: u64,
}

async fn run_db(o: &Opts, db: Db) -> Result<Option<DbRun>> {
    let Some(mut h) = Harness::start(db, |c: &mut Config| c.workers = 0, None).await else {
        return Ok(None);
    };
    let (fleet, supernet) = setup_fleet(&h, None).await?;
    let url = h.app().config().database_url.clone();
    h.handle
        .take()
        .context("in-process server")?
        .shutdown()
        .await?;
    let mut server = Server {
        child: None,
        port: free_port()?,
        metrics_port: free_port()?,
        dir: h.dir.path().to_path_buf(),
        url: url.clone(),
        log: h.dir.path().join("serve.log"),
    };
    server.spawn()?;
    server.wait_listening().await?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse()?;
    let mut channels = Vec::new();
    for _ in 0..o.channels {
        channels.push(connect(addr, false).await?);
    }
    let mut r = DbRun::default();
    let t = Instant::now();
    let creds = enroll_all((&channels[0], &h.admin), &fleet, o.agents, &channels).await?;
    r.enroll_s = t.elapsed().as_secs_f64();

    let sampler = RssSampler::start(server.pid());
    let calls = cadence(o, &creds, &channels, &supernet).await;
    r.threads = proc_status(server.pid(), "Threads");
    r.cadence_lookup_queries = server.lookup_queries().await;
    r.rss_mb = sampler.finish().await as f64 / (1 << 20) as f64;
    let (mut hb, mut rep, mut lag) = (calls.hb_us, calls.report_us, calls.lag_us);
    hb.sort_unstable();
    rep.sort_unstable();
    lag.sort_unstable();
    r.acked_reports = rep.len() as u64;
    r.reports_per_s = rep.len() as f64 / o.secs;
    r.heartbeats_per_s = hb.len() as f64 / o.secs;
    r.hb_p50_ms = percentile(&hb, 0.50);
    r.hb_p99_ms = percentile(&hb, 0.99);
    r.hb_max_ms = hb.last().map_or(f64::NAN, |v| *v as f64 / 1000.0);
    r.report_p99_ms = percentile(&rep, 0.99);
    r.lag_p99_ms = percentile(&lag, 0.99);
    r.errors = calls.errors;
    r.first_error = calls.first_error;

    // Reconnect storm: the old connections die with the server.
    drop(channels);
    r.stop_s = server.stop().await?.as_secs_f64();
    server.spawn()?;
    r.restart_s = server.wait_listening().await?.as_secs_f64();
    let sampler = RssSampler::start(server.pid());
    r.storm = storm(o, &creds, server.port, &supernet).await?;
    r.storm_rss_mb = sampler.finish().await as f64 / (1 << 20) as f64;
    r.storm_lookup_queries = server.lookup_queries().await;
    server.stop().await?;

    // Every acknowledged report is stored (read with the server stopped).
    let mut cfg = Config::for_data_dir(h.dir.path());
    cfg.database_url = url;
    cfg.workers = 0;
    let app = App::open(cfg).await?;
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(report_count), 0) AS BIGINT) AS n FROM device_reports",
    )
    .fetch_one(app.store().pool())
    .await?;
    r.stored_reports = row.try_get::<i64, _>("n")? as u64;
    drop(app);
    h.finish().await;
    Ok(Some(r))
}

pub async fn run(o: Opts) -> Result<()> {
    println!(
        "fleet cadence: {} agents, heartbeat every {} s, report every {} s, {} s per database; \
         {} shared HTTP/2 connections; reconnect storm within {} s over {} new connections; \
         bench: 1 tokio runtime with {} worker threads; server: `cloud-server serve` child \
         (its default runtime: one worker per core, {} cores)",
        o.agents,
        o.hb_secs,
        o.report_secs,
        o.secs,
        o.channels,
        o.storm_secs,
        o.storm_connections.min(o.agents),
        o.threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut sqlite = None;
    let mut pg = None;
    if o.db == "both" || o.db == "sqlite" {
        sqlite = run_db(&o, Db::Sqlite).await?;
    }
    if o.db == "both" || o.db == "pg" {
        pg = run_db(&o, Db::Postgres).await?;
        if pg.is_none() {
            println!("PostgreSQL figures are null (unreachable, see above)");
        }
    }
    println!();
    println!(
        "{:<9} {:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>8}",
        "db", "enroll", "reports/s", "rep p99", "hb/s", "hb p50", "hb p99", "hb max", "lag p99",
        "errors", "RSS MB", "threads", "stop s", "start s", "storm", "back s", "st p99", "st RSS", "stored"
    );
    for (name, r) in [("sqlite", &sqlite), ("postgres", &pg)] {
        let Some(r) = r else {
            println!("{name:<9} (not run)");
            continue;
        };
        println!(
            "{:<9} {:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>8}",
            name,
            fmt(r.enroll_s),
            fmt(r.reports_per_s),
            fmt(r.report_p99_ms),
            fmt(r.heartbeats_per_s),
            fmt(r.hb_p50_ms),
            fmt(r.hb_p99_ms),
            fmt(r.hb_max_ms),
            fmt(r.lag_p99_ms),
            r.errors,
            fmt(r.rss_mb),
            r.threads,
            format!("{:.2}", r.stop_s),
            format!("{:.2}", r.restart_s),
            r.storm.errors,
            fmt(r.storm.all_back.as_secs_f64()),
            fmt({
                let mut v = r.storm.hb_us.clone();
                v.sort_unstable();
                percentile(&v, 0.99)
            }),
            fmt(r.storm_rss_mb),
            format!("{}/{}", r.stored_reports, r.acked_reports),
        );
        if let Some(e) = &r.first_error {
            println!("  first cadence error ({name}): {e}");
        }
        if let Some(e) = &r.storm.first_error {
            println!(
                "  first storm error ({name}): {e}; agents never back after {STORM_ATTEMPTS} attempts: {}",
                r.storm.never_back
            );
        }
        let q = |v: Option<u64>| v.map_or("n/a".to_string(), |v| v.to_string());
        println!(
            "  credential lookup queries ({name}): cadence {}, storm {} (for {} agents)",
            q(r.cadence_lookup_queries),
            q(r.storm_lookup_queries),
            o.agents
        );
        if r.stored_reports < r.acked_reports {
            println!(
                "  LOST REPORTS ({name}): {} acknowledged, {} stored",
                r.acked_reports, r.stored_reports
            );
        }
    }
    println!(
        "columns: rep/hb = report/heartbeat latency in the client (ms); lag = how late the \
         client sent calls after their schedule; RSS/threads = the server process (largest \
         sample / at the end of the cadence phase); stop = SIGTERM to exit (graceful drain); \
         start = spawn to listening; storm = heartbeat attempts not OK in the reconnect storm; \
         back = listening to every agent's heartbeat OK; st p99/st RSS = storm heartbeat p99 \
         and the server's largest RSS during it; stored = reports stored/acknowledged"
    );
    let target = |r: &Option<DbRun>| {
        r.as_ref()
            .map(|r| r.errors == 0 && r.storm.errors == 0 && r.hb_p99_ms < 100.0)
    };
    println!(
        "targets (no errors, heartbeat p99 < 100 ms): sqlite {:?}, postgres {:?}",
        target(&sqlite),
        target(&pg)
    );
    let f = |r: &Option<DbRun>, g: fn(&DbRun) -> f64| json_num(r.as_ref().map(g));
    let storm_p99 = |r: &DbRun| {
        let mut v = r.storm.hb_us.clone();
        v.sort_unstable();
        percentile(&v, 0.99)
    };
    let runs = [&sqlite, &pg];
    let sum = |g: fn(&DbRun) -> u64| runs.iter().filter_map(|r| r.as_ref()).map(g).sum::<u64>();
    let max = |g: fn(&DbRun) -> f64| {
        runs.iter()
            .filter_map(|r| r.as_ref())
            .map(g)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    };
    let bench = serde_json::json!({
        "scenario": "cadence",
        "agents": o.agents,
        "agents_10k_p99_ms_sqlite": f(&sqlite, |r| r.hb_p99_ms),
        "agents_10k_p99_ms_pg": f(&pg, |r| r.hb_p99_ms),
        "agents_10k_report_p99_ms_sqlite": f(&sqlite, |r| r.report_p99_ms),
        "agents_10k_report_p99_ms_pg": f(&pg, |r| r.report_p99_ms),
        "agents_10k_reports_per_s_sqlite": f(&sqlite, |r| r.reports_per_s),
        "agents_10k_reports_per_s_pg": f(&pg, |r| r.reports_per_s),
        "agents_10k_errors": sum(|r| r.errors),
        "reconnect_storm_errors": sum(|r| r.storm.errors),
        "reconnect_storm_errors_sqlite": sqlite.as_ref().map(|r| r.storm.errors),
        "reconnect_storm_errors_pg": pg.as_ref().map(|r| r.storm.errors),
        "reconnect_storm_lookup_queries_sqlite": sqlite.as_ref().and_then(|r| r.storm_lookup_queries),
        "reconnect_storm_lookup_queries_pg": pg.as_ref().and_then(|r| r.storm_lookup_queries),
        "cadence_lookup_queries_sqlite": sqlite.as_ref().and_then(|r| r.cadence_lookup_queries),
        "cadence_lookup_queries_pg": pg.as_ref().and_then(|r| r.cadence_lookup_queries),
        "reconnect_all_s_sqlite": f(&sqlite, |r| r.storm.all_back.as_secs_f64()),
        "reconnect_all_s_pg": f(&pg, |r| r.storm.all_back.as_secs_f64()),
        "reconnect_hb_p99_ms_sqlite": f(&sqlite, storm_p99),
        "reconnect_hb_p99_ms_pg": f(&pg, storm_p99),
        "server_rss_mb_10k": json_num(max(|r| r.rss_mb)),
        "server_rss_mb_storm": json_num(max(|r| r.storm_rss_mb)),
        "server_threads": max(|r| r.threads as f64),
        "lost_reports": sum(|r| r.acked_reports.saturating_sub(r.stored_reports)),
        "client_threads": o.threads,
        "client_connections": o.channels,
        "storm_connections": o.storm_connections.min(o.agents),
    });
    println!("BENCH {bench}");
    Ok(())
}
