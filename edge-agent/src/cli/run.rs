//! `edge-agent run`: plan (profile and search, reusing what the state directory holds),
//! start serving, recalibrate BN if asked, open the local API, then hand over to
//! [`Agent`] until `--duration` ends or a shutdown signal arrives.
use std::sync::Arc;

use adaptivenet_core::data::Dataset;
use adaptivenet_core::supernet::Subnet;
use adaptivenet_edge::adapt::contention::Contention;
use adaptivenet_edge::adapt::drift::DriftConfig;
use adaptivenet_edge::adapt::plan::{self, or_recompute, PlanConfig};
use adaptivenet_edge::adapt::timeline::{Rotation, Timeline, TIMELINE_FILE};
use adaptivenet_edge::adapt::{AdaptConfig, Controller};
use adaptivenet_edge::agent::{Agent, AgentConfig, Applied, Replay, Resync};
use adaptivenet_edge::client::{Serving, SyncOptions};
use adaptivenet_edge::quality::{load_local_data, transform_for, QualityMode};
use adaptivenet_edge::serve::bn::{local_recalibration, RecalScope};
use adaptivenet_edge::serve::grpc::{self, ApiConfig, InferenceService};
use adaptivenet_edge::serve::{ArtifactSource, Server};
use adaptivenet_edge::state::{ActiveRecord, StateDir};
use anyhow::{bail, Context, Result};

use super::args::{budget_specs, plan_config, BnRecal, RunArgs, SearchArgs};
use super::commands::{print_search, progress_bars};
use super::source::open_source;

pub fn run(a: RunArgs) -> Result<()> {
    let common = &a.search.profile.common;
    let recal_pick = a.recal_pick(plan_config(&a.search).mode)?;
    let rt = crate::runtime()?;
    let (src, cloud) = open_source(common, &rt)?;
    let id = src.manifest.supernet_id.to_string();
    let state = StateDir::new(&common.state);
    let explicit_budgets = !a.search.budget.is_empty();
    let mut s = a.search.clone();
    s.budget = budget_specs(&s, cloud.as_ref().and_then(|c| c.budget.as_ref()));
    let mut pcfg = PlanConfig {
        clamp_budgets: true,
        ..plan_config(&s)
    };
    pcfg.search.recal_pick = recal_pick;
    // A plan kept for a rollback: restored into the state's slots when the cloud sends this
    // device back to it, so the plan below needs no profile and no search.
    let standby = cloud.as_ref().and_then(|c| {
        adaptivenet_edge::agent::standby_at_start(&state, &c.supernet_id, &id, c.rollout_active)
    });
    let the_plan = plan::plan(&src, &state, &pcfg, &mut progress_bars())?;
    print_search(&the_plan.record);
    let budget = the_plan.budget_ms;
    let front = the_plan.record.result.front.clone();
    if front.is_empty() {
        bail!("the search result has no subnet to serve");
    }
    // Resume the previously active subnet if it is still on the front.
    let mut idx = Controller::initial_index(&front, budget);
    if let Some(act) = or_recompute("active subnet", state.load_active(&id)) {
        if let Some(i) = front.iter().position(|c| c.subnet == act.subnet) {
            idx = i;
        }
    }
    let start: Subnet = front[idx].subnet.clone();
    let server =
        Arc::new(Server::start(src.clone(), &start, 50).context("loading the active subnet")?);
    plan::persist(
        "active subnet",
        state.save_active(
            &id,
            &ActiveRecord {
                subnet: start.clone(),
                budget_ms: budget,
            },
        ),
    );
    println!("serving {start} (budget {budget:.3} ms)");
    let data = load_local_data(&s.data, &src.manifest.input)?;
    let transform = transform_for(&src.manifest.input, &data)?;
    recalibrate_bn(&server, &src, &start, &data, &s, pcfg.mode, a.bn_recal)?;
    let mut cfg = AdaptConfig::new(budget);
    cfg.interval_ms = a.interval_ms;
    let controller = Controller::new(cfg, front, idx);
    let timeline = Timeline::open_with(
        &state.dir.join(TIMELINE_FILE),
        Rotation {
            max_bytes: a.timeline_max_mb.max(1) << 20,
            keep: a.timeline_keep,
        },
    )?;
    let listen_token = listen_token(&a)?;
    let started = std::time::Instant::now();
    let contention = a.contention.map(|spec| {
        println!(
            "contention: intensity {} from {} s for {}",
            spec.intensity,
            spec.start_s,
            spec.duration_s
                .map_or("the whole run".to_string(), |d| format!("{d} s"))
        );
        Contention::start(spec, started)
    });
    let applied = Applied {
        supernet_id: cloud.as_ref().map_or(id.clone(), |c| c.supernet_id.clone()),
        generation: cloud.as_ref().map_or(0, |c| c.generation),
        plan: the_plan,
    };
    let serving_reason = cloud.as_ref().map(|c| c.reason).unwrap_or_default();
    // The images a search evaluates (all local ones with --images 0 or more than held).
    let samples = match s.images {
        0 => data.len(),
        n => n.min(data.len()),
    } as u64;
    let resync = Resync {
        cache: common
            .cache
            .clone()
            .unwrap_or_else(|| common.state.join("cache")),
        state: state.clone(),
        sync: SyncOptions::default(),
        plan: pcfg,
        explicit_budgets,
    };
    anyhow::ensure!(
        a.drift_threshold.is_finite() && a.drift_threshold > 0.0,
        "--drift-threshold must be a positive fraction, got {}",
        a.drift_threshold
    );
    let replay = (!a.no_replay).then(|| Replay {
        data,
        transform,
        batch: common.batch.max(1),
    });
    let agent = Arc::new(Agent::new(
        server.clone(),
        controller,
        applied,
        timeline,
        resync,
        cloud.map(|c| c.client),
        AgentConfig {
            drift: DriftConfig {
                threshold: a.drift_threshold,
                windows: a.drift_windows,
            },
            contention: a.contention,
            started,
            heartbeat_ms: a.heartbeat_ms,
            report_every: a.report_every.max(1),
            samples,
            replay,
        },
    ));
    agent.set_serving(Serving {
        reason: serving_reason,
        failed: None,
    });
    if let Some(s) = standby {
        println!(
            "keeping the plan of supernet {} for a rollback (subnet {}, budget {:.3} ms)",
            s.applied.supernet_id, s.subnet, s.applied.plan.budget_ms
        );
        agent.keep_standby(s);
    }
    let result = rt.block_on(async {
        let api = match &a.listen {
            Some(addr) => {
                let cfg = ApiConfig {
                    max_batch: a.max_batch.max(1),
                    max_concurrent: a.listen_max_concurrent.max(1),
                    token: listen_token,
                };
                let mut svc = InferenceService::new(server.clone(), cfg, budget);
                svc.share_budget(agent.budget_handle());
                let h = grpc::serve(addr, svc).await?;
                println!("local inference API listening on {}", h.addr);
                Some(h)
            }
            None => None,
        };
        let duration = a.duration;
        let stop = async move {
            if duration > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(duration)).await;
                Ok(())
            } else {
                adaptivenet_proto::shutdown::signal().await
            }
        };
        let summary = agent.clone().run(stop).await?;
        if let Some(h) = api {
            h.shutdown().await;
        }
        let (n, p50, p95) = server.window_stats();
        let (requests, images) = server.served();
        println!(
            "served {} images; live p50 {p50:.3} ms p95 {p95:.3} ms over {n} samples; {} switches; active {}; {requests} requests / {images} images in total",
            summary.replayed,
            summary.switches,
            server.active().subnet
        );
        println!("timeline: {}", agent.timeline().path().display());
        Ok::<(), anyhow::Error>(())
    });
    if let Some(c) = contention {
        let work = c.stop();
        tracing::info!("contention: {work} matrix products");
    }
    result
}

/// `--bn-recal`: from now on every switch recalibrates its target on the images the search
/// evaluated (all of them with --images 0), starting with the subnet serving now.
fn recalibrate_bn(
    server: &Server,
    src: &ArtifactSource,
    start: &Subnet,
    data: &Dataset,
    s: &SearchArgs,
    mode: QualityMode,
    bn_recal: BnRecal,
) -> Result<()> {
    let Some(setting) = bn_recal.setting(mode) else {
        return Ok(());
    };
    let recal = local_recalibration(src, data, s.images, s.seed, setting)?;
    let n: usize = recal.inputs.iter().map(|x| x.dim(0).unwrap_or(0)).sum();
    let t0 = std::time::Instant::now();
    server.set_recalibration(recal);
    let rep = server
        .switch(start)
        .context("BN recalibration of the active subnet")?;
    println!(
        "BN recalibration ({}) of {start} on {n} local images: {:.0} ms{}",
        if setting.scope == RecalScope::All {
            "all modules"
        } else {
            "branches"
        },
        t0.elapsed().as_secs_f64() * 1e3,
        match (bn_recal, rep.recalibrated) {
            (BnRecal::Auto, Some(true)) => ", kept (local quality not lower)",
            (BnRecal::Auto, _) => ", refused (local quality lower): shipped statistics serve",
            _ => "",
        }
    );
    Ok(())
}

/// `--listen-token-file`'s token (surrounding whitespace ignored; empty is refused).
fn listen_token(a: &RunArgs) -> Result<Option<String>> {
    Ok(match &a.listen_token_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading --listen-token-file {}", p.display()))?;
            anyhow::ensure!(
                !text.trim().is_empty(),
                "--listen-token-file {} is empty",
                p.display()
            );
            Some(text.trim().to_string())
        }
        None => None,
    })
}
