//! Hot re-sync: when a heartbeat says the fleet's desired state moved to a new generation,
//! fetch it, download only the blobs not held yet (the cache is content-addressed and
//! blobs shared with the serving version are linked, not fetched), re-profile and re-search
//! the new supernet (or just re-plan the budget when only the policy changed), then switch
//! atomically under the controller lock. Any failure leaves the old subnet serving and the
//! applied generation unchanged, so the next heartbeat retries. A new generation that names
//! the supernet already serving, with budgets that resolve to the ones its plan was made
//! for (a rollout's cohort or reason changed, not the plan), is adopted as it is: nothing
//! is fetched, read or searched, and the controller keeps its place on the front.
//!
//! Staged rollouts: the plan served before a supernet change is kept as a [`Standby`] (with
//! its cached blobs, which the content-addressed cache never evicts) while the desired state
//! names a rollout, in memory and in the state directory (`standby.json`, see
//! [`StandbyRecord`]), so a rollback to it, also after a restart, re-installs that plan with
//! no download and no search, within a heartbeat. A new supernet the device cannot serve (a
//! blob or the artifact fails verification, or no subnet meets an absolute latency budget)
//! is a failed install: the old plan keeps serving, heartbeats report the failure, and that
//! supernet is not tried again while the desired state keeps naming it.
//!
//! A rollback re-installs from the cache without hashing every blob again (see
//! [`Resync::cached_source`]). **Invariant:** a blob sits under its final name in the cache
//! only after its size and sha256 were verified against the manifest (the sync renames a
//! verified `.part` into place, and nothing rewrites a blob in place), and every module
//! the server loads is hashed again against the manifest on the way in (`decode_module`).
//! So a re-install checks the manifest's digest and each blob's presence and size (file
//! metadata, no read), and nothing unverified is ever served: a blob damaged on disk since
//! fails its load, the old subnet keeps serving, and the re-install falls back to a full,
//! verifying sync that fetches it again.
//!
//! [`Resync`] is the re-plan itself (also used after drift, [`super::drift`]); [`task`] is
//! the background task a heartbeat starts, at most one at a time. Each re-sync that changes
//! what heartbeats report asks for a heartbeat at once, so the cloud learns it without
//! waiting for the next interval.
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use adaptivenet_core::artifact::{blob_path, sha256_hex};
use adaptivenet_core::supernet::Subnet;

use super::Agent;
use crate::adapt::plan::{
    feasible_budgets, or_recompute, persist, plan, resolve_budgets, Plan, PlanConfig,
};
use crate::adapt::{AdaptationReason, Controller, SharedController};
use crate::client::sync::write_current;
use crate::client::{
    BlobSelection, BudgetPolicy, CloudClient, DesiredState, InstallFailure, Serving, ServingReason,
    SyncOptions, SyncReport,
};
use crate::profile::ReusePlan;
use crate::serve::{ArtifactSource, Server, SwitchReport};
use crate::state::{ActiveRecord, StandbyRecord, StateDir};
use crate::{EdgeError, Result};

/// What is applied now (shared with heartbeats and reports).
#[derive(Clone, Debug)]
pub struct Applied {
    /// The cloud's supernet id.
    pub supernet_id: String,
    pub generation: u64,
    pub plan: Plan,
}

/// The plan served before the last supernet change, kept while a rollout may send the device
/// back to it (see the module docs).
#[derive(Clone, Debug)]
pub struct Standby {
    pub applied: Applied,
    /// The subnet it served when it was set aside: a rollback starts there again if it is
    /// still on the front.
    pub subnet: Subnet,
}

impl Standby {
    /// The persisted form; the supernet id goes into the envelope.
    pub fn record(&self) -> StandbyRecord {
        StandbyRecord {
            generation: self.applied.generation,
            subnet: self.subnet.clone(),
            budget_ms: self.applied.plan.budget_ms,
            table: self.applied.plan.table.clone(),
            search: self.applied.plan.record.clone(),
        }
    }

    /// Back from the persisted form of supernet `supernet_id`.
    pub fn from_record(supernet_id: String, r: StandbyRecord) -> Standby {
        Standby {
            applied: Applied {
                supernet_id,
                generation: r.generation,
                plan: Plan {
                    reuse: r.table.reuse.clone().unwrap_or_else(|| ReusePlan {
                        bytes: r.search.config.reuse_cache_bytes,
                        reason: "the bound of the kept search".into(),
                        ..ReusePlan::decide(None, 0.0, 0.0)
                    }),
                    table: r.table,
                    record: r.search,
                    budget_ms: r.budget_ms,
                    reused_table: true,
                    reused_search: true,
                },
            },
            subnet: r.subnet,
        }
    }
}

/// The kept plan at start-up, given what the cloud sent: the supernet `serving` (the cloud's
/// id; `manifest_id` its manifest's) and whether a rollout decided it (`None`: unknown, the
/// cloud was unreachable).
/// - Kept for `serving` itself (the rollout was rolled back while the agent was down): its
///   table, search result and subnet go back into the state's slots, so the plan that
///   follows is the kept one (no profile, no search), and the file is dropped.
/// - Kept for another supernet while a rollout is active (or unknown): returned, to be the
///   agent's standby.
/// - Otherwise no rollout can send the device back to it: the file is dropped.
pub fn standby_at_start(
    state: &StateDir,
    serving: &str,
    manifest_id: &str,
    rollout_active: Option<bool>,
) -> Option<Standby> {
    let (id, rec) = or_recompute("kept rollback plan", state.load_standby())?;
    if id == serving {
        persist("latency table", state.save_table(&rec.table));
        persist("search result", state.save_search(manifest_id, &rec.search));
        persist(
            "active subnet",
            state.save_active(
                manifest_id,
                &ActiveRecord {
                    subnet: rec.subnet.clone(),
                    budget_ms: rec.budget_ms,
                },
            ),
        );
        persist("kept rollback plan", state.clear_standby());
        return None;
    }
    if rollout_active == Some(false) {
        persist("kept rollback plan", state.clear_standby());
        return None;
    }
    Some(Standby::from_record(id, rec))
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
    /// `None` when nothing was synced: the plan serving was kept, or a kept plan was
    /// re-installed from the cache.
    pub sync: Option<SyncReport>,
    /// The plan is one the device held already (nothing profiled or searched).
    pub kept_plan: bool,
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
        let switch = self.install(src, &new_plan, None, server, ctl)?;
        Ok((new_plan, switch))
    }

    /// Switches to `new_plan`'s starting subnet of `src` (`prefer` if it is on the front)
    /// and resets the controller onto its front, atomically for the maintenance loop;
    /// persists the active subnet.
    fn install(
        &self,
        src: ArtifactSource,
        new_plan: &Plan,
        prefer: Option<&Subnet>,
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
        let idx = prefer
            .and_then(|p| front.iter().position(|c| &c.subnet == p))
            .unwrap_or_else(|| Controller::initial_index(&front, new_plan.budget_ms));
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

    /// Installs `previous` again (a rollback to the supernet served before): its stored plan
    /// is reused, so nothing is profiled or searched, and its modules come from the cache
    /// checked as the module docs say (no blob hashed but the ones loaded). If the cached
    /// copy is incomplete or a module fails its load, a verifying sync of that supernet
    /// (which fetches what is missing or damaged) precedes a second attempt. Its table and
    /// search result become the stored ones again.
    pub async fn reinstall(
        &self,
        client: &CloudClient,
        desired: &DesiredState,
        current: &Applied,
        previous: Standby,
        server: &Arc<Server>,
        ctl: &SharedController,
    ) -> Result<ResyncReport> {
        let id = &previous.applied.supernet_id;
        let cached = self
            .cached_source(id, &desired.manifest_sha256)
            .and_then(|src| {
                let manifest_id = src.manifest.supernet_id.to_string();
                let switch = self.install(
                    src,
                    &previous.applied.plan,
                    Some(&previous.subnet),
                    server,
                    ctl,
                )?;
                Ok((manifest_id, switch))
            });
        let (manifest_id, switch, sync) = match cached {
            Ok((m, switch)) => {
                persist(
                    "current supernet",
                    write_current(&self.cache, id, desired.generation),
                );
                (m, switch, None)
            }
            Err(e) => {
                tracing::warn!(
                    "the cached copy of supernet {id} cannot be re-installed as it is ({e}); \
                     syncing it with full verification"
                );
                let rep = client
                    .sync_supernet(desired, &self.cache, &BlobSelection::All, &self.sync)
                    .await?;
                let src = ArtifactSource::open(&rep.dir)?;
                let m = src.manifest.supernet_id.to_string();
                let switch = self.install(
                    src,
                    &previous.applied.plan,
                    Some(&previous.subnet),
                    server,
                    ctl,
                )?;
                (m, switch, Some(rep))
            }
        };
        self.persist_plan(&manifest_id, &previous.applied.plan);
        Ok(ResyncReport {
            from_generation: current.generation,
            applied: Applied {
                generation: desired.generation,
                ..previous.applied
            },
            sync,
            kept_plan: true,
            switch,
        })
    }

    /// The cached copy of supernet `supernet_id` (the cloud's id), checked without reading
    /// its blobs: the manifest's sha256 is `manifest_sha256` (when the cloud names one) and
    /// every blob it lists is present with the listed size. The module docs say why this is
    /// enough.
    pub fn cached_source(
        &self,
        supernet_id: &str,
        manifest_sha256: &str,
    ) -> Result<ArtifactSource> {
        let dir = self.cache.join(supernet_id);
        let mpath = dir.join("manifest.json");
        let bytes = std::fs::read(&mpath).map_err(|e| EdgeError::io(&mpath, e))?;
        let digest = sha256_hex(&bytes);
        if !manifest_sha256.is_empty() && digest != manifest_sha256 {
            return Err(EdgeError::BlobMismatch {
                sha256: manifest_sha256.to_string(),
                reason: format!("the cached manifest's digest is {digest}"),
            });
        }
        let src = ArtifactSource::open(&dir)?;
        for (_, e) in src.manifest.modules() {
            let path = blob_path(&dir, &e.sha256);
            let len = std::fs::metadata(&path)
                .map_err(|err| EdgeError::io(&path, err))?
                .len();
            if len != e.size {
                return Err(EdgeError::BlobMismatch {
                    sha256: e.sha256.clone(),
                    reason: format!("cached with {len} bytes, the manifest says {}", e.size),
                });
            }
        }
        Ok(src)
    }

    /// Stores `p`'s table and search result as the current ones (they are one slot each),
    /// under the manifest's supernet id `manifest_id`, which is what a plan looks them up by.
    fn persist_plan(&self, manifest_id: &str, p: &Plan) {
        persist("latency table", self.state.save_table(&p.table));
        persist(
            "search result",
            self.state.save_search(manifest_id, &p.record),
        );
    }

    /// Keeps `s` as the plan to roll back to, in the state directory (or forgets it).
    fn persist_standby(&self, s: Option<&Standby>) {
        match s {
            Some(s) => persist(
                "kept rollback plan",
                self.state.save_standby(&s.applied.supernet_id, &s.record()),
            ),
            None => persist("kept rollback plan", self.state.clear_standby()),
        }
    }

    /// Whether `desired` leaves `current`'s plan as it is: same supernet, and budgets that
    /// resolve (as [`plan`] would resolve them against the same table) to the ones the plan's
    /// search answered for. Settings that ask for a fresh profile or search never do.
    fn keeps_plan(&self, desired: &DesiredState, current: &Applied, server: &Server) -> bool {
        if desired.supernet_id != current.supernet_id
            || self.plan.research
            || self.plan.force_profile
        {
            return false;
        }
        let specs = if self.explicit_budgets {
            self.plan.budgets.clone()
        } else {
            policy_budgets(desired.budget.as_ref())
        };
        let spec = server.source().manifest.supernet_spec();
        let table = &current.plan.table;
        let budgets = resolve_budgets(&specs, table, spec.num_positions()).and_then(|b| {
            if self.plan.clamp_budgets {
                feasible_budgets(b, table, &spec)
            } else {
                Ok(b)
            }
        });
        let best = &current.plan.record.result.best;
        budgets.is_ok_and(|b| {
            b.len() == best.len()
                && b.iter()
                    .zip(best)
                    .all(|(b, r)| (r.budget_ms - b).abs() < 1e-9)
                && (b[0] - current.plan.budget_ms).abs() < 1e-9
        })
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
        if self.keeps_plan(desired, current, server) {
            return Ok(Some(ResyncReport {
                from_generation: current.generation,
                applied: Applied {
                    generation: desired.generation,
                    ..current.clone()
                },
                sync: None,
                kept_plan: true,
                switch: None,
            }));
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
            sync: Some(rep),
            kept_plan: false,
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
    // What serves now, should this re-sync set it aside.
    let serving_subnet = agent.server.active().subnet.clone();
    let previous = agent.standby().clone().filter(|p| {
        p.applied.supernet_id == desired.supernet_id && desired.generation != cur.generation
    });
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
            let changed = rep.applied.supernet_id != cur.supernet_id;
            let how = match (&rep.sync, rep.kept_plan) {
                (None, true) if changed => {
                    "; the kept plan from the cache: nothing downloaded, no search"
                }
                (None, _) => "; the serving plan kept: nothing synced, no search",
                (Some(_), true) => "; the kept plan, cache verified by a full sync",
                (Some(_), false) => "",
            };
            println!(
                "re-synced to supernet {} (generation {} -> {}, {}): serving {} (budget {:.3} ms){}{how}",
                rep.applied.supernet_id,
                rep.from_generation,
                rep.applied.generation,
                reason_text(desired.reason),
                agent.server.active().subnet,
                rep.applied.plan.budget_ms,
                super::loaded_note(rep.switch.as_ref()),
            );
            agent.set_budget(rep.applied.plan.budget_ms);
            if changed || rep.switch.is_some() {
                agent.set_reason(AdaptationReason::NewSupernet);
            }
            agent.timeline.note("resync");
            let kept = if desired.rollout_id.is_none() {
                // No rollout can send it back: the old plan is not needed any more.
                Some(None)
            } else if changed {
                Some(Some(Standby {
                    applied: cur,
                    subnet: serving_subnet,
                }))
            } else {
                None
            };
            if let Some(kept) = kept {
                let mut standby = agent.standby();
                let was = standby.is_some();
                *standby = kept.clone();
                drop(standby);
                if was || kept.is_some() {
                    agent.resync.persist_standby(kept.as_ref());
                }
            }
            *agent.applied() = rep.applied;
            agent.set_serving(Serving {
                reason: desired.reason,
                failed: None,
            });
            agent.beat_now();
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
                let manifest_id = agent.server.source().manifest.supernet_id.to_string();
                agent.resync.persist_plan(&manifest_id, &cur.plan);
                agent.applied().generation = desired.generation;
                agent.set_serving(Serving {
                    reason: ServingReason::InstallFailed,
                    failed: Some((desired.supernet_id.clone(), kind)),
                });
                agent.beat_now();
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
