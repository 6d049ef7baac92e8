//! Runtime maintenance (METHOD.md §3): a controller that does not oscillate under
//! measurement noise.
//!
//! [`Controller`] is a pure state machine over per-window p50 latencies (windows do not
//! overlap: see [`crate::serve::Server::take_fresh`]). It works on the log slowdown
//! `x = ln(live p50 / table latency)` of the active subnet:
//! - **Noise** `σ`: the per-window spread of `x`, estimated robustly from successive
//!   differences (`median |x_t - x_{t-1}| / (0.6745 √2)`, immune to level shifts such as a
//!   load step), clamped to `[noise_floor, noise_cap]`; `noise_prior` until enough windows.
//!   The median of `k` windows has spread `s_k ≈ 1.25 σ / √k`.
//! - **Down** when the median `m` of the last `down_after` windows on this subnet says it is
//!   over budget beyond tolerance *and* noise: `L·e^m > B·(1 + tolerance)·e^(z·s_down)`.
//!   The target is the most accurate entry whose predicted live latency clears the budget by
//!   `margin`: `L_j·e^m ≤ B / (1 + margin)`, else the cheapest.
//! - **Up** when, over the last `up_after` windows (more than down: slow up, fast down), a
//!   more accurate entry's predicted live latency fits the budget with confidence:
//!   `L_j·e^(μ + z_up·σ/√up_after) ≤ B` with `μ` the larger of the *mean* of those windows
//!   and the mean of their older half (slack must be sustained over the whole span; the
//!   median of light-tailed noise is too wide here: with ±15% uniform noise the median of 12
//!   windows crosses a 3-sigma line about once per 100 windows); the most accurate such
//!   entry is chosen. Between the two tests lies a dead band of at least
//!   `(1 + tolerance)·e^(z·s_down + z_up·σ/√up_after)`, which grows with the noise: under
//!   ±15% noise an entry is re-entered only if its table latency is ≲ 0.9 of the budget.
//! - **Near-duplicates** on the front (within `min_gap` latency of a more accurate entry) are
//!   never targets: stepping to them would not change the latency measurably.
//! - **Cooldown**: the first `cooldown` windows after a switch are discarded, and decisions
//!   use only windows measured on the current subnet and after the last level shift (a
//!   window more than `z·σ` from the history's mean restarts it), so a step up after a load
//!   ends goes straight to the entry that fits, instead of creeping through mixed windows.
//! - **Block**: after stepping down from entry `i`, entries `>= i` stay blocked until the
//!   slowdown measured on the new subnet drops by `unblock_drop` beyond noise (the
//!   environment really improved). A subnet whose own table error pushes it over budget is
//!   therefore not re-entered in a loop: no oscillation between two neighbours.
//!
//! [`maintain_until`] drives a shared controller from a server's live window on a tokio
//! interval until a cancellation token fires ([`maintain`]: until a watch flag is set);
//! tests use `tokio::time::pause()` with injected latencies. The loop that runs it in the
//! agent, with drift detection, the timeline and re-plans, is [`crate::agent`].
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::search::Candidate;
use crate::serve::{Server, SwitchReport, WindowStats};

pub mod contention;
pub mod drift;
pub mod plan;
pub mod timeline;

/// Controller settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptConfig {
    pub budget_ms: f64,
    /// Fresh samples a window needs before it counts.
    pub min_samples: usize,
    /// Windows whose median decides a step down.
    pub down_after: usize,
    /// Windows whose median decides a step up.
    pub up_after: usize,
    /// Relative excess over the budget tolerated (table error, not noise).
    pub tolerance: f64,
    /// A step-down target's predicted live latency clears the budget by this fraction.
    pub margin: f64,
    /// Confidence multiplier on the noise of the down median.
    pub z: f64,
    /// Confidence multiplier on the noise of the up mean (an up step is cheaper to delay
    /// than to undo).
    pub z_up: f64,
    /// Bounds and prior of the per-window log-noise estimate.
    pub noise_floor: f64,
    pub noise_cap: f64,
    pub noise_prior: f64,
    /// Successive-window differences kept for the noise estimate.
    pub noise_windows: usize,
    /// Relative latency gap below which a front entry is a near-duplicate.
    pub min_gap: f64,
    /// Relative drop of the slowdown that lifts the block on entries stepped down from.
    pub unblock_drop: f64,
    /// Windows discarded after a switch.
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
            up_after: 16,
            tolerance: 0.05,
            margin: 0.05,
            z: 3.0,
            z_up: 5.0,
            noise_floor: 0.01,
            noise_cap: 0.3,
            noise_prior: 0.1,
            noise_windows: 64,
            min_gap: 0.03,
            unblock_drop: 0.05,
            cooldown: 1,
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

/// Entries `>= above` are blocked until the slowdown drops below `level - ln(1 + unblock_drop)`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Block {
    above: usize,
    /// Median log slowdown on the subnet stepped down to (set once measured).
    level: Option<f64>,
}

/// Hysteresis state machine over a Pareto front (sorted by increasing latency).
#[derive(Clone, Debug)]
pub struct Controller {
    pub cfg: AdaptConfig,
    pub front: Vec<Candidate>,
    pub current: usize,
    /// Front indices that may be targets (near-duplicates removed), increasing latency.
    ladder: Vec<usize>,
    /// Log slowdowns of the windows on the current subnet, oldest first.
    history: VecDeque<f64>,
    /// |x_t - x_{t-1}| within segments on one subnet.
    diffs: VecDeque<f64>,
    cooldown: usize,
    block: Option<Block>,
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

impl Controller {
    pub fn new(cfg: AdaptConfig, front: Vec<Candidate>, current: usize) -> Self {
        let ladder = Self::ladder(&front, cfg.min_gap);
        Controller {
            current: current.min(front.len().saturating_sub(1)),
            front,
            ladder,
            history: VecDeque::new(),
            diffs: VecDeque::new(),
            cooldown: 0,
            block: None,
            cfg,
        }
    }

    /// Front indices without near-duplicates: walking from the most accurate entry down,
    /// keep an entry only if it is at least `min_gap` faster than the last one kept.
    fn ladder(front: &[Candidate], min_gap: f64) -> Vec<usize> {
        let mut keep: Vec<usize> = Vec::new();
        for i in (0..front.len()).rev() {
            let ok = keep
                .last()
                .is_none_or(|&k| front[i].latency_ms < front[k].latency_ms * (1.0 - min_gap));
            if ok {
                keep.push(i);
            }
        }
        keep.reverse();
        keep
    }

    /// The front index of the most accurate entry within `budget_ms` per the table, else 0.
    pub fn initial_index(front: &[Candidate], budget_ms: f64) -> usize {
        front
            .iter()
            .rposition(|c| c.latency_ms <= budget_ms)
            .unwrap_or(0)
    }

    /// Replaces front and budget (a re-search or a new supernet): history and blocks no
    /// longer apply; the noise estimate does (same device, same clock).
    pub fn reset(&mut self, budget_ms: f64, front: Vec<Candidate>, current: usize) {
        self.cfg.budget_ms = budget_ms;
        self.ladder = Self::ladder(&front, self.cfg.min_gap);
        self.current = current.min(front.len().saturating_sub(1));
        self.front = front;
        self.history.clear();
        self.block = None;
        self.cooldown = self.cfg.cooldown;
    }

    /// The per-window log-noise estimate.
    pub fn noise(&self) -> f64 {
        let c = &self.cfg;
        if self.diffs.len() < 4 {
            return c.noise_prior.clamp(c.noise_floor, c.noise_cap);
        }
        let mad = median(self.diffs.iter().copied());
        (mad / (0.6745 * std::f64::consts::SQRT_2)).clamp(c.noise_floor, c.noise_cap)
    }

    /// Spread of the median of `k` windows.
    fn spread(&self, k: usize) -> f64 {
        1.25 * self.noise() / (k.max(1) as f64).sqrt()
    }

    /// Median log slowdown of the last `k` windows on this subnet, if there are `k`.
    fn level(&self, k: usize) -> Option<f64> {
        let k = k.max(1);
        (self.history.len() >= k)
            .then(|| median(self.history.iter().skip(self.history.len() - k).copied()))
    }

    /// Mean log slowdown of the last `k` windows on this subnet, if there are `k`.
    fn mean_level(&self, k: usize) -> Option<f64> {
        self.mean_of(k, k)
    }

    /// Mean of the oldest `n` of the last `k` windows, if there are `k`.
    fn mean_of(&self, k: usize, n: usize) -> Option<f64> {
        let (k, n) = (k.max(1), n.clamp(1, k.max(1)));
        (self.history.len() >= k).then(|| {
            self.history
                .iter()
                .skip(self.history.len() - k)
                .take(n)
                .sum::<f64>()
                / n as f64
        })
    }

    /// Live/table latency ratio of the current subnet (median of the down windows).
    pub fn slowdown(&self) -> Option<f64> {
        self.level(self.cfg.down_after).map(f64::exp)
    }

    /// One check with the window's p50 (ms) of the active subnet.
    pub fn observe(&mut self, p50: f64) -> Decision {
        if self.front.is_empty() || !(p50 > 0.0 && p50.is_finite()) {
            return Decision::Stay;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return Decision::Stay;
        }
        let cfg = self.cfg.clone();
        let b = cfg.budget_ms;
        let lat = |i: usize| self.front[i].latency_ms.max(1e-9);
        let cur_l = lat(self.current);
        let x = (p50 / cur_l).ln();
        // A level shift (load came or went): this window is far outside the history's spread,
        // so the history describes another regime and decisions restart from here.
        let n = self.history.len();
        if n >= cfg.down_after.max(1) {
            let mean = self.history.iter().sum::<f64>() / n as f64;
            if (x - mean).abs() > cfg.z * self.noise() * (1.0 + 1.0 / n as f64).sqrt() {
                self.history.clear();
            }
        }
        if let Some(&prev) = self.history.back() {
            if self.diffs.len() == cfg.noise_windows.max(4) {
                self.diffs.pop_front();
            }
            self.diffs.push_back((x - prev).abs());
        }
        self.history.push_back(x);
        let keep = cfg.down_after.max(cfg.up_after).max(1);
        while self.history.len() > keep {
            self.history.pop_front();
        }

        // Block bookkeeping: remember the level on arrival (median of the first down
        // windows), lift when the mean over the up windows dropped enough beyond noise.
        let s_down = self.spread(cfg.down_after);
        let s_mean = self.noise() / (cfg.up_after.max(1) as f64).sqrt();
        match (self.block, self.level(cfg.down_after)) {
            (Some(blk), Some(m)) if blk.level.is_none() => {
                self.block = Some(Block {
                    level: Some(m),
                    ..blk
                })
            }
            (Some(Block { level: Some(l), .. }), _) => {
                if let Some(mu) = self.mean_level(cfg.up_after) {
                    let need = (1.0 + cfg.unblock_drop).ln() + cfg.z * s_down.hypot(s_mean);
                    if l - mu >= need {
                        self.block = None;
                    }
                }
            }
            _ => {}
        }

        // Down: sustained violation beyond tolerance and noise.
        if let Some(m) = self.level(cfg.down_after) {
            let over = cur_l * m.exp() > b * (1.0 + cfg.tolerance) * (cfg.z * s_down).exp();
            if over {
                let faster: Vec<usize> = self
                    .ladder
                    .iter()
                    .copied()
                    .filter(|&j| lat(j) < cur_l)
                    .collect();
                let Some(&cheapest) = faster.first() else {
                    return Decision::Stay; // Nothing faster: keep serving the cheapest.
                };
                let j = faster
                    .iter()
                    .rev()
                    .copied()
                    .find(|&j| lat(j) * m.exp() <= b / (1.0 + cfg.margin))
                    .unwrap_or(cheapest);
                let above = match self.block {
                    Some(blk) => blk.above.min(self.current),
                    None => self.current,
                };
                self.block = Some(Block { above, level: None });
                return Decision::Switch(j);
            }
        }

        // Up: sustained slack for a more accurate entry, beyond noise.
        if let (Some(all), Some(older)) = (
            self.mean_level(cfg.up_after),
            self.mean_of(cfg.up_after, cfg.up_after / 2),
        ) {
            // Slack must be sustained over the whole span: the older half counts too, so
            // right after a load drop (old half still slow) nothing moves yet.
            let mu = all.max(older);
            let allowed = |j: usize| self.block.is_none_or(|blk| j < blk.above);
            let target = self
                .ladder
                .iter()
                .rev()
                .copied()
                .filter(|&j| j > self.current && allowed(j))
                .find(|&j| lat(j) * (mu + cfg.z_up * s_mean).exp() <= b);
            if let Some(j) = target {
                return Decision::Switch(j);
            }
        }
        Decision::Stay
    }

    /// Tells the controller a switch to front index `j` happened.
    pub fn switched(&mut self, j: usize) {
        self.current = j;
        self.history.clear();
        self.cooldown = self.cfg.cooldown;
    }

    /// Tells the controller a switch failed: keep the old subnet and wait before retrying.
    pub fn failed(&mut self) {
        if self.block.is_some_and(|b| b.level.is_none()) {
            self.block = None; // Set for the step that did not happen.
        }
        self.history.clear();
        self.cooldown = self.cfg.cooldown.max(1);
    }
}

/// Why the served subnet last changed, as heartbeats tell the cloud (a closed set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdaptationReason {
    /// Serving the subnet chosen at start-up.
    Initial,
    /// The controller stepped down: live latency over the budget.
    OverBudget,
    /// The controller stepped up: sustained slack under the budget.
    Slack,
    /// Re-profiled and re-searched after the latency table drifted.
    Research,
    /// Re-synced to a new desired supernet or budget policy.
    NewSupernet,
}

/// A controller shared by the maintenance loop and whoever replaces its plan (re-sync).
pub type SharedController = Arc<Mutex<Controller>>;

/// One maintenance event.
#[derive(Clone, Debug)]
pub enum AdaptEvent {
    Switched(SwitchReport),
    SwitchFailed { to: String, error: String },
}

impl AdaptEvent {
    /// The timeline name of the event: `step_down` / `step_up` by front position, else
    /// `switch_failed`.
    pub fn name(&self, front: &[Candidate]) -> &'static str {
        match self {
            AdaptEvent::Switched(r) => {
                let pos = |s| front.iter().position(|c| &c.subnet == s);
                if pos(&r.to) < pos(&r.from) {
                    "step_down"
                } else {
                    "step_up"
                }
            }
            AdaptEvent::SwitchFailed { .. } => "switch_failed",
        }
    }

    /// Why a successful switch happened (`None` for a failed one).
    pub fn reason(&self, front: &[Candidate]) -> Option<AdaptationReason> {
        match (self, self.name(front)) {
            (AdaptEvent::Switched(_), "step_down") => Some(AdaptationReason::OverBudget),
            (AdaptEvent::Switched(_), _) => Some(AdaptationReason::Slack),
            (AdaptEvent::SwitchFailed { .. }, _) => None,
        }
    }
}

/// What one maintenance check saw and did.
#[derive(Clone, Debug)]
pub struct Tick {
    pub stats: WindowStats,
    pub decision: Decision,
    pub event: Option<AdaptEvent>,
}

/// [`maintain_until`], stopped by a watch flag becoming true (or its sender dropping).
pub async fn maintain(
    server: Arc<Server>,
    ctl: SharedController,
    mut shutdown: watch::Receiver<bool>,
    on_tick: impl FnMut(&Tick, &Controller),
) -> Vec<AdaptEvent> {
    let stop = CancellationToken::new();
    let flag = async {
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        stop.cancel();
    };
    let (events, ()) = tokio::join!(maintain_until(server, ctl, stop.clone(), on_tick), flag);
    events
}

/// The maintenance loop: every `interval_ms`, read the samples recorded since the last
/// check (once there are `min_samples`), decide, and switch (loading only differing
/// modules). Runs until `stop` is cancelled; returns the events. `on_tick` sees every check
/// with the controller after it (timeline, logging, persistence of the active subnet).
pub async fn maintain_until(
    server: Arc<Server>,
    ctl: SharedController,
    stop: CancellationToken,
    mut on_tick: impl FnMut(&Tick, &Controller),
) -> Vec<AdaptEvent> {
    let mut events = Vec::new();
    let interval = ctl
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .cfg
        .interval_ms;
    let mut tick = tokio::time::interval(Duration::from_millis(interval.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        if stop.is_cancelled() {
            break;
        }
        // Decide and switch under the controller lock, so a re-sync replacing the plan
        // never interleaves with a switch on the old plan.
        let mut c = ctl.lock().unwrap_or_else(|e| e.into_inner());
        let Some(stats) = server.take_fresh(c.cfg.min_samples) else {
            continue;
        };
        if stats.version != server.active().version {
            continue; // A switch from elsewhere landed between the read and now.
        }
        let decision = c.observe(stats.p50_ms);
        let event = match decision {
            Decision::Stay => None,
            Decision::Switch(j) => {
                let target = c.front[j].subnet.clone();
                Some(match server.switch(&target) {
                    Ok(r) => {
                        c.switched(j);
                        AdaptEvent::Switched(r)
                    }
                    Err(e) => {
                        c.failed();
                        AdaptEvent::SwitchFailed {
                            to: target.to_string(),
                            error: e.to_string(),
                        }
                    }
                })
            }
        };
        let t = Tick {
            stats,
            decision,
            event,
        };
        on_tick(&t, &c);
        drop(c);
        if let Some(ev) = t.event {
            events.push(ev);
        }
    }
    events
}

#[cfg(test)]
mod tests;
