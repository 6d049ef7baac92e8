//! One poller for every `WatchJob` stream of this process.
//!
//! Workers in other processes do not wake this process's watchers, so job state must be
//! polled. Polling once per watch let a thousand watches of one job run a thousand queries
//! every tick against a pool of a few connections; here one task reads each *watched job*
//! once per tick (or when a local worker announces a change) and fans the result out to
//! all its watchers through a `watch` channel. A job nobody watches any more is dropped
//! from the set on the next tick.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use crate::app::App;
use crate::domain::Job;
use crate::ops::metrics::Metrics;

/// How often watched jobs are read from the database.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The shared WatchJob poller (see the module docs). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct JobWatches {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<Uuid, watch::Sender<Job>>,
    running: bool,
}

impl JobWatches {
    /// Follows `job` (its current state, as the caller just read it): the receiver sees
    /// every later state the poller observes.
    pub fn subscribe(&self, app: &App, job: Job) -> watch::Receiver<Job> {
        let mut inner = self.inner.lock().expect("watch lock");
        let rx = match inner.jobs.get(&job.id) {
            Some(tx) => tx.subscribe(),
            None => {
                let id = job.id;
                let (tx, rx) = watch::channel(job);
                inner.jobs.insert(id, tx);
                rx
            }
        };
        if !inner.running {
            inner.running = true;
            tokio::spawn(poll(self.clone(), app.clone()));
        }
        rx
    }

    /// Jobs currently followed (for tests and logs).
    pub fn watched(&self) -> usize {
        self.inner.lock().expect("watch lock").jobs.len()
    }

    /// The watched jobs still having a receiver (drops the rest), or those among `only`.
    fn targets(&self, only: Option<Uuid>) -> Vec<(Uuid, watch::Sender<Job>)> {
        let mut inner = self.inner.lock().expect("watch lock");
        inner.jobs.retain(|_, tx| tx.receiver_count() > 0);
        inner
            .jobs
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o == **id))
            .map(|(id, tx)| (*id, tx.clone()))
            .collect()
    }
}

async fn poll(watches: JobWatches, app: App) {
    let mut wake = app.subscribe_jobs();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let only = tokio::select! {
            _ = app.shutdown_token().cancelled() => break,
            _ = tick.tick() => None,
            r = wake.recv() => match r {
                Ok(id) => Some(id),
                // Lagged: some wake-ups were missed, read everything.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        };
        for (id, tx) in watches.targets(only) {
            Metrics::inc(&app.metrics().job_watch_polls_total);
            match app.store().get_job(id).await {
                Ok(job) => {
                    tx.send_if_modified(|cur| {
                        let changed = *cur != job;
                        if changed {
                            *cur = job;
                        }
                        changed
                    });
                }
                // Transient database trouble: the watchers keep the last state and the
                // next tick tries again.
                Err(e) => tracing::debug!(job = %id, error = %e, "job watch poll failed"),
            }
        }
    }
    watches.inner.lock().expect("watch lock").running = false;
}
