//! The evolutionary loop (METHOD.md §2): per budget, an initial population, then generations
//! of parent selection and children by mutation and crossover, all scored through one
//! [`Archive`] shared by the budgets.
//!
//! Each generation keeps the top `parent_frac` as parents and fills the rest with children,
//! half by mutation and half by one-point crossover, all span-repaired ([`super::ops`]); a
//! child already in the archive is drawn again, so no subnet is scored twice.
//!
//! Invariants: every subnet returned is a valid code of the supernet and within its budget
//! per the table (the cheapest subnet is scored fully when nothing else fits); and a seed
//! reproduces the run: one ChaCha8 stream per budget, ordered containers only, and evaluation
//! results that do not depend on the number of worker threads.
use std::collections::BTreeSet;
use std::time::Instant;

use adaptivenet_core::supernet::{Subnet, Supernet, SupernetSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::archive::Archive;
use super::pareto::{best_within, pareto_front};
use super::prefix::ReuseCache;
use super::{ops, BudgetResult, Candidate, SearchConfig, SearchResult};
use crate::profile::LatencyTable;
use crate::quality::EvalSet;
use crate::{EdgeError, Result};

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
    progress: impl FnMut(usize, usize),
) -> Result<SearchResult> {
    Ok(search_keeping(supernet, table, set, budgets_ms, cfg, warm, progress)?.0)
}

/// [`search_from`], also returning every fully scored subnet of the run (in code order): the
/// shortlists of [`super::recal_pick`] come from all of them, not only the front.
pub fn search_keeping(
    supernet: &Supernet,
    table: &LatencyTable,
    set: &EvalSet,
    budgets_ms: &[f64],
    cfg: &SearchConfig,
    warm: &[Subnet],
    mut progress: impl FnMut(usize, usize),
) -> Result<(SearchResult, Vec<Candidate>)> {
    let spec = &supernet.spec;
    let warm: Vec<Subnet> = warm
        .iter()
        .filter(|s| spec.validate(s).is_ok())
        .cloned()
        .collect();
    table.check(spec)?;
    cfg.check()?;
    let cheapest = check_budgets(spec, table, budgets_ms)?;
    let start = Instant::now();
    let reuse = (cfg.speedups.prefix_reuse && cfg.reuse_cache_bytes > 0)
        .then(|| ReuseCache::new(cfg.reuse_cache_bytes));
    let mut arch = Archive::new(supernet, table, set, cfg, reuse);
    arch.evaluate(vec![Subnet::original(spec.num_positions())], false)?;
    let total = budgets_ms.len() * (cfg.generations + 1);
    let mut done = 0;
    for (bi, &budget) in budgets_ms.iter().enumerate() {
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed ^ (bi as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut pop = initial_population(spec, table, cfg, &warm, budget, &mut rng)?;
        arch.evaluate(pop.clone(), false)?;
        done += 1;
        progress(done, total);
        for _ in 0..cfg.generations {
            let k = ((cfg.parent_frac * cfg.population as f64).round() as usize)
                .clamp(2, pop.len().max(2));
            arch.select_parents(&mut pop, k, budget)?;
            if let Some(r) = arch.reuse.as_mut() {
                r.keep_prefixes_of(&pop);
            }
            let children = breed(&arch, &pop, budget, &mut rng)?;
            arch.evaluate(children.clone(), false)?;
            pop.extend(children);
            done += 1;
            progress(done, total);
        }
    }
    answer(arch, budgets_ms, cheapest, start)
}

/// Refuses an empty budget list and any budget below the cheapest subnet's latency; returns
/// that latency.
fn check_budgets(spec: &SupernetSpec, table: &LatencyTable, budgets_ms: &[f64]) -> Result<f64> {
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
    Ok(cheapest)
}

/// The initial population of one budget: the warm start (those nearest the budget first),
/// then samples, in the latency band around the budget with guided initialisation.
fn initial_population(
    spec: &SupernetSpec,
    table: &LatencyTable,
    cfg: &SearchConfig,
    warm: &[Subnet],
    budget: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Subnet>> {
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
            let s = ops::sample_in_band(spec, table, lo, hi, rng)?;
            let l = table.predict_ms(&s)?;
            if (l < lo || l > hi) && tries < 25 * cfg.population {
                continue;
            }
            s
        } else {
            spec.sample(rng, false)?
        };
        pop.insert(s);
    }
    Ok(pop.into_iter().collect())
}

/// The children of one generation, none of them scored before: even-numbered ones by
/// mutation, odd-numbered ones by crossover, each drawn up to 30 times until new.
fn breed(
    arch: &Archive,
    parents: &[Subnet],
    budget: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Subnet>> {
    let n_child = arch.cfg.population.saturating_sub(parents.len());
    let mut children = BTreeSet::new();
    for c in 0..n_child {
        for _attempt in 0..30 {
            let child = if c % 2 == 0 || parents.len() < 2 {
                mutant(
                    arch,
                    &parents[rng.random_range(0..parents.len())],
                    budget,
                    rng,
                )?
            } else {
                let i = rng.random_range(0..parents.len());
                let mut j = rng.random_range(0..parents.len() - 1);
                if j >= i {
                    j += 1;
                }
                ops::crossover(&arch.supernet.spec, &parents[i], &parents[j], rng)
            };
            if !arch.contains(&child) && !children.contains(&child) {
                children.insert(child);
                break;
            }
        }
    }
    Ok(children.into_iter().collect())
}

/// A mutation of `parent`; with the latency-preserving speed-up, a child more than 1% of the
/// budget away from its parent's latency is compensated on the positions it did not change.
fn mutant(arch: &Archive, parent: &Subnet, budget: f64, rng: &mut ChaCha8Rng) -> Result<Subnet> {
    let (spec, table, cfg) = (&arch.supernet.spec, arch.table, arch.cfg);
    let (mut child, frozen) = ops::mutate(spec, parent, cfg.mutation_prob, rng);
    if cfg.speedups.latency_preserving {
        let d = table.predict_ms(&child)? - arch.latency(parent);
        if d.abs() > 0.01 * budget {
            ops::compensate(spec, table, &mut child, d, &frozen)?;
        }
    }
    Ok(child)
}

/// The best fully scored subnet per budget and the front, after guaranteeing a feasible answer
/// for every budget: the cheapest subnet fits any budget that passed [`check_budgets`]; and
/// every fully scored subnet.
fn answer(
    mut arch: Archive,
    budgets_ms: &[f64],
    cheapest: f64,
    start: Instant,
) -> Result<(SearchResult, Vec<Candidate>)> {
    if budgets_ms
        .iter()
        .any(|&b| best_within(&arch.candidates(), b).is_none())
    {
        let cheapest = ops::cheapest(&arch.supernet.spec, arch.table)?;
        arch.evaluate(vec![cheapest], true)?;
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
    stats.images = arch.set.len;
    stats.seconds = start.elapsed().as_secs_f64();
    stats.evals_per_s = stats.evaluations as f64 / stats.seconds.max(1e-9);
    let result = SearchResult {
        best,
        front: pareto_front(&all),
        stats,
    };
    Ok((result, all))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::testing::{eval_set, supernet};
    use crate::search::{Budget, Speedups};

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
        warm.push(Subnet(vec![
            adaptivenet_core::supernet::Choice::Original;
            4
        ])); // another supernet's code
        let again = SearchConfig {
            generations: 0,
            seed: 2,
            ..cfg
        };
        let second = search_from(&sn, &table, &set, &[budget], &again, &warm, |_, _| {}).unwrap();
        assert!(second.best[0].best.quality >= first.best[0].best.quality);
    }
}
