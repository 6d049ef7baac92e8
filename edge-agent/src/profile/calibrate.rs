//! Calibration of the additive latency model against end-to-end measurements.
//!
//! Timing a module on its own misses what a whole forward pass adds: per-call dispatch and
//! allocation, cache traffic between consecutive modules, the subnet validation. Those costs
//! scale partly with the total work (a factor) and partly with the number of module calls (a
//! merge saves a call), so the candidates fitted here are nested linear models of the
//! additive sum `a` and the number of block calls `k`:
//!
//! | model | prediction |
//! |---|---|
//! | `none` | `a` |
//! | `scale` | `s * a` (median ratio, robust) |
//! | `scale_per_call` | `s * a + c * k` |
//! | `scale_offset` | `s * a + o` |
//!
//! Every candidate is scored leave-one-out (each subnet predicted by a fit on the others), so
//! the figure that picks the model is out-of-sample; a richer model is chosen only when it
//! lowers that error by more than [`MIN_GAIN`]. Fits minimise *relative* squared error (the
//! target is a relative error), with one trimming pass against outlier measurements.
use serde::{Deserialize, Serialize};

use super::quantile;

/// A richer calibration model must lower the leave-one-out median error by more than this
/// (absolute fraction) to be preferred over a simpler one.
pub const MIN_GAIN: f64 = 0.002;

/// `predicted = scale * additive_sum + per_call_ms * block_calls + overhead_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub scale: f64,
    /// Cost per block-module call that isolated timings miss (ms).
    #[serde(default)]
    pub per_call_ms: f64,
    pub overhead_ms: f64,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            scale: 1.0,
            per_call_ms: 0.0,
            overhead_ms: 0.0,
        }
    }
}

impl Calibration {
    /// Calibrated latency of a subnet with additive sum `additive` and `calls` block calls.
    pub fn apply(&self, additive: f64, calls: usize) -> f64 {
        self.scale * additive + self.per_call_ms * calls as f64 + self.overhead_ms
    }

    /// Whether every figure is finite and the factor positive.
    pub fn is_sane(&self) -> bool {
        self.scale.is_finite()
            && self.scale > 0.0
            && self.per_call_ms.is_finite()
            && self.overhead_ms.is_finite()
    }
}

/// The candidate models (see the module docs), simplest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationModel {
    None,
    Scale,
    ScalePerCall,
    ScaleOffset,
}

impl CalibrationModel {
    pub const ALL: [CalibrationModel; 4] = [
        CalibrationModel::None,
        CalibrationModel::Scale,
        CalibrationModel::ScalePerCall,
        CalibrationModel::ScaleOffset,
    ];
}

/// One end-to-end observation: additive sum (ms), block calls, measured latency (ms).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    pub additive: f64,
    pub calls: usize,
    pub measured: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    quantile(&s, 0.5)
}

/// Weighted least squares of `measured ≈ x·θ` with weights `1/measured²` (relative error),
/// for two features; `None` when singular.
fn lsq2(obs: &[Observation], feat: impl Fn(&Observation) -> [f64; 2]) -> Option<[f64; 2]> {
    let (mut a, mut b, mut c, mut r0, mut r1) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for o in obs {
        let w = 1.0 / (o.measured * o.measured).max(1e-18);
        let [x0, x1] = feat(o);
        a += w * x0 * x0;
        b += w * x0 * x1;
        c += w * x1 * x1;
        r0 += w * x0 * o.measured;
        r1 += w * x1 * o.measured;
    }
    let det = a * c - b * b;
    if det.is_nan() || det.abs() <= 1e-12 * (a * c).abs().max(1e-300) {
        return None;
    }
    Some([(c * r0 - b * r1) / det, (a * r1 - b * r0) / det])
}

fn fit_once(model: CalibrationModel, obs: &[Observation]) -> Option<Calibration> {
    let id = Calibration::default();
    let cal = match model {
        CalibrationModel::None => id,
        CalibrationModel::Scale => {
            let r: Vec<f64> = obs
                .iter()
                .map(|o| o.measured / o.additive.max(1e-12))
                .collect();
            if r.is_empty() {
                return None;
            }
            Calibration {
                scale: median(&r),
                ..id
            }
        }
        CalibrationModel::ScalePerCall => {
            let [s, c] = lsq2(obs, |o| [o.additive, o.calls as f64])?;
            Calibration {
                scale: s,
                per_call_ms: c,
                ..id
            }
        }
        CalibrationModel::ScaleOffset => {
            let [s, off] = lsq2(obs, |o| [o.additive, 1.0])?;
            Calibration {
                scale: s,
                overhead_ms: off,
                ..id
            }
        }
    };
    cal.is_sane().then_some(cal)
}

fn rel_err(c: &Calibration, o: &Observation) -> f64 {
    (c.apply(o.additive, o.calls) - o.measured).abs() / o.measured.max(1e-12)
}

/// Fits `model` on `obs`: a first fit, then a refit without points whose relative error is
/// more than 3 median absolute deviations above the median (one noisy measurement must not
/// tilt the line). `None` when the fit is degenerate or predicts a non-positive latency for
/// one of the observations.
pub fn fit(model: CalibrationModel, obs: &[Observation]) -> Option<Calibration> {
    let first = fit_once(model, obs)?;
    let errs: Vec<f64> = obs.iter().map(|o| rel_err(&first, o)).collect();
    let med = median(&errs);
    let mad = median(&errs.iter().map(|e| (e - med).abs()).collect::<Vec<_>>());
    let kept: Vec<Observation> = obs
        .iter()
        .zip(&errs)
        .filter(|(_, e)| **e <= med + 3.0 * mad.max(0.005))
        .map(|(o, _)| *o)
        .collect();
    let cal = if kept.len() >= 3 && kept.len() < obs.len() {
        fit_once(model, &kept)?
    } else {
        first
    };
    obs.iter()
        .all(|o| cal.apply(o.additive, o.calls) > 0.0)
        .then_some(cal)
}

/// Sorted leave-one-out relative errors of `model` on `obs` (`None` if a fold cannot fit).
pub fn loo_errors(model: CalibrationModel, obs: &[Observation]) -> Option<Vec<f64>> {
    let mut e = Vec::with_capacity(obs.len());
    for i in 0..obs.len() {
        let rest: Vec<Observation> = obs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, o)| *o)
            .collect();
        let c = if model == CalibrationModel::None {
            Calibration::default()
        } else {
            fit(model, &rest)?
        };
        e.push(rel_err(&c, &obs[i]));
    }
    e.sort_by(f64::total_cmp);
    Some(e)
}

/// The outcome of model selection.
#[derive(Clone, Debug, PartialEq)]
pub struct Selected {
    pub model: CalibrationModel,
    pub calibration: Calibration,
    /// Sorted leave-one-out relative errors of the chosen model.
    pub loo: Vec<f64>,
    /// Leave-one-out median error of every candidate that could be fitted.
    pub candidates: Vec<(CalibrationModel, f64)>,
}

/// Picks the calibration model with the lowest leave-one-out median error (a richer model
/// must win by more than [`MIN_GAIN`]) and fits it on all observations. With fewer than 4
/// observations only `none` and `scale` are considered.
pub fn select(obs: &[Observation]) -> Selected {
    let mut best: Option<(CalibrationModel, Vec<f64>)> = None;
    let mut candidates = Vec::new();
    for m in CalibrationModel::ALL {
        if obs.len() < 4
            && matches!(
                m,
                CalibrationModel::ScalePerCall | CalibrationModel::ScaleOffset
            )
        {
            continue;
        }
        let Some(e) = loo_errors(m, obs) else {
            continue;
        };
        let med = quantile(&e, 0.5);
        candidates.push((m, med));
        let better = match &best {
            None => true,
            Some((_, b)) => med < quantile(b, 0.5) - MIN_GAIN,
        };
        if better {
            best = Some((m, e));
        }
    }
    let (model, loo) = best.unwrap_or((CalibrationModel::None, Vec::new()));
    let calibration = if model == CalibrationModel::None {
        Calibration::default()
    } else {
        fit(model, obs).unwrap_or_default()
    };
    Selected {
        model,
        calibration,
        loo,
        candidates,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(per_call: f64, scale: f64, noise: f64) -> Vec<Observation> {
        // Subnets with 5..=9 calls and sums that do not grow with the call count in lockstep
        // (a merge is cheaper per call), measured with deterministic +-noise.
        (0..36)
            .map(|i| {
                let calls = 5 + i % 5;
                let additive = 1.0 + 0.17 * ((i * 7) % 11) as f64 + 0.2 * calls as f64;
                let wiggle = noise * (((i * 13) % 7) as f64 / 3.0 - 1.0);
                Observation {
                    additive,
                    calls,
                    measured: (scale * additive + per_call * calls as f64) * (1.0 + wiggle),
                }
            })
            .collect()
    }

    #[test]
    fn per_call_overhead_is_fitted_and_beats_a_factor() {
        let obs = synthetic(0.08, 1.02, 0.005);
        let raw = loo_errors(CalibrationModel::None, &obs).unwrap();
        let sel = select(&obs);
        assert_eq!(sel.model, CalibrationModel::ScalePerCall, "{sel:?}");
        assert!((sel.calibration.per_call_ms - 0.08).abs() < 0.02, "{sel:?}");
        assert!((sel.calibration.scale - 1.02).abs() < 0.03, "{sel:?}");
        let cal = quantile(&sel.loo, 0.5);
        let raw_med = quantile(&raw, 0.5);
        assert!(
            raw_med > 0.1 && cal < 0.01,
            "raw {raw_med} calibrated {cal}"
        );
        // The factor alone cannot absorb a per-call cost as well.
        let scale_only = sel
            .candidates
            .iter()
            .find(|(m, _)| *m == CalibrationModel::Scale)
            .unwrap()
            .1;
        assert!(scale_only > cal + MIN_GAIN, "{sel:?}");
    }

    #[test]
    fn unbiased_data_keeps_the_identity_and_an_outlier_does_not_tilt_the_fit() {
        let obs = synthetic(0.0, 1.0, 0.01);
        assert_eq!(select(&obs).model, CalibrationModel::None);
        let mut biased = synthetic(0.0, 1.1, 0.004);
        biased[3].measured *= 3.0; // one disturbed measurement
        let sel = select(&biased);
        assert!(
            (sel.calibration.scale - 1.1).abs() < 0.02
                && sel.calibration.per_call_ms.abs() < 0.02
                && sel.calibration.overhead_ms.abs() < 0.05,
            "{sel:?}"
        );
        assert!(quantile(&sel.loo, 0.5) < 0.01, "{sel:?}");
    }

    #[test]
    fn degenerate_input_falls_back_to_the_identity() {
        assert_eq!(select(&[]).calibration, Calibration::default());
        let same = [Observation {
            additive: 1.0,
            calls: 9,
            measured: 1.2,
        }; 5];
        // Collinear features: the two-feature fits are singular, the factor still works.
        let sel = select(&same);
        assert!(sel.calibration.is_sane());
        assert!(
            (sel.calibration.apply(1.0, 9) - 1.2).abs() < 1e-9,
            "{sel:?}"
        );
    }
}
