//! Progress of a long training run: one event per optimisation step, to any sink. The cloud's
//! job worker implements [`ProgressSink`] to forward it to `WatchJob`.
use std::time::Duration;

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
    /// Training loss of this step.
    pub loss: f64,
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
