//! Search settings: which speed-ups run, the latency budget, and the evolutionary and racing
//! parameters.
//!
//! Invariant: a configuration stored by an older agent still parses (every field added
//! later has a serde default equal to [`SearchConfig::default`]'s), and a configuration the
//! search accepts passes [`SearchConfig::check`], which names the offending field.
use adaptivenet_core::supernet::Subnet;
use serde::{Deserialize, Serialize};

use crate::profile::LatencyTable;
use crate::serve::bn::RecalSetting;
use crate::{EdgeError, Result};

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
    /// Re-ranking of each budget's best candidates with BN recalibrated as the agent will
    /// serve them (`edge-agent run --bn-recal --recal-pick`). Applied by the plan after the
    /// search (it needs the artifact's unfolded weights), recorded here so that a stored
    /// result is reused only under the same pick. Absent (and not written) without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recal_pick: Option<RecalPick>,
}

/// The recal pick's settings ([`super::recal_pick`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecalPick {
    /// Candidates per budget re-scored (the best by search quality); below 2 nothing is
    /// re-ranked.
    pub k: usize,
    /// The recalibration the agent serves with, hence re-scores with.
    pub setting: RecalSetting,
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
            recal_pick: None,
        }
    }
}

impl SearchConfig {
    /// Refuses settings the evolutionary loop cannot run with.
    pub(super) fn check(&self) -> Result<()> {
        if self.population < 2 || !(0.0..1.0).contains(&self.parent_frac) {
            return Err(EdgeError::config(
                "search",
                "population >= 2 and 0 <= parent_frac < 1 required",
            ));
        }
        if !(self.race_z.is_finite() && self.race_z >= 0.0) {
            return Err(EdgeError::config(
                "race_z",
                format!("{} must be a finite number >= 0", self.race_z),
            ));
        }
        Ok(())
    }
}
