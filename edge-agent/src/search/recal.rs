//! The recal pick: with BN recalibration on, the search's scores (shipped statistics) are not
//! the ones a subnet serves with, and the statistics shipped with a supernet fit some paths
//! much worse than others (EfficientNet-Lite0 at 0.6 of the oracle's latency, in one run:
//! 0.72 of its accuracy retained as chosen, 0.92 once the chosen subnet was recalibrated). So each
//! budget's best few candidates are re-scored as they would serve, and the best re-scored
//! one is the answer.
//!
//! Invariants: every answer is a fully scored candidate within its budget (re-scoring changes
//! a quality, never a latency); with `k < 2` the result is returned untouched and nothing is
//! re-scored; the front keeps each answer as the most accurate entry within its budget, so
//! serving (the front's best within the budget) starts on it; the order of evaluation is
//! fixed (budgets in order, each shortlist best first), so a seed reproduces the pick.
use std::collections::{BTreeMap, BTreeSet};

use adaptivenet_core::supernet::Subnet;

use super::pareto::{best_within, pareto_front, top_within};
use super::{BudgetResult, Candidate, SearchResult};
use crate::Result;

/// Re-ranks `result` (from a search whose every fully scored subnet is `evaluated`): for each
/// budget the `k` best candidates within it by search quality are re-scored with `rescore`
/// (each subnet once), and the answer is the best re-scored candidate within the budget,
/// with its re-scored quality. Shortlists are pooled: a subnet re-scored for a smaller budget
/// fits every larger one too, and leaving it out would let a larger budget answer worse.
///
/// The front gets the re-scored candidates with their new qualities, and loses any entry
/// that would outrank an answer within its budget on the mixed scores (it was not
/// re-scored, or lost): the served subnet is the answer, and the controller can still step
/// down to every faster entry and up to every entry beyond the budgets.
pub fn recal_pick(
    result: SearchResult,
    evaluated: &[Candidate],
    k: usize,
    mut rescore: impl FnMut(&Subnet) -> Result<f64>,
) -> Result<SearchResult> {
    if k < 2 {
        return Ok(result);
    }
    // Subnet -> (search quality, candidate with the re-scored quality).
    let mut scored: BTreeMap<Subnet, (f64, Candidate)> = BTreeMap::new();
    for b in &result.best {
        let mut shortlist = top_within(evaluated, b.budget_ms, k);
        if !shortlist.iter().any(|c| c.subnet == b.best.subnet) {
            shortlist.insert(0, b.best.clone());
        }
        for c in shortlist {
            if scored.contains_key(&c.subnet) {
                continue;
            }
            let q = rescore(&c.subnet)?;
            tracing::debug!(
                "recal pick: {} at {:.3} ms: {:.2}% -> {q:.2}% recalibrated",
                c.subnet,
                c.latency_ms,
                c.quality
            );
            let before = c.quality;
            scored.insert(c.subnet.clone(), (before, Candidate { quality: q, ..c }));
        }
    }
    let pool: Vec<Candidate> = scored.values().map(|(_, c)| c.clone()).collect();
    let mut best = Vec::with_capacity(result.best.len());
    for b in &result.best {
        // The budget's own answer is in the pool, so something fits.
        let w = best_within(&pool, b.budget_ms).unwrap_or_else(|| b.best.clone());
        let before = scored.get(&w.subnet).map_or(w.quality, |(q, _)| *q);
        let searched = scored
            .get(&b.best.subnet)
            .map_or(b.best.quality, |(_, c)| c.quality);
        tracing::info!(
            "recal pick at {:.3} ms: {} ({:.3} ms), {before:.2}% -> {:.2}% with recalibrated BN; \
             the search's best {} {:.2}% -> {searched:.2}%; {} candidates re-scored",
            b.budget_ms,
            w.subnet,
            w.latency_ms,
            w.quality,
            b.best.subnet,
            b.best.quality,
            scored.len()
        );
        best.push(BudgetResult {
            budget_ms: b.budget_ms,
            best: w,
        });
    }
    let front = merged_front(&result.front, &pool, &best);
    Ok(SearchResult {
        best,
        front,
        stats: result.stats,
    })
}

/// The front over the re-scored `pool` and the search's `front` (re-scored entries carry
/// their new quality), without entries that would outrank an answer within its budget.
fn merged_front(front: &[Candidate], pool: &[Candidate], best: &[BudgetResult]) -> Vec<Candidate> {
    let answers: BTreeSet<&Subnet> = best.iter().map(|b| &b.best.subnet).collect();
    let rescored: BTreeSet<&Subnet> = pool.iter().map(|c| &c.subnet).collect();
    // Below an answer in latency and quality, or beyond its budget.
    let fits = |c: &Candidate| {
        answers.contains(&c.subnet)
            || best.iter().all(|b| {
                c.latency_ms > b.budget_ms
                    || (c.latency_ms < b.best.latency_ms && c.quality < b.best.quality)
            })
    };
    let all: Vec<Candidate> = pool
        .iter()
        .chain(front.iter().filter(|c| !rescored.contains(&c.subnet)))
        .filter(|c| fits(c))
        .cloned()
        .collect();
    pareto_front(&all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::SearchStats;
    use adaptivenet_core::supernet::Choice;

    /// A candidate whose code spells `id` in bits (pruned or original per position): the
    /// ranking never looks inside a code.
    fn cand(id: u8, latency_ms: f64, quality: f64) -> Candidate {
        let subnet = Subnet(
            (0..8)
                .map(|i| {
                    if id >> i & 1 == 1 {
                        Choice::Prune1
                    } else {
                        Choice::Original
                    }
                })
                .collect(),
        );
        Candidate {
            subnet,
            latency_ms,
            quality,
        }
    }

    fn result(all: &[Candidate], budgets: &[f64]) -> SearchResult {
        SearchResult {
            best: budgets
                .iter()
                .map(|&b| BudgetResult {
                    budget_ms: b,
                    best: best_within(all, b).unwrap(),
                })
                .collect(),
            front: pareto_front(all),
            stats: SearchStats::default(),
        }
    }

    #[test]
    fn the_answers_are_the_best_rescored_of_each_shortlist_and_serve_first() {
        let all = vec![
            cand(1, 1.0, 50.0),
            cand(2, 2.0, 60.0),
            cand(3, 3.0, 70.0),
            cand(4, 4.0, 80.0),
            cand(5, 5.0, 79.0),
            cand(6, 6.0, 85.0),
            cand(7, 7.0, 86.0),
            cand(8, 9.0, 97.0),
        ];
        let r = result(&all, &[5.0, 7.5]);
        // Recalibration lifts subnet 3 (the third best within 5 ms) above all but 8.
        let mut calls = Vec::new();
        let picked = recal_pick(r.clone(), &all, 3, |s| {
            calls.push(s.clone());
            let i = all.iter().position(|c| &c.subnet == s).unwrap();
            Ok(all[i].quality + if i == 2 { 25.0 } else { 0.0 })
        })
        .unwrap();
        // Shortlists {4, 5, 3} at 5 ms and {7, 6, 4} at 7.5 ms; each subnet re-scored once.
        assert_eq!(calls.len(), 5);
        assert_eq!(
            picked.best[0].best,
            Candidate {
                quality: 95.0,
                ..all[2].clone()
            }
        );
        // Pooled: 3 fits 7.5 ms too and beats that budget's own shortlist.
        assert_eq!(picked.best[1].best.subnet, all[2].subnet);
        for b in &picked.best {
            // What serving starts on (`Controller::initial_index`).
            let served = picked
                .front
                .iter()
                .rposition(|c| c.latency_ms <= b.budget_ms);
            assert_eq!(picked.front[served.unwrap()], b.best);
        }
        assert!(picked
            .front
            .windows(2)
            .all(|w| w[0].latency_ms < w[1].latency_ms && w[0].quality < w[1].quality));
        // Faster entries and those beyond every budget stay; 4, 6 and 7 would outrank 3.
        let front: Vec<&Subnet> = picked.front.iter().map(|c| &c.subnet).collect();
        assert_eq!(
            front,
            [0, 1, 2, 7].map(|i| &all[i].subnet).to_vec(),
            "{:?}",
            picked.front
        );
        // k < 2: untouched, nothing re-scored.
        let same = recal_pick(r.clone(), &all, 1, |_| unreachable!()).unwrap();
        assert_eq!(same, r);
    }
}
