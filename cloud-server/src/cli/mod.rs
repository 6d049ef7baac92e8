//! Command-line interface (binary only; uses anyhow).
mod client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use adaptivenet_cloud::domain::{parse_id, Role};
use adaptivenet_cloud::elastify::runner::ElastifyRunner;
use adaptivenet_cloud::jobs::{worker_id_prefix, Worker};
use adaptivenet_cloud::server::{self, TlsFiles};
use adaptivenet_cloud::{App, Config};
use adaptivenet_kernels::threads;
use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "cloud-server", version, about = "adaptivenet cloud server")]
pub struct Args {
    /// Data directory (SQLite file and blobs unless overridden).
    #[arg(
        long,
        env = "ADAPTIVENET_DATA_DIR",
        default_value = "./adaptivenet-data",
        global = true
    )]
    data_dir: PathBuf,
    /// Database URL (`sqlite://...` or `postgres://...`); default: SQLite in the data dir.
    #[arg(long, env = "ADAPTIVENET_DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Blob storage on an object store instead of `<data dir>/blobs`: `s3://bucket/prefix`
    /// (build with `--features s3`; credentials, region and endpoint from the standard
    /// `AWS_*` variables, e.g. `AWS_ENDPOINT=http://minio:9000 AWS_ALLOW_HTTP=true`) or
    /// `file:///dir`. Serve, worker and token commands must all use the same URL.
    #[arg(long, env = "ADAPTIVENET_BLOB_URL", global = true)]
    blob_url: Option<String>,
    /// Kernel threads for training and evaluation (oracle training, elastification jobs,
    /// priors). Default: every hardware thread, because the cloud trains at batch 128 where
    /// 2 threads beat 1 (elastification on 2 vCPUs: 1.3-1.4x the samples/s); the kernels'
    /// own default of 1 thread on <= 2-core machines is tuned for batch-1 latency on edge
    /// devices. Give fewer to leave cores to a co-located `serve`.
    #[arg(long, env = "ADAPTIVENET_THREADS", global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the gRPC API (and run in-process job workers).
    Serve {
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Prometheus metrics endpoint (`GET /metrics`).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Serve the read-only operator console (a web UI; sign in with a viewer token or
        /// better) on this address, e.g. 127.0.0.1:8080. Off unless given.
        #[arg(long)]
        web_listen: Option<SocketAddr>,
        /// In-process job workers (0: only separate `worker` processes run jobs).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        #[arg(long, default_value_t = 512)]
        max_concurrent_requests: usize,
        /// Largest accepted oracle, MiB.
        #[arg(long, default_value_t = 512)]
        max_oracle_mib: u64,
        /// Largest accepted dataset upload, MiB.
        #[arg(long, default_value_t = 2048)]
        max_dataset_mb: u64,
        /// The only directory under which datasets may be registered by `file://` URI
        /// (without it, such registrations are refused; uploads always work).
        #[arg(long, env = "ADAPTIVENET_DATASET_ROOT")]
        dataset_root: Option<PathBuf>,
        /// An `s3://bucket/prefix` at or under which datasets may be registered (repeatable;
        /// without one, `s3://` registrations are refused). Needs the `s3` feature.
        #[arg(
            long = "dataset-s3-prefix",
            env = "ADAPTIVENET_DATASET_S3_PREFIXES",
            value_delimiter = ','
        )]
        dataset_s3_prefixes: Vec<String>,
        /// Reports carrying a quality estimate from fewer local samples are rejected.
        #[arg(long, default_value_t = 100)]
        min_report_samples: u64,
        /// Lifetime of a device credential, seconds (0: never expires). Agents rotate theirs
        /// (`RotateCredential`) before it ends.
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        device_credential_ttl_secs: u64,
        /// Seconds a rotated-out device credential keeps working.
        #[arg(long, default_value_t = 900)]
        credential_grace_secs: u64,
        /// Seconds this process reuses a credential lookup (0: no cache, every call reads the
        /// database). The trade-off is revocation: revoking a device or token, or rotating a
        /// credential, through this process applies at once, but through another replica or
        /// `token revoke-api` it applies here only within this many seconds. Keep it above
        /// the agents' heartbeat interval (30 s), or every heartbeat reads the database; an
        /// entry in use is refreshed in the background before it ends.
        #[arg(long, default_value_t = 60)]
        auth_cache_ttl_secs: u64,
        /// Dashboard privacy floor k: aggregate groups of fewer devices are suppressed,
        /// min/p90/max dropped below 2k, viewers' aggregates move in steps of k reports.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        min_group_devices: u32,
        /// Milliseconds between two judgements of a running rollout; a replica's rollout
        /// lease lasts three of them, so after a crash another one continues within that.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..))]
        rollout_tick_ms: u64,
        /// PostgreSQL: make reports and heartbeats wait for the WAL flush. By default they
        /// commit asynchronously (a database crash may lose the last fraction of a second of
        /// telemetry, as SQLite's WAL mode does on power loss); everything else is always
        /// synchronous.
        #[arg(long)]
        durable_telemetry: bool,
        /// Seconds a worker's job lease lasts without a heartbeat before another worker may
        /// take the job over (resuming from its checkpoint).
        #[arg(long, default_value_t = 30)]
        job_lease_secs: u64,
        /// Server certificate chain (PEM): serve gRPC over TLS (build with `--features tls`).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Mutual TLS: CA certificate (PEM) that signs client certificates. Every client
        /// (devices, the CLI, probes over gRPC) must then present one; without it the
        /// handshake fails.
        #[arg(long, requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// A browser origin (`https://dash.example.com`, or `*`) allowed to call the dashboard
        /// and read-only developer methods through gRPC-Web (repeatable). Without one,
        /// gRPC-Web is off and the listener speaks HTTP/2 only.
        #[arg(
            long = "grpc-web-cors-origin",
            env = "ADAPTIVENET_GRPC_WEB_CORS_ORIGINS",
            value_delimiter = ','
        )]
        grpc_web_cors_origins: Vec<String>,
        /// Quotas, timeouts and HTTP/2 limits against hostile or broken clients.
        #[command(flatten)]
        net: adaptivenet_cloud::ops::net::NetLimits,
        /// Seconds between blob garbage collections (0: never; see `gc`).
        #[arg(long, default_value_t = 3600)]
        gc_interval_secs: u64,
        /// Unreferenced blobs younger than this many seconds are kept (see `gc`).
        #[arg(long, default_value_t = 86400)]
        gc_grace_secs: u64,
    },
    /// Run job workers only (same database and blob store as the server).
    Worker {
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Seconds a job lease lasts without a heartbeat (as `serve --job-lease-secs`).
        #[arg(long, default_value_t = 30)]
        job_lease_secs: u64,
        /// Prometheus endpoint (`GET /metrics`, `/healthz`): this worker's job run durations
        /// and database errors.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Delete blobs no row references any more (superseded and settled jobs' checkpoints,
    /// module blobs of runs that never registered) once older than the grace period.
    Gc {
        /// Keep unreferenced blobs younger than this: it must exceed the longest time a job
        /// or upload holds a blob before its row references it.
        #[arg(long, default_value_t = 86400)]
        grace_secs: u64,
    },
    /// Manage credentials directly in the database (bootstrap, break-glass).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Manage fleets directly in the database.
    Fleet {
        #[command(subcommand)]
        cmd: FleetCmd,
    },
    /// A gRPC client for developers and operators.
    Client(client::ClientArgs),
    /// Oracle tools that need no server.
    Oracle {
        #[command(subcommand)]
        cmd: OracleCmd,
    },
    /// Train an oracle from scratch (small-input ResNet on Fashion-MNIST), locally.
    TrainOracle(adaptivenet_cloud::elastify::TrainOracleArgs),
    /// Elastify an oracle into a supernet artifact directory, locally (resumable: re-run the
    /// same command after an interruption).
    Elastify(adaptivenet_cloud::elastify::ElastifyArgs),
}

#[derive(Subcommand, Debug)]
enum OracleCmd {
    /// Load an oracle and compare its outputs with reference logits (e.g. PyTorch's): prints
    /// the max absolute difference and exits non-zero above --tol.
    Verify {
        /// Architecture descriptor JSON (or an index of descriptors with --entry).
        #[arg(long)]
        arch: PathBuf,
        /// Entry of an index file such as the parity fixtures' index.json.
        #[arg(long)]
        entry: Option<String>,
        /// Weights: safetensors, PyTorch .pth (zip or legacy).
        #[arg(long)]
        weights: PathBuf,
        /// safetensors with `input` (NCHW) and `logits`.
        #[arg(long)]
        io: PathBuf,
        #[arg(long, default_value_t = 1e-4)]
        tol: f32,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create an API token (admin, developer, viewer); prints it once.
    CreateApi {
        #[arg(long)]
        role: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// Limit the token to one fleet (by id or name): developer and viewer tokens only.
        #[arg(long)]
        fleet: Option<String>,
    },
    /// Create an enrollment token for a fleet (by id or name).
    CreateEnrollment {
        #[arg(long)]
        fleet: String,
        /// Enrolments allowed (at most 10000).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Lifetime in seconds (default 24 h, at most 30 days).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// List API tokens (never the secrets).
    List,
    /// Revoke an API token by id.
    RevokeApi { id: String },
    /// Revoke an enrollment token by id.
    RevokeEnrollment { id: String },
}

#[derive(Subcommand, Debug)]
enum FleetCmd {
    Create { name: String },
}

/// A token cancelled by Ctrl-C: long local jobs stop at the next step with a checkpoint.
/// What a PEM file given on the command line must hold.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pem {
    Certificate,
    PrivateKey,
}

/// Reads a PEM file named by `flag`: a missing, unreadable or non-PEM file is an error that
/// names the flag and the path here, not a bare rustls message at the first handshake.
pub(crate) fn read_pem(flag: &str, path: &std::path::Path, kind: Pem) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let ok = match kind {
        Pem::Certificate => text.contains("-----BEGIN CERTIFICATE-----"),
        Pem::PrivateKey => text
            .lines()
            .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with("PRIVATE KEY-----")),
    };
    if !ok {
        let want = match kind {
            Pem::Certificate => "a PEM certificate (-----BEGIN CERTIFICATE-----)",
            Pem::PrivateKey => "a PEM private key (-----BEGIN ... PRIVATE KEY-----)",
        };
        anyhow::bail!("{flag} {}: not {want}", path.display());
    }
    Ok(bytes)
}

fn cancel_on_ctrl_c() -> CancellationToken {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping at the next step (a checkpoint is kept)");
            c.cancel();
        }
    });
    cancel
}

/// A run stopped by Ctrl-C is not a failure: say where it stopped and exit with 130 (the
/// shell's code for SIGINT) instead of an error report with a backtrace.
fn exit_if_cancelled<T>(r: adaptivenet_cloud::Result<T>) -> anyhow::Result<T> {
    match r {
        Err(adaptivenet_cloud::CloudError::Cancelled(msg)) => {
            eprintln!("{msg}; run the same command again to resume");
            std::process::exit(130)
        }
        other => Ok(other?),
    }
}

fn oracle_cmd(cmd: OracleCmd) -> anyhow::Result<()> {
    match cmd {
        OracleCmd::Verify {
            arch,
            entry,
            weights,
            io,
            tol,
        } => {
            use adaptivenet_core::model::verify::{read_descriptor, verify_io};
            let desc = read_descriptor(&arch, entry.as_deref())?;
            let tensors = adaptivenet_core::weights::read_tensors(&weights)?;
            let model = adaptivenet_core::model::Model::load(&desc, tensors)?;
            let r = verify_io(&model, &io)?;
            println!(
                "{}: {} parameters, logits {:?}: max |diff| = {:.3e}, mean |diff| = {:.3e}, top-1 agreement {:.1}%",
                desc.spec.family,
                model.num_params(),
                r.logits_shape,
                r.max_abs_diff,
                r.mean_abs_diff,
                100.0 * r.top1_agreement
            );
            if r.max_abs_diff > tol {
                anyhow::bail!("max |diff| {:.3e} exceeds --tol {tol:.1e}", r.max_abs_diff);
            }
            println!("OK (tolerance {tol:.1e})");
            Ok(())
        }
    }
}

fn config(args: &Args) -> Config {
    let mut c = Config::for_data_dir(&args.data_dir);
    if let Some(u) = &args.database_url {
        c.database_url = u.clone();
    }
    c.blob_url = args.blob_url.clone();
    c
}

/// Applies `--threads` to the kernels' cap and to candle's own pool (see
/// [`threads::size_candle_pool`]). Runs before the async runtime and any tensor exists.
pub fn apply_threads(args: &Args) -> anyhow::Result<()> {
    let n = match args.threads {
        Some(0) => anyhow::bail!("--threads: 0 is not a thread count (give 1 or more)"),
        Some(n) => n,
        None => threads::available(),
    };
    threads::set_max_threads(n);
    threads::size_candle_pool(n);
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let args = match args.cmd {
        Cmd::Client(c) => return client::run(c).await,
        Cmd::Oracle { cmd } => return oracle_cmd(cmd),
        Cmd::TrainOracle(a) => {
            let cancel = cancel_on_ctrl_c();
            let report = exit_if_cancelled(
                tokio::task::spawn_blocking(move || {
                    adaptivenet_cloud::elastify::run_train_oracle(&a, &cancel)
                })
                .await?,
            )?;
            println!(
                "{}",
                adaptivenet_cloud::elastify::cli::oracle_summary(&report)
            );
            return Ok(());
        }
        Cmd::Elastify(a) => {
            let cancel = cancel_on_ctrl_c();
            let (manifest, report) = exit_if_cancelled(
                tokio::task::spawn_blocking(move || {
                    adaptivenet_cloud::elastify::run_elastify(&a, &cancel)
                })
                .await?,
            )?;
            println!(
                "supernet {} written: {} subnets, {} priors",
                manifest.supernet_id,
                manifest.subnet_count,
                manifest.priors.len()
            );
            for (i, st) in report.stages.iter().enumerate() {
                let k = (st.losses.len() / 10).clamp(1, 50);
                println!(
                    "  stage {i}: {} steps ({} this run), loss {:.4} -> {:.4} (mean of first/last {k}), {:.0} samples/s ({} threads), {:.1} s",
                    st.steps,
                    st.steps_run,
                    st.head_mean(k),
                    st.tail_mean(k),
                    st.samples_per_sec,
                    threads::current(),
                    st.time.as_secs_f64()
                );
            }
            return Ok(());
        }
        _ => args,
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let mut cfg = config(&args);
    match args.cmd {
        Cmd::Serve {
            listen,
            metrics_listen,
            web_listen,
            workers,
            max_concurrent_requests,
            max_oracle_mib,
            max_dataset_mb,
            dataset_root,
            dataset_s3_prefixes,
            min_report_samples,
            device_credential_ttl_secs,
            credential_grace_secs,
            auth_cache_ttl_secs,
            min_group_devices,
            rollout_tick_ms,
            durable_telemetry,
            job_lease_secs,
            tls_cert,
            tls_key,
            tls_client_ca,
            grpc_web_cors_origins,
            net,
            gc_interval_secs,
            gc_grace_secs,
        } => {
            cfg.net = net;
            anyhow::ensure!(job_lease_secs >= 2, "--job-lease-secs must be at least 2");
            cfg.job_lease = std::time::Duration::from_secs(job_lease_secs);
            cfg.durable_telemetry = durable_telemetry;
            cfg.workers = workers;
            cfg.max_concurrent_requests = max_concurrent_requests;
            cfg.max_oracle_bytes = max_oracle_mib << 20;
            cfg.max_dataset_bytes = max_dataset_mb << 20;
            cfg.dataset_root = dataset_root;
            for p in &dataset_s3_prefixes {
                adaptivenet_cloud::datasets::s3::S3Location::parse("--dataset-s3-prefix", p)?;
            }
            cfg.dataset_s3_prefixes = dataset_s3_prefixes;
            cfg.min_report_samples = min_report_samples;
            cfg.device_credential_ttl = (device_credential_ttl_secs > 0)
                .then(|| Duration::from_secs(device_credential_ttl_secs));
            cfg.credential_grace = Duration::from_secs(credential_grace_secs);
            cfg.auth_cache_ttl = Duration::from_secs(auth_cache_ttl_secs);
            cfg.min_group_devices = min_group_devices;
            cfg.rollout_tick = Duration::from_millis(rollout_tick_ms);
            adaptivenet_cloud::ops::web::WebOrigins::parse(&grpc_web_cors_origins)?;
            cfg.grpc_web_origins = grpc_web_cors_origins;
            let tls = match (tls_cert, tls_key) {
                (Some(c), Some(k)) => Some(TlsFiles {
                    cert_pem: read_pem("--tls-cert", &c, Pem::Certificate)?,
                    key_pem: read_pem("--tls-key", &k, Pem::PrivateKey)?,
                    client_ca_pem: tls_client_ca
                        .map(|p| read_pem("--tls-client-ca", &p, Pem::Certificate))
                        .transpose()?,
                }),
                (None, None) => None,
                _ => anyhow::bail!("--tls-cert and --tls-key go together"),
            };
            let app = App::open(cfg).await?;
            let listener = tokio::net::TcpListener::bind(listen).await?;
            let ml = match metrics_listen {
                Some(a) => Some(tokio::net::TcpListener::bind(a).await?),
                None => None,
            };
            if gc_interval_secs > 0 {
                tokio::spawn(adaptivenet_cloud::gc::periodic(
                    app.store().clone(),
                    app.blobs().clone(),
                    Duration::from_secs(gc_interval_secs),
                    Duration::from_secs(gc_grace_secs),
                    app.shutdown_token().clone(),
                ));
            }
            let web = match web_listen {
                Some(a) => Some(tokio::net::TcpListener::bind(a).await?),
                None => None,
            };
            let handle =
                server::start(app, listener, Some(Arc::new(ElastifyRunner)), ml, tls).await?;
            if let Some(l) = web {
                tokio::spawn(adaptivenet_cloud::web::run(handle.app().clone(), l));
            }
            tracing::info!(addr = %handle.addr, metrics = ?handle.metrics_addr, "cloud-server ready");
            adaptivenet_proto::shutdown::signal().await?;
            tracing::info!("draining");
            handle.shutdown().await?;
        }
        Cmd::Worker {
            concurrency,
            job_lease_secs,
            metrics_listen,
        } => {
            anyhow::ensure!(job_lease_secs >= 2, "--job-lease-secs must be at least 2");
            cfg.job_lease = std::time::Duration::from_secs(job_lease_secs);
            let app = App::open(cfg).await?;
            let stop = CancellationToken::new();
            if let Some(a) = metrics_listen {
                let l = tokio::net::TcpListener::bind(a).await?;
                let m = app.clone();
                let render: Arc<dyn Fn() -> String + Send + Sync> =
                    Arc::new(move || m.metrics().render());
                tokio::spawn(adaptivenet_cloud::ops::metrics::serve_http(
                    l,
                    render,
                    stop.clone(),
                ));
            }
            let prefix = worker_id_prefix();
            let handles: Vec<_> = (0..concurrency.max(1))
                .map(|i| {
                    let w = Worker::new(
                        app.clone(),
                        Arc::new(ElastifyRunner),
                        format!("{prefix}-{i}"),
                    );
                    tokio::spawn(w.run(stop.clone()))
                })
                .collect();
            adaptivenet_proto::shutdown::signal().await?;
            stop.cancel();
            for h in handles {
                let _ = h.await;
            }
        }
        Cmd::Migrate => {
            App::open(cfg).await?;
            println!("migrations applied");
        }
        Cmd::Gc { grace_secs } => {
            let app = App::open(cfg).await?;
            let r = adaptivenet_cloud::gc::collect(
                app.store(),
                app.blobs(),
                Duration::from_secs(grace_secs),
            )
            .await?;
            println!(
                "scanned {} blobs: {} referenced, {} unreferenced but younger than {grace_secs} s, \
                 {} deleted ({} bytes)",
                r.scanned, r.referenced, r.young, r.deleted, r.deleted_bytes
            );
        }
        Cmd::Token { cmd } => {
            let app = App::open(cfg).await?;
            match cmd {
                TokenCmd::CreateApi {
                    role,
                    description,
                    ttl_secs,
                    fleet,
                } => {
                    let fleet = match fleet {
                        Some(f) => Some(fleet_id(&app, &f).await?),
                        None => None,
                    };
                    let t = app
                        .create_fleet_api_token(
                            Role::parse(&role)?,
                            &description,
                            ttl_secs.map(Duration::from_secs),
                            fleet,
                        )
                        .await?;
                    println!("id:    {}\ntoken: {}", t.id, t.token);
                }
                TokenCmd::CreateEnrollment {
                    fleet,
                    uses,
                    ttl_secs,
                } => {
                    let fleet_id = fleet_id(&app, &fleet).await?;
                    let t = app
                        .create_enrollment_token(fleet_id, uses, ttl_secs.map(Duration::from_secs))
                        .await?;
                    println!("id:    {}\ntoken: {}", t.id, t.token);
                }
                TokenCmd::List => {
                    for (t, desc) in app.store().list_api_tokens().await? {
                        let fleet = t.fleet_id.map_or("*".to_string(), |f| f.to_string());
                        println!(
                            "{}  {:9}  fleet={fleet}  revoked={}  expires_ms={:?}  {desc}",
                            t.id,
                            t.role.as_str(),
                            t.revoked,
                            t.expires_ms
                        );
                    }
                }
                TokenCmd::RevokeApi { id } => {
                    app.revoke_api_token(parse_id("id", &id)?).await?;
                    println!("revoked");
                }
                TokenCmd::RevokeEnrollment { id } => {
                    app.store()
                        .revoke_enrollment_token(parse_id("id", &id)?)
                        .await?;
                    println!("revoked");
                }
            }
        }
        Cmd::Fleet {
            cmd: FleetCmd::Create { name },
        } => {
            let app = App::open(cfg).await?;
            let f = app.store().create_fleet(&name).await?;
            println!("{}", f.id);
        }
        Cmd::Client(_) | Cmd::Oracle { .. } | Cmd::TrainOracle(_) | Cmd::Elastify(_) => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

/// A fleet named by id or by name.
async fn fleet_id(app: &App, fleet: &str) -> anyhow::Result<uuid::Uuid> {
    Ok(match parse_id("fleet", fleet) {
        Ok(id) => id,
        Err(_) => app.store().fleet_by_name(fleet).await?.id,
    })
}
