//! Progress of a long training run: one event per optimisation step, to any sink. The cloud's
//! job worker implements [`ProgressSink`] to forward it to `WatchJob`.
//!
//! One step's loss is one batch through one sampled path: its noise, and during elastification
//! the mix of short and long paths, hide the trend. Every event therefore also carries a window
//! mean over the stage ([`ProgressEvent::loss_avg`]) and, for elastification, the same per path
//! size ([`ProgressEvent::loss_by_blocks`]), so that a run drawing harder paths can be told from
//! one that diverges.
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use adaptivenet_core::supernet::Subnet;
use serde::{Deserialize, Serialize};

/// Steps a smoothed loss averages over (per path size: paths of that size).
pub const LOSS_WINDOW: usize = 50;

/// The smoothed loss of the trained paths of one size.
#[derive(Clone, Debug, PartialEq)]
pub struct SizeLoss {
    /// Blocks a path of this size runs (a merged block counts once).
    pub blocks: usize,
    /// Mean loss of the last [`LOSS_WINDOW`] paths of this size in the stage (fewer early on).
    pub loss: f64,
    /// Paths averaged.
    pub paths: usize,
    /// Mean share of branches (merged or pruned blocks) among the blocks of those paths.
    pub branch_share: f64,
}

/// Why an elastification step trained a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathRole {
    /// Drawn at random (left to right, `original_weight` per position).
    Random,
    /// The sandwich rule's smallest path.
    Smallest,
    /// The sandwich rule's largest path.
    Largest,
}

/// One path an elastification step trained, with its loss.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainedPath {
    pub subnet: Subnet,
    pub role: PathRole,
    pub loss: f64,
}

/// One progress report of a long job (sent after every optimisation step).
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressEvent {
    /// `oracle`, `stage0` or `stage1`.
    pub stage: String,
    /// Epoch (passes over the training data so far, 0-based) of this step.
    pub epoch: u64,
    /// Steps done in this stage, 1-based (the step just finished).
    pub step: u64,
    /// Steps of this stage.
    pub stage_steps: u64,
    /// Steps done over all stages, and their total.
    pub global_step: u64,
    pub total_steps: u64,
    /// Training loss of this step (elastification: the mean over the step's paths).
    pub loss: f64,
    /// Mean of `loss` over the stage's last [`LOSS_WINDOW`] steps, this one included (also
    /// across a resume).
    pub loss_avg: f64,
    /// Elastification: the smoothed loss per path size, fewest blocks first; empty for the
    /// oracle, whose every step runs the same network.
    pub loss_by_blocks: Vec<SizeLoss>,
    /// Elastification: the paths this step trained (empty for the oracle).
    pub paths: Vec<TrainedPath>,
    /// Learning rate of this step.
    pub lr: f64,
    /// Training throughput of this stage since it (re)started.
    pub samples_per_sec: f64,
    /// Estimated time to the end of the job at the current throughput.
    pub eta: Duration,
}

impl ProgressEvent {
    /// Overall fraction done, in `[0, 1]`.
    pub fn fraction(&self) -> f64 {
        if self.total_steps == 0 {
            1.0
        } else {
            (self.global_step as f64 / self.total_steps as f64).clamp(0.0, 1.0)
        }
    }

    /// `loss_by_blocks` for a log line: `4b 1.234 5b 0.987 ...` (blocks, smoothed loss).
    pub fn sizes_line(&self) -> String {
        let mut out = String::new();
        for s in &self.loss_by_blocks {
            if !out.is_empty() {
                out.push(' ');
            }
            let _ = write!(out, "{}b {:.3}", s.blocks, s.loss);
        }
        out
    }
}

/// Running window means of a stage's losses: over its last [`LOSS_WINDOW`] steps, and per path
/// size over the last [`LOSS_WINDOW`] paths of that size. Rebuilt from the stage's recorded
/// losses on resume, so the printed figures do not depend on where a run was interrupted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossWindows {
    steps: VecDeque<f64>,
    /// blocks -> (loss, branches) of the latest paths of that size.
    sizes: BTreeMap<usize, VecDeque<(f64, usize)>>,
}

impl LossWindows {
    /// Records one step's loss.
    pub fn step(&mut self, loss: f64) {
        if self.steps.len() == LOSS_WINDOW {
            self.steps.pop_front();
        }
        self.steps.push_back(loss);
    }

    /// Records one trained path: its blocks, how many of them are branches, its loss.
    pub fn path(&mut self, blocks: usize, branches: usize, loss: f64) {
        let w = self.sizes.entry(blocks).or_default();
        if w.len() == LOSS_WINDOW {
            w.pop_front();
        }
        w.push_back((loss, branches));
    }

    /// Mean over the step window (NaN before the first step).
    pub fn mean(&self) -> f64 {
        if self.steps.is_empty() {
            f64::NAN
        } else {
            self.steps.iter().sum::<f64>() / self.steps.len() as f64
        }
    }

    /// The per-size window means, fewest blocks first.
    pub fn by_blocks(&self) -> Vec<SizeLoss> {
        self.sizes
            .iter()
            .map(|(&blocks, w)| {
                let n = w.len() as f64;
                SizeLoss {
                    blocks,
                    loss: w.iter().map(|p| p.0).sum::<f64>() / n,
                    paths: w.len(),
                    branch_share: w.iter().map(|p| p.1 as f64).sum::<f64>() / (n * blocks as f64),
                }
            })
            .collect()
    }
}

/// Where progress goes. Implemented for closures, a `tokio::sync::watch` sender (latest value
/// wins), the cloud job worker's progress sender and [`NoProgress`]. Never blocks the
/// training loop.
pub trait ProgressSink {
    fn report(&mut self, event: &ProgressEvent);
}

impl<F: FnMut(&ProgressEvent)> ProgressSink for F {
    fn report(&mut self, event: &ProgressEvent) {
        self(event)
    }
}

impl ProgressSink for tokio::sync::watch::Sender<Option<ProgressEvent>> {
    fn report(&mut self, event: &ProgressEvent) {
        self.send_replace(Some(event.clone()));
    }
}

/// Discards progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn report(&mut self, _: &ProgressEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_average_the_latest_steps_and_each_size_apart() {
        let mut w = LossWindows::default();
        assert!(w.mean().is_nan());
        for k in 0..LOSS_WINDOW + 10 {
            w.step(k as f64);
        }
        // The first 10 steps left the window: mean of 10..LOSS_WINDOW+10.
        let expect = (10..LOSS_WINDOW + 10).sum::<usize>() as f64 / LOSS_WINDOW as f64;
        assert!((w.mean() - expect).abs() < 1e-9, "{}", w.mean());
        // A rare size keeps its own window instead of being averaged into the frequent one.
        for _ in 0..LOSS_WINDOW + 5 {
            w.path(6, 2, 1.0);
        }
        w.path(3, 3, 9.0);
        w.path(6, 1, 3.0);
        let s = w.by_blocks();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].blocks, s[0].paths, s[0].loss), (3, 1, 9.0));
        assert_eq!(s[0].branch_share, 1.0);
        assert_eq!((s[1].blocks, s[1].paths), (6, LOSS_WINDOW));
        let mean6 = ((LOSS_WINDOW - 1) as f64 + 3.0) / LOSS_WINDOW as f64;
        assert!((s[1].loss - mean6).abs() < 1e-12, "{}", s[1].loss);
        let share6 = (2.0 * (LOSS_WINDOW - 1) as f64 + 1.0) / (6.0 * LOSS_WINDOW as f64);
        assert!((s[1].branch_share - share6).abs() < 1e-12);
        let e = ProgressEvent {
            stage: "stage1".into(),
            epoch: 0,
            step: 1,
            stage_steps: 1,
            global_step: 1,
            total_steps: 1,
            loss: 1.0,
            loss_avg: w.mean(),
            loss_by_blocks: s,
            paths: Vec::new(),
            lr: 0.1,
            samples_per_sec: 1.0,
            eta: Duration::ZERO,
        };
        assert_eq!(e.sizes_line(), format!("3b 9.000 6b {mean6:.3}"));
    }
}
