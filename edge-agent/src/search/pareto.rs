//! Ranking evaluated subnets: fitness under a budget, the Pareto front, the best per budget.
//!
//! Invariant: orders are total and deterministic (ties by latency, then by code), so the same
//! archive always gives the same front and answers; a subnet above the budget always ranks
//! below every subnet within it.
use super::Candidate;

/// Fitness of a subnet under a budget: its quality when its latency fits, else
/// `quality/100 - latency/budget`, negative, so below every subnet that fits.
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

/// The `k` most accurate candidates within a budget, best first, in [`best_within`]'s order
/// (so the first is its answer).
pub fn top_within(all: &[Candidate], budget_ms: f64, k: usize) -> Vec<Candidate> {
    let mut v: Vec<&Candidate> = all.iter().filter(|c| c.latency_ms <= budget_ms).collect();
    v.sort_by(|a, b| {
        b.quality
            .total_cmp(&a.quality)
            .then(a.latency_ms.total_cmp(&b.latency_ms))
            .then(a.subnet.cmp(&b.subnet))
    });
    v.into_iter().take(k).cloned().collect()
}
