//! The archive: every subnet scored in a run, shared by all budgets, and the evaluation cache
//! in front of the evaluators of [`super::prefix`].
//!
//! Invariants: a subnet is never scored twice on the same image (a raced-out one is completed
//! on the images it has not seen); only fully scored entries become [`Candidate`]s, so a
//! raced-out subnet never enters the front or an answer; how subnets are evaluated (per subnet
//! or as a prefix tree, with or without the cross-generation cache, on any number of workers)
//! changes the work counted in [`SearchStats`], never a mask, hence never a score.
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use adaptivenet_core::supernet::{Subnet, Supernet};

use super::pareto::fitness;
use super::prefix::{evaluate_masks_reusing, Masks, Method, ReuseCache};
use super::{Candidate, SearchConfig, SearchStats};
use crate::profile::LatencyTable;
use crate::quality::EvalSet;
use crate::Result;

/// What the archive knows about one scored subnet.
#[derive(Clone)]
pub(super) struct Entry {
    pub(super) latency: f64,
    /// Percent; for a raced-out subnet an estimate below its reference's quality.
    pub(super) quality: f64,
    /// Upper confidence bound of the quality (percent): `quality` when scored fully.
    pub(super) upper: f64,
    /// Scored on every image (only these enter the front and the answers).
    pub(super) full: bool,
    /// Per-image correctness on the images it was scored on (from image 0).
    pub(super) mask: Vec<bool>,
}

/// Scored subnets of a run, shared by all budgets.
pub(super) struct Archive<'a> {
    pub(super) supernet: &'a Supernet,
    pub(super) table: &'a LatencyTable,
    pub(super) set: &'a EvalSet,
    pub(super) cfg: &'a SearchConfig,
    pub(super) scores: BTreeMap<Subnet, Entry>,
    pub(super) stats: SearchStats,
    /// Cross-generation prefix reuse (with `prefix_reuse` and a non-zero bound).
    pub(super) reuse: Option<ReuseCache>,
    /// Module calls times images, over the run.
    image_module_calls: u64,
}

impl<'a> Archive<'a> {
    /// An empty archive; `reuse` is the cross-generation cache, if any.
    pub(super) fn new(
        supernet: &'a Supernet,
        table: &'a LatencyTable,
        set: &'a EvalSet,
        cfg: &'a SearchConfig,
        reuse: Option<ReuseCache>,
    ) -> Self {
        Archive {
            supernet,
            table,
            set,
            cfg,
            scores: BTreeMap::new(),
            stats: SearchStats::default(),
            reuse,
            image_module_calls: 0,
        }
    }
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

    /// Per-image correctness of `subnets` on the images `range`, counting the work.
    pub(super) fn masks(&mut self, subnets: &[Subnet], range: Range<usize>) -> Result<Masks> {
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

    pub(super) fn full_entry(&self, latency: f64, mask: Vec<bool>) -> Entry {
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
    pub(super) fn evaluate(&mut self, subnets: Vec<Subnet>, force_full: bool) -> Result<()> {
        let todo = self.to_score(subnets, force_full);
        let (partial, new): (Vec<Subnet>, Vec<Subnet>) =
            todo.into_iter().partition(|s| self.scores.contains_key(s));
        self.complete(partial)?;
        if new.is_empty() {
            return Ok(());
        }
        let lat = new
            .iter()
            .map(|s| self.table.predict_ms(s))
            .collect::<Result<Vec<_>>>()?;
        self.stats.evaluations += new.len();
        if self.can_race(force_full) {
            self.race(new, lat)
        } else {
            self.score_fully(new, lat)
        }
    }

    /// The distinct `subnets` without a score (or, with `force_full`, without a full one), in
    /// code order.
    fn to_score(&self, subnets: Vec<Subnet>, force_full: bool) -> Vec<Subnet> {
        subnets
            .into_iter()
            .filter(|s| self.scores.get(s).is_none_or(|e| force_full && !e.full))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Completes raced-out subnets, whatever round dropped them, on the images after those
    /// their mask covers: one pass per group of equal coverage.
    fn complete(&mut self, partial: Vec<Subnet>) -> Result<()> {
        self.stats.rescored += partial.len();
        let n = self.set.len;
        for (seen, group) in self.by_seen(partial) {
            let rest = self.masks(&group, seen..n)?;
            for (s, tail) in group.into_iter().zip(rest) {
                let (latency, mask) = self.extended(&s, tail);
                let e = self.full_entry(latency, mask);
                self.scores.insert(s, e);
            }
        }
        Ok(())
    }

    /// The raced-out `subnets`, grouped by the number of images they were scored on.
    pub(super) fn by_seen(&self, subnets: Vec<Subnet>) -> BTreeMap<usize, Vec<Subnet>> {
        let mut by_seen: BTreeMap<usize, Vec<Subnet>> = BTreeMap::new();
        for s in subnets {
            let e = &self.scores[&s];
            if !e.full {
                by_seen.entry(e.mask.len()).or_default().push(s);
            }
        }
        by_seen
    }

    /// The latency of a scored subnet and its mask followed by `tail`.
    pub(super) fn extended(&self, s: &Subnet, tail: Vec<bool>) -> (f64, Vec<bool>) {
        let e = &self.scores[s];
        let mut mask = e.mask.clone();
        mask.extend(tail);
        (e.latency, mask)
    }

    /// Scores `new` (latencies `lat`) on every image in one pass.
    fn score_fully(&mut self, new: Vec<Subnet>, lat: Vec<f64>) -> Result<()> {
        let m = self.masks(&new, 0..self.set.len)?;
        for ((s, l), m) in new.into_iter().zip(lat).zip(m) {
            let e = self.full_entry(l, m);
            self.scores.insert(s, e);
        }
        Ok(())
    }

    pub(super) fn contains(&self, s: &Subnet) -> bool {
        self.scores.contains_key(s)
    }

    pub(super) fn latency(&self, s: &Subnet) -> f64 {
        self.scores[s].latency
    }

    pub(super) fn fit(&self, s: &Subnet, budget: f64) -> f64 {
        let e = &self.scores[s];
        fitness(e.quality, e.latency, budget)
    }

    /// Fully scored candidates.
    pub(super) fn candidates(&self) -> Vec<Candidate> {
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
