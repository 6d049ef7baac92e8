//! The agent's runtime once a plan is serving: one [`Agent`] owns the server, the
//! controller, the applied plan, the timeline and the budget, and runs one background task
//! per concern, each in its own file:
//! - [`maintenance`]: the controller's tick (switches, drift detection, timeline, the
//!   persisted active subnet);
//! - [`drift`]: re-profile and warm-started re-search when the latency table drifted;
//! - [`heartbeat`]: heartbeats, credential rotation and aggregate reports (cloud mode), one
//!   per interval and one at once after a re-sync changed what they report;
//! - [`resync`]: applying a new desired generation a heartbeat announced, at once;
//! - [`replay`]: the device's own data replayed as request traffic.
//!
//! One [`CancellationToken`] stops them all: [`Agent::run`] cancels it when its stop future
//! resolves and joins the tasks. Re-plans (drift, re-sync) never stop serving: they plan on
//! the blocking pool and install under the controller lock, and a failure keeps the old
//! plan. At most one drift re-plan and one re-sync run at a time.
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::adapt::contention::ContentionSpec;
use crate::adapt::drift::DriftConfig;
use crate::adapt::timeline::Timeline;
use crate::adapt::{AdaptationReason, Controller, SharedController};
use crate::client::{CloudClient, Serving};
use crate::serve::{Server, SwitchReport};
use crate::{EdgeError, Result};

pub mod drift;
pub mod heartbeat;
pub mod maintenance;
pub mod replay;
pub mod resync;

pub use replay::Replay;
pub use resync::{policy_budgets, standby_at_start, Applied, Resync, ResyncReport, Standby};

/// How the runtime behaves (the plan and the serving subnet come separately).
#[derive(Debug)]
pub struct AgentConfig {
    pub drift: DriftConfig,
    /// The contention demo's load, for the timeline's `contention` column.
    pub contention: Option<ContentionSpec>,
    /// Time zero of the timeline (and of the contention schedule).
    pub started: Instant,
    /// Milliseconds between heartbeats; `None` follows the interval the cloud suggests.
    pub heartbeat_ms: Option<u64>,
    /// A report every this many heartbeats (and one at start).
    pub report_every: u32,
    /// Local images a search scores, for reports of results that did not record them.
    pub samples: u64,
    /// Replay local data as traffic (`None`: only API requests feed the window).
    pub replay: Option<Replay>,
}

/// What a run did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunSummary {
    /// Images the replay served.
    pub replayed: usize,
    /// Switches the controller made (failed ones included).
    pub switches: usize,
}

/// The serving agent: see the module docs.
#[derive(Debug)]
pub struct Agent {
    server: Arc<Server>,
    ctl: SharedController,
    /// The cloud's view of what runs (heartbeats, reports), replaced by re-plans.
    applied: Mutex<Applied>,
    timeline: Timeline,
    /// The budget the controller works to, as f64 bits, shared with the local API.
    budget: Arc<AtomicU64>,
    reason: Mutex<AdaptationReason>,
    /// Why it serves the applied supernet, and one it could not serve (heartbeats say so).
    serving: Mutex<Serving>,
    /// The plan served before the last supernet change, kept (also in the state directory)
    /// while a rollout is active so a rollback installs it again with no download and no
    /// search.
    standby: Mutex<Option<Standby>>,
    /// Asks the heartbeat task for a heartbeat now (a re-sync changed what it reports).
    beat: tokio::sync::Notify,
    resync: Resync,
    cloud: Option<Arc<CloudClient>>,
    cfg: AgentConfig,
    /// A drift re-plan is running (further drift signals are dropped meanwhile).
    replanning: AtomicBool,
    /// A re-sync is running (heartbeats do not start another).
    resyncing: AtomicBool,
    cancel: CancellationToken,
}

impl Agent {
    /// An agent serving `applied`'s plan on `server`, adapting with `controller`; `resync`
    /// says how to re-plan (state directory, cache, plan settings), `cloud` is the session
    /// in cloud mode.
    pub fn new(
        server: Arc<Server>,
        controller: Controller,
        applied: Applied,
        timeline: Timeline,
        resync: Resync,
        cloud: Option<Arc<CloudClient>>,
        cfg: AgentConfig,
    ) -> Self {
        Agent {
            budget: Arc::new(AtomicU64::new(applied.plan.budget_ms.to_bits())),
            server,
            ctl: Arc::new(Mutex::new(controller)),
            applied: Mutex::new(applied),
            timeline,
            reason: Mutex::new(AdaptationReason::Initial),
            serving: Mutex::new(Serving::default()),
            standby: Mutex::new(None),
            beat: tokio::sync::Notify::new(),
            resync,
            cloud,
            cfg,
            replanning: AtomicBool::new(false),
            resyncing: AtomicBool::new(false),
            cancel: CancellationToken::new(),
        }
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The budget as f64 bits, for the local API to report (see
    /// [`crate::serve::grpc::InferenceService::share_budget`]).
    pub fn budget_handle(&self) -> Arc<AtomicU64> {
        self.budget.clone()
    }

    /// Why the served subnet last changed.
    pub fn reason(&self) -> AdaptationReason {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why it serves the applied supernet, as heartbeats report it.
    pub fn serving(&self) -> Serving {
        self.serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets what heartbeats report (at start: the reason the cloud gave for the supernet).
    pub fn set_serving(&self, s: Serving) {
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// Keeps `s` as the plan to roll back to (at start: the one [`standby_at_start`] found
    /// in the state directory, which holds it already).
    pub fn keep_standby(&self, s: Standby) {
        *self.standby() = Some(s);
    }

    fn standby(&self) -> MutexGuard<'_, Option<Standby>> {
        self.standby.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A heartbeat as soon as the heartbeat task can send one (a stored permit if it is
    /// busy sending the previous one, so the request is never lost).
    fn beat_now(&self) {
        self.beat.notify_one();
    }

    fn set_reason(&self, r: AdaptationReason) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = r;
    }

    fn set_budget(&self, budget_ms: f64) {
        self.budget.store(budget_ms.to_bits(), Ordering::Relaxed);
    }

    fn applied(&self) -> MutexGuard<'_, Applied> {
        self.applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs every background task until `stop` resolves, then cancels and joins them. An
    /// error of `stop` (no signal handler) is returned after the tasks stopped.
    pub async fn run(
        self: Arc<Self>,
        stop: impl Future<Output = std::io::Result<()>>,
    ) -> Result<RunSummary> {
        let (drift_tx, drift_rx) = tokio::sync::mpsc::channel(1);
        let replay = self.cfg.replay.is_some().then(|| {
            let agent = self.clone();
            tokio::task::spawn_blocking(move || replay::run(&agent))
        });
        let maintenance = tokio::spawn(maintenance::run(self.clone(), drift_tx));
        let drift = tokio::spawn(drift::run(self.clone(), drift_rx));
        let heartbeat = self
            .cloud
            .clone()
            .map(|client| tokio::spawn(heartbeat::run(self.clone(), client)));
        let stopped = stop.await;
        self.cancel.cancel();
        let replayed = match replay {
            Some(h) => h.await.map_err(|e| task_failed("replay", e))??,
            None => 0,
        };
        let events = maintenance
            .await
            .map_err(|e| task_failed("maintenance", e))?;
        // Both end at cancellation (a re-plan in progress is dropped; serving never waited
        // for one).
        let _ = drift.await;
        if let Some(h) = heartbeat {
            let _ = h.await;
        }
        stopped.map_err(|source| EdgeError::Io {
            path: "shutdown signal".into(),
            source,
        })?;
        Ok(RunSummary {
            replayed,
            switches: events.len(),
        })
    }
}

fn task_failed(task: &'static str, e: tokio::task::JoinError) -> EdgeError {
    EdgeError::config(task, format!("background task failed: {e}"))
}

/// "; loaded N, reused M modules" for a re-plan that switched, else nothing.
fn loaded_note(switch: Option<&SwitchReport>) -> String {
    switch.map_or(String::new(), |s| {
        format!("; loaded {}, reused {} modules", s.loaded, s.reused)
    })
}
