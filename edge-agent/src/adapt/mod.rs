//! Runtime maintenance (METHOD.md §3) with hysteresis.
//!
//! [`Controller`] is a pure state machine over window statistics. It estimates how much slower
//! than the table the device runs right now, `r = live p50 / table latency` of the active
//! subnet, and applies `r` to the other front entries.
//! - **Down** after `down_after` consecutive checks with p50 above `budget * (1 + tolerance)`:
//!   to the most accurate entry with `r * latency <= budget`. The entry left behind is then
//!   blocked until `r` has dropped by `unblock_drop` (the environment really improved), so a
//!   subnet whose own table error is above the tolerance cannot be re-entered in a loop.
//! - **Up** one entry after `up_after` consecutive checks in which `r * latency(next) <=
//!   budget * (1 + tolerance / 2)`: after the step its expected p50 is half a tolerance below
//!   the down threshold, so noise smaller than that cannot make it step straight back.
//! - After a switch the window restarts on the new subnet (the research loop re-measured the
//!   old one) and `cooldown` checks are skipped.
//!
//! [`maintain`] drives the controller from a server's live window on a tokio interval; tests
//! use `tokio::time::pause()` with injected latencies.
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::search::Candidate;
use crate::serve::{Server, SwitchReport};

/// Controller settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptConfig {
    pub budget_ms: f64,
    /// Samples needed in the window before any decision.
    pub min_samples: usize,
    pub down_after: usize,
    pub up_after: usize,
    /// Relative slack over the budget tolerated as noise.
    pub tolerance: f64,
    /// Relative drop of `r` that lifts the block on an entry stepped down from.
    pub unblock_drop: f64,
    /// Checks skipped after a switch.
    pub cooldown: usize,
    /// Time between checks.
    pub interval_ms: u64,
}

impl AdaptConfig {
    pub fn new(budget_ms: f64) -> Self {
        AdaptConfig {
            budget_ms,
            min_samples: 20,
            down_after: 3,
            up_after: 5,
            tolerance: 0.05,
            unblock_drop: 0.1,
            cooldown: 2,
            interval_ms: 1000,
        }
    }
}

/// What the controller wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Stay,
    /// Switch to this front index.
    Switch(usize),
}

/// Hysteresis state machine over a Pareto front (sorted by increasing latency).
#[derive(Clone, Debug)]
pub struct Controller {
    pub cfg: AdaptConfig,
    pub front: Vec<Candidate>,
    pub current: usize,
    over: usize,
    under: usize,
    cooldown: usize,
    /// (front index, r when stepping down from it).
    blocked: Option<(usize, f64)>,
}

impl Controller {
    pub fn new(cfg: AdaptConfig, front: Vec<Candidate>, current: usize) -> Self {
        Controller {
            cfg,
            current: current.min(front.len().saturating_sub(1)),
            front,
            over: 0,
            under: 0,
            cooldown: 0,
            blocked: None,
        }
    }

    /// The front index of the most accurate entry within `budget_ms` per the table, else 0.
    pub fn initial_index(front: &[Candidate], budget_ms: f64) -> usize {
        front
            .iter()
            .rposition(|c| c.latency_ms <= budget_ms)
            .unwrap_or(0)
    }

    /// One check with the window's p50 (ms) of the active subnet.
    pub fn observe(&mut self, p50: f64) -> Decision {
        if self.front.is_empty() {
            return Decision::Stay;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return Decision::Stay;
        }
        let b = self.cfg.budget_ms;
        let tol = self.cfg.tolerance;
        let ratio = p50 / self.front[self.current].latency_ms.max(1e-9);
        if let Some((k, r)) = self.blocked {
            if ratio <= r * (1.0 - self.cfg.unblock_drop) || self.current >= k {
                self.blocked = None;
            }
        }
        let next = self.current + 1;
        let up_ok = next < self.front.len()
            && ratio * self.front[next].latency_ms <= b * (1.0 + tol / 2.0)
            && self.blocked.is_none_or(|(k, _)| next < k);
        if p50 > b * (1.0 + tol) {
            self.under = 0;
            self.over += 1;
            if self.over >= self.cfg.down_after && self.current > 0 {
                let j = self.front[..self.current]
                    .iter()
                    .rposition(|c| ratio * c.latency_ms <= b)
                    .unwrap_or(0);
                self.blocked = Some((self.current, ratio));
                return Decision::Switch(j);
            }
        } else if up_ok {
            self.over = 0;
            self.under += 1;
            if self.under >= self.cfg.up_after {
                return Decision::Switch(next);
            }
        } else {
            self.over = 0;
            self.under = 0;
        }
        Decision::Stay
    }

    /// Tells the controller a switch to front index `j` happened.
    pub fn switched(&mut self, j: usize) {
        self.current = j;
        self.over = 0;
        self.under = 0;
        self.cooldown = self.cfg.cooldown;
    }

    /// Tells the controller a switch failed: keep the old subnet and wait before retrying.
    pub fn failed(&mut self) {
        self.over = 0;
        self.under = 0;
        self.cooldown = self.cfg.cooldown;
    }
}

/// One maintenance event.
#[derive(Clone, Debug)]
pub enum AdaptEvent {
    Switched(SwitchReport),
    SwitchFailed { to: String, error: String },
}

/// The maintenance loop: every `interval_ms`, read the live window of `server`, decide, and
/// switch (loading only differing modules). Runs until `shutdown` becomes true; returns the
/// events. `on_event` sees each event as it happens (logging, persistence of the active
/// subnet).
pub async fn maintain(
    server: Arc<Server>,
    mut ctl: Controller,
    mut shutdown: watch::Receiver<bool>,
    mut on_event: impl FnMut(&AdaptEvent, &Controller),
) -> Vec<AdaptEvent> {
    let mut events = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(ctl.cfg.interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() { break; }
                continue;
            }
        }
        if *shutdown.borrow() {
            break;
        }
        let (n, p50, _p95) = server.window_stats();
        if n < ctl.cfg.min_samples {
            continue;
        }
        if let Decision::Switch(j) = ctl.observe(p50) {
            let target = ctl.front[j].subnet.clone();
            let ev = match server.switch(&target) {
                Ok(r) => {
                    ctl.switched(j);
                    AdaptEvent::Switched(r)
                }
                Err(e) => {
                    ctl.failed();
                    AdaptEvent::SwitchFailed {
                        to: target.to_string(),
                        error: e.to_string(),
                    }
                }
            };
            on_event(&ev, &ctl);
            events.push(ev);
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaptivenet_core::supernet::Subnet;

    fn front() -> Vec<Candidate> {
        [
            (5.0, 80.0),
            (6.0, 85.0),
            (7.0, 88.0),
            (8.0, 90.0),
            (10.0, 92.0),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(l, q))| Candidate {
            subnet: Subnet(vec![i as i8 % 2]),
            latency_ms: l,
            quality: q,
        })
        .collect()
    }

    /// Deterministic noise in [-a, a].
    fn noise(i: usize, a: f64) -> f64 {
        let x = ((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) as f64 / (1u64 << 53) as f64;
        (2.0 * x - 1.0) * a
    }

    #[test]
    fn steps_down_under_load_and_back_up_without_oscillating() {
        let mut c = Controller::new(AdaptConfig::new(8.0), front(), 3);
        let mut switches = Vec::new();
        for t in 0..300 {
            let load = if (100..200).contains(&t) { 1.4 } else { 1.0 };
            let p50 = c.front[c.current].latency_ms * load * (1.0 + noise(t, 0.03));
            if let Decision::Switch(j) = c.observe(p50) {
                switches.push((t, j));
                c.switched(j);
            }
        }
        // One step down when the load comes, back up when it goes; nothing in steady phases.
        assert!(
            switches
                .iter()
                .any(|&(t, j)| (100..120).contains(&t) && j < 3),
            "{switches:?}"
        );
        assert_eq!(c.current, 3, "{switches:?}");
        assert!(switches.len() <= 4, "{switches:?}");
        assert!(
            switches
                .iter()
                .all(|&(t, _)| (100..140).contains(&t) || (200..260).contains(&t)),
            "{switches:?}"
        );
    }
}
