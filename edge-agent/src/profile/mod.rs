//! On-device latency table: time every (position, choice) module, the stem and the head on the
//! oracle path's feature map at that position, then check the additive model against
//! end-to-end measurements of random subnets and fit one calibration factor.
//!
//! Measurements are taken in interleaved rounds (every module once per round) so that slow
//! drifts (frequency, other processes) spread over all modules instead of biasing a few.
pub mod calibrate;
pub mod conditions;
pub mod memory;

use std::time::Instant;

use adaptivenet_core::supernet::{Choice, ModuleKey, Subnet, Supernet, SupernetSpec};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use calibrate::{Calibration, CalibrationModel, Observation};
pub use conditions::{current_threads, pin_threads, Conditions};
pub use memory::ReusePlan;

use crate::{EdgeError, Result};

/// Version of the latency-table JSON this code writes and reads.
pub const TABLE_FORMAT: u32 = 1;

/// Robust summary of repeated timings, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub median_ms: f64,
    pub p95_ms: f64,
    pub runs: usize,
}

impl Stat {
    /// Summarises samples (ms); an empty slice gives zeros.
    pub fn from_samples(samples: &[f64]) -> Stat {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Stat {
            median_ms: quantile(&v, 0.5),
            p95_ms: quantile(&v, 0.95),
            runs: v.len(),
        }
    }

    /// A fixed value (synthetic tables).
    pub fn fixed(ms: f64) -> Stat {
        Stat {
            median_ms: ms,
            p95_ms: ms,
            runs: 0,
        }
    }
}

/// Linear-interpolated quantile of sorted data (0 for empty input).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let x = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (x - lo as f64)
        }
    }
}

/// One module's latency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModuleLatency {
    pub position: usize,
    /// Stored as the research code's integer id (see [`Choice`]).
    pub choice: Choice,
    pub stat: Stat,
}

/// How well the table predicts end-to-end latency (relative errors, fractions not percent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub subnets: usize,
    pub rounds: usize,
    /// Median of measured / additive-sum: > 1 means the sum under-predicts.
    pub bias: f64,
    pub raw_median_err: f64,
    pub raw_p90_err: f64,
    /// Errors after calibration, each subnet predicted with a calibration fitted on the
    /// others (leave-one-out), so the figure is not an in-sample fit.
    pub calibrated_median_err: f64,
    pub calibrated_p90_err: f64,
    /// Whether a calibration was adopted (a model other than `none` won).
    pub calibrated: bool,
    /// The calibration model chosen by leave-one-out error (see [`calibrate`]).
    #[serde(default = "default_model")]
    pub model: CalibrationModel,
}

fn default_model() -> CalibrationModel {
    CalibrationModel::Scale
}

/// The persisted latency table of one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyTable {
    pub format_version: u32,
    /// The supernet the table belongs to (manifest `supernet_id`), if known.
    pub supernet_id: Option<String>,
    pub conditions: Conditions,
    pub stem: Stat,
    pub head: Stat,
    /// Sorted by (position, choice).
    pub modules: Vec<ModuleLatency>,
    #[serde(default)]
    pub calibration: Calibration,
    #[serde(default)]
    pub validation: Option<Validation>,
    /// How much the search may keep across generations on this device, decided when the
    /// table was profiled (absent in tables stored before it was).
    #[serde(default)]
    pub reuse: Option<ReusePlan>,
}

impl LatencyTable {
    /// Checks that every module of `spec` has an entry and every figure is finite.
    pub fn check(&self, spec: &SupernetSpec) -> Result<()> {
        for (pos, choices) in spec.positions.iter().enumerate() {
            for c in choices {
                self.module_ms(ModuleKey::new(pos, c.id))?;
            }
        }
        let all = [self.stem.median_ms, self.head.median_ms];
        if all
            .iter()
            .chain(self.modules.iter().map(|m| &m.stat.median_ms))
            .any(|v| !v.is_finite() || *v < 0.0)
            || !self.calibration.is_sane()
        {
            return Err(EdgeError::config(
                "latency table",
                "negative or non-finite figure",
            ));
        }
        Ok(())
    }

    /// Median latency of one module.
    pub fn module_ms(&self, key: ModuleKey) -> Result<f64> {
        self.modules
            .binary_search_by(|m| ModuleKey::new(m.position, m.choice).cmp(&key))
            .map(|i| self.modules[i].stat.median_ms)
            .map_err(|_| EdgeError::MissingLatency { module: key.name() })
    }

    /// The additive model: stem + chosen modules + head (uncalibrated).
    pub fn additive_ms(&self, s: &Subnet) -> Result<f64> {
        let mut t = self.stem.median_ms + self.head.median_ms;
        for key in s.steps() {
            t += self.module_ms(key)?;
        }
        Ok(t)
    }

    /// Calibrated prediction of a subnet's end-to-end latency.
    pub fn predict_ms(&self, s: &Subnet) -> Result<f64> {
        Ok(self
            .calibration
            .apply(self.additive_ms(s)?, s.steps().count()))
    }

    /// Calibrated latency of one module's contribution, its per-call cost included, so that
    /// `predict_ms` = constant part + the sum of these over the subnet's modules (search uses
    /// it for deltas and bounds).
    pub fn scaled_module_ms(&self, key: ModuleKey) -> Result<f64> {
        Ok(self.calibration.scale * self.module_ms(key)? + self.calibration.per_call_ms)
    }

    /// The calibrated part every subnet pays (stem, head, constant overhead).
    pub fn fixed_ms(&self) -> f64 {
        self.calibration.scale * (self.stem.median_ms + self.head.median_ms)
            + self.calibration.overhead_ms
    }

    /// (cheapest, most expensive) calibrated subnet latency, by dynamic programming.
    pub fn latency_range(&self, spec: &SupernetSpec) -> Result<(f64, f64)> {
        let n = spec.num_positions();
        let mut lo = vec![f64::INFINITY; n + 1];
        let mut hi = vec![f64::NEG_INFINITY; n + 1];
        lo[n] = 0.0;
        hi[n] = 0.0;
        for i in (0..n).rev() {
            for c in &spec.positions[i] {
                if i + c.span <= n {
                    let m = self.scaled_module_ms(ModuleKey::new(i, c.id))?;
                    lo[i] = lo[i].min(m + lo[i + c.span]);
                    hi[i] = hi[i].max(m + hi[i + c.span]);
                }
            }
        }
        Ok((self.fixed_ms() + lo[0], self.fixed_ms() + hi[0]))
    }

    /// A synthetic table proportional to MACs (`ms_per_mmac` per million MACs): deterministic
    /// latencies for tests and for planning before a device has been profiled.
    pub fn from_macs(spec: &SupernetSpec, ms_per_mmac: f64) -> LatencyTable {
        let o = &spec.oracle;
        let [_, h, w] = o.input;
        let shapes = o.block_shapes(h, w);
        let f = |macs: u64| Stat::fixed(macs as f64 / 1e6 * ms_per_mmac);
        let last = shapes[shapes.len() - 1];
        let mut modules = Vec::new();
        for (i, cs) in spec.positions.iter().enumerate() {
            for c in cs {
                modules.push(ModuleLatency {
                    position: i,
                    choice: c.id,
                    stat: f(c.block.macs(&o.numerics, shapes[i][1], shapes[i][2])),
                });
            }
        }
        modules.sort_by_key(|m| (m.position, m.choice));
        LatencyTable {
            format_version: TABLE_FORMAT,
            supernet_id: None,
            conditions: Conditions::detect(current_threads(), 1),
            stem: f(o.stem.macs(&o.numerics, h, w)),
            head: f(o.head.macs(last[1], last[2])),
            modules,
            calibration: Calibration::default(),
            validation: None,
            reuse: None,
        }
    }
}

/// How to profile.
#[derive(Clone, Debug)]
pub struct ProfileConfig {
    /// Deployment batch size.
    pub batch: usize,
    /// Untimed rounds first (allocator, caches, frequency ramp-up).
    pub warmup: usize,
    /// Timed rounds; the median over them is stored.
    pub rounds: usize,
    pub seed: u64,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            batch: 1,
            warmup: 5,
            rounds: 40,
            seed: 0,
        }
    }
}

fn time_ms<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let t = Instant::now();
    let out = f()?;
    Ok((t.elapsed().as_secs_f64() * 1e3, out))
}

/// A deterministic random input batch of the model's input shape.
pub fn random_input(spec: &SupernetSpec, batch: usize, seed: u64) -> Result<Tensor> {
    use rand::Rng;
    let [c, h, w] = spec.oracle.input;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Ok(Tensor::from_vec(data, (batch, c, h, w), &Device::Cpu)?)
}

/// Times every module of a (fully loaded) supernet. Each module runs on the oracle path's
/// feature map entering its position, so merges see exactly the shape they get in a subnet.
pub fn profile(
    supernet: &Supernet,
    cfg: &ProfileConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<LatencyTable> {
    if cfg.batch == 0 || cfg.rounds == 0 {
        return Err(EdgeError::config(
            "profile",
            "batch and rounds must be >= 1",
        ));
    }
    let spec = &supernet.spec;
    let x = random_input(spec, cfg.batch, cfg.seed)?;
    // Oracle-path features entering each position, and the last one for the head.
    let mut feats = vec![supernet.forward_stem(&x)?];
    for i in 0..spec.num_positions() {
        let h = supernet.forward_module(ModuleKey::new(i, Choice::Original), &feats[i])?;
        feats.push(h);
    }
    let units: Vec<ModuleKey> = spec
        .positions
        .iter()
        .enumerate()
        .flat_map(|(i, cs)| cs.iter().map(move |c| ModuleKey::new(i, c.id)))
        .collect();
    let mut samples = vec![Vec::with_capacity(cfg.rounds); units.len()];
    let (mut stem_s, mut head_s) = (Vec::new(), Vec::new());
    let total = cfg.warmup + cfg.rounds;
    for round in 0..total {
        let keep = round >= cfg.warmup;
        let (t, _) = time_ms(|| Ok(supernet.forward_stem(&x)?))?;
        if keep {
            stem_s.push(t);
        }
        for (k, &key) in units.iter().enumerate() {
            let (t, _) = time_ms(|| Ok(supernet.forward_module(key, &feats[key.pos])?))?;
            if keep {
                samples[k].push(t);
            }
        }
        let (t, _) = time_ms(|| Ok(supernet.forward_head(&feats[spec.num_positions()])?))?;
        if keep {
            head_s.push(t);
        }
        progress(round + 1, total);
    }
    let mut modules: Vec<ModuleLatency> = units
        .iter()
        .zip(&samples)
        .map(|(&key, s)| ModuleLatency {
            position: key.pos,
            choice: key.choice,
            stat: Stat::from_samples(s),
        })
        .collect();
    // Lookups binary-search by module key; spec order puts the pruned choices after the
    // merges, key order before the original.
    modules.sort_by_key(|m| (m.position, m.choice));
    // What a cross-generation cache hit at each position reads back (the activation one
    // image leaves there) against what it saves at least (the fastest module there).
    let per_image = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes() / cfg.batch;
    let out_bytes: Vec<usize> = feats[1..].iter().map(per_image).collect();
    let fastest_ms: Vec<f64> = (0..spec.num_positions())
        .map(|i| {
            modules
                .iter()
                .filter(|m| m.position == i)
                .map(|m| m.stat.median_ms / cfg.batch as f64)
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let reuse = ReusePlan::measure(&out_bytes, &fastest_ms);
    tracing::info!("search reuse cache: {}", reuse.reason);
    Ok(LatencyTable {
        format_version: TABLE_FORMAT,
        supernet_id: None,
        conditions: Conditions::detect(current_threads(), cfg.batch),
        stem: Stat::from_samples(&stem_s),
        head: Stat::from_samples(&head_s),
        modules,
        calibration: Calibration::default(),
        validation: None,
        reuse: Some(reuse),
    })
}

/// Measured end-to-end latency of subnets: interleaved rounds in a fresh random order each
/// round; the median per subnet.
pub fn measure_subnets(
    supernet: &Supernet,
    subnets: &[Subnet],
    batch: usize,
    warmup: usize,
    rounds: usize,
    seed: u64,
) -> Result<Vec<f64>> {
    let x = random_input(&supernet.spec, batch.max(1), seed)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut samples = vec![Vec::with_capacity(rounds); subnets.len()];
    let mut order: Vec<usize> = (0..subnets.len()).collect();
    for round in 0..warmup + rounds.max(1) {
        order.shuffle(&mut rng);
        for &k in &order {
            let (t, _) = time_ms(|| Ok(supernet.forward(&subnets[k], &x)?))?;
            if round >= warmup {
                samples[k].push(t);
            }
        }
    }
    Ok(samples
        .iter()
        .map(|s| Stat::from_samples(s).median_ms)
        .collect())
}

/// Distinct random subnets (plus the oracle path), deterministic for a seed.
pub fn random_subnets(spec: &SupernetSpec, n: usize, seed: u64) -> Result<Vec<Subnet>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let total = spec.count().min(n as u128) as usize;
    let mut seen = std::collections::BTreeSet::new();
    seen.insert(Subnet::original(spec.num_positions()));
    let mut tries = 0;
    while seen.len() < total && tries < 100 * n {
        seen.insert(spec.sample(&mut rng, false)?);
        tries += 1;
    }
    let mut v: Vec<Subnet> = seen.into_iter().collect();
    v.shuffle(&mut rng);
    Ok(v)
}

/// Relative errors `|pred - meas| / meas`, sorted.
pub fn rel_errors(pred: &[f64], meas: &[f64]) -> Vec<f64> {
    let mut e: Vec<f64> = pred
        .iter()
        .zip(meas)
        .map(|(p, m)| (p - m).abs() / m.max(1e-9))
        .collect();
    e.sort_by(f64::total_cmp);
    e
}

/// Compares additive predictions with measurements, selects and fits the calibration (see
/// [`calibrate`]) and reports its leave-one-out error. Pure: testable with injected numbers.
pub fn assess(obs: &[Observation], rounds: usize) -> (Validation, Calibration) {
    let ratios: Vec<f64> = obs
        .iter()
        .map(|o| o.measured / o.additive.max(1e-9))
        .collect();
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let raw = rel_errors(
        &obs.iter().map(|o| o.additive).collect::<Vec<_>>(),
        &obs.iter().map(|o| o.measured).collect::<Vec<_>>(),
    );
    let sel = calibrate::select(obs);
    (
        Validation {
            subnets: obs.len(),
            rounds,
            bias: quantile(&sorted, 0.5),
            raw_median_err: quantile(&raw, 0.5),
            raw_p90_err: quantile(&raw, 0.9),
            calibrated_median_err: quantile(&sel.loo, 0.5),
            calibrated_p90_err: quantile(&sel.loo, 0.9),
            calibrated: sel.model != CalibrationModel::None,
            model: sel.model,
        },
        sel.calibration,
    )
}

/// End-to-end observations of `subnets` against a table's additive sums.
pub fn observations(
    table: &LatencyTable,
    subnets: &[Subnet],
    measured: &[f64],
) -> Result<Vec<Observation>> {
    subnets
        .iter()
        .zip(measured)
        .map(|(s, &m)| {
            Ok(Observation {
                additive: table.additive_ms(s)?,
                calls: s.steps().count(),
                measured: m,
            })
        })
        .collect()
}

/// Validates the additive model on `n` random subnets measured end to end (interleaved
/// rounds) and stores the validation and the fitted calibration in the table.
pub fn validate_table(
    supernet: &Supernet,
    table: &mut LatencyTable,
    n: usize,
    rounds: usize,
    seed: u64,
) -> Result<Validation> {
    let subnets = random_subnets(&supernet.spec, n, seed)?;
    let measured = measure_subnets(supernet, &subnets, table.conditions.batch, 2, rounds, seed)?;
    let obs = observations(table, &subnets, &measured)?;
    let (v, c) = assess(&obs, rounds);
    table.calibration = c;
    table.validation = Some(v.clone());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assess_fits_a_constant_bias() {
        // Measurements 10% above the sum with +-1% noise: calibrated error must be ~1%.
        let obs: Vec<Observation> = (0..30)
            .map(|i| {
                let a = 1.0 + i as f64 * 0.1;
                Observation {
                    additive: a,
                    calls: 9,
                    measured: a * 1.1 * (1.0 + 0.01 * ((i % 3) as f64 - 1.0)),
                }
            })
            .collect();
        let (v, c) = assess(&obs, 5);
        assert!(v.raw_median_err > 0.08, "{v:?}");
        assert!(v.calibrated_median_err < 0.015, "{v:?}");
        assert!(
            v.calibrated && (c.apply(1.0, 9) - 1.1).abs() < 0.02,
            "{c:?}"
        );
    }

    #[test]
    fn calibrated_prediction_is_fixed_part_plus_module_contributions() {
        use adaptivenet_core::model::{ArchDescriptor, Model};
        use adaptivenet_core::supernet::{branches::build_supernet, SupernetConfig};
        let arch = ArchDescriptor::from_json(
            br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[4,8,16],"in_channels":1,"num_classes":10}"#,
        )
        .unwrap();
        let sn = build_supernet(
            &Model::init(&arch.spec, 1).unwrap(),
            &SupernetConfig::merge_only(),
        )
        .unwrap();
        let mut t = LatencyTable::from_macs(&sn.spec, 0.01);
        t.calibration = Calibration {
            scale: 1.07,
            per_call_ms: 0.03,
            overhead_ms: 0.02,
        };
        let (lo, hi) = t.latency_range(&sn.spec).unwrap();
        for s in sn.spec.enumerate(1000).unwrap() {
            let p = t.predict_ms(&s).unwrap();
            let parts: f64 = s.steps().map(|k| t.scaled_module_ms(k).unwrap()).sum();
            assert!((p - (t.fixed_ms() + parts)).abs() < 1e-12);
            assert!(p >= lo - 1e-12 && p <= hi + 1e-12);
        }
    }

    #[test]
    fn quantiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 1.0), 5.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        let s = Stat::from_samples(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median_ms, s.runs), (2.0, 3));
    }

    #[test]
    fn profiled_table_finds_every_module_with_pruned_branches_too() {
        use adaptivenet_core::model::{ArchDescriptor, Model};
        use adaptivenet_core::supernet::{branches::build_supernet, SupernetConfig};
        let arch = ArchDescriptor::from_json(
            br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[4,8,16],"in_channels":1,"num_classes":10}"#,
        )
        .unwrap();
        let names = ["merge2", "merge3", "prune1", "prune2"];
        let sn = build_supernet(
            &Model::init(&arch.spec, 1).unwrap(),
            &SupernetConfig::from_names(&names, 0).unwrap(),
        )
        .unwrap();
        let cfg = ProfileConfig {
            warmup: 0,
            rounds: 1,
            ..ProfileConfig::default()
        };
        let t = profile(&sn, &cfg, |_, _| {}).unwrap();
        t.check(&sn.spec).unwrap();
        assert!(
            t.module_ms(ModuleKey::new(0, Choice::Prune2)).is_ok()
                && t.module_ms(ModuleKey::new(0, Choice::Merge3)).is_ok()
        );
    }
}
