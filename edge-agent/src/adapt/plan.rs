//! The agent's plan for an artifact: latency table (profiled once per supernet and
//! conditions), search result (once per settings and budgets) and the budget served,
//! reusing what the state directory holds. Used at start-up and by hot re-sync, so a restart
//! serves again without a new search and a new supernet version is planned the same way.
use std::path::{Path, PathBuf};

use adaptivenet_core::data::Dataset;

use crate::profile::{self, LatencyTable, ProfileConfig, ReusePlan};
use crate::quality::{load_local_data, EvalSet, QualityMode};
use crate::search::{self, Budget, SearchConfig};
use crate::serve::bn::{local_recalibration, served_quality};
use crate::serve::ArtifactSource;
use crate::state::{SearchRecord, StateDir};
use crate::{EdgeError, Result};

/// How to (re)compute a plan.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub threads: usize,
    pub batch: usize,
    /// Timed rounds per module when profiling.
    pub rounds: usize,
    /// Random subnets measured end to end to validate the table (0 skips).
    pub validate: usize,
    /// Re-profile even if a stored table matches.
    pub force_profile: bool,
    pub search: SearchConfig,
    /// The search's cross-generation bound is the one decided when the device was profiled
    /// (`LatencyTable::reuse`), not `search.reuse_cache_bytes` (which an operator set).
    pub reuse_from_profile: bool,
    /// Budget specs (`0.6`, `12ms`); the first one is served.
    pub budgets: Vec<String>,
    /// Local data directory (read only when a search is needed).
    pub data: PathBuf,
    pub images: usize,
    pub mode: QualityMode,
    /// Search again even if a stored result matches.
    pub research: bool,
    /// Raise budgets below the cheapest subnet to it (serving) instead of refusing them.
    pub clamp_budgets: bool,
}

/// A plan: what to serve and what to adapt over.
#[derive(Clone, Debug)]
pub struct Plan {
    pub table: LatencyTable,
    pub record: SearchRecord,
    /// The served budget (the first one), ms.
    pub budget_ms: f64,
    /// Whether a stored table / search result was reused.
    pub reused_table: bool,
    pub reused_search: bool,
    /// The cross-generation bound a search under this plan runs with, and why.
    pub reuse: ReusePlan,
}

/// The cross-generation bound of a plan's search: the profiling-time decision stored with
/// `table`, unless `cfg` fixes one (or the table predates the decision).
pub fn search_reuse(table: &LatencyTable, cfg: &PlanConfig) -> ReusePlan {
    match &table.reuse {
        Some(r) if cfg.reuse_from_profile => r.clone(),
        measured => {
            let reason = if cfg.reuse_from_profile {
                "the search's default: the latency table predates the decision"
            } else {
                "set by --reuse-cache-mb"
            };
            ReusePlan {
                bytes: cfg.search.reuse_cache_bytes,
                reason: format!("{} MiB, {reason}", cfg.search.reuse_cache_bytes >> 20),
                ..measured
                    .clone()
                    .unwrap_or_else(|| ReusePlan::decide(None, 0.0, 0.0))
            }
        }
    }
}

/// Progress of the long stages: (stage, done, total).
pub type Progress<'a> = &'a mut dyn FnMut(&'static str, usize, usize);

/// Loads a state file, treating an unusable one as absent (with a warning naming it): the
/// agent recomputes rather than failing.
pub fn or_recompute<T>(what: &str, r: Result<Option<T>>) -> Option<T> {
    match r {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("{what}: {e}; recomputing");
            None
        }
    }
}

/// A state write that failed (a full disk): the atomic write left the stored file as it was,
/// and the agent goes on with the new result in memory rather than stopping serving.
pub fn persist(what: &str, r: Result<()>) {
    if let Err(e) = r {
        tracing::warn!("{what} not persisted, the stored one is kept: {e}");
    }
}

/// The stored table if it matches the conditions, else a fresh profile (saved).
pub fn ensure_table(
    src: &ArtifactSource,
    state: &StateDir,
    cfg: &PlanConfig,
    progress: Progress,
) -> Result<(LatencyTable, bool)> {
    let id = src.manifest.supernet_id.to_string();
    if !cfg.force_profile {
        if let Some(t) = or_recompute("latency table", state.load_table(&id)) {
            if t.conditions.threads == cfg.threads && t.conditions.batch == cfg.batch {
                tracing::info!(
                    "using the stored latency table ({})",
                    state.table_path().display()
                );
                return Ok((t, true));
            }
            tracing::info!("stored table was measured under other conditions; re-profiling");
        }
    }
    let supernet = src.load(None)?;
    let pcfg = ProfileConfig {
        batch: cfg.batch,
        rounds: cfg.rounds.max(1),
        ..ProfileConfig::default()
    };
    let total = pcfg.warmup + pcfg.rounds;
    let mut t = profile::profile(&supernet, &pcfg, |d, _| progress("profile", d, total))?;
    t.supernet_id = Some(id);
    if cfg.validate > 0 {
        let v = profile::validate_table(&supernet, &mut t, cfg.validate, 15, 1)?;
        tracing::info!(
            "latency model: raw median {:.1}% p90 {:.1}%, calibrated (x{:.3}) median {:.1}% p90 {:.1}%",
            100.0 * v.raw_median_err,
            100.0 * v.raw_p90_err,
            v.bias,
            100.0 * v.calibrated_median_err,
            100.0 * v.calibrated_p90_err
        );
    }
    persist("latency table", state.save_table(&t));
    Ok((t, false))
}

/// Budget specs resolved against a table, in ms.
pub fn resolve_budgets(specs: &[String], t: &LatencyTable, n_positions: usize) -> Result<Vec<f64>> {
    if specs.is_empty() {
        return Err(EdgeError::config("budget", "no budget given"));
    }
    specs
        .iter()
        .map(|s| Budget::parse(s)?.resolve(t, n_positions))
        .collect()
}

/// A serving daemon must serve something: a budget below the cheapest subnet (per this
/// device's table) is raised to that subnet's latency with a warning, so the agent serves its
/// fastest subnet and reports the violation, instead of exiting. (`edge-agent search`, an
/// explicit query, still refuses such a budget.)
pub fn feasible_budgets(
    budgets: Vec<f64>,
    t: &LatencyTable,
    spec: &adaptivenet_core::supernet::SupernetSpec,
) -> Result<Vec<f64>> {
    let (cheapest, _) = t.latency_range(spec)?;
    Ok(budgets
        .into_iter()
        .map(|b| {
            if b < cheapest {
                tracing::warn!(
                    "latency budget {b:.3} ms is below the cheapest subnet ({cheapest:.3} ms on \
                     this device); serving the fastest subnet instead"
                );
                // A hair above, so float summation order cannot put the cheapest subnet's
                // own prediction outside it.
                cheapest * (1.0 + 1e-9)
            } else {
                b
            }
        })
        .collect())
}

fn read_data(dir: &Path, src: &ArtifactSource) -> Result<Dataset> {
    load_local_data(dir, &src.manifest.input)
}

/// Table, then the stored search result if it was made with the same settings and budgets,
/// else a new search on the local data (saved).
pub fn plan(
    src: &ArtifactSource,
    state: &StateDir,
    cfg: &PlanConfig,
    progress: Progress,
) -> Result<Plan> {
    let (table, reused_table) = ensure_table(src, state, cfg, progress)?;
    let reuse = search_reuse(&table, cfg);
    let search_cfg = SearchConfig {
        reuse_cache_bytes: reuse.bytes,
        ..cfg.search.clone()
    };
    let id = src.manifest.supernet_id.to_string();
    let spec = src.manifest.supernet_spec();
    let mut budgets = resolve_budgets(&cfg.budgets, &table, spec.num_positions())?;
    if cfg.clamp_budgets {
        budgets = feasible_budgets(budgets, &table, &spec)?;
    }
    let budget_ms = budgets[0];
    let previous = or_recompute("search result", state.load_search(&id));
    if !cfg.research {
        if let Some(rec) = previous.clone() {
            let same_budgets = rec.result.best.len() == budgets.len()
                && rec
                    .result
                    .best
                    .iter()
                    .zip(&budgets)
                    .all(|(r, b)| (r.budget_ms - b).abs() < 1e-9);
            // The cache bound changes the speed of a search, not its result.
            let same_config = SearchConfig {
                reuse_cache_bytes: search_cfg.reuse_cache_bytes,
                ..rec.config.clone()
            } == search_cfg;
            if same_config && same_budgets && !rec.result.front.is_empty() {
                tracing::info!(
                    "using the stored search result ({})",
                    state.search_path().display()
                );
                return Ok(Plan {
                    table,
                    record: rec,
                    budget_ms,
                    reused_table,
                    reused_search: true,
                    reuse,
                });
            }
        }
    }
    let data = read_data(&cfg.data, src)?;
    let supernet = src.load(None)?;
    let set = EvalSet::from_dataset(
        &supernet,
        &src.manifest.input,
        &data,
        cfg.images,
        100,
        cfg.mode,
        cfg.search.seed,
    )?;
    let total = budgets.len() * (search_cfg.generations + 1);
    // Conditions changed (new table, budget or settings): warm-start from the last front of
    // this supernet, re-scored under the current table and data.
    let warm: Vec<_> = previous
        .map(|r| r.result.front.into_iter().map(|c| c.subnet).collect())
        .unwrap_or_default();
    if !warm.is_empty() {
        tracing::info!(
            "re-search warm-started from {} subnets of the last front",
            warm.len()
        );
    }
    tracing::info!("search reuse cache: {}", reuse.reason);
    let searched = search::search_keeping(
        &supernet,
        &table,
        &set,
        &budgets,
        &search_cfg,
        &warm,
        |d, _| progress("search", d, total),
    );
    drop(supernet);
    // The activations the search kept are freed; give their pages back to the OS rather
    // than hold them while serving.
    adaptivenet_kernels::alloc::release_freed_memory();
    let (mut result, evaluated) = searched?;
    if let Some(pick) = search_cfg.recal_pick.filter(|p| p.k >= 2) {
        // The images and recalibration `edge-agent run --bn-recal` serves with.
        let recal = local_recalibration(src, &data, cfg.images, cfg.search.seed, pick.setting)?;
        result = search::recal_pick(
            result,
            &evaluated,
            pick.k,
            served_quality(src, recal, &set)?,
        )?;
    }
    let record = SearchRecord {
        config: search_cfg,
        result,
    };
    persist("search result", state.save_search(&id, &record));
    Ok(Plan {
        table,
        record,
        budget_ms,
        reused_table,
        reused_search: false,
        reuse,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaptivenet_core::supernet::{branches::build_supernet, SupernetConfig};

    fn cfg(reuse_from_profile: bool) -> PlanConfig {
        PlanConfig {
            threads: 1,
            batch: 1,
            rounds: 1,
            validate: 0,
            force_profile: false,
            search: SearchConfig {
                reuse_cache_bytes: 64 << 20,
                ..SearchConfig::default()
            },
            reuse_from_profile,
            budgets: Vec::new(),
            data: PathBuf::new(),
            images: 0,
            mode: QualityMode::Labelled,
            research: false,
            clamp_budgets: false,
        }
    }

    #[test]
    fn the_search_runs_with_the_profiled_reuse_bound_unless_one_is_set() {
        let arch = adaptivenet_core::model::ArchDescriptor::from_json(
            br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1,1,1],"widths":[4,8,16],"in_channels":1,"num_classes":10}"#,
        )
        .unwrap();
        let oracle = adaptivenet_core::model::Model::init(&arch.spec, 5).unwrap();
        let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
        let mut table = LatencyTable::from_macs(&sn.spec, 1.0);
        // A table stored before the decision existed: the configured bound.
        assert_eq!(search_reuse(&table, &cfg(true)).bytes, 64 << 20);
        let decided = ReusePlan::decide(Some(4 << 30), 10.0, 0.1);
        table.reuse = Some(decided.clone());
        assert_eq!(search_reuse(&table, &cfg(true)), decided);
        // An operator's bound wins, and says so.
        let set = search_reuse(&table, &cfg(false));
        assert_eq!(set.bytes, 64 << 20);
        assert!(set.reason.contains("--reuse-cache-mb"), "{}", set.reason);
        assert_eq!(set.read_gb_s, decided.read_gb_s);
    }
}
