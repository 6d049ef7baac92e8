//! `edge-agent`: profile, search, serve and adapt a subnet on this device, from a local
//! artifact directory or from the cloud (enroll once, sync the fleet's supernet, report
//! aggregates). Errors print a one-line cause chain and exit non-zero.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adaptivenet_core::artifact::{write_artifact, InputSpec};
use adaptivenet_core::data::FASHION_MNIST_CLASSES;
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::{branches::build_supernet, Subnet, SupernetConfig};
use adaptivenet_edge::adapt::contention::{Contention, ContentionSpec};
use adaptivenet_edge::adapt::drift::{DriftConfig, DriftDetector};
use adaptivenet_edge::adapt::plan::{self, or_recompute, PlanConfig};
use adaptivenet_edge::adapt::resync::{policy_budgets, Applied, Resync};
use adaptivenet_edge::adapt::timeline::{Rotation, Timeline, TimelineEntry, TIMELINE_FILE};
use adaptivenet_edge::adapt::{maintain, AdaptConfig, AdaptEvent, Controller, SharedController};
use adaptivenet_edge::client::{
    local_device_class, AgentAggregates, BlobSelection, CloudClient, HeartbeatInput, SyncOptions,
    TlsOptions,
};
use adaptivenet_edge::profile::{pin_threads, LatencyTable};
use adaptivenet_edge::quality::{load_local_data, QualityMode};
use adaptivenet_edge::search::{SearchConfig, Speedups};
use adaptivenet_edge::serve::bn::RecalScope;
use adaptivenet_edge::serve::grpc::{self, ApiConfig, InferenceService};
use adaptivenet_edge::serve::{ArtifactSource, Recalibration, Server};
use adaptivenet_edge::state::{ActiveRecord, SearchRecord, StateDir};
use adaptivenet_edge::EdgeError;
use adaptivenet_proto::v1 as pb;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

/// Post-deployment architecture adaptation on the edge (AdaptiveNet).
///
/// Typical use: `edge-agent run --artifact DIR --data DIR --budget 0.6 --threads 1 --state DIR`
/// profiles this device (once), searches the supernet on the local data (once per budget),
/// then serves the chosen subnet and steps along the Pareto front when live latency drifts.
/// State (latency table, front, active subnet) persists in --state, so a restart serves again
/// without a new search.
///
/// Cloud mode: `edge-agent run --cloud http://HOST:50051 --enroll-token TOKEN --state DIR
/// --data DIR --budget 0.6` enrolls once (the identity is kept in --state/identity.json, 0600),
/// syncs the fleet's desired supernet into --cache (resumable, verified downloads), then
/// profiles, searches and serves it as above, sending heartbeats and aggregate-only reports
/// (never local data or per-sample results). An unreachable cloud does not stop serving.
#[derive(Parser)]
#[command(name = "edge-agent", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time every module of the supernet and validate the additive latency model.
    Profile(ProfileArgs),
    /// Search the best subnet per budget on local data (profiles first if needed).
    Search(SearchArgs),
    /// Profile and search if needed, then serve local data and adapt to live latency.
    Run(RunArgs),
    /// Write an untrained ResNet-20 supernet artifact (development without a trained one).
    DemoArtifact {
        #[arg(long)]
        out: PathBuf,
        /// Stage widths of the ResNet-20 oracle.
        #[arg(long, default_value = "16,32,64", value_delimiter = ',')]
        widths: Vec<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write SVG plots of a state directory: the Pareto front (pareto.svg) and, when the
    /// agent recorded one, the adaptation timeline (timeline.svg).
    Plot {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Plot title prefix (default: the state directory's name).
        #[arg(long)]
        title: Option<String>,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Supernet artifact directory (manifest.json + blobs/); offline mode.
    #[arg(long, required_unless_present = "cloud", conflicts_with = "cloud")]
    artifact: Option<PathBuf>,
    /// Cloud endpoint (e.g. http://127.0.0.1:50051): enroll, sync the fleet's supernet into
    /// --cache, report aggregates.
    #[arg(long)]
    cloud: Option<String>,
    /// Enrollment token (needed once; later runs reuse the identity stored in --state).
    /// Visible in `ps` when given as a flag: prefer --enroll-token-file or the environment.
    #[arg(long, env = "ADAPTIVENET_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// File holding the enrollment token (surrounding whitespace ignored). Precedence: this
    /// file, then --enroll-token, then ADAPTIVENET_ENROLL_TOKEN.
    #[arg(long, env = "ADAPTIVENET_ENROLL_TOKEN_FILE")]
    enroll_token_file: Option<PathBuf>,
    /// Enroll afresh with the token even though --state holds an identity (replacing it),
    /// e.g. after moving to another --cloud: a stored identity is only ever sent to the
    /// endpoint that issued it.
    #[arg(long)]
    re_enroll: bool,
    /// Privacy floor: reports whose quality rests on fewer local images are withheld on the
    /// device (and noted in the timeline); the cloud's announced minimum applies if larger.
    #[arg(long, default_value_t = 100)]
    min_quality_samples: u64,
    /// Local supernet cache for cloud mode (default: <state>/cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Per-request deadline of cloud calls, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    cloud_timeout_ms: u64,
    /// CA certificate (PEM) that signed the cloud's certificate, for an https:// --cloud
    /// (builds with the `tls` feature).
    #[arg(long, env = "ADAPTIVENET_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Device certificate (PEM) for a cloud that requires mutual TLS (`--tls-client-ca`).
    #[arg(long, env = "ADAPTIVENET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "ADAPTIVENET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// State directory (latency table, search result, active subnet).
    #[arg(long)]
    state: PathBuf,
    /// Tensor worker threads (pinned before any computation; recorded in the table).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Deployment batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

#[derive(Args, Clone)]
struct ProfileArgs {
    #[command(flatten)]
    common: Common,
    /// Timed rounds per module (interleaved).
    #[arg(long, default_value_t = 40)]
    rounds: usize,
    /// Random subnets measured end to end to validate the table (0 skips validation).
    #[arg(long, default_value_t = 30)]
    validate: usize,
    /// Re-profile even if a table for this artifact exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Clone)]
struct SearchArgs {
    #[command(flatten)]
    profile: ProfileArgs,
    /// Local data: an IDX directory (Fashion-MNIST layout) or an ImageFolder tree.
    #[arg(long)]
    data: PathBuf,
    /// Budgets: fractions of the oracle's latency (0.6 or 0.6x) or milliseconds (12ms);
    /// comma-separated for several in one run. The first one is served by `run`. Default: the
    /// fleet's budget policy in cloud mode, else 0.6.
    #[arg(long, value_delimiter = ',')]
    budget: Vec<String>,
    /// Local images used for the search.
    #[arg(long, default_value_t = 500)]
    images: usize,
    #[arg(long, default_value_t = 64)]
    population: usize,
    #[arg(long, default_value_t = 8)]
    generations: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Quality = agreement with the oracle's predictions (no labels needed).
    #[arg(long)]
    label_free: bool,
    /// Plain EA: all four speed-ups off (for comparison).
    #[arg(long)]
    plain: bool,
    /// Turn racing off. Racing (beyond the paper) scores a candidate on a small subset first
    /// (100 images, then 200, 400, ...) and goes on only with those that can still reach the
    /// front; a raced-out
    /// subnet that could still become a parent is scored fully, so the search takes the same
    /// path and finds the same front, with fewer module passes.
    #[arg(long)]
    no_racing: bool,
    /// Racing is the default; accepted for older scripts.
    #[arg(long, hide = true, conflicts_with = "no_racing")]
    racing: bool,
    /// Evaluation workers for the search (images are split between them; the result does
    /// not depend on it). On 2 cores 1 is usually fastest for small models.
    #[arg(long, default_value_t = 1)]
    search_threads: usize,
    /// Memory (MiB) for activations kept between generations of the search, so a child does
    /// not recompute the prefix it shares with its parent. Changes the speed, never the
    /// result; 0 turns it off.
    #[arg(long, default_value_t = 256)]
    reuse_cache_mb: usize,
    /// Search again even if a stored result matches.
    #[arg(long)]
    research: bool,
}

#[derive(Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    search: SearchArgs,
    /// Cloud mode: milliseconds between heartbeats (default: the interval the cloud suggests).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Cloud mode: send an aggregate report every this many heartbeats (and once after search).
    #[arg(long, default_value_t = 10)]
    report_every: u32,
    /// Seconds to serve (0 = until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Milliseconds between maintenance checks.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Serve the local gRPC inference API (adaptivenet.v1.EdgeInference) on this address,
    /// e.g. 127.0.0.1:50061 (port 0 picks a free one; the address is printed). Off if unset.
    #[arg(long)]
    listen: Option<String>,
    /// Largest batch the local API accepts.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Local API: file holding a token that callers must send as `authorization: Bearer
    /// <token>` (UNAUTHENTICATED otherwise). Without it anyone who can reach --listen may
    /// use the API, so a non-loopback --listen warns.
    #[arg(long)]
    listen_token_file: Option<PathBuf>,
    /// Local API: most inference requests served at once; more are refused at once with
    /// RESOURCE_EXHAUSTED (HTTP 429), not queued.
    #[arg(long, default_value_t = 4)]
    listen_max_concurrent: usize,
    /// Rotate <state>/timeline.jsonl when it would grow past this many MiB...
    #[arg(long, default_value_t = 8)]
    timeline_max_mb: u64,
    /// ...keeping this many rotated files (timeline.jsonl.1 is the newest).
    #[arg(long, default_value_t = 4)]
    timeline_keep: usize,
    /// Do not replay the local data as request traffic (only API requests feed the window).
    #[arg(long)]
    no_replay: bool,
    /// Background load for the contention demo: INTENSITY[:START_S:DURATION_S], busy
    /// threads (fractional = duty cycle) from START_S for DURATION_S seconds after serving
    /// starts (default: from 0 until the end). The timeline goes to <state>/timeline.jsonl.
    #[arg(long)]
    contention: Option<ContentionSpec>,
    /// Re-profile and re-search (warm-started, same budget in ms) when live latency stays
    /// more than this fraction off the latency table's prediction...
    #[arg(long, default_value_t = DriftConfig::default().threshold)]
    drift_threshold: f64,
    /// ...for this many consecutive maintenance windows (0: never re-profile on drift).
    #[arg(long, default_value_t = DriftConfig::default().windows)]
    drift_windows: usize,
    /// BN recalibration of the served subnet on the local images (beyond the paper):
    /// `all` re-estimates the BN statistics of every module on the path, `branches` only the
    /// branches'; `auto` is `all`, kept only where it does not lower the subnet's quality on
    /// those images (labels, or agreement with the oracle with --label-free): statistics
    /// fitted to a device that sees few classes can cost tens of points. Every later switch
    /// recalibrates (and checks) its target too.
    #[arg(long, value_enum, default_value_t = BnRecal::Off)]
    bn_recal: BnRecal,
}

/// `--bn-recal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BnRecal {
    Off,
    Auto,
    Branches,
    All,
}

fn main() {
    adaptivenet_kernels::alloc::retain_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let threads = match &cli.cmd {
        Cmd::Profile(p) => p.common.threads,
        Cmd::Search(s) => s.profile.common.threads,
        Cmd::Run(r) => r.search.profile.common.threads,
        Cmd::DemoArtifact { .. } | Cmd::Plot { .. } => 1,
    };
    pin_threads(threads);
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Profile(a) => {
            let rt = runtime()?;
            let (src, _) = open_source(&a.common, &rt)?;
            let t = ensure_table(&src, &a)?;
            print_table(&t);
            Ok(())
        }
        Cmd::Search(a) => {
            let rt = runtime()?;
            let (src, cloud) = open_source(&a.profile.common, &rt)?;
            let mut a = a;
            a.budget = budget_specs(&a, cloud.as_ref().and_then(|c| c.budget.as_ref()));
            let (_t, rec) = ensure_search(&src, &a)?;
            print_search(&rec);
            Ok(())
        }
        Cmd::Run(a) => run(a),
        Cmd::DemoArtifact { out, widths, seed } => demo_artifact(&out, &widths, seed),
        Cmd::Plot {
            state_dir,
            out,
            title,
        } => {
            let title = title.unwrap_or_else(|| {
                state_dir
                    .file_name()
                    .map_or("agent".into(), |n| n.to_string_lossy().into_owned())
            });
            let files = adaptivenet_edge::plot::plot_state_dir(&state_dir, &out, &title)?;
            println!("pareto front: {}", files.pareto.display());
            match files.timeline {
                Ok(p) => println!("timeline: {}", p.display()),
                Err(why) => println!("{why}"),
            }
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// A cloud session: the client and what the last sync applied.
struct CloudSession {
    client: Arc<CloudClient>,
    supernet_id: String,
    generation: u64,
    /// The fleet's latency budget policy (None when serving from the cache offline).
    budget: Option<pb::LatencyBudgetPolicy>,
}

/// The artifact to work on: `--artifact` as is, or (cloud mode) enroll once and sync the
/// fleet's desired supernet into the cache.
fn open_source(
    c: &Common,
    rt: &tokio::runtime::Runtime,
) -> Result<(ArtifactSource, Option<CloudSession>)> {
    let Some(url) = &c.cloud else {
        let dir = c
            .artifact
            .as_ref()
            .context("--artifact or --cloud is required")?;
        return Ok((
            ArtifactSource::open(dir).context("opening the artifact")?,
            None,
        ));
    };
    let deadline = std::time::Duration::from_millis(c.cloud_timeout_ms.max(1));
    let cache = c.cache.clone().unwrap_or_else(|| c.state.join("cache"));
    let token = enroll_token(c)?;
    let tls = TlsOptions {
        ca_file: c.ca_file.clone(),
        client_cert: c.tls_cert.clone(),
        client_key: c.tls_key.clone(),
    };
    let synced = rt.block_on(async {
        let mut client = CloudClient::connect_tls(url, deadline, &tls)
            .await?
            .with_state_dir(&c.state)?
            .with_min_quality_samples(c.min_quality_samples)
            .with_re_enroll(c.re_enroll);
        let new = client
            .enroll(
                token.as_deref(),
                local_device_class(),
                env!("CARGO_PKG_VERSION"),
            )
            .await?;
        if !new {
            tracing::info!("using the stored device identity");
        }
        let rep = client
            .sync(&cache, &BlobSelection::All, &SyncOptions::default())
            .await?;
        Ok::<_, EdgeError>((client, rep))
    });
    let (client, rep) = match synced {
        Ok(v) => v,
        Err(e) if e.is_transient() => {
            // The cloud is unreachable or served a blob that failed verification: serve
            // the last synced supernet, if any, and keep trying in the background
            // (heartbeats, reports, re-sync).
            let Some((cur, dir)) = adaptivenet_edge::client::sync::cached_current(&cache) else {
                return Err(anyhow::Error::new(e).context(format!(
                    "syncing the supernet from {url} (nothing cached yet)"
                )));
            };
            let why = match &e {
                EdgeError::BlobMismatch { .. } => "a downloaded blob failed verification",
                EdgeError::Interrupted { .. } => "the download was interrupted",
                EdgeError::Cloud { .. } => "the cloud answered with a retryable error",
                _ => "the cloud is unreachable",
            };
            tracing::warn!(
                "sync failed, {why} ({e}); serving the cached supernet {} from {}",
                cur.supernet_id,
                dir.display()
            );
            let client = rt
                .block_on(async {
                    CloudClient::connect_lazy_tls(url, deadline, &tls)?.with_state_dir(&c.state)
                })
                .context("reading the device identity")?
                .with_min_quality_samples(c.min_quality_samples);
            if client.identity().is_none() {
                bail!("not enrolled and the cloud {url} is unreachable");
            }
            client.check_identity_endpoint()?;
            let src = ArtifactSource::open(&dir).context("opening the cached supernet")?;
            return Ok((
                src,
                Some(CloudSession {
                    client: Arc::new(client),
                    supernet_id: cur.supernet_id,
                    generation: cur.generation,
                    budget: None,
                }),
            ));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("syncing the supernet from {url}")))
        }
    };
    let s = &rep.stats;
    tracing::info!(
        "synced supernet {} v{} into {}: {} blobs needed, {} cached, {} downloaded ({} bytes, {} resumed, {} restarted)",
        rep.supernet_id,
        rep.supernet_version,
        rep.dir.display(),
        s.blobs_needed,
        s.blobs_skipped,
        s.blobs_downloaded,
        s.bytes_received,
        s.resumed,
        s.restarts_from_zero
    );
    let src = ArtifactSource::open(&rep.dir).context("opening the synced supernet")?;
    Ok((
        src,
        Some(CloudSession {
            client: Arc::new(client),
            supernet_id: rep.supernet_id,
            generation: rep.generation,
            budget: rep.budget,
        }),
    ))
}

/// The enrollment token: `--enroll-token-file`, else `--enroll-token` (or its environment
/// variable, which clap resolves below the flag).
fn enroll_token(c: &Common) -> Result<Option<String>> {
    match &c.enroll_token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --enroll-token-file {}", path.display()))?;
            let token = text.trim();
            anyhow::ensure!(
                !token.is_empty(),
                "--enroll-token-file {} is empty",
                path.display()
            );
            Ok(Some(token.to_string()))
        }
        None => Ok(c.enroll_token.clone()),
    }
}

/// Sends a report; one below the privacy minimum stays on the device and is noted in the
/// timeline.
async fn send_report(client: &CloudClient, agg: &AgentAggregates, timeline: &Timeline) -> bool {
    match client.report(agg).await {
        Ok(()) => true,
        Err(e @ EdgeError::ReportWithheld { .. }) => {
            println!("{e}");
            timeline.note("report_withheld");
            false
        }
        Err(e) => {
            tracing::warn!("report not delivered (kept for retry): {e}");
            false
        }
    }
}

fn bar(len: u64, msg: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(msg);
    pb
}

/// Draws one progress bar per stage of a plan (profile, search).
fn progress_bars() -> impl FnMut(&'static str, usize, usize) {
    let mut cur: Option<(&'static str, ProgressBar)> = None;
    move |stage, done, total| {
        if cur.as_ref().map(|(s, _)| *s) != Some(stage) {
            if let Some((_, b)) = cur.take() {
                b.finish_and_clear();
            }
            cur = Some((stage, bar(total as u64, stage)));
        }
        if let Some((_, b)) = &cur {
            b.set_position(done as u64);
            if done >= total {
                b.finish_and_clear();
            }
        }
    }
}

fn profile_config(a: &ProfileArgs) -> PlanConfig {
    PlanConfig {
        threads: a.common.threads,
        batch: a.common.batch,
        rounds: a.rounds,
        validate: a.validate,
        force_profile: a.force,
        search: SearchConfig::default(),
        budgets: Vec::new(),
        data: PathBuf::new(),
        images: 0,
        mode: QualityMode::Labelled,
        research: false,
        clamp_budgets: false,
    }
}

fn plan_config(a: &SearchArgs) -> PlanConfig {
    PlanConfig {
        search: SearchConfig {
            population: a.population,
            generations: a.generations,
            seed: a.seed,
            speedups: if a.plain {
                Speedups::none()
            } else {
                Speedups {
                    racing: a.racing || !a.no_racing,
                    ..Speedups::all()
                }
            },
            threads: a.search_threads,
            reuse_cache_bytes: a.reuse_cache_mb << 20,
            ..SearchConfig::default()
        },
        budgets: a.budget.clone(),
        data: a.data.clone(),
        images: a.images,
        mode: if a.label_free {
            QualityMode::OracleAgreement
        } else {
            QualityMode::Labelled
        },
        research: a.research,
        ..profile_config(&a.profile)
    }
}

fn ensure_table(src: &ArtifactSource, a: &ProfileArgs) -> Result<LatencyTable> {
    let state = StateDir::new(&a.common.state);
    let (t, _) = plan::ensure_table(src, &state, &profile_config(a), &mut progress_bars())
        .context("profiling")?;
    Ok(t)
}

fn print_table(t: &LatencyTable) {
    let c = &t.conditions;
    println!(
        "conditions: threads={} batch={} cpu={:?} governor={}",
        c.threads,
        c.batch,
        c.cpu_model,
        c.governor.as_deref().unwrap_or("unreadable")
    );
    println!(
        "stem {:.4} ms  head {:.4} ms",
        t.stem.median_ms, t.head.median_ms
    );
    println!(
        "{:>4} {:>6} {:>10} {:>10} {:>5}",
        "pos", "choice", "median_ms", "p95_ms", "runs"
    );
    for m in &t.modules {
        println!(
            "{:>4} {:>6} {:>10.4} {:>10.4} {:>5}",
            m.position, m.choice, m.stat.median_ms, m.stat.p95_ms, m.stat.runs
        );
    }
    if let Some(v) = &t.validation {
        println!(
            "validation on {} subnets: bias x{:.3}; raw median {:.1}% p90 {:.1}%; calibrated median {:.1}% p90 {:.1}%",
            v.subnets,
            v.bias,
            100.0 * v.raw_median_err,
            100.0 * v.raw_p90_err,
            100.0 * v.calibrated_median_err,
            100.0 * v.calibrated_p90_err
        );
    }
}

/// The budgets to search for: `--budget` if given, else the fleet's policy (cloud mode: a
/// latency in ms, or a fraction of the oracle's latency on this device), else 0.6.
fn budget_specs(a: &SearchArgs, policy: Option<&pb::LatencyBudgetPolicy>) -> Vec<String> {
    if !a.budget.is_empty() {
        return a.budget.clone();
    }
    policy_budgets(policy)
}

fn ensure_search(src: &ArtifactSource, a: &SearchArgs) -> Result<(LatencyTable, SearchRecord)> {
    let state = StateDir::new(&a.profile.common.state);
    let p = plan::plan(src, &state, &plan_config(a), &mut progress_bars())?;
    Ok((p.table, p.record))
}

fn print_search(rec: &SearchRecord) {
    let r = &rec.result;
    println!(
        "search: {} evaluations in {:.2} s ({:.1} evals/s, {} module applications)",
        r.stats.evaluations, r.stats.seconds, r.stats.evals_per_s, r.stats.module_applications
    );
    for b in &r.best {
        println!(
            "budget {:.3} ms: {} latency {:.3} ms quality {:.2}%",
            b.budget_ms, b.best.subnet, b.best.latency_ms, b.best.quality
        );
    }
    println!("pareto front ({} points):", r.front.len());
    for c in &r.front {
        println!("  {} {:.3} ms {:.2}%", c.subnet, c.latency_ms, c.quality);
    }
}

/// The cloud's view of what this agent runs (heartbeats, reports), replaced by re-syncs.
type SharedApplied = Arc<std::sync::Mutex<Applied>>;

fn aggregates(
    cur: &Applied,
    active: &Subnet,
    live: Option<(usize, f64, f64)>,
    samples: u64,
) -> AgentAggregates {
    let rec = &cur.plan.record;
    // The images the quality was measured on (older stored results did not record them).
    let samples = match rec.result.stats.images {
        0 => samples,
        n => n as u64,
    };
    let cand = rec
        .result
        .front
        .iter()
        .find(|c| &c.subnet == active)
        .cloned()
        .unwrap_or_else(|| rec.result.front[0].clone());
    AgentAggregates::from_state(
        &cur.supernet_id,
        &cur.plan.table,
        rec,
        &cand,
        cur.plan.budget_ms,
        live,
        samples,
        local_device_class(),
    )
}

/// The oracle's top-1 on each batch: the label-free targets of `--bn-recal auto`.
fn oracle_top1(src: &ArtifactSource, inputs: &[candle_core::Tensor]) -> Result<Vec<Vec<u32>>> {
    let oracle = Subnet::original(src.manifest.supernet_spec().num_positions());
    let sn = src.load(Some(std::slice::from_ref(&oracle)))?;
    inputs
        .iter()
        .map(|x| Ok(adaptivenet_edge::quality::top1(&sn.forward(&oracle, x)?)?))
        .collect()
}

fn run(a: RunArgs) -> Result<()> {
    let common = &a.search.profile.common;
    let rt = runtime()?;
    let (src, cloud) = open_source(common, &rt)?;
    let id = src.manifest.supernet_id.to_string();
    let state = StateDir::new(&common.state);
    let explicit_budgets = !a.search.budget.is_empty();
    let mut s = a.search.clone();
    s.budget = budget_specs(&s, cloud.as_ref().and_then(|c| c.budget.as_ref()));
    let pcfg = PlanConfig {
        clamp_budgets: true,
        ..plan_config(&s)
    };
    let the_plan = plan::plan(&src, &state, &pcfg, &mut progress_bars())?;
    print_search(&the_plan.record);
    let budget = the_plan.budget_ms;
    let front = the_plan.record.result.front.clone();
    if front.is_empty() {
        bail!("the search result has no subnet to serve");
    }
    // Resume the previously active subnet if it is still on the front.
    let mut idx = Controller::initial_index(&front, budget);
    if let Some(act) = or_recompute("active subnet", state.load_active(&id)) {
        if let Some(i) = front.iter().position(|c| c.subnet == act.subnet) {
            idx = i;
        }
    }
    let start: Subnet = front[idx].subnet.clone();
    let server =
        Arc::new(Server::start(src.clone(), &start, 50).context("loading the active subnet")?);
    plan::persist(
        "active subnet",
        state.save_active(
            &id,
            &ActiveRecord {
                subnet: start.clone(),
                budget_ms: budget,
            },
        ),
    );
    println!("serving {start} (budget {budget:.3} ms)");
    let data = load_local_data(&s.data, &src.manifest.input)?;
    let t = adaptivenet_edge::quality::transform_for(&src.manifest.input, &data)?;
    let scope = match a.bn_recal {
        BnRecal::Off => None,
        BnRecal::Branches => Some(RecalScope::Branches),
        BnRecal::All | BnRecal::Auto => Some(RecalScope::All),
    };
    if let Some(scope) = scope {
        // The images the search evaluated (all of them with --images 0).
        let (inputs, labels) = adaptivenet_edge::quality::search_batches(
            &src.manifest.input,
            &data,
            s.images,
            250,
            pcfg.search.seed,
        )?;
        let guard = match (a.bn_recal, pcfg.mode) {
            (BnRecal::Auto, QualityMode::Labelled) => Some(labels),
            (BnRecal::Auto, QualityMode::OracleAgreement) => Some(oracle_top1(&src, &inputs)?),
            _ => None,
        };
        let n: usize = inputs.iter().map(|x| x.dim(0).unwrap_or(0)).sum();
        let t0 = std::time::Instant::now();
        server.set_recalibration(Recalibration {
            inputs,
            scope,
            guard,
        });
        let rep = server
            .switch(&start)
            .context("BN recalibration of the active subnet")?;
        println!(
            "BN recalibration ({}) of {start} on {n} local images: {:.0} ms{}",
            if scope == RecalScope::All {
                "all modules"
            } else {
                "branches"
            },
            t0.elapsed().as_secs_f64() * 1e3,
            match (a.bn_recal, rep.recalibrated) {
                (BnRecal::Auto, Some(true)) => ", kept (local quality not lower)",
                (BnRecal::Auto, _) => ", refused (local quality lower): shipped statistics serve",
                _ => "",
            }
        );
    }
    let mut cfg = AdaptConfig::new(budget);
    cfg.interval_ms = a.interval_ms;
    let ctl: SharedController = Arc::new(std::sync::Mutex::new(Controller::new(cfg, front, idx)));
    let timeline = Arc::new(Timeline::open_with(
        &state.dir.join(TIMELINE_FILE),
        Rotation {
            max_bytes: a.timeline_max_mb.max(1) << 20,
            keep: a.timeline_keep,
        },
    )?);
    let listen_token = match &a.listen_token_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading --listen-token-file {}", p.display()))?;
            anyhow::ensure!(
                !text.trim().is_empty(),
                "--listen-token-file {} is empty",
                p.display()
            );
            Some(text.trim().to_string())
        }
        None => None,
    };
    let t0 = std::time::Instant::now();
    let contention = a.contention.map(|spec| {
        println!(
            "contention: intensity {} from {} s for {}",
            spec.intensity,
            spec.start_s,
            spec.duration_s
                .map_or("the whole run".to_string(), |d| format!("{d} s"))
        );
        Contention::start(spec, t0)
    });
    let contention_spec = a.contention;
    let reason = Arc::new(std::sync::atomic::AtomicI32::new(
        pb::AdaptationReason::Initial as i32,
    ));
    let applied: SharedApplied = Arc::new(std::sync::Mutex::new(Applied {
        supernet_id: cloud.as_ref().map_or(id.clone(), |c| c.supernet_id.clone()),
        generation: cloud.as_ref().map_or(0, |c| c.generation),
        plan: the_plan,
    }));
    // The images a search evaluates (all local ones with --images 0 or more than held).
    let samples = match s.images {
        0 => data.len(),
        n => n.min(data.len()),
    } as u64;
    let resync = Resync {
        cache: common
            .cache
            .clone()
            .unwrap_or_else(|| common.state.join("cache")),
        state: state.clone(),
        sync: SyncOptions::default(),
        plan: pcfg,
        explicit_budgets,
    };
    let heartbeat_ms = a.heartbeat_ms;
    let report_every = a.report_every.max(1);
    anyhow::ensure!(
        a.drift_threshold.is_finite() && a.drift_threshold > 0.0,
        "--drift-threshold must be a positive fraction, got {}",
        a.drift_threshold
    );
    let mut drift = DriftDetector::new(DriftConfig {
        threshold: a.drift_threshold,
        windows: a.drift_windows,
    });
    let drift_resync = resync.clone();
    let drift_windows = a.drift_windows;
    let drift_busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (drift_tx, mut drift_rx) = tokio::sync::mpsc::channel::<f64>(1);
    let result = rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let budget_bits = Arc::new(std::sync::atomic::AtomicU64::new(budget.to_bits()));
        let api = match &a.listen {
            Some(addr) => {
                let cfg = ApiConfig {
                    max_batch: a.max_batch.max(1),
                    max_concurrent: a.listen_max_concurrent.max(1),
                    token: listen_token,
                };
                let mut svc = InferenceService::new(server.clone(), cfg, budget);
                svc.share_budget(budget_bits.clone());
                let h = grpc::serve(addr, svc).await?;
                println!("local inference API listening on {}", h.addr);
                Some(h)
            }
            None => None,
        };
        let st = state.clone();
        let why = reason.clone();
        let tl = timeline.clone();
        let bits = budget_bits.clone();
        let srv = server.clone();
        let busy = drift_busy.clone();
        let maint = tokio::spawn(maintain(server.clone(), ctl.clone(), rx.clone(), move |tick, c| {
            let event = tick.event.as_ref().map(|ev| ev.name(&c.front));
            let predicted = c.front.get(c.current).map_or(0.0, |x| x.latency_ms);
            if drift.observe(tick.stats.p50_ms, predicted)
                && !busy.swap(true, std::sync::atomic::Ordering::AcqRel)
                && drift_tx.try_send(c.cfg.budget_ms).is_err()
            {
                busy.store(false, std::sync::atomic::Ordering::Release);
            }
            if let Some(ev) = &tick.event {
                match ev {
                    AdaptEvent::Switched(r) => {
                        why.store(
                            if event == Some("step_down") { pb::AdaptationReason::OverBudget } else { pb::AdaptationReason::Slack } as i32,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        let bn = match r.recalibrated {
                            Some(true) => ", BN recalibrated",
                            Some(false) => ", shipped BN",
                            None => "",
                        };
                        println!(
                            "switched {} -> {} at p50 {:.3} ms (budget {:.3} ms; loaded {}, reused {}, {:.1} ms{bn})",
                            r.from, r.to, tick.stats.p50_ms, c.cfg.budget_ms, r.loaded, r.reused, r.millis
                        );
                        let active = srv.active();
                        if let Err(e) = st.save_active(&active.supernet_id, &ActiveRecord { subnet: r.to.clone(), budget_ms: c.cfg.budget_ms }) {
                            tracing::warn!("active subnet not persisted: {e}");
                        }
                    }
                    AdaptEvent::SwitchFailed { to, error } => eprintln!("switch to {to} failed, still serving: {error}"),
                }
            }
            bits.store(c.cfg.budget_ms.to_bits(), std::sync::atomic::Ordering::Relaxed);
            let t_s = t0.elapsed().as_secs_f64();
            let entry = TimelineEntry {
                t_s,
                p50_ms: tick.stats.p50_ms,
                p95_ms: tick.stats.p95_ms,
                budget_ms: c.cfg.budget_ms,
                subnet: c.front.get(c.current).map_or_else(String::new, |x| x.subnet.to_string()),
                event: event.map(str::to_string),
                samples: tick.stats.samples,
                noise: c.noise(),
                contention: contention_spec.map_or(0.0, |sp| sp.intensity_at(t_s)),
            };
            if let Err(e) = tl.record(entry) {
                tracing::warn!("timeline: {e}");
            }
        }));
        // Table drift: re-profile and re-search in the background; serving goes on.
        let drift_task = {
            let (server, ctl, applied, timeline, reason, bits, busy) = (
                server.clone(), ctl.clone(), applied.clone(), timeline.clone(), reason.clone(),
                budget_bits.clone(), drift_busy.clone(),
            );
            tokio::spawn(async move {
                while let Some(budget) = drift_rx.recv().await {
                    println!(
                        "latency table drifted (live latency off the table for {drift_windows} windows): re-profiling and re-searching at {budget:.3} ms"
                    );
                    timeline.note("drift_reprofile");
                    match drift_resync.replan_after_drift(budget, &server, &ctl).await {
                        Ok((plan, switch)) => {
                            println!(
                                "re-planned after drift: serving {} (front of {}, budget {:.3} ms){}",
                                server.active().subnet,
                                plan.record.result.front.len(),
                                plan.budget_ms,
                                switch.map_or(String::new(), |s| format!("; loaded {}, reused {} modules", s.loaded, s.reused)),
                            );
                            bits.store(plan.budget_ms.to_bits(), std::sync::atomic::Ordering::Relaxed);
                            reason.store(pb::AdaptationReason::Research as i32, std::sync::atomic::Ordering::Relaxed);
                            applied.lock().unwrap_or_else(|e| e.into_inner()).plan = plan;
                        }
                        Err(e) => {
                            eprintln!("re-planning after drift failed, still serving the old plan: {e}");
                            timeline.note("drift_reprofile_failed");
                        }
                    }
                    busy.store(false, std::sync::atomic::Ordering::Release);
                }
            })
        };
        // Local request stream: the device's own data, batch by batch.
        let batch = common.batch.max(1);
        let worker = (!a.no_replay).then(|| {
            let worker_server = server.clone();
            let stop = tx.clone();
            tokio::task::spawn_blocking(move || -> Result<usize> {
                let mut served = 0usize;
                let mut i = 0usize;
                while !*stop.borrow() {
                    let idx: Vec<usize> = (0..batch).map(|k| (i + k) % data.len()).collect();
                    i += batch;
                    let (x, _) = data.batch_tensor(&idx, &t, &candle_core::Device::Cpu)?;
                    worker_server.infer(&x)?;
                    served += batch;
                }
                Ok(served)
            })
        });
        let cloud_task = cloud.map(|session| {
            let server = server.clone();
            let ctl = ctl.clone();
            let applied = applied.clone();
            let timeline = timeline.clone();
            let mut stop = rx.clone();
            let reason = reason.clone();
            let budget_bits = budget_bits.clone();
            tokio::spawn(async move {
                let client = session.client;
                let resync = Arc::new(resync);
                let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let first = aggregates(&applied.lock().unwrap_or_else(|e| e.into_inner()), &server.active().subnet, None, samples);
                if send_report(&client, &first, &timeline).await {
                    tracing::info!("reported the search outcome to the cloud");
                }
                let mut interval = heartbeat_ms.unwrap_or(30_000).max(100);
                let mut beats = 0u32;
                let mut resync_task: Option<tokio::task::JoinHandle<()>> = None;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(interval)) => {}
                        _ = stop.changed() => break,
                    }
                    let active = server.active().subnet.clone();
                    let (n, p50, p95) = server.window_stats();
                    let cur = applied.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let hb = HeartbeatInput {
                        supernet_id: cur.supernet_id.clone(),
                        active_subnet: active.clone(),
                        latency_p50_ms: if n > 0 { p50 } else { 0.0 },
                        latency_p95_ms: if n > 0 { p95 } else { 0.0 },
                        reason: pb::AdaptationReason::try_from(
                            reason.load(std::sync::atomic::Ordering::Relaxed),
                        )
                        .unwrap_or(pb::AdaptationReason::Unspecified),
                        applied_generation: cur.generation,
                    };
                    // Rotate a credential nearing expiry before using it again; a failure is
                    // retried at the next heartbeat (the old one works until it expires).
                    if let Err(e) = client
                        .rotate_credential_if_due(adaptivenet_edge::client::now_unix_ms())
                        .await
                    {
                        tracing::warn!("credential rotation failed: {e}");
                    }
                    match client.heartbeat(&hb).await {
                        Ok(r) => {
                            if heartbeat_ms.is_none() && r.heartbeat_interval_ms > 0 {
                                interval = u64::from(r.heartbeat_interval_ms);
                            }
                            let idle = !busy.load(std::sync::atomic::Ordering::Acquire);
                            if r.desired_generation != cur.generation && idle {
                                // Re-sync in the background: heartbeats and serving go on.
                                busy.store(true, std::sync::atomic::Ordering::Release);
                                let (client, resync, server, ctl, applied, timeline, busy, reason, bits) = (
                                    client.clone(), resync.clone(), server.clone(), ctl.clone(),
                                    applied.clone(), timeline.clone(), busy.clone(), reason.clone(), budget_bits.clone(),
                                );
                                resync_task = Some(tokio::spawn(async move {
                                    let outcome = match client.desired_state().await {
                                        Ok(desired) => resync.apply(&client, &desired, &cur, &server, &ctl).await,
                                        Err(e) => Err(e),
                                    };
                                    match outcome {
                                        Ok(Some(rep)) => {
                                            println!(
                                                "re-synced to supernet {} (generation {} -> {}): serving {} (budget {:.3} ms){}",
                                                rep.applied.supernet_id,
                                                rep.from_generation,
                                                rep.applied.generation,
                                                server.active().subnet,
                                                rep.applied.plan.budget_ms,
                                                rep.switch.as_ref().map_or(String::new(), |s| format!("; loaded {}, reused {} modules", s.loaded, s.reused)),
                                            );
                                            bits.store(rep.applied.plan.budget_ms.to_bits(), std::sync::atomic::Ordering::Relaxed);
                                            reason.store(pb::AdaptationReason::NewSupernet as i32, std::sync::atomic::Ordering::Relaxed);
                                            timeline.note("resync");
                                            *applied.lock().unwrap_or_else(|e| e.into_inner()) = rep.applied;
                                        }
                                        Ok(None) => {}
                                        Err(e) => {
                                            eprintln!("re-sync failed, still serving the old subnet: {e}");
                                            timeline.note("resync_failed");
                                        }
                                    }
                                    busy.store(false, std::sync::atomic::Ordering::Release);
                                }));
                            }
                            if let Err(e) = client.flush_pending_report().await {
                                tracing::warn!("pending report not delivered: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("heartbeat failed, still serving: {e}"),
                    }
                    beats += 1;
                    if beats.is_multiple_of(report_every) && n > 0 {
                        let agg = aggregates(&applied.lock().unwrap_or_else(|e| e.into_inner()), &active, Some((n, p50, p95)), samples);
                        send_report(&client, &agg, &timeline).await;
                    }
                }
                if let Some(t) = resync_task {
                    t.abort();
                }
            })
        });
        if a.duration > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(a.duration)).await;
        } else {
            shutdown_signal().await?;
        }
        let _ = tx.send(true);
        let served = match worker {
            Some(w) => w.await??,
            None => 0,
        };
        let events = maint.await?;
        drift_task.abort();
        if let Some(t) = cloud_task {
            let _ = t.await;
        }
        if let Some(h) = api {
            h.shutdown().await;
        }
        let (n, p50, p95) = server.window_stats();
        let (requests, images) = server.served();
        println!(
            "served {served} images; live p50 {p50:.3} ms p95 {p95:.3} ms over {n} samples; {} switches; active {}; {requests} requests / {images} images in total",
            events.len(),
            server.active().subnet
        );
        println!("timeline: {}", timeline.path().display());
        Ok::<(), anyhow::Error>(())
    });
    if let Some(c) = contention {
        let work = c.stop();
        tracing::info!("contention: {work} matrix products");
    }
    result
}

fn demo_artifact(out: &Path, widths: &[usize], seed: u64) -> Result<()> {
    if widths.len() != 3 || widths.contains(&0) {
        bail!("--widths needs three positive stage widths, e.g. 16,32,64");
    }
    let arch = serde_json::json!({
        "family": "adaptivenet.resnet_small", "block": "basic", "layers": [3, 3, 3],
        "widths": widths, "in_channels": 1, "num_classes": 10
    });
    let arch = ArchDescriptor::from_json(arch.to_string().as_bytes())?;
    let oracle = Model::init(&arch.spec, seed)?;
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only())?;
    let input = InputSpec {
        shape: [1, 28, 28],
        // Untrained weights learnt no statistics: centre x / 255 generically.
        mean: vec![0.5],
        std: vec![0.25],
        class_names: FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let m = write_artifact(out, &sn, input, &"0".repeat(64), vec![])?;
    println!(
        "wrote {} ({} subnets, supernet {})",
        out.display(),
        m.subnet_count,
        m.supernet_id
    );
    Ok(())
}

/// Ctrl-C or SIGTERM (what containers, Kubernetes and systemd send): stop serving cleanly.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search_args(extra: &[&str]) -> SearchArgs {
        let mut argv = vec![
            "edge-agent",
            "search",
            "--artifact",
            "a",
            "--state",
            "s",
            "--data",
            "d",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parses").cmd {
            Cmd::Search(a) => a,
            _ => unreachable!("search subcommand"),
        }
    }

    #[test]
    fn budget_comes_from_the_flag_then_the_fleet_policy_then_the_default() {
        let policy = |ms: f64, fraction: f64| pb::LatencyBudgetPolicy {
            latency_budget_ms: ms,
            budget_fraction: fraction,
            hysteresis: 0.1,
        };
        let explicit = search_args(&["--budget", "0.5,12ms"]);
        assert_eq!(
            budget_specs(&explicit, Some(&policy(3.0, 0.7))),
            vec!["0.5", "12ms"]
        );
        let unset = search_args(&[]);
        assert_eq!(budget_specs(&unset, Some(&policy(3.0, 0.7))), vec!["3ms"]);
        assert_eq!(budget_specs(&unset, Some(&policy(0.0, 0.7))), vec!["0.7"]);
        assert_eq!(budget_specs(&unset, Some(&policy(0.0, 0.0))), vec!["0.6"]);
        assert_eq!(budget_specs(&unset, None), vec!["0.6"]);
        // Every spec the policy produces parses as a budget.
        for s in ["3ms", "0.7"] {
            adaptivenet_edge::search::Budget::parse(s).expect("valid budget");
        }
    }
}
