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
//! **Racing** (beyond the paper, [`Speedups::racing`]): once the archive holds fully
//! evaluated subnets, a new candidate is first scored on the first `race_images` images only
//! and compared *pairwise* (same images) with the reference it must beat to enter the Pareto
//! front: the best fully evaluated subnet at no higher latency. If even an upper confidence
//! bound (`race_z` standard errors) on its full-set advantage is negative, it stops there and
//! keeps an estimated quality (below the reference's) and its upper bound; it never enters
//! the front or a best-per-budget answer. Survivors race on in rounds over twice as many
//! images (`race_images`, 2x, 4x, ..., all), the bound tightening as the images grow, and only
//! those still in reach at the last round are scored on every image. Candidates with no
//! reference (faster than every fully scored subnet, such as the initial population) are
//! seeded: every fourth of them in latency order is scored fully first, and the rest race
//! against those. Pairwise
//! comparison is what makes a 100-image subset informative: two subnets of one supernet
//! disagree on few images, so the noise is that of the disagreements, not of accuracy.
//! Racing must not steer the search: at parent selection a raced-out member whose upper
//! bound reaches the parents' cut is scored fully first (on the images it has not seen), so
//! the parents, hence every later generation, are those full scores would give unless a race
//! verdict was wrong.
//!
//! Determinism: one ChaCha8 stream per budget from the seed, ordered containers only, and
//! evaluation results that do not depend on the number of worker threads, so a seed
//! reproduces the same evaluations and results.
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

pub use prefix::{
    evaluate_each, evaluate_masks, evaluate_masks_reusing, evaluate_prefix, EvalStats, Masks,
    Method, ReuseCache,
};

/// Which speed-ups are on: the paper's four, and racing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Speedups {
    pub stem_cache: bool,
    pub guided_init: bool,
    pub latency_preserving: bool,
    pub prefix_reuse: bool,
    /// Score on a subset first, the full set only for candidates that can reach the front.
    #[serde(default)]
    pub racing: bool,
}

impl Speedups {
    pub fn all() -> Self {
        Speedups {
            stem_cache: true,
            guided_init: true,
            latency_preserving: true,
            prefix_reuse: true,
            racing: true,
        }
    }

    /// The plain EA of the research code, for comparison.
    pub fn none() -> Self {
        Speedups {
            stem_cache: false,
            guided_init: false,
            latency_preserving: false,
            prefix_reuse: false,
            racing: false,
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
    /// Bound on activations cached by prefix reuse within a generation.
    pub max_cache_bytes: usize,
    /// Bound on activations kept across generations for prefix reuse (children re-use their
    /// parent's prefix); 0 turns it off. Results are the same either way.
    #[serde(default = "default_reuse_cache_bytes")]
    pub reuse_cache_bytes: usize,
    /// Evaluation workers (the images are split between them; results do not depend on it).
    #[serde(default = "one")]
    pub threads: usize,
    /// Racing: images of the first, pairwise-compared round (each later round doubles them).
    #[serde(default = "default_race_images")]
    pub race_images: usize,
    /// Racing: standard errors of optimism before a candidate is dropped.
    #[serde(default = "default_race_z")]
    pub race_z: f64,
    /// Racing: of the new candidates without a reference (faster than every fully scored
    /// subnet), one in this many, in latency order, is scored fully first and the others race
    /// against those; 1 scores them all fully.
    #[serde(default = "default_race_seed_every")]
    pub race_seed_every: usize,
}

fn one() -> usize {
    1
}

fn default_reuse_cache_bytes() -> usize {
    256 << 20
}

fn default_race_images() -> usize {
    100
}

fn default_race_z() -> f64 {
    2.5
}

/// A quarter of an initial population scored in full gives each of the rest a reference at a
/// nearby latency.
fn default_race_seed_every() -> usize {
    4
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
            reuse_cache_bytes: default_reuse_cache_bytes(),
            threads: 1,
            race_images: default_race_images(),
            race_z: default_race_z(),
            race_seed_every: default_race_seed_every(),
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

/// What the archive knows about one scored subnet.
struct Entry {
    latency: f64,
    /// Percent; for a raced-out subnet an estimate below its reference's quality.
    quality: f64,
    /// Upper confidence bound of the quality (percent): `quality` when scored fully.
    upper: f64,
    /// Scored on every image (only these enter the front and the answers).
    full: bool,
    /// Per-image correctness on the images it was scored on (from image 0).
    mask: Vec<bool>,
}

/// Whether a candidate can still beat its reference on the full set, judged from the first
/// `mask.len()` images compared pairwise: `ahead` = images it gets right and the reference
/// wrong, `behind` the reverse. The remaining `rest` images are extrapolated with an upper
/// confidence bound of `z` standard errors (disagreement rates smoothed by half an image so
/// a clean subset still leaves room for doubt). Returns (can reach, estimated full-set
/// difference in images).
pub fn race_keeps(ahead: usize, behind: usize, subset: usize, rest: usize, z: f64) -> (bool, f64) {
    let (keep, estimate, _) = race_bounds(ahead, behind, subset, rest, z);
    (keep, estimate)
}

/// [`race_keeps`] with the upper confidence bound of the difference (images) as well.
fn race_bounds(
    ahead: usize,
    behind: usize,
    subset: usize,
    rest: usize,
    z: f64,
) -> (bool, f64, f64) {
    let r = subset.max(1) as f64;
    let pa = (ahead as f64 + 0.5) / (r + 1.0);
    let pb = (behind as f64 + 0.5) / (r + 1.0);
    let mu = pa - pb;
    let var = (pa + pb - mu * mu).max(0.0);
    let rest = rest as f64;
    let seen = ahead as f64 - behind as f64;
    let estimate = seen + rest * (ahead as f64 - behind as f64) / r;
    let ucb = seen + rest * mu + z * rest * (var * (1.0 / r + 1.0 / rest.max(1.0))).sqrt();
    (ucb > 0.0, estimate, ucb)
}

/// Scored subnets of a run, shared by all budgets.
struct Archive<'a> {
    supernet: &'a Supernet,
    table: &'a LatencyTable,
    set: &'a EvalSet,
    cfg: &'a SearchConfig,
    scores: BTreeMap<Subnet, Entry>,
    stats: SearchStats,
    /// Cross-generation prefix reuse (with `prefix_reuse` and a non-zero bound).
    reuse: Option<ReuseCache>,
    /// Module calls times images, over the run.
    image_module_calls: u64,
}

impl Archive<'_> {
    fn method(&self) -> Method {
        let sp = self.cfg.speedups;
        if sp.prefix_reuse {
            Method::Prefix {
                max_cache_bytes: self.cfg.max_cache_bytes,
            }
        } else {
            Method::Each {
                from_stem: sp.stem_cache,
            }
        }
    }

    fn masks(&mut self, subnets: &[Subnet], range: std::ops::Range<usize>) -> Result<Masks> {
        let (m, st) = evaluate_masks_reusing(
            self.supernet,
            self.set,
            subnets,
            range,
            self.method(),
            self.cfg.threads.max(1),
            self.reuse.as_mut(),
        )?;
        // Summed exactly, then converted: racing's many small calls would add up rounding.
        self.image_module_calls += st.image_module_calls;
        self.stats.module_applications =
            (self.image_module_calls as f64 / self.set.len.max(1) as f64).round() as usize;
        self.stats.peak_reuse_bytes = self.stats.peak_reuse_bytes.max(st.reuse_cached_bytes);
        Ok(m)
    }

    /// The racing reference of a latency: the best fully scored subnet no slower.
    fn reference(&self, latency: f64) -> Option<&Entry> {
        self.scores
            .values()
            .filter(|e| e.full && e.latency <= latency)
            .max_by(|a, b| a.quality.total_cmp(&b.quality))
    }

    fn full_entry(&self, latency: f64, mask: Vec<bool>) -> Entry {
        let correct = mask.iter().filter(|&&c| c).count();
        let quality = self.set.percent(correct);
        Entry {
            latency,
            quality,
            upper: quality,
            full: true,
            mask,
        }
    }

    /// Scores the subnets not scored yet (with `force_full`, also completes raced-out ones on
    /// the images they have not seen).
    fn evaluate(&mut self, subnets: Vec<Subnet>, force_full: bool) -> Result<()> {
        let new: Vec<Subnet> = subnets
            .into_iter()
            .filter(|s| self.scores.get(s).is_none_or(|e| force_full && !e.full))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let n = self.set.len;
        let r = self.cfg.race_images.min(n);
        let (partial, new): (Vec<Subnet>, Vec<Subnet>) =
            new.into_iter().partition(|s| self.scores.contains_key(s));
        if !partial.is_empty() {
            // Raced out earlier, in some round: the images up to their mask's length are
            // already scored. Grouped by that length, each group gets the rest in one pass.
            self.stats.rescored += partial.len();
            let mut by_seen: BTreeMap<usize, Vec<Subnet>> = BTreeMap::new();
            for s in partial {
                by_seen
                    .entry(self.scores[&s].mask.len())
                    .or_default()
                    .push(s);
            }
            for (seen, group) in by_seen {
                let rest = self.masks(&group, seen..n)?;
                for (s, tail) in group.into_iter().zip(rest) {
                    let e = &self.scores[&s];
                    let mut m = e.mask.clone();
                    m.extend(tail);
                    let e = self.full_entry(e.latency, m);
                    self.scores.insert(s, e);
                }
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        let lat = new
            .iter()
            .map(|s| self.table.predict_ms(s))
            .collect::<Result<Vec<_>>>()?;
        self.stats.evaluations += new.len();
        let race = self.cfg.speedups.racing
            && !force_full
            && r > 0
            && r < n
            && self.scores.values().any(|e| e.full);
        if !race {
            let m = self.masks(&new, 0..n)?;
            for ((s, l), m) in new.into_iter().zip(lat).zip(m) {
                let e = self.full_entry(l, m);
                self.scores.insert(s, e);
            }
            return Ok(());
        }
        // Candidates faster than every fully scored subnet have no reference to race
        // against (the whole initial population: the oracle is the slowest). Every
        // `race_seed_every`-th of them in latency order, the fastest first, is scored fully
        // first, in one pass; then each of the others has a reference no slower than itself,
        // at a nearby latency, and races.
        let mut alive: Vec<usize> = (0..new.len()).collect();
        let mut no_ref: Vec<usize> = (0..new.len())
            .filter(|&k| self.reference(lat[k]).is_none())
            .collect();
        if !no_ref.is_empty() {
            no_ref.sort_by(|&a, &b| lat[a].total_cmp(&lat[b]).then(new[a].cmp(&new[b])));
            let seeds: BTreeSet<usize> = no_ref
                .into_iter()
                .step_by(self.cfg.race_seed_every.max(1))
                .collect();
            let subs: Vec<Subnet> = seeds.iter().map(|&k| new[k].clone()).collect();
            let m = self.masks(&subs, 0..n)?;
            for (&k, m) in seeds.iter().zip(m) {
                let e = self.full_entry(lat[k], m);
                self.scores.insert(new[k].clone(), e);
            }
            alive.retain(|k| !seeds.contains(k));
            if alive.is_empty() {
                return Ok(());
            }
        }
        // Rounds over growing prefixes of the set (r, 2r, 4r, ..., n): after each, the
        // candidates that can no longer reach their reference stop; the rest go on.
        let mut masks: Vec<Vec<bool>> = vec![Vec::new(); new.len()];
        let (mut lo, mut hi) = (0, r);
        loop {
            let subs: Vec<Subnet> = alive.iter().map(|&k| new[k].clone()).collect();
            let part = self.masks(&subs, lo..hi)?;
            for (&k, p) in alive.iter().zip(part) {
                masks[k].extend(p);
            }
            if hi == n {
                break;
            }
            let mut next = Vec::with_capacity(alive.len());
            for &k in &alive {
                match self.race_verdict(&masks[k], lat[k]) {
                    Some((false, est, upper)) => {
                        self.stats.raced_out += 1;
                        self.stats.raced_out_later += usize::from(lo > 0);
                        self.scores.insert(
                            new[k].clone(),
                            Entry {
                                latency: lat[k],
                                quality: est,
                                upper,
                                full: false,
                                mask: std::mem::take(&mut masks[k]),
                            },
                        );
                    }
                    _ => next.push(k),
                }
            }
            alive = next;
            if alive.is_empty() {
                break;
            }
            (lo, hi) = (hi, (hi * 2).min(n));
        }
        for k in alive {
            let e = self.full_entry(lat[k], std::mem::take(&mut masks[k]));
            self.scores.insert(new[k].clone(), e);
        }
        Ok(())
    }

    /// The race verdict of a candidate scored on the first `mask.len()` images against its
    /// reference: (can still reach it, estimated quality, upper bound of the quality), both
    /// in percent over the whole set; `None` without a reference.
    fn race_verdict(&self, mask: &[bool], latency: f64) -> Option<(bool, f64, f64)> {
        let n = self.set.len;
        let seen = mask.len();
        self.reference(latency).map(|rf| {
            let ahead = mask
                .iter()
                .zip(&rf.mask)
                .filter(|(a, b)| **a && !**b)
                .count();
            let behind = mask
                .iter()
                .zip(&rf.mask)
                .filter(|(a, b)| !**a && **b)
                .count();
            let (keep, est, ucb) = race_bounds(ahead, behind, seen, n - seen, self.cfg.race_z);
            let per_image = 100.0 / n as f64;
            (
                keep,
                rf.quality + per_image * est,
                rf.quality + per_image * ucb,
            )
        })
    }

    /// Scores raced-out `subnets` on one more round of images (twice those seen, in groups
    /// by that count) and updates their estimate and upper bound; those reaching the last
    /// image become fully scored.
    fn extend(&mut self, subnets: Vec<Subnet>) -> Result<()> {
        let n = self.set.len;
        let mut by_seen: BTreeMap<usize, Vec<Subnet>> = BTreeMap::new();
        for s in subnets {
            let e = &self.scores[&s];
            if !e.full {
                by_seen.entry(e.mask.len()).or_default().push(s);
            }
        }
        for (seen, group) in by_seen {
            let hi = (2 * seen).clamp(seen + 1, n);
            let more = self.masks(&group, seen..hi)?;
            for (s, tail) in group.into_iter().zip(more) {
                let e = &self.scores[&s];
                let latency = e.latency;
                let mut mask = e.mask.clone();
                mask.extend(tail);
                let e = if mask.len() == n {
                    self.stats.rescored += 1;
                    self.full_entry(latency, mask)
                } else {
                    // A raced-out subnet had a reference, and references stay; without one
                    // the bound is open and the next round extends it again.
                    let (quality, upper) = self
                        .race_verdict(&mask, latency)
                        .map_or((0.0, f64::INFINITY), |(_, est, ucb)| (est, ucb));
                    Entry {
                        latency,
                        quality,
                        upper,
                        full: false,
                        mask,
                    }
                };
                self.scores.insert(s, e);
            }
        }
        Ok(())
    }

    /// Orders `pop` best first and keeps the `k` parents. With racing, a raced-out member
    /// whose optimistic fitness (quality at its upper bound) reaches the parents' cut is
    /// scored on more images (a round at a time, [`Archive::extend`]) until its bound falls
    /// below the cut or it is fully scored, so the parents are the ones full scores would
    /// pick (barring a wrong race verdict) and racing does not steer the search.
    fn select_parents(&mut self, pop: &mut Vec<Subnet>, k: usize, budget: f64) -> Result<()> {
        loop {
            pop.sort_by(|a, b| {
                self.fit(b, budget)
                    .total_cmp(&self.fit(a, budget))
                    .then(self.latency(a).total_cmp(&self.latency(b)))
                    .then(a.cmp(b))
            });
            let k = k.min(pop.len());
            if k == 0 {
                pop.clear();
                return Ok(());
            }
            let cut = self.fit(&pop[k - 1], budget);
            let doubtful: Vec<Subnet> = pop
                .iter()
                .filter(|s| {
                    let e = &self.scores[*s];
                    !e.full && fitness(e.upper, e.latency, budget) >= cut
                })
                .cloned()
                .collect();
            if doubtful.is_empty() {
                pop.truncate(k);
                return Ok(());
            }
            self.extend(doubtful)?;
        }
    }

    fn latency(&self, s: &Subnet) -> f64 {
        self.scores[s].latency
    }

    fn fit(&self, s: &Subnet, budget: f64) -> f64 {
        let e = &self.scores[s];
        fitness(e.quality, e.latency, budget)
    }

    /// Fully scored candidates.
    fn candidates(&self) -> Vec<Candidate> {
        self.scores
            .iter()
            .filter(|(_, e)| e.full)
            .map(|(s, e)| Candidate {
                subnet: s.clone(),
                latency_ms: e.latency,
                quality: e.quality,
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
    progress: impl FnMut(usize, usize),
) -> Result<SearchResult> {
    search_from(supernet, table, set, budgets_ms, cfg, &[], progress)
}

/// Incremental re-search: like [`search`], with `warm` (e.g. the previous Pareto front) put
/// into every budget's initial population first, re-scored under the current table and data.
/// Subnets that are not valid codes of this supernet are skipped, so a front of an older
/// supernet version cannot poison the run.
pub fn search_from(
    supernet: &Supernet,
    table: &LatencyTable,
    set: &EvalSet,
    budgets_ms: &[f64],
    cfg: &SearchConfig,
    warm: &[Subnet],
    mut progress: impl FnMut(usize, usize),
) -> Result<SearchResult> {
    let spec = &supernet.spec;
    let warm: Vec<Subnet> = warm
        .iter()
        .filter(|s| spec.validate(s).is_ok())
        .cloned()
        .collect();
    table.check(spec)?;
    if cfg.population < 2 || !(0.0..1.0).contains(&cfg.parent_frac) {
        return Err(EdgeError::config(
            "search",
            "population >= 2 and 0 <= parent_frac < 1 required",
        ));
    }
    if !(cfg.race_z.is_finite() && cfg.race_z >= 0.0) {
        return Err(EdgeError::config(
            "race_z",
            format!("{} must be a finite number >= 0", cfg.race_z),
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
        reuse: (cfg.speedups.prefix_reuse && cfg.reuse_cache_bytes > 0)
            .then(|| ReuseCache::new(cfg.reuse_cache_bytes)),
        image_module_calls: 0,
    };
    let n = spec.num_positions();
    arch.evaluate(vec![Subnet::original(n)], false)?;
    let total = budgets_ms.len() * (cfg.generations + 1);
    let mut done = 0;
    for (bi, &budget) in budgets_ms.iter().enumerate() {
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed ^ (bi as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Initial population: the warm start (those nearest the budget first), then samples.
        let mut pop = BTreeSet::new();
        let mut seeds = warm
            .iter()
            .map(|s| Ok((table.predict_ms(s)?, s)))
            .collect::<Result<Vec<_>>>()?;
        seeds.sort_by(|a, b| {
            (a.0 - budget)
                .abs()
                .total_cmp(&(b.0 - budget).abs())
                .then(a.1.cmp(b.1))
        });
        pop.extend(
            seeds
                .into_iter()
                .take(cfg.population)
                .map(|(_, s)| s.clone()),
        );
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
        arch.evaluate(pop.clone(), false)?;
        done += 1;
        progress(done, total);
        for _ in 0..cfg.generations {
            let k = ((cfg.parent_frac * cfg.population as f64).round() as usize)
                .clamp(2, pop.len().max(2));
            arch.select_parents(&mut pop, k, budget)?;
            let parents = pop.clone();
            if let Some(r) = arch.reuse.as_mut() {
                r.keep_prefixes_of(&parents);
            }
            let n_child = cfg.population.saturating_sub(parents.len());
            let mut children = BTreeSet::new();
            for c in 0..n_child {
                for _attempt in 0..30 {
                    let child = if c % 2 == 0 || parents.len() < 2 {
                        let p = &parents[rng.random_range(0..parents.len())];
                        let (mut child, frozen) = ops::mutate(spec, p, cfg.mutation_prob, &mut rng);
                        if cfg.speedups.latency_preserving {
                            let d = table.predict_ms(&child)? - arch.latency(p);
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
            arch.evaluate(children.clone(), false)?;
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
        arch.evaluate(vec![ops::cheapest(spec, table)?], true)?;
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
    stats.images = set.len;
    stats.seconds = start.elapsed().as_secs_f64();
    stats.evals_per_s = stats.evaluations as f64 / stats.seconds.max(1e-9);
    Ok(SearchResult {
        best,
        front: pareto_front(&all),
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quality::QualityMode;
    use adaptivenet_core::model::{ArchDescriptor, Model};
    use adaptivenet_core::supernet::{branches::build_supernet, SupernetConfig};
    use candle_core::{Device, Tensor};

    fn supernet() -> Supernet {
        let arch = ArchDescriptor::from_json(
            br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[4,8,16],"in_channels":1,"num_classes":10}"#,
        )
        .unwrap();
        build_supernet(
            &Model::init(&arch.spec, 5).unwrap(),
            &SupernetConfig::merge_only(),
        )
        .unwrap()
    }

    /// Seeded images (deterministic, unlike `Tensor::randn`), contrast rising per batch.
    fn eval_set(sn: &Supernet, batches: usize, batch: usize) -> EvalSet {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let inputs = (0..batches)
            .map(|b| {
                let scale = 1.0 + b as f32 * 0.1;
                let v: Vec<f32> = (0..batch * 28 * 28)
                    .map(|_| rng.random_range(-scale..scale))
                    .collect();
                Tensor::from_vec(v, (batch, 1, 28, 28), &Device::Cpu).unwrap()
            })
            .collect();
        EvalSet::from_batches(sn, inputs, None, QualityMode::OracleAgreement).unwrap()
    }

    #[test]
    fn race_bound_keeps_close_calls_and_drops_clear_losers() {
        // No disagreement seen yet: too early to drop.
        assert!(race_keeps(0, 0, 100, 400, 2.5).0);
        // A few images either way: keep.
        assert!(race_keeps(2, 5, 100, 400, 2.5).0);
        // 25 images behind, 1 ahead out of 100: cannot catch up on 400 more.
        let (keep, est) = race_keeps(1, 25, 100, 400, 2.5);
        assert!(!keep && est < -100.0, "{est}");
        // z = 0 reduces the rule to the extrapolated mean.
        assert!(!race_keeps(2, 5, 100, 400, 0.0).0);
        assert!(race_keeps(5, 2, 100, 400, 0.0).0);
    }

    #[test]
    fn evaluation_does_not_depend_on_workers_or_method_and_ranges_compose() {
        let sn = supernet();
        let set = eval_set(&sn, 3, 10);
        let subnets = sn.spec.enumerate(1000).unwrap();
        let subnets: Vec<Subnet> = subnets.into_iter().step_by(7).collect();
        let each = Method::Each { from_stem: false };
        let (a, sa) = evaluate_masks(&sn, &set, &subnets, 0..30, each, 1).unwrap();
        let prefix = Method::Prefix {
            max_cache_bytes: usize::MAX,
        };
        let (b, sb) = evaluate_masks(&sn, &set, &subnets, 0..30, prefix, 3).unwrap();
        assert_eq!(a, b);
        assert!(sb.module_applications < sa.module_applications);
        // Split at an image inside a batch, with two workers.
        let (lo, _) = evaluate_masks(&sn, &set, &subnets, 0..13, prefix, 2).unwrap();
        let (hi, _) = evaluate_masks(&sn, &set, &subnets, 13..30, prefix, 2).unwrap();
        for ((l, h), full) in lo.iter().zip(&hi).zip(&a) {
            assert_eq!([l.as_slice(), h.as_slice()].concat(), *full);
        }
        assert!(evaluate_masks(&sn, &set, &subnets, 0..31, prefix, 1).is_err());
    }

    #[test]
    fn cross_generation_reuse_changes_the_work_not_the_results() {
        let sn = supernet();
        let set = eval_set(&sn, 3, 10);
        let all = sn.spec.enumerate(1000).unwrap();
        let parents: Vec<Subnet> = all.iter().step_by(7).cloned().collect();
        // Children differ from every parent but share prefixes with them.
        let children: Vec<Subnet> = all
            .iter()
            .step_by(5)
            .filter(|s| !parents.contains(s))
            .cloned()
            .collect();
        let prefix = Method::Prefix {
            max_cache_bytes: usize::MAX,
        };
        let (truth, plain) = evaluate_masks(&sn, &set, &children, 0..30, prefix, 1).unwrap();
        for workers in [1, 2] {
            let mut cache = ReuseCache::new(usize::MAX / 2);
            evaluate_masks_reusing(
                &sn,
                &set,
                &parents,
                0..30,
                prefix,
                workers,
                Some(&mut cache),
            )
            .unwrap();
            let held = cache.bytes();
            assert!(held > 0);
            cache.keep_prefixes_of(&parents);
            assert_eq!(cache.bytes(), held, "every entry lies on a parent's path");
            let (m, st) = evaluate_masks_reusing(
                &sn,
                &set,
                &children,
                0..30,
                prefix,
                workers,
                Some(&mut cache),
            )
            .unwrap();
            assert_eq!(m, truth, "{workers} workers");
            assert!(
                st.module_applications < plain.module_applications,
                "{} vs {}",
                st.module_applications,
                plain.module_applications
            );
            // Cells, not the range's split, key the cache: a racing-style first round (the
            // first batch, on the other worker count) finds what the full passes cached.
            let other = 3 - workers;
            let (first_round, plain_round) =
                evaluate_masks(&sn, &set, &children, 0..10, prefix, other).unwrap();
            let (m, st) = evaluate_masks_reusing(
                &sn,
                &set,
                &children,
                0..10,
                prefix,
                other,
                Some(&mut cache),
            )
            .unwrap();
            assert_eq!(m, first_round, "{other} workers on the first round");
            assert!(
                st.image_module_calls < plain_round.image_module_calls,
                "{} vs {}",
                st.image_module_calls,
                plain_round.image_module_calls
            );
            // Nothing survives for parents that share no prefix with the cached paths.
            cache.keep_prefixes_of(&[]);
            assert_eq!(cache.bytes(), 0);
        }
        // A bound too small for any activation: same masks, no saving.
        let mut tiny = ReuseCache::new(1);
        evaluate_masks_reusing(&sn, &set, &parents, 0..30, prefix, 1, Some(&mut tiny)).unwrap();
        let (m, st) =
            evaluate_masks_reusing(&sn, &set, &children, 0..30, prefix, 1, Some(&mut tiny))
                .unwrap();
        assert_eq!(
            (m, st.module_applications),
            (truth, plain.module_applications)
        );
    }

    #[test]
    fn search_with_cross_generation_reuse_finds_the_same_with_fewer_passes() {
        let sn = supernet();
        let set = eval_set(&sn, 4, 50);
        let table = LatencyTable::from_macs(&sn.spec, 1.0);
        let n = sn.spec.num_positions();
        let budget = Budget::Fraction(0.6).resolve(&table, n).unwrap();
        let cfg = SearchConfig {
            population: 16,
            generations: 4,
            seed: 3,
            speedups: Speedups {
                racing: false,
                ..Speedups::all()
            },
            threads: 2,
            ..SearchConfig::default()
        };
        let with = search(&sn, &table, &set, &[budget], &cfg, |_, _| {}).unwrap();
        let without = search(
            &sn,
            &table,
            &set,
            &[budget],
            &SearchConfig {
                reuse_cache_bytes: 0,
                ..cfg.clone()
            },
            |_, _| {},
        )
        .unwrap();
        assert_eq!((&with.best, &with.front), (&without.best, &without.front));
        assert_eq!(with.stats.evaluations, without.stats.evaluations);
        assert!(with.stats.peak_reuse_bytes > 0 && without.stats.peak_reuse_bytes == 0);
        assert!(
            with.stats.module_applications < without.stats.module_applications,
            "{} vs {}",
            with.stats.module_applications,
            without.stats.module_applications
        );
    }

    #[test]
    fn parents_under_racing_are_the_ones_full_scores_pick() {
        let sn = supernet();
        let set = eval_set(&sn, 4, 50);
        let table = LatencyTable::from_macs(&sn.spec, 1.0);
        let all = sn.spec.enumerate(1000).unwrap();
        let (truth, _) = evaluate_prefix(&sn, &set, &all, usize::MAX).unwrap();
        let q: BTreeMap<&Subnet, f64> = all.iter().zip(truth).collect();
        let cfg = SearchConfig {
            race_images: 50,
            ..SearchConfig::default()
        };
        let (lo, hi) = table.latency_range(&sn.spec).unwrap();
        let mut rescored = 0;
        for (k, frac) in [(10, 0.5), (30, 0.7), (60, 1.0), (100, 1.0)] {
            let budget = lo + (hi - lo) * frac;
            let mut arch = Archive {
                supernet: &sn,
                table: &table,
                set: &set,
                cfg: &cfg,
                scores: BTreeMap::new(),
                stats: SearchStats::default(),
                reuse: None,
                image_module_calls: 0,
            };
            arch.evaluate(all.iter().step_by(15).cloned().collect(), false)
                .unwrap();
            arch.evaluate(all.clone(), false).unwrap();
            assert!(arch.stats.raced_out > 0);
            // The exact order: fitness from full scores, then latency, then code.
            let mut exact = all.clone();
            let fit = |s: &Subnet| fitness(q[s], table.predict_ms(s).unwrap(), budget);
            exact.sort_by(|a, b| {
                fit(b)
                    .total_cmp(&fit(a))
                    .then(
                        table
                            .predict_ms(a)
                            .unwrap()
                            .total_cmp(&table.predict_ms(b).unwrap()),
                    )
                    .then(a.cmp(b))
            });
            // A pessimistic race verdict on a true parent (estimate far below, bound just
            // above its quality), and one on a clear loser (bound below the cut).
            let mut doctor = |s: &Subnet, quality: f64, upper: f64| {
                let e = arch.scores.get_mut(s).unwrap();
                e.mask.truncate(cfg.race_images);
                (e.quality, e.upper, e.full) = (quality, upper, false);
            };
            let parent = exact[k / 2].clone();
            doctor(&parent, q[&parent] - 50.0, q[&parent] + 0.1);
            let loser = exact.last().unwrap().clone();
            doctor(&loser, q[&loser] - 50.0, q[&loser]);
            let mut pop = all.clone();
            arch.select_parents(&mut pop, k, budget).unwrap();
            exact.truncate(k);
            assert_eq!(pop, exact, "k {k}, budget {budget}");
            assert!(pop.iter().all(|s| arch.scores[s].full));
            assert_eq!(arch.scores[&parent].quality, q[&parent]);
            // No work spent on what cannot become a parent.
            assert!(!arch.scores[&loser].full);
            rescored += arch.stats.rescored;
        }
        assert!(rescored >= 4);
    }

    #[test]
    fn racing_does_not_steer_the_search() {
        let sn = supernet();
        let set = eval_set(&sn, 4, 50);
        let table = LatencyTable::from_macs(&sn.spec, 1.0);
        let n = sn.spec.num_positions();
        for (seed, frac) in [(1, 0.6), (2, 0.75)] {
            let budget = Budget::Fraction(frac).resolve(&table, n).unwrap();
            let cfg = SearchConfig {
                population: 16,
                generations: 5,
                seed,
                race_images: 50,
                ..SearchConfig::default()
            };
            let raced = search(&sn, &table, &set, &[budget], &cfg, |_, _| {}).unwrap();
            let off = SearchConfig {
                speedups: Speedups {
                    racing: false,
                    ..cfg.speedups
                },
                ..cfg.clone()
            };
            let full = search(&sn, &table, &set, &[budget], &off, |_, _| {}).unwrap();
            assert!(
                raced.stats.raced_out > 0,
                "seed {seed}: racing dropped nothing"
            );
            // Same parents every generation, hence the same subnets evaluated and the same
            // answers; only the work differs.
            assert_eq!(
                raced.stats.evaluations, full.stats.evaluations,
                "seed {seed}"
            );
            assert_eq!(raced.best, full.best, "seed {seed}");
            assert_eq!(raced.front, full.front, "seed {seed}");
            assert!(
                raced.stats.module_applications < full.stats.module_applications,
                "seed {seed}: {:?} vs {:?}",
                raced.stats,
                full.stats
            );
        }
    }

    #[test]
    fn racing_seeds_the_initial_population_and_races_the_rest() {
        let sn = supernet();
        let set = eval_set(&sn, 4, 50);
        let table = LatencyTable::from_macs(&sn.spec, 1.0);
        let n = sn.spec.num_positions();
        let budget = Budget::Fraction(0.5).resolve(&table, n).unwrap();
        // Only the initial population: every member is faster than the oracle, the one
        // fully scored subnet, so none has a racing reference of its own.
        let cfg = |every| SearchConfig {
            population: 32,
            generations: 0,
            seed: 0,
            race_images: 50,
            race_seed_every: every,
            ..SearchConfig::default()
        };
        let run = |every| search(&sn, &table, &set, &[budget], &cfg(every), |_, _| {}).unwrap();
        let (seeded, unseeded) = (run(4), run(1));
        let off = search(
            &sn,
            &table,
            &set,
            &[budget],
            &SearchConfig {
                speedups: Speedups {
                    racing: false,
                    ..Speedups::all()
                },
                ..cfg(4)
            },
            |_, _| {},
        )
        .unwrap();
        assert_eq!(unseeded.stats.raced_out, 0, "{:?}", unseeded.stats);
        assert!(seeded.stats.raced_out > 0, "{:?}", seeded.stats);
        for r in [&seeded, &unseeded] {
            assert_eq!(r.stats.evaluations, off.stats.evaluations);
            assert_eq!((&r.best, &r.front), (&off.best, &off.front));
        }
        assert!(
            seeded.stats.module_applications < unseeded.stats.module_applications,
            "{:?} vs {:?}",
            seeded.stats,
            unseeded.stats
        );
    }

    #[test]
    fn racing_never_drops_a_subnet_that_would_enter_the_front() {
        let sn = supernet();
        let set = eval_set(&sn, 4, 50);
        let table = LatencyTable::from_macs(&sn.spec, 1.0);
        let all = sn.spec.enumerate(1000).unwrap();
        let (truth, _) = evaluate_prefix(&sn, &set, &all, usize::MAX).unwrap();
        let cfg = SearchConfig {
            race_images: 50,
            ..SearchConfig::default()
        };
        let mut arch = Archive {
            supernet: &sn,
            table: &table,
            set: &set,
            cfg: &cfg,
            scores: BTreeMap::new(),
            stats: SearchStats::default(),
            reuse: None,
            image_module_calls: 0,
        };
        // A few subnets fully scored first (the references), then every other one raced.
        let seeds: Vec<Subnet> = all.iter().step_by(15).cloned().collect();
        arch.evaluate(seeds.clone(), false).unwrap();
        assert_eq!(arch.stats.raced_out, 0);
        arch.evaluate(all.clone(), false).unwrap();
        // Non-vacuous: some subnets were actually dropped by a race.
        assert!(arch.stats.raced_out > 0, "{:?}", arch.stats);
        assert_eq!(arch.stats.evaluations, all.len());
        let q: BTreeMap<&Subnet, f64> = all.iter().zip(truth).collect();
        // Full scores are exact.
        for (s, e) in arch.scores.iter().filter(|(_, e)| e.full) {
            assert_eq!(e.quality, q[s]);
        }
        // The front and the best subnet of every budget over the raced archive equal those of
        // exhaustive evaluation.
        let exact: Vec<Candidate> = all
            .iter()
            .map(|s| Candidate {
                subnet: s.clone(),
                latency_ms: table.predict_ms(s).unwrap(),
                quality: q[s],
            })
            .collect();
        let raced = arch.candidates();
        let qualities = |f: Vec<Candidate>| f.iter().map(|c| c.quality).collect::<Vec<_>>();
        assert_eq!(
            qualities(pareto_front(&raced)),
            qualities(pareto_front(&exact))
        );
        let (lo, hi) = table.latency_range(&sn.spec).unwrap();
        for k in 0..=10 {
            let b = lo + (hi - lo) * k as f64 / 10.0;
            assert_eq!(
                best_within(&raced, b).map(|c| c.quality),
                best_within(&exact, b).map(|c| c.quality),
                "budget {b}"
            );
        }
        // Raced-out estimates sit below the truth's reach: never above the best full score
        // at their latency.
        for (s, e) in arch.scores.iter().filter(|(_, e)| !e.full) {
            let r = arch.reference(e.latency).unwrap();
            assert!(e.quality < r.quality, "{s}: {} vs {}", e.quality, r.quality);
        }
        // Rounds: some were dropped after the first round (on more images), and completing
        // the raced-out ones, whatever round dropped them, gives their exact scores.
        assert!(arch.stats.raced_out_later > 0, "{:?}", arch.stats);
        let dropped: Vec<Subnet> = arch
            .scores
            .iter()
            .filter(|(_, e)| !e.full)
            .map(|(s, _)| s.clone())
            .collect();
        let seen: BTreeSet<usize> = dropped.iter().map(|s| arch.scores[s].mask.len()).collect();
        assert!(seen.len() > 1, "dropped after {seen:?} images only");
        arch.evaluate(dropped.clone(), true).unwrap();
        assert_eq!(arch.stats.rescored, dropped.len());
        for s in &dropped {
            let e = &arch.scores[s];
            assert!(e.full && e.mask.len() == set.len, "{s}");
            assert_eq!(e.quality, q[s], "{s}");
        }
    }

    #[test]
    fn search_with_racing_is_deterministic_and_answers_from_full_scores() {
        let sn = supernet();
        let set = eval_set(&sn, 4, 50);
        let table = LatencyTable::from_macs(&sn.spec, 1.0);
        let n = sn.spec.num_positions();
        let budget = Budget::Fraction(0.7).resolve(&table, n).unwrap();
        let cfg = SearchConfig {
            population: 12,
            generations: 4,
            seed: 9,
            race_images: 50,
            threads: 2,
            ..SearchConfig::default()
        };
        let a = search(&sn, &table, &set, &[budget], &cfg, |_, _| {}).unwrap();
        let b = search(
            &sn,
            &table,
            &set,
            &[budget],
            &SearchConfig { threads: 1, ..cfg },
            |_, _| {},
        )
        .unwrap();
        assert_eq!((&a.best, &a.front), (&b.best, &b.front));
        assert_eq!(a.stats.evaluations, b.stats.evaluations);
        let best = &a.best[0].best;
        assert!(best.latency_ms <= budget);
        sn.spec.validate(&best.subnet).unwrap();
        let (q, _) =
            evaluate_prefix(&sn, &set, std::slice::from_ref(&best.subnet), usize::MAX).unwrap();
        assert_eq!(q[0], best.quality);
        for c in &a.front {
            let (q, _) =
                evaluate_prefix(&sn, &set, std::slice::from_ref(&c.subnet), usize::MAX).unwrap();
            assert_eq!(q[0], c.quality, "{}", c.subnet);
        }
    }

    #[test]
    fn warm_start_from_a_front_keeps_its_best_and_skips_foreign_codes() {
        let sn = supernet();
        let set = eval_set(&sn, 2, 20);
        let table = LatencyTable::from_macs(&sn.spec, 1.0);
        let budget = Budget::Fraction(0.7)
            .resolve(&table, sn.spec.num_positions())
            .unwrap();
        let cfg = SearchConfig {
            population: 10,
            generations: 3,
            seed: 1,
            ..SearchConfig::default()
        };
        let first = search(&sn, &table, &set, &[budget], &cfg, |_, _| {}).unwrap();
        let mut warm: Vec<Subnet> = first.front.iter().map(|c| c.subnet.clone()).collect();
        warm.push(Subnet(vec![0; 4])); // another supernet's code
        let again = SearchConfig {
            generations: 0,
            seed: 2,
            ..cfg
        };
        let second = search_from(&sn, &table, &set, &[budget], &again, &warm, |_, _| {}).unwrap();
        assert!(second.best[0].best.quality >= first.best[0].best.quality);
    }
}
