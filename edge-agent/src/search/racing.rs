//! Racing (beyond the paper, [`Speedups::racing`](super::Speedups)): scoring a candidate on a
//! subset of the images first, and on all of them only if it can still reach the front.
//!
//! Once the archive holds fully evaluated subnets, a new candidate is first scored on the
//! first `race_images` images only and compared *pairwise* (same images) with the reference
//! it must beat to enter the Pareto front: the best fully evaluated subnet at no higher
//! latency. If even an upper confidence bound (`race_z` standard errors) on its full-set
//! advantage is negative, it stops there and keeps an estimated quality (below the
//! reference's) and its upper bound. Survivors race on in rounds over twice as many images
//! (`race_images`, 2x, 4x, ..., all), the bound tightening as the images grow, and only those
//! still in reach at the last round are scored on every image. Candidates with no reference
//! (faster than every fully scored subnet, such as the initial population) are seeded: every
//! fourth of them in latency order is scored fully first, and the rest race against those.
//! Pairwise comparison is what makes a 100-image subset informative: two subnets of one
//! supernet disagree on few images, so the noise is that of the disagreements, not of
//! accuracy.
//!
//! Invariants: a raced-out subnet never enters the front or an answer (it is not fully
//! scored; see `archive.rs`); and racing does not steer the search: at parent selection
//! a raced-out member whose upper bound reaches the parents' cut is scored on more rounds
//! until its bound is below the cut or it is fully scored, so the parents, hence every later
//! generation, are those full scores would give unless a race verdict was wrong.
use std::collections::BTreeSet;

use adaptivenet_core::supernet::Subnet;

use super::archive::{Archive, Entry};
use super::pareto::fitness;
use crate::Result;

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

impl Archive<'_> {
    /// Whether new candidates race rather than being scored fully: racing is on, the first
    /// round is a proper subset of the images, and some subnet is fully scored (a reference).
    pub(super) fn can_race(&self, force_full: bool) -> bool {
        let n = self.set.len;
        let r = self.cfg.race_images.min(n);
        self.cfg.speedups.racing
            && !force_full
            && r > 0
            && r < n
            && self.scores.values().any(|e| e.full)
    }

    /// Races the new candidates `new` (latencies `lat`): seeds those without a reference,
    /// then runs the rounds.
    pub(super) fn race(&mut self, new: Vec<Subnet>, lat: Vec<f64>) -> Result<()> {
        let alive = self.seed_unreferenced(&new, &lat)?;
        if alive.is_empty() {
            return Ok(());
        }
        self.race_rounds(&new, &lat, alive)
    }

    /// The racing reference of a latency: the best fully scored subnet no slower.
    pub(super) fn reference(&self, latency: f64) -> Option<&Entry> {
        self.scores
            .values()
            .filter(|e| e.full && e.latency <= latency)
            .max_by(|a, b| a.quality.total_cmp(&b.quality))
    }

    /// Candidates faster than every fully scored subnet have no reference to race against
    /// (the whole initial population: the oracle is the slowest). Every `race_seed_every`-th
    /// of them in latency order, the fastest first, is scored fully first, in one pass; then
    /// each of the others has a reference no slower than itself, at a nearby latency. Returns
    /// the indices of `new` left to race.
    fn seed_unreferenced(&mut self, new: &[Subnet], lat: &[f64]) -> Result<Vec<usize>> {
        let mut alive: Vec<usize> = (0..new.len()).collect();
        let mut no_ref: Vec<usize> = (0..new.len())
            .filter(|&k| self.reference(lat[k]).is_none())
            .collect();
        if no_ref.is_empty() {
            return Ok(alive);
        }
        no_ref.sort_by(|&a, &b| lat[a].total_cmp(&lat[b]).then(new[a].cmp(&new[b])));
        let seeds: BTreeSet<usize> = no_ref
            .into_iter()
            .step_by(self.cfg.race_seed_every.max(1))
            .collect();
        let subs: Vec<Subnet> = seeds.iter().map(|&k| new[k].clone()).collect();
        let m = self.masks(&subs, 0..self.set.len)?;
        for (&k, m) in seeds.iter().zip(m) {
            let e = self.full_entry(lat[k], m);
            self.scores.insert(new[k].clone(), e);
        }
        alive.retain(|k| !seeds.contains(k));
        Ok(alive)
    }

    /// Rounds over growing prefixes of the set (r, 2r, 4r, ..., n): after each, the
    /// candidates `alive` (indices of `new`) that can no longer reach their reference stop;
    /// the rest go on, and those left after the last round are fully scored.
    fn race_rounds(&mut self, new: &[Subnet], lat: &[f64], mut alive: Vec<usize>) -> Result<()> {
        let n = self.set.len;
        let mut masks: Vec<Vec<bool>> = vec![Vec::new(); new.len()];
        let (mut lo, mut hi) = (0, self.cfg.race_images.min(n));
        loop {
            let subs: Vec<Subnet> = alive.iter().map(|&k| new[k].clone()).collect();
            let part = self.masks(&subs, lo..hi)?;
            for (&k, p) in alive.iter().zip(part) {
                masks[k].extend(p);
            }
            if hi == n {
                break;
            }
            alive.retain(|&k| !self.drop_if_out(&new[k], lat[k], &mut masks[k], lo > 0));
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

    /// Ends the race of `s` if it can no longer reach its reference: it enters the archive
    /// with its estimate, its bound and the images scored so far (`later`: after a round other
    /// than the first). Returns whether it was dropped.
    fn drop_if_out(&mut self, s: &Subnet, latency: f64, mask: &mut Vec<bool>, later: bool) -> bool {
        let Some((false, quality, upper)) = self.race_verdict(mask, latency) else {
            return false;
        };
        self.stats.raced_out += 1;
        self.stats.raced_out_later += usize::from(later);
        let entry = Entry {
            latency,
            quality,
            upper,
            full: false,
            mask: std::mem::take(mask),
        };
        self.scores.insert(s.clone(), entry);
        true
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
        for (seen, group) in self.by_seen(subnets) {
            let hi = (2 * seen).clamp(seen + 1, n);
            let more = self.masks(&group, seen..hi)?;
            for (s, tail) in group.into_iter().zip(more) {
                let (latency, mask) = self.extended(&s, tail);
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
    pub(super) fn select_parents(
        &mut self,
        pop: &mut Vec<Subnet>,
        k: usize,
        budget: f64,
    ) -> Result<()> {
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::profile::LatencyTable;
    use crate::search::testing::{eval_set, supernet};
    use crate::search::{
        best_within, evaluate_prefix, pareto_front, search, Budget, Candidate, SearchConfig,
        Speedups,
    };

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
        // One raced archive, copied for each case: the race does not depend on the budget.
        let mut raced = Archive::new(&sn, &table, &set, &cfg, None);
        raced
            .evaluate(all.iter().step_by(15).cloned().collect(), false)
            .unwrap();
        raced.evaluate(all.clone(), false).unwrap();
        assert!(raced.stats.raced_out > 0);
        let mut rescored = 0;
        for (k, frac) in [(10, 0.5), (30, 0.7), (60, 1.0), (100, 1.0)] {
            let budget = lo + (hi - lo) * frac;
            let mut arch = Archive::new(&sn, &table, &set, &cfg, None);
            arch.scores = raced.scores.clone();
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
        let mut arch = Archive::new(&sn, &table, &set, &cfg, None);
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
}
