//! The rollout model: steps, cohorts, gates, the stored rollout and decision, and `judge`,
//! all pure functions of their inputs. Below the store (which persists these types) and the
//! engine (`crate::rollout::engine`, which drives them); see `crate::rollout` for the
//! invariants.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::DeviceClass;
use crate::error::{CloudError, Result};

/// Buckets of the cohort hash: percent steps have a resolution of 0.01 %.
const BUCKETS: u64 = 10_000;

/// Lifecycle of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutState {
    Running,
    Paused,
    Succeeded,
    RolledBack,
    Aborted,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Succeeded => "succeeded",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "running" => RolloutState::Running,
            "paused" => RolloutState::Paused,
            "succeeded" => RolloutState::Succeeded,
            "rolled_back" => RolloutState::RolledBack,
            "aborted" => RolloutState::Aborted,
            other => {
                return Err(CloudError::Internal(format!(
                    "unknown rollout state {other}"
                )))
            }
        })
    }

    /// Running or paused: the fleet's devices follow the cohort split.
    pub fn is_active(self) -> bool {
        matches!(self, RolloutState::Running | RolloutState::Paused)
    }
}

/// One step: who joins the cohort at it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// A share of the fleet, in (0, 100], by the device id's bucket.
    Percent(f64),
    /// Named devices (canaries).
    Devices(Vec<Uuid>),
    /// Every device of a class.
    Class(i32),
}

/// The steps used when a request names none.
pub fn default_steps() -> Vec<Step> {
    vec![
        Step::Percent(5.0),
        Step::Percent(25.0),
        Step::Percent(100.0),
    ]
}

/// Checks steps (naming `steps[i]` on failure) and appends a final 100 % step when the last
/// one does not cover the whole fleet. Percent steps must grow.
pub fn normalize_steps(mut steps: Vec<Step>) -> Result<Vec<Step>> {
    if steps.is_empty() {
        return Ok(default_steps());
    }
    let mut last_pct = 0.0;
    for (i, s) in steps.iter().enumerate() {
        let field = format!("steps[{i}]");
        match s {
            Step::Percent(p) => {
                if !p.is_finite() || *p <= 0.0 || *p > 100.0 {
                    return Err(CloudError::invalid(field, "percent must be in (0, 100]"));
                }
                if *p <= last_pct {
                    return Err(CloudError::invalid(
                        field,
                        format!("percent steps must grow ({p} after {last_pct})"),
                    ));
                }
                last_pct = *p;
            }
            Step::Devices(d) => {
                if d.is_empty() {
                    return Err(CloudError::invalid(field, "device list is empty"));
                }
            }
            Step::Class(c) => {
                DeviceClass::new(&field, *c)?;
            }
        }
    }
    if steps.len() > 32 {
        return Err(CloudError::invalid("steps", "at most 32 steps"));
    }
    if !matches!(steps.last(), Some(Step::Percent(p)) if *p >= 100.0) {
        steps.push(Step::Percent(100.0));
    }
    Ok(steps)
}

/// The stable bucket of a device, in `0..BUCKETS`.
pub fn bucket(device: Uuid) -> u64 {
    let h = Sha256::digest(device.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_be_bytes(b) % BUCKETS
}

/// Whether a device is in the cohort (on B) at step `index`.
pub fn in_cohort(steps: &[Step], index: usize, device: Uuid, class: DeviceClass) -> bool {
    steps.iter().take(index + 1).any(|s| match s {
        Step::Percent(p) => (bucket(device) as f64) < p / 100.0 * BUCKETS as f64,
        Step::Devices(d) => d.contains(&device),
        Step::Class(c) => *c == class.0,
    })
}

/// Gates and holds of every step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// Largest allowed drop of mean quality (points).
    pub max_quality_drop_points: f64,
    /// Largest allowed drop of the within-budget share by p95 (points).
    pub max_budget_share_drop_points: f64,
    /// Minimum hold of a step before promotion (ms).
    pub window_ms: i64,
    /// Cohort devices that must have reported on B during the step (capped at the cohort).
    pub min_reports: u64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            max_quality_drop_points: 2.0,
            max_budget_share_drop_points: 10.0,
            window_ms: 10 * 60 * 1000,
            min_reports: 5,
        }
    }
}

impl Gates {
    /// Validates request values; 0 keeps the default.
    pub fn from_request(
        quality: f64,
        budget: f64,
        window_secs: u64,
        min_reports: u64,
    ) -> Result<Self> {
        let d = Gates::default();
        let points = |field: &str, v: f64, default: f64| {
            if !v.is_finite() || !(0.0..=100.0).contains(&v) {
                Err(CloudError::invalid(
                    field,
                    "must be between 0 and 100 points",
                ))
            } else if v == 0.0 {
                Ok(default)
            } else {
                Ok(v)
            }
        };
        if window_secs > 7 * 24 * 3600 {
            return Err(CloudError::invalid("gates.window_secs", "at most one week"));
        }
        if min_reports > 1_000_000 {
            return Err(CloudError::invalid("gates.min_reports", "at most 1000000"));
        }
        Ok(Gates {
            max_quality_drop_points: points(
                "gates.max_quality_drop_points",
                quality,
                d.max_quality_drop_points,
            )?,
            max_budget_share_drop_points: points(
                "gates.max_budget_share_drop_points",
                budget,
                d.max_budget_share_drop_points,
            )?,
            window_ms: if window_secs == 0 {
                d.window_ms
            } else {
                window_secs as i64 * 1000
            },
            min_reports: if min_reports == 0 {
                d.min_reports
            } else {
                min_reports
            },
        })
    }
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub id: Uuid,
    pub fleet_id: Uuid,
    pub from_supernet_id: Uuid,
    pub to_supernet_id: Uuid,
    pub steps: Vec<Step>,
    pub gates: Gates,
    pub step_index: usize,
    pub step_started_ms: i64,
    pub state: RolloutState,
    pub status: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl Rollout {
    /// The supernet a device of this fleet should serve while the rollout is active.
    pub fn target_for(&self, device: Uuid, class: DeviceClass) -> Uuid {
        if in_cohort(&self.steps, self.step_index, device, class) {
            self.to_supernet_id
        } else {
            self.from_supernet_id
        }
    }

    pub fn is_last_step(&self) -> bool {
        self.step_index + 1 >= self.steps.len()
    }
}

/// One recorded decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub seq: u64,
    pub at_ms: i64,
    pub step_index: usize,
    pub action: String,
    pub detail: serde_json::Value,
}

/// A device's latest report, as the gates see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub device_id: Uuid,
    pub class: DeviceClass,
    pub supernet_id: Uuid,
    /// Quality in [0, 1].
    pub quality: f64,
    pub latency_p95_ms: f64,
    pub latency_budget_ms: f64,
    pub reported_ms: i64,
}

/// Mean quality and within-budget share of one group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupStats {
    pub devices: usize,
    /// Mean quality, points (0-100).
    pub quality_points: f64,
    /// Share of devices whose p95 is within budget, points.
    pub within_budget_points: f64,
}

impl GroupStats {
    fn of(samples: &[&Sample]) -> Option<GroupStats> {
        if samples.is_empty() {
            return None;
        }
        let n = samples.len() as f64;
        Some(GroupStats {
            devices: samples.len(),
            quality_points: 100.0 * samples.iter().map(|s| s.quality).sum::<f64>() / n,
            within_budget_points: 100.0
                * samples
                    .iter()
                    .filter(|s| s.latency_p95_ms <= s.latency_budget_ms)
                    .count() as f64
                / n,
        })
    }
}

/// What the gates concluded for one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassVerdict {
    pub class: i32,
    /// The cohort on B (None when the class has no such device: never shown below k).
    pub cohort: Option<GroupStats>,
    /// The devices on A the cohort was compared with.
    pub control: Option<GroupStats>,
    /// Why the class was not compared, or which gate failed; None when it passed.
    pub note: Option<String>,
    pub failed: bool,
}

/// The gates' conclusion over a whole step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough time or reports yet; the string says what is awaited.
    Hold(String),
    /// Every compared class passed (and the window and reports are complete).
    Promote(serde_json::Value),
    /// Some class failed a gate (decided as soon as the reports are in, before the window).
    Rollback(serde_json::Value),
}

/// Judges the current step from the fleet's latest reports.
///
/// `cohort_devices` are the fleet's devices in the cohort at this step; `samples` the fleet's
/// latest reports. A cohort sample counts only when it reports B and arrived during the step;
/// the control group is the devices outside the cohort that report A. `k` is the privacy
/// floor: a class is compared only when both groups have at least `k` devices.
pub fn judge(
    r: &Rollout,
    cohort_devices: &[(Uuid, DeviceClass)],
    samples: &[Sample],
    k: usize,
    now_ms: i64,
) -> Verdict {
    let k = k.max(1);
    let in_cohort: BTreeMap<Uuid, DeviceClass> = cohort_devices.iter().copied().collect();
    let cohort: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            in_cohort.contains_key(&s.device_id)
                && s.supernet_id == r.to_supernet_id
                && s.reported_ms >= r.step_started_ms
        })
        .collect();
    let control: Vec<&Sample> = samples
        .iter()
        .filter(|s| !in_cohort.contains_key(&s.device_id) && s.supernet_id == r.from_supernet_id)
        .collect();
    let needed = (r.gates.min_reports as usize).min(cohort_devices.len());
    let elapsed = now_ms - r.step_started_ms;

    let mut classes: Vec<i32> = cohort.iter().map(|s| s.class.0).collect();
    classes.sort_unstable();
    classes.dedup();
    let verdicts: Vec<ClassVerdict> = classes
        .iter()
        .map(|&c| {
            let on_b: Vec<&Sample> = cohort.iter().copied().filter(|s| s.class.0 == c).collect();
            let on_a: Vec<&Sample> = control.iter().copied().filter(|s| s.class.0 == c).collect();
            if on_b.len() < k || on_a.len() < k {
                return ClassVerdict {
                    class: c,
                    cohort: None,
                    control: None,
                    note: Some(format!(
                        "not compared: {} device(s) on B and {} on A, the privacy floor is {k}",
                        on_b.len(),
                        on_a.len()
                    )),
                    failed: false,
                };
            }
            let (b, a) = (GroupStats::of(&on_b).unwrap(), GroupStats::of(&on_a).unwrap());
            let q_drop = a.quality_points - b.quality_points;
            let w_drop = a.within_budget_points - b.within_budget_points;
            let mut fails = Vec::new();
            if q_drop > r.gates.max_quality_drop_points {
                fails.push(format!(
                    "quality {:.2} on B vs {:.2} on A: drop {q_drop:.2} > {:.2} points",
                    b.quality_points, a.quality_points, r.gates.max_quality_drop_points
                ));
            }
            if w_drop > r.gates.max_budget_share_drop_points {
                fails.push(format!(
                    "within budget by p95 {:.1} % on B vs {:.1} % on A: drop {w_drop:.1} > {:.1} points",
                    b.within_budget_points, a.within_budget_points, r.gates.max_budget_share_drop_points
                ));
            }
            ClassVerdict {
                class: c,
                cohort: Some(b),
                control: Some(a),
                failed: !fails.is_empty(),
                note: (!fails.is_empty()).then(|| fails.join("; ")),
            }
        })
        .collect();
    let detail = serde_json::json!({
        "step": r.step_index,
        "cohort_devices": cohort_devices.len(),
        "cohort_reports_on_b": cohort.len(),
        "control_reports_on_a": control.len(),
        "elapsed_ms": elapsed,
        "classes": verdicts,
    });
    if cohort.len() < needed {
        return Verdict::Hold(format!(
            "step {} of {}: {} of {needed} cohort report(s) on B",
            r.step_index + 1,
            r.steps.len(),
            cohort.len()
        ));
    }
    if verdicts.iter().any(|v| v.failed) {
        return Verdict::Rollback(detail);
    }
    if elapsed < r.gates.window_ms {
        return Verdict::Hold(format!(
            "step {} of {}: gates pass so far, window {}s of {}s",
            r.step_index + 1,
            r.steps.len(),
            elapsed / 1000,
            r.gates.window_ms / 1000
        ));
    }
    Verdict::Promote(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(steps: Vec<Step>) -> Rollout {
        Rollout {
            id: Uuid::new_v4(),
            fleet_id: Uuid::new_v4(),
            from_supernet_id: Uuid::from_u128(1),
            to_supernet_id: Uuid::from_u128(2),
            steps,
            gates: Gates {
                max_quality_drop_points: 2.0,
                max_budget_share_drop_points: 10.0,
                window_ms: 1000,
                min_reports: 2,
            },
            step_index: 0,
            step_started_ms: 100,
            state: RolloutState::Running,
            status: String::new(),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn sample(d: u128, on: u128, quality: f64, p95: f64, at: i64) -> Sample {
        Sample {
            device_id: Uuid::from_u128(d),
            class: DeviceClass(1),
            supernet_id: Uuid::from_u128(on),
            quality,
            latency_p95_ms: p95,
            latency_budget_ms: 10.0,
            reported_ms: at,
        }
    }

    #[test]
    fn percent_cohorts_are_stable_nested_and_near_their_share() {
        let steps = default_steps();
        let ids: Vec<Uuid> = (0..20_000u128)
            .map(|i| Uuid::from_u128(i * 7919 + 13))
            .collect();
        let share = |i: usize| {
            ids.iter()
                .filter(|d| in_cohort(&steps, i, **d, DeviceClass(1)))
                .count() as f64
                / ids.len() as f64
        };
        assert!((share(0) - 0.05).abs() < 0.01, "{}", share(0));
        assert!((share(1) - 0.25).abs() < 0.015, "{}", share(1));
        assert_eq!(share(2), 1.0);
        for d in &ids {
            let at0 = in_cohort(&steps, 0, *d, DeviceClass(1));
            assert!(
                !at0 || in_cohort(&steps, 1, *d, DeviceClass(1)),
                "cohorts only grow"
            );
            assert_eq!(bucket(*d), bucket(*d));
        }
    }

    #[test]
    fn explicit_devices_and_classes_come_first() {
        let canary = Uuid::from_u128(42);
        let steps = normalize_steps(vec![Step::Devices(vec![canary]), Step::Class(3)]).unwrap();
        assert_eq!(steps.len(), 3, "a final 100 % step is added");
        assert!(in_cohort(&steps, 0, canary, DeviceClass(1)));
        let other = Uuid::from_u128(43);
        assert!(!in_cohort(&steps, 0, other, DeviceClass(3)));
        assert!(in_cohort(&steps, 1, other, DeviceClass(3)));
        assert!(!in_cohort(&steps, 1, other, DeviceClass(2)));
        assert!(in_cohort(&steps, 2, other, DeviceClass(2)));
    }

    #[test]
    fn bad_steps_name_the_step() {
        for (steps, field) in [
            (vec![Step::Percent(0.0)], "steps[0]"),
            (vec![Step::Percent(50.0), Step::Percent(20.0)], "steps[1]"),
            (vec![Step::Devices(vec![])], "steps[0]"),
            (vec![Step::Class(99)], "steps[0]"),
            (vec![Step::Percent(f64::NAN)], "steps[0]"),
        ] {
            let e = normalize_steps(steps).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn judge_holds_then_promotes_or_rolls_back() {
        let r = rollout(default_steps());
        let cohort = [
            (Uuid::from_u128(1), DeviceClass(1)),
            (Uuid::from_u128(2), DeviceClass(1)),
        ];
        let control = [sample(3, 1, 0.90, 5.0, 50), sample(4, 1, 0.92, 5.0, 50)];
        // One cohort report: hold.
        let mut s = control.to_vec();
        s.push(sample(1, 2, 0.91, 5.0, 200));
        assert!(matches!(judge(&r, &cohort, &s, 2, 300), Verdict::Hold(m) if m.contains("1 of 2")));
        // A report from before the step, or on A, does not count.
        let mut stale = s.clone();
        stale.push(sample(2, 2, 0.91, 5.0, 50));
        assert!(matches!(
            judge(&r, &cohort, &stale, 2, 300),
            Verdict::Hold(_)
        ));
        // Both in and good: hold for the window, then promote.
        s.push(sample(2, 2, 0.90, 5.0, 250));
        assert!(matches!(judge(&r, &cohort, &s, 2, 300), Verdict::Hold(m) if m.contains("window")));
        assert!(matches!(
            judge(&r, &cohort, &s, 2, 1200),
            Verdict::Promote(_)
        ));
        // Quality 10 points lower: roll back at once, without waiting for the window.
        let mut bad = control.to_vec();
        bad.push(sample(1, 2, 0.80, 5.0, 200));
        bad.push(sample(2, 2, 0.81, 5.0, 200));
        match judge(&r, &cohort, &bad, 2, 300) {
            Verdict::Rollback(d) => assert!(d.to_string().contains("quality"), "{d}"),
            v => panic!("{v:?}"),
        }
        // Slower: both over budget by p95.
        let mut slow = control.to_vec();
        slow.push(sample(1, 2, 0.91, 50.0, 200));
        slow.push(sample(2, 2, 0.91, 50.0, 200));
        assert!(matches!(
            judge(&r, &cohort, &slow, 2, 300),
            Verdict::Rollback(_)
        ));
        // Under the privacy floor nothing is compared: the bad step is not judged on 2 devices.
        match judge(&r, &cohort, &bad, 3, 1200) {
            Verdict::Promote(d) => assert!(d.to_string().contains("not compared"), "{d}"),
            v => panic!("{v:?}"),
        }
    }
}
