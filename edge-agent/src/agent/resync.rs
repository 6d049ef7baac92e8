//! Hot re-sync: when a heartbeat says the fleet's desired state moved to a new generation,
//! fetch it, download only the blobs not held yet (the cache is content-addressed and
//! blobs shared with the serving version are linked, not fetched), re-profile and re-search
//! the new supernet (or just re-plan the budget when only the policy changed), then switch
//! atomically under the controller lock. Any failure leaves the old subnet serving and the
//! applied generation unchanged, so the next heartbeat retries.
//!
//! Staged rollouts: the plan served before a supernet change is kept (with its cached
//! blobs, which the content-addressed cache never evicts) while the desired state names a
//! rollout, so a rollback to it re-installs that plan with no download and no search, within
//! a heartbeat. A new supernet the device cannot serve (a blob or the artifact fails
//! verification, or no subnet meets an absolute latency budget) is a failed install: the
//! old plan keeps serving, heartbeats report the failure, and that supernet is not tried
//! again while the desired state keeps naming it.
//!
//! [`Resync`] is the re-plan itself (also used after drift, [`super::drift`]); [`task`] is
//! the background task a heartbeat starts, at most one at a time.
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Agent;
use crate::adapt::plan::{persist, plan, Plan, PlanConfig};
use crate::adapt::{AdaptationReason, Controller, SharedController};
use crate::client::sync::write_current;
use crate::client::{
    BlobSelection, BudgetPolicy, CloudClient, DesiredState, InstallFailure, Serving, ServingReason,
    SyncOptions, SyncReport,
};
use crate::serve::{ArtifactSource, Server, SwitchReport};
use crate::state::{ActiveRecord, StateDir};
use crate::{EdgeError, Result};

/// What is applied now (shared with heartbeats and reports).
#[derive(Clone, Debug)]
pub struct Applied {
    /// The cloud's supernet id.
    pub supernet_id: String,
    pub generation: u64,
    pub plan: Plan,
}

/// Re-sync settings.
#[derive(Clone, Debug)]
pub struct Resync {
    pub cache: PathBuf,
    pub state: StateDir,
    pub sync: SyncOptions,
    pub plan: PlanConfig,
    /// Budgets given on the command line win over the fleet's policy.
    pub explicit_budgets: bool,
}

/// What a re-sync did.
#[derive(Clone, Debug)]
pub struct ResyncReport {
    pub from_generation: u64,
    pub applied: Applied,
    pub sync: SyncReport,
    /// `None` when the new plan serves the subnet already serving on the same weights.
    pub switch: Option<SwitchReport>,
}

/// Budget specs from the fleet's policy: a latency in ms, else a fraction, else 0.6.
pub fn policy_budgets(policy: Option<&BudgetPolicy>) -> Vec<String> {
    match policy {
        Some(p) if p.latency_budget_ms > 0.0 => vec![format!("{}ms", p.latency_budget_ms)],
        Some(p) if p.budget_fraction > 0.0 => vec![p.budget_fraction.to_string()],
        _ => vec!["0.6".to_string()],
    }
}

impl Resync {
    /// The latency table drifted (see [`crate::adapt::drift`]): re-profile this device, re-search the
    /// serving supernet warm-started from the current front at the same budget in
    /// milliseconds (a fraction would be re-resolved against the new, slower oracle time and
    /// loosen the budget), and install the new plan. Serving goes on meanwhile; on failure
    /// the old plan stays.
    pub async fn replan_after_drift(
        &self,
        budget_ms: f64,
        server: &Arc<Server>,
        ctl: &SharedController,
    ) -> Result<(Plan, Option<SwitchReport>)> {
        let cfg = PlanConfig {
            force_profile: true,
            research: true,
            budgets: vec![format!("{budget_ms}ms")],
            clamp_budgets: true,
            ..self.plan.clone()
        };
        self.plan_and_install(server.source(), cfg, server, ctl)
            .await
    }

    /// Plans `src` with `cfg` on the blocking pool, then switches to the plan's starting
    /// subnet and resets the controller onto the new front, atomically for the maintenance
    /// loop. The active subnet is persisted.
    async fn plan_and_install(
        &self,
        src: ArtifactSource,
        cfg: PlanConfig,
        server: &Arc<Server>,
        ctl: &SharedController,
    ) -> Result<(Plan, Option<SwitchReport>)> {
        let state = self.state.clone();
        let plan_src = src.clone();
        let new_plan =
            tokio::task::spawn_blocking(move || plan(&plan_src, &state, &cfg, &mut |_, _, _| {}))
                .await
                .map_err(|e| EdgeError::config("resync", format!("planning task: {e}")))??;
        let switch = self.install(src, &new_plan, server, ctl)?;
        Ok((new_plan, switch))
    }

    /// Switches to `new_plan`'s starting subnet of `src` and resets the controller onto its
    /// front, atomically for the maintenance loop; persists the active subnet.
    fn install(
        &self,
        src: ArtifactSource,
        new_plan: &Plan,
        server: &Arc<Server>,
        ctl: &SharedController,
    ) -> Result<Option<SwitchReport>> {
        let front = new_plan.record.result.front.clone();
        if front.is_empty() {
            return Err(EdgeError::config(
                "resync",
                "the new search found no subnet",
            ));
        }
        let idx = Controller::initial_index(&front, new_plan.budget_ms);
        let target = front[idx].subnet.clone();
        let manifest_id = src.manifest.supernet_id.to_string();
        let switch = {
            // Under the controller lock: the maintenance loop cannot switch on the old plan
            // between the swap and the new plan.
            let mut c = ctl.lock().unwrap_or_else(|e| e.into_inner());
            let active = server.active();
            let switch = if active.supernet_id != manifest_id {
                Some(server.replace(src, &target)?)
            } else if active.subnet != target {
                Some(server.switch(&target)?)
            } else {
                None
            };
            c.reset(new_plan.budget_ms, front, idx);
            switch
        };
        // Installed already: a failed write (full disk) must not report the re-sync failed.
        persist(
            "active subnet",
            self.state.save_active(
                &manifest_id,
                &ActiveRecord {
                    subnet: target,
                    budget_ms: new_plan.budget_ms,
                },
            ),
        );
        Ok(switch)
    }

    /// Installs `previous` again (a rollback to the supernet served before): the sync only
    /// re-verifies the cached blobs, and the stored plan is reused, so nothing is searched.
    /// Its table and search result become the stored ones again.
    pub async fn reinstall(
        &self,
        client: &CloudClient,
        desired: &DesiredState,
        current: &Applied,
        previous: Applied,
        server: &Arc<Server>,
        ctl: &SharedController,
    ) -> Result<ResyncReport> {
        let rep = client
            .sync_supernet(desired, &self.cache, &BlobSelection::All, &self.sync)
            .await?;
        let src = ArtifactSource::open(&rep.dir)?;
        let switch = self.install(src, &previous.plan, server, ctl)?;
        self.persist_plan(&previous);
        Ok(ResyncReport {
            from_generation: current.generation,
            applied: Applied {
                generation: desired.generation,
                ..previous
            },
            sync: rep,
            switch,
        })
    }

    /// Stores `a`'s table and search result as the current ones (they are one slot each).
    fn persist_plan(&self, a: &Applied) {
        persist("latency table", self.state.save_table(&a.plan.table));
        persist(
            "search result",
            self.state.save_search(&a.supernet_id, &a.plan.record),
        );
    }

    /// Applies `desired` if its generation differs from `current`'s. Blocking work
    /// (profiling, search) runs on the blocking pool; serving continues meanwhile.
    pub async fn apply(
        &self,
        client: &CloudClient,
        desired: &DesiredState,
        current: &Applied,
        server: &Arc<Server>,
        ctl: &SharedController,
    ) -> Result<Option<ResyncReport>> {
        if desired.generation == current.generation {
            return Ok(None);
        }
        tracing::info!(
            "desired state moved to generation {} (applied {}): supernet {}",
            desired.generation,
            current.generation,
            desired.supernet_id
        );
        let rep = client
            .sync_supernet(desired, &self.cache, &BlobSelection::All, &self.sync)
            .await?;
        let s = &rep.stats;
        tracing::info!(
            "synced supernet {} v{}: {} blobs needed, {} cached, {} linked from other versions, {} downloaded ({} bytes)",
            rep.supernet_id,
            rep.supernet_version,
            s.blobs_needed,
            s.blobs_skipped,
            s.blobs_linked,
            s.blobs_downloaded,
            s.bytes_received
        );
        let src = ArtifactSource::open(&rep.dir)?;
        let mut cfg = self.plan.clone();
        if !self.explicit_budgets {
            cfg.budgets = policy_budgets(desired.budget.as_ref());
        }
        if rep.supernet_id != current.supernet_id {
            // A plan serves already: a new supernet that cannot meet the budget is refused
            // (a failed install), not served over budget.
            cfg.clamp_budgets = false;
        }
        let (new_plan, switch) = self.plan_and_install(src, cfg, server, ctl).await?;
        Ok(Some(ResyncReport {
            from_generation: current.generation,
            applied: Applied {
                supernet_id: rep.supernet_id.clone(),
                generation: desired.generation,
                plan: new_plan,
            },
            sync: rep,
            switch,
        }))
    }
}

/// Applies the desired state a heartbeat announced, on top of `cur`: serving goes on
/// meanwhile; success installs the new plan and generation. A supernet this device cannot
/// serve is a failed install (see the module docs); any other failure keeps the old plan
/// and generation (the next heartbeat retries). Clears the agent's re-sync flag when done.
pub(super) async fn task(agent: Arc<Agent>, client: Arc<CloudClient>, cur: Applied) {
    match client.desired_state().await {
        Ok(desired) => follow(&agent, &client, &desired, cur).await,
        Err(e) => eprintln!("re-sync failed, still serving the old subnet: {e}"),
    }
    agent.resyncing.store(false, Ordering::Release);
}

async fn follow(agent: &Agent, client: &CloudClient, desired: &DesiredState, cur: Applied) {
    let serving = agent.serving();
    if let Some((failed, _)) = &serving.failed {
        if *failed == desired.supernet_id && desired.supernet_id != cur.supernet_id {
            // Already tried and could not serve it: stay, and keep saying so.
            agent.applied().generation = desired.generation;
            return;
        }
    }
    let previous = agent
        .standby()
        .clone()
        .filter(|p| p.supernet_id == desired.supernet_id && desired.generation != cur.generation);
    let outcome = match previous {
        Some(p) => agent
            .resync
            .reinstall(client, desired, &cur, p, &agent.server, &agent.ctl)
            .await
            .map(Some),
        None => {
            agent
                .resync
                .apply(client, desired, &cur, &agent.server, &agent.ctl)
                .await
        }
    };
    match outcome {
        Ok(Some(rep)) => {
            println!(
                "re-synced to supernet {} (generation {} -> {}, {}): serving {} (budget {:.3} ms){}",
                rep.applied.supernet_id,
                rep.from_generation,
                rep.applied.generation,
                reason_text(desired.reason),
                agent.server.active().subnet,
                rep.applied.plan.budget_ms,
                super::loaded_note(rep.switch.as_ref()),
            );
            agent.set_budget(rep.applied.plan.budget_ms);
            agent.set_reason(AdaptationReason::NewSupernet);
            agent.timeline.note("resync");
            let changed = rep.applied.supernet_id != cur.supernet_id;
            let mut standby = agent.standby();
            if desired.rollout_id.is_none() {
                // No rollout can send it back: the old plan is not needed any more.
                *standby = None;
            } else if changed {
                *standby = Some(cur);
            }
            drop(standby);
            *agent.applied() = rep.applied;
            agent.set_serving(Serving {
                reason: desired.reason,
                failed: None,
            });
        }
        Ok(None) => {}
        Err(e) => match InstallFailure::of(&e).filter(|_| desired.supernet_id != cur.supernet_id) {
            Some(kind) => {
                eprintln!(
                    "install failed ({kind:?}): cannot serve supernet {}: {e}; serving {} again",
                    desired.supernet_id, cur.supernet_id
                );
                agent.timeline.note("install_failed");
                // The sync may have named the new supernet as the one to start from, and
                // profiling it replaced the stored table: point both back to what serves.
                persist(
                    "current supernet",
                    write_current(&agent.resync.cache, &cur.supernet_id, desired.generation),
                );
                agent.resync.persist_plan(&cur);
                agent.applied().generation = desired.generation;
                agent.set_serving(Serving {
                    reason: ServingReason::InstallFailed,
                    failed: Some((desired.supernet_id.clone(), kind)),
                });
            }
            None => {
                eprintln!("re-sync failed, still serving the old subnet: {e}");
                agent.timeline.note("resync_failed");
            }
        },
    }
}

fn reason_text(r: ServingReason) -> &'static str {
    match r {
        ServingReason::Unspecified => "no reason given",
        ServingReason::Label => "the fleet's label",
        ServingReason::Pinned => "pinned",
        ServingReason::RolloutCohort => "in the rollout's cohort",
        ServingReason::RolloutControl => "outside the rollout's cohort",
        ServingReason::RolledBack => "rolled back",
        ServingReason::InstallFailed => "install failed",
    }
}
