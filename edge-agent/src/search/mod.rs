//! On-device evolutionary search (METHOD.md §2) with the four edge speed-ups.
//!
//! Fitness is the local quality when the table latency fits the budget, else
//! `quality/100 - latency/budget` (negative, so below every feasible subnet). Each generation
//! keeps the top `parent_frac` as parents and fills the rest with children, half by mutation
//! and half by one-point crossover, all span-repaired; a global archive of evaluated codes
//! prevents repeats and is shared by all budgets of one run. Results: the best subnet per
//! budget (always valid and within budget per the table) and the Pareto front over every
//! evaluated subnet.
//!
//! Determinism: one ChaCha8 stream per budget from the seed, ordered containers only, so a
//! seed reproduces the same evaluations and results.
pub mod ops;
pub mod prefix;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use adaptivenet_core::supernet::{Subnet, Supernet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::profile::LatencyTable;
use crate::quality::EvalSet;
use crate::{EdgeError, Result};

pub use prefix::{evaluate_each, evaluate_prefix, EvalStats};

/// Which of the four speed-ups are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Speedups {
    pub stem_cache: bool,
    pub guided_init: bool,
    pub latency_preserving: bool,
    pub prefix_reuse: bool,
}

impl Speedups {
    pub fn all() -> Self {
        Speedups {
            stem_cache: true,
            guided_init: true,
            latency_preserving: true,
            prefix_reuse: true,
        }
    }

    /// The plain EA of the research code, for comparison.
    pub fn none() -> Self {
        Speedups {
            stem_cache: false,
            guided_init: false,
            latency_preserving: false,
            prefix_reuse: false,
        }
    }
}

/// A latency budget.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// A fraction of the oracle's latency per the (calibrated) table.
    Fraction(f64),
    Ms(f64),
}

impl Budget {
    /// Parses `0.6` (fraction, `< 2` without unit), `0.6x` or `12ms`.
    pub fn parse(s: &str) -> Result<Budget> {
        let s = s.trim();
        let num = |t: &str| {
            t.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| {
                    EdgeError::config(
                        "budget",
                        format!("{s:?} is not a positive number (use 0.6, 0.6x or 12ms)"),
                    )
                })
        };
        if let Some(ms) = s.strip_suffix("ms") {
            Ok(Budget::Ms(num(ms)?))
        } else if let Some(f) = s.strip_suffix('x') {
            Ok(Budget::Fraction(num(f)?))
        } else {
            let v = num(s)?;
            if v < 2.0 {
                Ok(Budget::Fraction(v))
            } else {
                Err(EdgeError::config(
                    "budget",
                    format!("{s:?} is ambiguous: write {s}ms or a fraction below 2"),
                ))
            }
        }
    }

    /// The budget in ms for a table.
    pub fn resolve(self, table: &LatencyTable, n_positions: usize) -> Result<f64> {
        Ok(match self {
            Budget::Ms(ms) => ms,
            Budget::Fraction(f) => f * table.predict_ms(&Subnet::original(n_positions))?,
        })
    }
}

/// Search settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    pub population: usize,
    pub generations: usize,
    /// Share of the population kept as parents (0.25-0.4).
    pub parent_frac: f64,
    /// Per-position re-draw probability of a mutation.
    pub mutation_prob: f64,
    pub seed: u64,
    pub speedups: Speedups,
    /// Latency band of the guided initial population, as fractions of the budget.
    pub band: (f64, f64),
    /// Bound on activations cached by prefix reuse.
    pub max_cache_bytes: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            population: 64,
            generations: 8,
            parent_frac: 0.3,
            mutation_prob: 0.1,
            seed: 0,
            speedups: Speedups::all(),
            band: (0.8, 1.0),
            max_cache_bytes: 256 << 20,
        }
    }
}

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
    pub evaluations: usize,
    pub module_applications: usize,
    pub seconds: f64,
    pub evals_per_s: f64,
}

/// The outcome of one search run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    pub best: Vec<BudgetResult>,
    /// Pareto front by increasing latency (and strictly increasing quality).
    pub front: Vec<Candidate>,
    pub stats: SearchStats,
}

/// Fitness of a subnet under a budget (see the module docs).
pub fn fitness(quality: f64, latency_ms: f64, budget_ms: f64) -> f64 {
    if latency_ms <= budget_ms {
        quality
    } else {
        quality / 100.0 - latency_ms / budget_ms
    }
}

/// The non-dominated candidates, by increasing latency with strictly increasing quality.
pub fn pareto_front(all: &[Candidate]) -> Vec<Candidate> {
    let mut v: Vec<&Candidate> = all.iter().collect();
    v.sort_by(|a, b| {
        a.latency_ms
            .total_cmp(&b.latency_ms)
            .then(b.quality.total_cmp(&a.quality))
            .then(a.subnet.cmp(&b.subnet))
    });
    let mut out: Vec<Candidate> = Vec::new();
    for c in v {
        if out.last().is_none_or(|l| c.quality > l.quality) {
            out.push(c.clone());
        }
    }
    out
}

/// The most accurate candidate within a budget (ties: cheaper, then smaller code).
pub fn best_within(all: &[Candidate], budget_ms: f64) -> Option<Candidate> {
    all.iter()
        .filter(|c| c.latency_ms <= budget_ms)
        .max_by(|a, b| {
            a.quality
                .total_cmp(&b.quality)
                .then(b.latency_ms.total_cmp(&a.latency_ms))
                .then(b.subnet.cmp(&a.subnet))
        })
        .cloned()
}

/// Evaluated subnets of a run: code → (latency, quality).
struct Archive<'a> {
    supernet: &'a Supernet,
    table: &'a LatencyTable,
    set: &'a EvalSet,
    cfg: &'a SearchConfig,
    scores: BTreeMap<Subnet, (f64, f64)>,
    stats: SearchStats,
}

impl Archive<'_> {
    fn evaluate(&mut self, subnets: Vec<Subnet>) -> Result<()> {
        let new: Vec<Subnet> = subnets
            .into_iter()
            .filter(|s| !self.scores.contains_key(s))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let sp = self.cfg.speedups;
        let (q, st) = if sp.prefix_reuse {
            evaluate_prefix(self.supernet, self.set, &new, self.cfg.max_cache_bytes)?
        } else {
            evaluate_each(self.supernet, self.set, &new, sp.stem_cache)?
        };
        self.stats.evaluations += new.len();
        self.stats.module_applications += st.module_applications;
        for (s, q) in new.into_iter().zip(q) {
            let lat = self.table.predict_ms(&s)?;
            self.scores.insert(s, (lat, q));
        }
        Ok(())
    }

    fn fit(&self, s: &Subnet, budget: f64) -> f64 {
        let (l, q) = self.scores[s];
        fitness(q, l, budget)
    }

    fn candidates(&self) -> Vec<Candidate> {
        self.scores
            .iter()
            .map(|(s, &(latency_ms, quality))| Candidate {
                subnet: s.clone(),
                latency_ms,
                quality,
            })
            .collect()
    }
}

/// Runs the search for every budget (ms) with one shared archive. `progress(done, total)` is
/// called after every generation.
pub fn search(
    supernet: &Supernet,
    table: &LatencyTable,
    set: &EvalSet,
    budgets_ms: &[f64],
    cfg: &SearchConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<SearchResult> {
    let spec = &supernet.spec;
    table.check(spec)?;
    if cfg.population < 2 || !(0.0..1.0).contains(&cfg.parent_frac) {
        return Err(EdgeError::config(
            "search",
            "population >= 2 and 0 <= parent_frac < 1 required",
        ));
    }
    if budgets_ms.is_empty() {
        return Err(EdgeError::config(
            "budget",
            "at least one budget is required",
        ));
    }
    let (cheapest, _) = table.latency_range(spec)?;
    for &b in budgets_ms {
        if b.is_nan() || b < cheapest {
            return Err(EdgeError::BudgetTooLow {
                budget_ms: b,
                cheapest_ms: cheapest,
            });
        }
    }
    let start = Instant::now();
    let mut arch = Archive {
        supernet,
        table,
        set,
        cfg,
        scores: BTreeMap::new(),
        stats: SearchStats::default(),
    };
    let n = spec.num_positions();
    arch.evaluate(vec![Subnet::original(n)])?;
    let total = budgets_ms.len() * (cfg.generations + 1);
    let mut done = 0;
    for (bi, &budget) in budgets_ms.iter().enumerate() {
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed ^ (bi as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Initial population.
        let mut pop = BTreeSet::new();
        let (lo, hi) = (cfg.band.0 * budget, cfg.band.1 * budget);
        let mut tries = 0;
        while pop.len() < cfg.population && tries < 50 * cfg.population {
            tries += 1;
            let s = if cfg.speedups.guided_init {
                let s = ops::sample_in_band(spec, table, lo, hi, &mut rng)?;
                let l = table.predict_ms(&s)?;
                if (l < lo || l > hi) && tries < 25 * cfg.population {
                    continue;
                }
                s
            } else {
                spec.sample(&mut rng, false)?
            };
            pop.insert(s);
        }
        let mut pop: Vec<Subnet> = pop.into_iter().collect();
        arch.evaluate(pop.clone())?;
        done += 1;
        progress(done, total);
        for _ in 0..cfg.generations {
            pop.sort_by(|a, b| {
                arch.fit(b, budget)
                    .total_cmp(&arch.fit(a, budget))
                    .then(arch.scores[a].0.total_cmp(&arch.scores[b].0))
                    .then(a.cmp(b))
            });
            let k = ((cfg.parent_frac * cfg.population as f64).round() as usize)
                .clamp(2, pop.len().max(2));
            pop.truncate(k);
            let parents = pop.clone();
            let n_child = cfg.population.saturating_sub(parents.len());
            let mut children = BTreeSet::new();
            for c in 0..n_child {
                for _attempt in 0..30 {
                    let child = if c % 2 == 0 || parents.len() < 2 {
                        let p = &parents[rng.random_range(0..parents.len())];
                        let (mut child, frozen) = ops::mutate(spec, p, cfg.mutation_prob, &mut rng);
                        if cfg.speedups.latency_preserving {
                            let d = table.predict_ms(&child)? - arch.scores[p].0;
                            if d.abs() > 0.01 * budget {
                                ops::compensate(spec, table, &mut child, d, &frozen)?;
                            }
                        }
                        child
                    } else {
                        let i = rng.random_range(0..parents.len());
                        let mut j = rng.random_range(0..parents.len() - 1);
                        if j >= i {
                            j += 1;
                        }
                        ops::crossover(spec, &parents[i], &parents[j], &mut rng)
                    };
                    if !arch.scores.contains_key(&child) && !children.contains(&child) {
                        children.insert(child);
                        break;
                    }
                }
            }
            let children: Vec<Subnet> = children.into_iter().collect();
            arch.evaluate(children.clone())?;
            pop.extend(children);
            done += 1;
            progress(done, total);
        }
    }
    // Guarantee a feasible answer for every budget: the cheapest subnet fits any budget that
    // passed the check above.
    if budgets_ms
        .iter()
        .any(|&b| best_within(&arch.candidates(), b).is_none())
    {
        arch.evaluate(vec![ops::cheapest(spec, table)?])?;
    }
    let all = arch.candidates();
    let mut best = Vec::new();
    for &b in budgets_ms {
        let c = best_within(&all, b).ok_or(EdgeError::BudgetTooLow {
            budget_ms: b,
            cheapest_ms: cheapest,
        })?;
        best.push(BudgetResult {
            budget_ms: b,
            best: c,
        });
    }
    let mut stats = arch.stats;
    stats.seconds = start.elapsed().as_secs_f64();
    stats.evals_per_s = stats.evaluations as f64 / stats.seconds.max(1e-9);
    Ok(SearchResult {
        best,
        front: pareto_front(&all),
        stats,
    })
}
