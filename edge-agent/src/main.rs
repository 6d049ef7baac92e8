//! `edge-agent`: profile, search, serve and adapt a subnet on this device, from a local
//! artifact directory or from the cloud (enroll once, sync the fleet's supernet, report
//! aggregates). Errors print a one-line cause chain and exit non-zero.
//!
//! The binary's own modules are in `cli/`: flags, the artifact source, the one-shot
//! commands and `run`, which starts [`adaptivenet_edge::agent::Agent`].
mod cli;

use std::path::PathBuf;

use adaptivenet_edge::profile::pin_threads;
use anyhow::Result;
use clap::{Parser, Subcommand};

use cli::args::{budget_specs, EvaluateArgs, ProfileArgs, RunArgs, SearchArgs};
use cli::commands::{
    demo_artifact, ensure_search, ensure_table, evaluate, print_search, print_table,
};
use cli::source::open_source;

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
    /// Score the stored plan against the labels of local data, on this device: the chosen
    /// subnet per budget as it serves, the oracle, and the front's best by labels (beside the
    /// label-free agreement the search ranked by). Nothing is sent anywhere.
    Evaluate(EvaluateArgs),
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
        Cmd::Evaluate(e) => e.threads,
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
        Cmd::Run(a) => cli::run::run(a),
        Cmd::Evaluate(a) => evaluate(&a),
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
