//! Boundary tests of the edge agent on a narrow ResNet-20 (widths 4/8/16, the 149-subnet
//! merge-only space) with synthetic images, so the whole file runs in seconds.
use std::sync::Arc;
use std::time::Duration;

use adaptivenet_core::artifact::{blob_path, write_artifact, InputSpec};
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::{
    branches::build_supernet, Choice, ModuleKey, Subnet, Supernet, SupernetConfig,
};
use adaptivenet_edge::adapt::{maintain, AdaptConfig, AdaptEvent, Controller};
use adaptivenet_edge::profile::{self, random_subnets, LatencyTable, ProfileConfig};
use adaptivenet_edge::quality::{EvalSet, QualityMode};
use adaptivenet_edge::search::{
    self, best_within, evaluate_each, evaluate_prefix, Budget, Candidate, SearchConfig, Speedups,
};
use adaptivenet_edge::serve::{ArtifactSource, Server};
use adaptivenet_edge::state::{ActiveRecord, StateDir};
use adaptivenet_edge::EdgeError;
use candle_core::{Device, Tensor};

fn supernet() -> Supernet {
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[4,8,16],"in_channels":1,"num_classes":10}"#,
    )
    .unwrap();
    let oracle = Model::init(&arch.spec, 7).unwrap();
    build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap()
}

fn eval_set(sn: &Supernet, images: usize, batch: usize) -> EvalSet {
    let inputs = (0..images / batch)
        .map(|b| {
            Tensor::randn(0f32, 1.0, (batch, 1, 28, 28), &Device::Cpu)
                .map(|t| t * (b as f64 + 1.0))
                .unwrap()
                .unwrap()
        })
        .collect();
    EvalSet::from_batches(sn, inputs, None, QualityMode::OracleAgreement).unwrap()
}

fn artifact(sn: &Supernet) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.5],
        std: vec![0.5],
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    write_artifact(dir.path(), sn, input, &"0".repeat(64), vec![]).unwrap();
    dir
}

#[test]
fn prefix_reuse_gives_exactly_the_plain_scores_with_less_work() {
    let sn = supernet();
    assert_eq!(sn.spec.count(), 149);
    let set = eval_set(&sn, 16, 8);
    let all = sn.spec.enumerate(1000).unwrap();
    let (cached, ps) = evaluate_each(&sn, &set, &all, true).unwrap();
    let (prefix, st) = evaluate_prefix(&sn, &set, &all, usize::MAX).unwrap();
    assert_eq!(cached, prefix);
    // Without the stem cache (plain baseline) and with a zero memory bound (per-subnet
    // fallback everywhere), on a subset to keep the test short: same scores again.
    let sub: Vec<Subnet> = all.iter().step_by(5).cloned().collect();
    let want: Vec<f64> = prefix.iter().step_by(5).copied().collect();
    let (plain, _) = evaluate_each(&sn, &set, &sub, false).unwrap();
    let (bounded, bs) = evaluate_prefix(&sn, &set, &sub, 0).unwrap();
    assert_eq!(plain, want);
    assert_eq!(bounded, want);
    assert_eq!(bs.peak_cached_bytes, 0);
    assert!(
        st.module_applications * 2 < ps.module_applications,
        "{st:?} vs {ps:?}"
    );
    // The oracle agrees with itself.
    let oracle = all.iter().position(|s| !s.uses_branch()).unwrap();
    assert_eq!(prefix[oracle], 100.0);
    eprintln!(
        "149 subnets: {} module applications per batch with prefix reuse, {} without",
        st.module_applications / 2,
        ps.module_applications / 2
    );
}

fn is_pareto(front: &[Candidate], all: &[Candidate]) -> bool {
    front.iter().all(|f| {
        !all.iter().any(|c| {
            c.latency_ms <= f.latency_ms
                && c.quality >= f.quality
                && (c.latency_ms < f.latency_ms || c.quality > f.quality)
        })
    })
}

#[test]
fn search_is_deterministic_valid_within_budget_and_finds_the_optimum() {
    let sn = supernet();
    let set = eval_set(&sn, 16, 16);
    let table = LatencyTable::from_macs(&sn.spec, 1.0);
    let n = sn.spec.num_positions();
    let budgets: Vec<f64> = [0.6, 0.8]
        .iter()
        .map(|&f| Budget::Fraction(f).resolve(&table, n).unwrap())
        .collect();
    let cfg = SearchConfig {
        population: 16,
        generations: 5,
        seed: 3,
        ..SearchConfig::default()
    };
    let a = search::search(&sn, &table, &set, &budgets, &cfg, |_, _| {}).unwrap();
    let b = search::search(&sn, &table, &set, &budgets, &cfg, |_, _| {}).unwrap();
    assert_eq!(a.best, b.best);
    assert_eq!(a.front, b.front);
    assert_eq!(a.stats.evaluations, b.stats.evaluations);

    // Exhaustive ground truth over the 149 subnets.
    let all = sn.spec.enumerate(1000).unwrap();
    let (q, _) = evaluate_prefix(&sn, &set, &all, usize::MAX).unwrap();
    let truth: Vec<Candidate> = all
        .iter()
        .zip(q)
        .map(|(s, quality)| Candidate {
            subnet: s.clone(),
            latency_ms: table.predict_ms(s).unwrap(),
            quality,
        })
        .collect();
    for r in &a.best {
        sn.spec.validate(&r.best.subnet).unwrap();
        assert!(r.best.latency_ms <= r.budget_ms);
        assert_eq!(r.best.latency_ms, table.predict_ms(&r.best.subnet).unwrap());
        let opt = best_within(&truth, r.budget_ms).unwrap();
        assert!(
            opt.quality - r.best.quality <= 0.5,
            "found {:?}, optimum {:?}",
            r.best,
            opt
        );
    }
    // The front is Pareto-optimal among everything (a fortiori among what was evaluated).
    let evaluated: Vec<Candidate> = truth
        .iter()
        .filter(|c| a.front.iter().any(|f| f.subnet == c.subnet) || a.stats.evaluations >= 149)
        .cloned()
        .collect();
    assert!(is_pareto(&a.front, &evaluated));
    for w in a.front.windows(2) {
        assert!(w[0].latency_ms <= w[1].latency_ms && w[0].quality < w[1].quality);
    }
    assert!(
        a.stats.evaluations < 149,
        "search should not need the whole space: {:?}",
        a.stats
    );

    // Plain EA: same guarantees, no speed-ups.
    let plain = SearchConfig {
        speedups: Speedups::none(),
        ..cfg.clone()
    };
    let p = search::search(&sn, &table, &set, &budgets, &plain, |_, _| {}).unwrap();
    for r in &p.best {
        sn.spec.validate(&r.best.subnet).unwrap();
        assert!(r.best.latency_ms <= r.budget_ms);
    }
}

#[test]
fn serving_raises_a_budget_below_the_cheapest_subnet_to_it() {
    let sn = supernet();
    let set = eval_set(&sn, 16, 16);
    let table = LatencyTable::from_macs(&sn.spec, 1.0);
    let (cheapest, most) = table.latency_range(&sn.spec).unwrap();
    let budgets = adaptivenet_edge::adapt::plan::feasible_budgets(
        vec![cheapest * 0.5, most * 0.9],
        &table,
        &sn.spec,
    )
    .unwrap();
    assert!(budgets[0] >= cheapest && budgets[0] < cheapest * (1.0 + 1e-6));
    assert_eq!(budgets[1], most * 0.9, "a feasible budget is kept");
    // The raised budget is searchable and yields the fastest subnet.
    let r = search::search(
        &sn,
        &table,
        &set,
        &budgets,
        &SearchConfig {
            population: 8,
            generations: 1,
            ..SearchConfig::default()
        },
        |_, _| {},
    )
    .unwrap();
    let served = table.predict_ms(&r.best[0].best.subnet).unwrap();
    assert!(
        (served - cheapest).abs() < 1e-9 * cheapest.max(1.0),
        "{served} vs {cheapest}"
    );
}

#[test]
fn budget_below_the_cheapest_subnet_is_an_error() {
    let sn = supernet();
    let set = eval_set(&sn, 16, 16);
    let table = LatencyTable::from_macs(&sn.spec, 1.0);
    let (cheapest, _) = table.latency_range(&sn.spec).unwrap();
    let err = search::search(
        &sn,
        &table,
        &set,
        &[cheapest * 0.5],
        &SearchConfig::default(),
        |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, EdgeError::BudgetTooLow { .. }), "{err}");
    assert!(Budget::parse("abc").is_err());
    assert_eq!(Budget::parse("12ms").unwrap(), Budget::Ms(12.0));
    assert_eq!(Budget::parse("0.6").unwrap(), Budget::Fraction(0.6));
}

#[test]
fn profile_table_covers_every_module_and_validation_reports_errors() {
    let sn = supernet();
    let cfg = ProfileConfig {
        batch: 1,
        warmup: 1,
        rounds: 3,
        seed: 0,
    };
    let mut t = profile::profile(&sn, &cfg, |_, _| {}).unwrap();
    t.check(&sn.spec).unwrap();
    // Profiling also decides how much the search may keep across generations.
    let reuse = t.reuse.as_ref().unwrap();
    assert!(
        reuse.read_gb_s > 0.0 && reuse.hit_cost_ratio > 0.0,
        "{reuse:?}"
    );
    assert_eq!(
        t.modules.len(),
        sn.spec.positions.iter().map(Vec::len).sum::<usize>()
    );
    assert!(t
        .modules
        .iter()
        .all(|m| m.stat.runs == 3 && m.stat.median_ms > 0.0));
    let v = profile::validate_table(&sn, &mut t, 30, 2, 0).unwrap();
    assert_eq!(v.subnets, 30);
    assert!(v.raw_median_err.is_finite() && v.calibrated_p90_err.is_finite());
    assert_eq!(
        random_subnets(&sn.spec, 30, 5).unwrap(),
        random_subnets(&sn.spec, 30, 5).unwrap()
    );
}

#[test]
fn switch_loads_only_differing_modules_and_a_failed_load_keeps_the_old_subnet() {
    let sn = supernet();
    let dir = artifact(&sn);
    let src = ArtifactSource::open(dir.path()).unwrap();
    let a = Subnet::parse("000000000").unwrap();
    let b = Subnet::parse("1x0000000").unwrap();
    let server = Server::start(src.clone(), &a, 10).unwrap();
    assert_eq!(server.active().supernet.modules.len(), 9);
    let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let before = server.active();
    let r = server.switch(&b).unwrap();
    assert_eq!((r.loaded, r.reused), (1, 7));
    // The in-flight holder of the old model still runs it.
    before.supernet.forward(&before.subnet, &x).unwrap();
    assert_eq!(server.active().subnet, b);
    assert_eq!(server.active().supernet.modules.len(), 8);
    // Outputs equal the full (BN-folded, as the device runs it) supernet's for that subnet.
    let y = server.infer(&x).unwrap();
    let mut folded = sn.clone();
    folded.fold().unwrap();
    let want = folded.forward(&b, &x).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    // ... and the unfolded supernet's within the folding tolerance.
    let unfolded = sn.forward(&b, &x).unwrap();
    let d = (y - unfolded).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-4);

    // Flip a byte in the blob of p3c2: switching to a subnet that needs it fails cleanly.
    let entry = &src.manifest.positions[3]
        .choices
        .iter()
        .find(|c| c.id == Choice::Merge3)
        .unwrap()
        .module;
    let path = blob_path(dir.path(), &entry.sha256);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = server
        .switch(&Subnet::parse("1x02xx000").unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("sha256"), "{err}");
    assert_eq!(server.active().subnet, b);
    server.infer(&x).unwrap();
}

#[test]
fn state_round_trips_and_bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let st = StateDir::new(dir.path());
    assert!(st.load_active("id").unwrap().is_none());
    let rec = ActiveRecord {
        subnet: Subnet::parse("2xx000000").unwrap(),
        budget_ms: 1.5,
    };
    st.save_active("id", &rec).unwrap();
    assert_eq!(st.load_active("id").unwrap(), Some(rec));
    assert!(matches!(
        st.load_active("other"),
        Err(EdgeError::StaleState { .. })
    ));
    std::fs::write(st.active_path(), b"{\"format_version\":1,").unwrap();
    let err = st.load_active("id").unwrap_err();
    assert!(
        matches!(err, EdgeError::CorruptState { .. }) && err.to_string().contains("active.json"),
        "{err}"
    );
    std::fs::write(st.table_path(), b"\x00\xff garbage").unwrap();
    assert!(matches!(
        st.load_table("id"),
        Err(EdgeError::CorruptState { .. })
    ));
    // A subnet code that does not parse is corrupt state too.
    std::fs::write(
        st.active_path(),
        br#"{"format_version":1,"supernet_id":"id","data":{"subnet":"1xx","budget_ms":1.0}}"#,
    )
    .unwrap();
    assert!(matches!(
        st.load_active("id"),
        Err(EdgeError::CorruptState { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn maintenance_loop_steps_down_under_load_and_back_without_oscillation() {
    let sn = supernet();
    let dir = artifact(&sn);
    let src = ArtifactSource::open(dir.path()).unwrap();
    let table = LatencyTable::from_macs(&sn.spec, 1.0);
    let front: Vec<Candidate> = [
        "1x1x1x1x0",
        "1x1x1x000",
        "1x1x00000",
        "1x0000000",
        "000000000",
    ]
    .iter()
    .enumerate()
    .map(|(i, s)| {
        let subnet = Subnet::parse(s).unwrap();
        Candidate {
            latency_ms: table.predict_ms(&subnet).unwrap(),
            quality: 80.0 + i as f64,
            subnet,
        }
    })
    .collect();
    assert!(front.windows(2).all(|w| w[0].latency_ms < w[1].latency_ms));
    // A little headroom: the controller re-enters an entry only when it holds the budget
    // with confidence.
    let budget = front[3].latency_ms * 1.05;
    let server = Arc::new(Server::start(src, &front[3].subnet, 30).unwrap());
    let mut cfg = AdaptConfig::new(budget);
    cfg.interval_ms = 100;
    let ctl = Arc::new(std::sync::Mutex::new(Controller::new(
        cfg,
        front.clone(),
        3,
    )));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let lat: std::collections::HashMap<Subnet, f64> = front
        .iter()
        .map(|c| (c.subnet.clone(), c.latency_ms))
        .collect();
    // Injected workload: 10 samples every 10 ms of the active subnet's table latency times a
    // load factor (1.5 between t = 5 s and 10 s) with +-3% deterministic noise.
    let load_server = server.clone();
    let workload = tokio::spawn(async move {
        let t0 = tokio::time::Instant::now();
        let mut k = 0u64;
        while t0.elapsed() < Duration::from_secs(16) {
            let t = t0.elapsed().as_secs_f64();
            let load = if (5.0..10.0).contains(&t) { 1.5 } else { 1.0 };
            let m = load_server.active();
            for _ in 0..10 {
                k += 1;
                let u =
                    ((k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) as f64) / (1u64 << 53) as f64;
                load_server.record(m.version, lat[&m.subnet] * load * (1.0 + 0.06 * (u - 0.5)));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tx.send(true);
    });
    let t0 = tokio::time::Instant::now();
    let mut log = Vec::new();
    let mut windows = 0;
    let events = maintain(server.clone(), ctl, rx, |tick, c| {
        windows += 1;
        if let Some(AdaptEvent::Switched(_)) = &tick.event {
            log.push((t0.elapsed().as_secs_f64(), c.current));
        }
    })
    .await;
    assert!(windows >= 150, "{windows} windows");
    workload.await.unwrap();
    assert!(events.iter().all(|e| matches!(e, AdaptEvent::Switched(_))));
    // Down once when the load arrives, back up to the start when it leaves; nothing while
    // conditions are steady.
    assert!(
        log.first()
            .is_some_and(|&(t, j)| (5.0..7.0).contains(&t) && j < 3),
        "{log:?}"
    );
    assert_eq!(server.active().subnet, front[3].subnet, "{log:?}");
    assert!(log.len() <= 4, "{log:?}");
    // Besides the step down, under the load only a fill-up towards the budget (the step down
    // cleared it by a margin), never back down: no oscillation.
    assert!(
        log.iter()
            .all(|&(t, _)| (5.0..8.0).contains(&t) || (10.0..14.0).contains(&t)),
        "{log:?}"
    );
    let under_load: Vec<usize> = log
        .iter()
        .filter(|&&(t, _)| t < 10.0)
        .map(|&(_, j)| j)
        .collect();
    assert!(under_load.windows(2).all(|w| w[0] < w[1]), "{log:?}");
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A test artifact with its source (the directory must outlive it) and `n` local images
/// from another distribution than the initial BN statistics assume.
fn recal_fixture(n: usize) -> (tempfile::TempDir, ArtifactSource, Tensor) {
    let dir = artifact(&supernet());
    let src = ArtifactSource::open(dir.path()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (n, 1, 28, 28), &Device::Cpu)
        .unwrap()
        .affine(3.0, 1.0)
        .unwrap();
    (dir, src, x)
}

#[test]
fn a_recalibrating_server_recalibrates_every_switch_target() {
    use adaptivenet_edge::serve::bn::{recalibrate, RecalScope};
    use adaptivenet_edge::serve::Recalibration;
    let (_dir, src, x) = recal_fixture(16);
    let (a, b) = (
        Subnet::parse("1x02xx000").unwrap(),
        Subnet::parse("2xx1x0000").unwrap(),
    );
    // What serving `s` recalibrated on `x` must answer: a fresh server given the modules.
    let expected = |s: &Subnet| {
        let reference = Server::start(src.clone(), s, 10).unwrap();
        let given = recalibrate(&src, s, std::slice::from_ref(&x), RecalScope::All).unwrap();
        reference.switch_with(s, given).unwrap();
        reference.infer(&x).unwrap()
    };
    let server = Server::start(src.clone(), &a, 10).unwrap();
    let shipped_a = server.infer(&x).unwrap();
    server.set_recalibration(Recalibration {
        inputs: vec![x.clone()],
        scope: RecalScope::All,
        guard: None,
    });
    server.switch(&a).unwrap();
    let want_a = expected(&a);
    assert_eq!(max_abs_diff(&server.infer(&x).unwrap(), &want_a), 0.0);
    assert!(
        max_abs_diff(&shipped_a, &want_a) > 1e-3,
        "recalibration changed nothing"
    );
    // b shares positions 6-8 with a: their statistics must be b's, not a's reused.
    server.switch(&b).unwrap();
    assert_eq!(max_abs_diff(&server.infer(&x).unwrap(), &expected(&b)), 0.0);
    server.switch(&a).unwrap();
    assert_eq!(max_abs_diff(&server.infer(&x).unwrap(), &want_a), 0.0);
}

/// `--bn-recal auto`: the guard keeps recalibrated statistics only where they predict the
/// targets at least as well as the shipped ones, and a refusal serves the shipped statistics
/// even when the previous path's recalibrated modules could be reused.
#[test]
fn the_recalibration_guard_keeps_only_what_does_not_lower_local_quality() {
    use adaptivenet_edge::quality::top1;
    use adaptivenet_edge::serve::bn::{recalibrate, RecalScope};
    use adaptivenet_edge::serve::Recalibration;
    let (_dir, src, x) = recal_fixture(64);
    let a = Subnet::parse("1x02xx000").unwrap();
    let shipped = Server::start(src.clone(), &a, 10)
        .unwrap()
        .infer(&x)
        .unwrap();
    let fitted = {
        let s = Server::start(src.clone(), &a, 10).unwrap();
        s.switch_with(
            &a,
            recalibrate(&src, &a, std::slice::from_ref(&x), RecalScope::All).unwrap(),
        )
        .unwrap();
        s.infer(&x).unwrap()
    };
    let (shipped_top1, fitted_top1) = (top1(&shipped).unwrap(), top1(&fitted).unwrap());
    assert_ne!(
        shipped_top1, fitted_top1,
        "precondition: recalibration changes predictions"
    );
    let guarded = |targets: &[u32]| Recalibration {
        inputs: vec![x.clone()],
        scope: RecalScope::All,
        guard: Some(vec![targets.to_vec()]),
    };
    // Targets the recalibrated path predicts perfectly: kept.
    let server = Server::start(src.clone(), &a, 10).unwrap();
    server.set_recalibration(guarded(&fitted_top1));
    assert_eq!(server.switch(&a).unwrap().recalibrated, Some(true));
    assert_eq!(max_abs_diff(&server.infer(&x).unwrap(), &fitted), 0.0);
    // Targets the shipped statistics predict perfectly: refused, and the shipped modules
    // serve although the active model holds recalibrated ones for the same path.
    server.set_recalibration(guarded(&shipped_top1));
    assert_eq!(server.switch(&a).unwrap().recalibrated, Some(false));
    assert_eq!(max_abs_diff(&server.infer(&x).unwrap(), &shipped), 0.0);
    // Mismatched targets are refused before anything changes.
    server.set_recalibration(Recalibration {
        guard: Some(vec![]),
        ..guarded(&fitted_top1)
    });
    assert!(matches!(
        server.switch(&a),
        Err(EdgeError::InvalidConfig { ref field, .. }) if field == "targets"
    ));
    assert_eq!(max_abs_diff(&server.infer(&x).unwrap(), &shipped), 0.0);
}

#[test]
fn bn_recalibration_sets_running_stats_to_the_local_batch_statistics() {
    use adaptivenet_edge::serve::bn::{recalibrate, RecalScope};
    let sn = supernet(); // the fixture's artifact holds these weights (seeded)
    let (_dir, src, x) = recal_fixture(16);
    let s = Subnet::parse("1x02xx000").unwrap();
    let only_branches =
        recalibrate(&src, &s, std::slice::from_ref(&x), RecalScope::Branches).unwrap();
    let keys: Vec<ModuleKey> = only_branches.keys().copied().collect();
    assert_eq!(
        keys,
        vec![
            ModuleKey::new(0, Choice::Merge2),
            ModuleKey::new(3, Choice::Merge3)
        ]
    );
    assert!(recalibrate(
        &src,
        &Subnet::parse("000000000").unwrap(),
        std::slice::from_ref(&x),
        RecalScope::Branches
    )
    .unwrap()
    .is_empty());
    // With every module recalibrated on one batch, eval mode on that batch reproduces
    // train mode (batch statistics) up to the unbiased-variance factor.
    let all = recalibrate(&src, &s, std::slice::from_ref(&x), RecalScope::All).unwrap();
    assert_eq!(all.len(), s.steps().count());
    let server = Server::start(src.clone(), &s, 10).unwrap();
    let before = server.infer(&x).unwrap();
    server.switch_with(&s, all).unwrap();
    let after = server.infer(&x).unwrap();
    let mut train = sn.clone();
    let mut h = train.forward_stem(&x).unwrap();
    for key in s.steps() {
        let params = train.module(key).unwrap().clone();
        let mut ctx = adaptivenet_core::model::TrainCtx::new(1.0);
        h = train
            .forward_module_train(key, &params, &h, &mut ctx)
            .unwrap();
        ctx.apply(train.modules.get_mut(&key).unwrap());
    }
    let want = train.forward_head(&h).unwrap();
    let err = |a: &Tensor| max_abs_diff(a, &want);
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        err(&after) < 0.02 * scale,
        "{} vs scale {scale}",
        err(&after)
    );
    assert!(
        err(&before) > 5.0 * err(&after),
        "recalibration changed nothing"
    );
}
