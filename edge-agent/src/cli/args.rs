//! The command line's flags (`profile`, `search`, `run`) and what they mean for a plan.
use std::path::PathBuf;

use adaptivenet_edge::adapt::contention::ContentionSpec;
use adaptivenet_edge::adapt::drift::DriftConfig;
use adaptivenet_edge::adapt::plan::PlanConfig;
use adaptivenet_edge::agent::policy_budgets;
use adaptivenet_edge::client::BudgetPolicy;
use adaptivenet_edge::quality::QualityMode;
use adaptivenet_edge::search::{RecalPick, SearchConfig, Speedups};
use adaptivenet_edge::serve::bn::{RecalScope, RecalSetting};
use clap::Args;

#[derive(Args, Clone)]
pub struct Common {
    /// Supernet artifact directory (manifest.json + blobs/); offline mode.
    #[arg(long, required_unless_present = "cloud", conflicts_with = "cloud")]
    pub artifact: Option<PathBuf>,
    /// Cloud endpoint (e.g. http://127.0.0.1:50051): enroll, sync the fleet's supernet into
    /// --cache, report aggregates.
    #[arg(long)]
    pub cloud: Option<String>,
    /// Enrollment token (needed once; later runs reuse the identity stored in --state).
    /// Visible in `ps` when given as a flag: prefer --enroll-token-file or the environment.
    #[arg(long, env = "ADAPTIVENET_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// File holding the enrollment token (surrounding whitespace ignored). Precedence: this
    /// file, then --enroll-token, then ADAPTIVENET_ENROLL_TOKEN.
    #[arg(long, env = "ADAPTIVENET_ENROLL_TOKEN_FILE")]
    pub enroll_token_file: Option<PathBuf>,
    /// Enroll afresh with the token even though --state holds an identity (replacing it),
    /// e.g. after moving to another --cloud: a stored identity is only ever sent to the
    /// endpoint that issued it.
    #[arg(long)]
    pub re_enroll: bool,
    /// Privacy floor: reports whose quality rests on fewer local images are withheld on the
    /// device (and noted in the timeline); the cloud's announced minimum applies if larger.
    #[arg(long, default_value_t = 100)]
    pub min_quality_samples: u64,
    /// Local supernet cache for cloud mode (default: <state>/cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Per-request deadline of cloud calls, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub cloud_timeout_ms: u64,
    /// CA certificate (PEM) that signed the cloud's certificate, for an https:// --cloud
    /// (builds with the `tls` feature).
    #[arg(long, env = "ADAPTIVENET_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Device certificate (PEM) for a cloud that requires mutual TLS (`--tls-client-ca`).
    #[arg(long, env = "ADAPTIVENET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "ADAPTIVENET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// State directory (latency table, search result, active subnet).
    #[arg(long)]
    pub state: PathBuf,
    /// Tensor worker threads (pinned before any computation; recorded in the table).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Deployment batch size.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

#[derive(Args, Clone)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub common: Common,
    /// Timed rounds per module (interleaved).
    #[arg(long, default_value_t = 40)]
    pub rounds: usize,
    /// Random subnets measured end to end to validate the table (0 skips validation).
    #[arg(long, default_value_t = 30)]
    pub validate: usize,
    /// Re-profile even if a table for this artifact exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Clone)]
pub struct SearchArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Local data: an IDX directory (Fashion-MNIST layout) or an ImageFolder tree.
    #[arg(long)]
    pub data: PathBuf,
    /// Budgets: fractions of the oracle's latency (0.6 or 0.6x) or milliseconds (12ms);
    /// comma-separated for several in one run. The first one is served by `run`. Default: the
    /// fleet's budget policy in cloud mode, else 0.6.
    #[arg(long, value_delimiter = ',')]
    pub budget: Vec<String>,
    /// Local images used for the search.
    #[arg(long, default_value_t = 500)]
    pub images: usize,
    #[arg(long, default_value_t = 64)]
    pub population: usize,
    #[arg(long, default_value_t = 8)]
    pub generations: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Quality = agreement with the oracle's predictions (no labels needed).
    #[arg(long)]
    pub label_free: bool,
    /// Plain EA: all four speed-ups off (for comparison).
    #[arg(long)]
    pub plain: bool,
    /// Turn racing off. Racing (beyond the paper) scores a candidate on a small subset first
    /// (100 images, then 200, 400, ...) and goes on only with those that can still reach the
    /// front; a raced-out
    /// subnet that could still become a parent is scored fully, so the search takes the same
    /// path and finds the same front, with fewer module passes.
    #[arg(long)]
    pub no_racing: bool,
    /// Racing is the default; accepted for older scripts.
    #[arg(long, hide = true, conflicts_with = "no_racing")]
    pub racing: bool,
    /// Evaluation workers for the search (images are split between them; the result does
    /// not depend on it). On 2 cores 1 is usually fastest for small models.
    #[arg(long, default_value_t = 1)]
    pub search_threads: usize,
    /// Memory (MiB) for activations kept between generations of the search, so a child does
    /// not recompute the prefix it shares with its parent. Changes the speed, never the
    /// result; 0 turns it off. Default: decided when the device is profiled (a quarter of
    /// the memory available then, if reading an activation back is cheaper than
    /// recomputing it; logged and sent in heartbeats).
    #[arg(long)]
    pub reuse_cache_mb: Option<usize>,
    /// Search again even if a stored result matches.
    #[arg(long)]
    pub research: bool,
}

#[derive(Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub search: SearchArgs,
    /// Cloud mode: milliseconds between heartbeats (default: the interval the cloud suggests).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Cloud mode: send an aggregate report every this many heartbeats (and once after search).
    #[arg(long, default_value_t = 10)]
    pub report_every: u32,
    /// Seconds to serve (0 = until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub duration: u64,
    /// Milliseconds between maintenance checks.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Serve the local gRPC inference API (adaptivenet.v1.EdgeInference) on this address,
    /// e.g. 127.0.0.1:50061 (port 0 picks a free one; the address is printed). Off if unset.
    #[arg(long)]
    pub listen: Option<String>,
    /// Largest batch the local API accepts.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Local API: file holding a token that callers must send as `authorization: Bearer
    /// <token>` (UNAUTHENTICATED otherwise). Without it anyone who can reach --listen may
    /// use the API, so a non-loopback --listen warns.
    #[arg(long)]
    pub listen_token_file: Option<PathBuf>,
    /// Local API: most inference requests served at once; more are refused at once with
    /// RESOURCE_EXHAUSTED (HTTP 429), not queued.
    #[arg(long, default_value_t = 4)]
    pub listen_max_concurrent: usize,
    /// Rotate <state>/timeline.jsonl when it would grow past this many MiB...
    #[arg(long, default_value_t = 8)]
    pub timeline_max_mb: u64,
    /// ...keeping this many rotated files (timeline.jsonl.1 is the newest).
    #[arg(long, default_value_t = 4)]
    pub timeline_keep: usize,
    /// Do not replay the local data as request traffic (only API requests feed the window).
    #[arg(long)]
    pub no_replay: bool,
    /// Background load for the contention demo: INTENSITY[:START_S:DURATION_S], busy
    /// threads (fractional = duty cycle) from START_S for DURATION_S seconds after serving
    /// starts (default: from 0 until the end). The timeline goes to <state>/timeline.jsonl.
    #[arg(long)]
    pub contention: Option<ContentionSpec>,
    /// Re-profile and re-search (warm-started, same budget in ms) when live latency stays
    /// more than this fraction off the latency table's prediction...
    #[arg(long, default_value_t = DriftConfig::default().threshold)]
    pub drift_threshold: f64,
    /// ...for this many consecutive maintenance windows (0: never re-profile on drift).
    #[arg(long, default_value_t = DriftConfig::default().windows)]
    pub drift_windows: usize,
    /// BN recalibration of the served subnet on the local images (beyond the paper):
    /// `all` re-estimates the BN statistics of every module on the path, `branches` only the
    /// branches'; `auto` is `all`, kept only where it does not lower the subnet's quality on
    /// those images (labels, or agreement with the oracle with --label-free): statistics
    /// fitted to a device that sees few classes can cost tens of points. Every later switch
    /// recalibrates (and checks) its target too.
    #[arg(long, value_enum, default_value_t = BnRecal::Off)]
    pub bn_recal: BnRecal,
    /// With --bn-recal: re-score the search's best K candidates per budget with their BN
    /// recalibrated as they will serve, and serve the best re-scored one (default 4; 0 or 1
    /// serves the search's pick). The search ranks by the shipped statistics, which fit some
    /// paths far worse than others, so its pick is not the best subnet once recalibrated.
    /// Costs one recalibration and one scoring pass over the search images per candidate.
    // Hyphen values are taken as the value, so `--recal-pick -1` is refused naming the flag.
    #[arg(long, value_name = "K", allow_hyphen_values = true)]
    pub recal_pick: Option<usize>,
}

impl RunArgs {
    /// `--recal-pick` for the plan: `None` without --bn-recal (the search's result is
    /// then what it always was); refused when set explicitly without --bn-recal.
    pub fn recal_pick(&self, mode: QualityMode) -> anyhow::Result<Option<RecalPick>> {
        let setting = self.bn_recal.setting(mode);
        match (self.recal_pick, setting) {
            (Some(k), None) => anyhow::bail!(
                "--recal-pick {k} re-scores candidates with recalibrated BN statistics: it \
                 needs --bn-recal branches, all or auto"
            ),
            (k, Some(setting)) => Ok(Some(RecalPick {
                k: k.unwrap_or(DEFAULT_RECAL_PICK),
                setting,
            })
            .filter(|p| p.k >= 2)),
            (None, None) => Ok(None),
        }
    }
}

/// `--recal-pick`'s default: a few candidates, since each costs a recalibration and a
/// scoring pass over the search images.
pub const DEFAULT_RECAL_PICK: usize = 4;

/// `--bn-recal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BnRecal {
    Off,
    Auto,
    Branches,
    All,
}

impl BnRecal {
    /// What the server applies: scope, and the guard's targets for `auto` (labels, or the
    /// oracle's top-1 for a label-free agent).
    pub fn setting(self, mode: QualityMode) -> Option<RecalSetting> {
        let scope = match self {
            BnRecal::Off => return None,
            BnRecal::Branches => RecalScope::Branches,
            BnRecal::All | BnRecal::Auto => RecalScope::All,
        };
        Some(RecalSetting {
            scope,
            guard: (self == BnRecal::Auto).then_some(mode),
        })
    }
}

#[derive(Args, Clone)]
pub struct EvaluateArgs {
    /// The agent's state directory (its stored search result).
    #[arg(long)]
    pub state: PathBuf,
    /// Supernet artifact directory (default: the supernet the agent last synced into --cache).
    #[arg(long)]
    pub artifact: Option<PathBuf>,
    /// Local supernet cache of a cloud-mode agent (default: <state>/cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Labelled local data: an IDX directory or an ImageFolder tree (folders named by the
    /// model's class names, or by class index).
    #[arg(long)]
    pub data: PathBuf,
    /// The agent searched label-free (its `--bn-recal auto` guard used the oracle's top-1).
    #[arg(long)]
    pub label_free: bool,
    /// The agent's `--bn-recal`, reproduced so the subnets are scored as they serve.
    #[arg(long, value_enum, default_value_t = BnRecal::Off)]
    pub bn_recal: BnRecal,
    /// Tensor worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print the result as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn profile_config(a: &ProfileArgs) -> PlanConfig {
    PlanConfig {
        threads: a.common.threads,
        batch: a.common.batch,
        rounds: a.rounds,
        validate: a.validate,
        force_profile: a.force,
        search: SearchConfig::default(),
        reuse_from_profile: true,
        budgets: Vec::new(),
        data: PathBuf::new(),
        images: 0,
        mode: QualityMode::Labelled,
        research: false,
        clamp_budgets: false,
    }
}

pub fn plan_config(a: &SearchArgs) -> PlanConfig {
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
            reuse_cache_bytes: a
                .reuse_cache_mb
                .map_or(SearchConfig::default().reuse_cache_bytes, |mb| mb << 20),
            ..SearchConfig::default()
        },
        reuse_from_profile: a.reuse_cache_mb.is_none(),
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

/// The budgets to search for: `--budget` if given, else the fleet's policy (cloud mode: a
/// latency in ms, or a fraction of the oracle's latency on this device), else 0.6.
pub fn budget_specs(a: &SearchArgs, policy: Option<&BudgetPolicy>) -> Vec<String> {
    if !a.budget.is_empty() {
        return a.budget.clone();
    }
    policy_budgets(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Cmd};
    use clap::Parser;

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
        let policy = |ms: f64, fraction: f64| BudgetPolicy {
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
