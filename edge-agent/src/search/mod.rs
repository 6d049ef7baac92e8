//! On-device evolutionary search (METHOD.md §2) with the four edge speed-ups, and racing.
//!
//! One file per concern, each naming the invariant it keeps:
//! - `config.rs`: which speed-ups run, the budget, the evolutionary and racing settings;
//! - `evolve.rs`: the loop ([`search`], [`search_from`]): populations, parents, children,
//!   the answers;
//! - `archive.rs`: every subnet scored in a run, shared by all budgets, and the evaluation cache
//!   in front of the evaluators;
//! - `racing.rs`: scoring on doubling image subsets and dropping what cannot reach the front,
//!   without steering the search;
//! - `pareto.rs`: fitness, the Pareto front and the best subnet per budget;
//! - `recal.rs`: the recal pick, each budget's best few re-scored with BN recalibrated as
//!   they would serve;
//! - [`prefix`]: evaluating many subnets as a prefix tree, on workers, with the
//!   cross-generation cache; [`ops`]: mutation, crossover, repair, compensation.
//!
//! Results: the best subnet per budget (always valid and within budget per the table) and the
//! Pareto front over every fully evaluated subnet. A seed reproduces the same evaluations and
//! results, whatever the number of worker threads.
mod archive;
mod config;
mod evolve;
pub mod ops;
mod pareto;
pub mod prefix;
mod racing;
mod recal;
#[cfg(test)]
mod testing;

use adaptivenet_core::supernet::Subnet;
use serde::{Deserialize, Serialize};

pub use config::{Budget, RecalPick, SearchConfig, Speedups};
pub use evolve::{search, search_from, search_keeping};
pub use pareto::{best_within, fitness, pareto_front, top_within};
pub use prefix::{
    evaluate_each, evaluate_masks, evaluate_masks_reusing, evaluate_prefix, EvalStats, Masks,
    Method, ReuseCache,
};
pub use racing::race_keeps;
pub use recal::recal_pick;

/// An evaluated subnet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub subnet: Subnet,
    /// Calibrated table latency.
    pub latency_ms: f64,
    /// Local quality in percent.
    pub quality: f64,
}

/// The best subnet found for one budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetResult {
    pub budget_ms: f64,
    pub best: Candidate,
}

/// Work and time of a search.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchStats {
    /// Distinct subnets scored (fully or, with racing, on the subset only).
    pub evaluations: usize,
    /// Of those, subnets dropped by racing (after any round).
    #[serde(default)]
    pub raced_out: usize,
    /// Of the raced-out, those dropped in a later round than the first.
    #[serde(default)]
    pub raced_out_later: usize,
    /// Raced-out subnets scored fully later (candidate parents, or a guaranteed answer).
    #[serde(default)]
    pub rescored: usize,
    /// Block-module forward calls in equivalent passes over the whole set.
    pub module_applications: usize,
    /// Most bytes the cross-generation prefix cache held.
    #[serde(default)]
    pub peak_reuse_bytes: usize,
    pub seconds: f64,
    pub evals_per_s: f64,
    /// Local images every full score was computed on: the sample count behind a reported
    /// quality (0 in results stored before it was recorded).
    #[serde(default)]
    pub images: usize,
}

/// The outcome of one search run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    pub best: Vec<BudgetResult>,
    /// Pareto front by increasing latency (and strictly increasing quality).
    pub front: Vec<Candidate>,
    pub stats: SearchStats,
}
