//! The recal pick (`edge-agent run --bn-recal … --recal-pick K`) through the agent's plan, on
//! a narrow ResNet-20 supernet (widths 4/8/16, merge-only, untrained: its merged branches'
//! shipped BN statistics fit no path) with synthetic local images and a MAC latency table, so
//! every run is deterministic. The expected pick is recomputed here from the library's parts
//! (the search's candidates, `bn::recalibrate` on the search images, the search's quality
//! function), not through the pick's own code.
mod common;

use std::path::Path;

use adaptivenet_edge::adapt::plan::{plan, resolve_budgets, Plan, PlanConfig};
use adaptivenet_edge::adapt::Controller;
use adaptivenet_edge::profile::LatencyTable;
use adaptivenet_edge::quality::{load_local_data, search_batches, EvalSet, QualityMode};
use adaptivenet_edge::search::{self, best_within, top_within, Candidate, RecalPick, SearchConfig};
use adaptivenet_edge::serve::bn::{recalibrate, RecalScope, RecalSetting, RECAL_BATCH};
use adaptivenet_edge::serve::ArtifactSource;
use adaptivenet_edge::state::StateDir;
use common::{artifact, Stripes};

/// Local images, and of those the ones the search scores (and recalibration uses).
const IMAGES: usize = 90;
const SEARCH_IMAGES: usize = 60;
const K: usize = 4;
const MODE: QualityMode = QualityMode::OracleAgreement;

/// An ImageFolder of [`Stripes`] in three classes.
fn image_folder(dir: &Path) {
    let mut stripes = Stripes::new(11);
    for i in 0..IMAGES {
        let d = dir.join((i % 3).to_string());
        std::fs::create_dir_all(&d).unwrap();
        let img = image::GrayImage::from_raw(28, 28, stripes.next_image()).unwrap();
        img.save(d.join(format!("{i:03}.png"))).unwrap();
    }
}

/// The table the plan finds stored (MAC-proportional, so latencies are exact).
fn table(src: &ArtifactSource) -> LatencyTable {
    let mut t = LatencyTable::from_macs(&src.manifest.supernet_spec(), 1.0);
    t.supernet_id = Some(src.manifest.supernet_id.to_string());
    t.conditions.threads = 1;
    t.conditions.batch = 1;
    t
}

fn setting(scope: RecalScope) -> RecalSetting {
    RecalSetting { scope, guard: None }
}

fn config(data: &Path, budgets: &[&str], pick: Option<RecalPick>) -> PlanConfig {
    PlanConfig {
        threads: 1,
        batch: 1,
        rounds: 1,
        validate: 0,
        force_profile: false,
        search: SearchConfig {
            population: 16,
            generations: 3,
            seed: 5,
            recal_pick: pick,
            ..SearchConfig::default()
        },
        reuse_from_profile: false,
        budgets: budgets.iter().map(|b| b.to_string()).collect(),
        data: data.to_path_buf(),
        images: SEARCH_IMAGES,
        mode: MODE,
        research: false,
        clamp_budgets: false,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    src: ArtifactSource,
    data: std::path::PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let src = artifact(&dir.path().join("art"));
        let data = dir.path().join("data");
        image_folder(&data);
        Fixture {
            _dir: dir,
            src,
            data,
        }
    }

    /// A plan in `state` (a fresh one unless given), the table stored there first.
    fn plan_in(&self, state: &Path, cfg: &PlanConfig) -> Plan {
        let state = StateDir::new(state);
        state.save_table(&table(&self.src)).unwrap();
        plan(&self.src, &state, cfg, &mut |_, _, _| {}).unwrap()
    }

    fn plan(&self, cfg: &PlanConfig) -> Plan {
        let state = tempfile::tempdir().unwrap();
        self.plan_in(state.path(), cfg)
    }

    /// The plain search the plan runs, with every fully scored candidate, and its image set.
    fn search(&self, cfg: &PlanConfig) -> (search::SearchResult, Vec<Candidate>, EvalSet) {
        let sn = self.src.load(None).unwrap();
        let ds = load_local_data(&self.data, &self.src.manifest.input).unwrap();
        let set = EvalSet::from_dataset(
            &sn,
            &self.src.manifest.input,
            &ds,
            SEARCH_IMAGES,
            100,
            MODE,
            cfg.search.seed,
        )
        .unwrap();
        let t = table(&self.src);
        let budgets = resolve_budgets(&cfg.budgets, &t, sn.spec.num_positions()).unwrap();
        let (r, all) =
            search::search_keeping(&sn, &t, &set, &budgets, &cfg.search, &[], |_, _| {}).unwrap();
        (r, all, set)
    }

    /// `c` with its modules in `scope` recalibrated on the search images (in the batches the
    /// agent uses) and scored by the search's quality function on them.
    fn recalibrated(&self, c: &Candidate, set: &EvalSet, scope: RecalScope, seed: u64) -> f64 {
        let ds = load_local_data(&self.data, &self.src.manifest.input).unwrap();
        let (inputs, _) = search_batches(
            &self.src.manifest.input,
            &ds,
            SEARCH_IMAGES,
            RECAL_BATCH,
            seed,
        )
        .unwrap();
        let given = recalibrate(&self.src, &c.subnet, &inputs, scope).unwrap();
        let mut net = self
            .src
            .load(Some(std::slice::from_ref(&c.subnet)))
            .unwrap();
        net.modules.extend(given);
        set.evaluate(&net, &c.subnet, true).unwrap()
    }
}

#[test]
fn the_pick_is_the_best_recalibrated_of_the_top_k_within_the_budget() {
    let f = Fixture::new();
    let pick = RecalPick {
        k: K,
        setting: setting(RecalScope::Branches),
    };
    let cfg = config(&f.data, &["0.6"], Some(pick));
    let (plain, all, set) = f.search(&cfg);
    let budget = plain.best[0].budget_ms;
    let top = top_within(&all, budget, K);
    assert_eq!(
        top.len(),
        K,
        "precondition: {K} candidates within the budget"
    );
    assert_eq!(top[0], plain.best[0].best);
    let rescored: Vec<Candidate> = top
        .iter()
        .map(|c| Candidate {
            quality: f.recalibrated(c, &set, RecalScope::Branches, cfg.search.seed),
            ..c.clone()
        })
        .collect();
    let want = best_within(&rescored, budget).unwrap();
    // The fixture must make the pick matter: recalibration re-orders the shortlist.
    assert_ne!(
        want.subnet, plain.best[0].best.subnet,
        "precondition: {rescored:?} vs {top:?}"
    );

    let got = f.plan(&cfg);
    let best = &got.record.result.best[0];
    assert_eq!(best.best, want, "{rescored:?}");
    assert!(best.best.latency_ms <= budget);
    // Serving starts on it.
    let front = &got.record.result.front;
    assert_eq!(front[Controller::initial_index(front, budget)], want);
    assert_eq!(got.record.config.recal_pick, Some(pick));
}

#[test]
fn no_pick_answers_over_budget_and_serving_starts_on_each_answer() {
    let f = Fixture::new();
    for scope in [RecalScope::Branches, RecalScope::All] {
        let pick = RecalPick {
            k: K,
            setting: setting(scope),
        };
        let got = f.plan(&config(&f.data, &["0.5", "0.6", "0.8"], Some(pick)));
        let r = &got.record.result;
        let spec = f.src.manifest.supernet_spec();
        let t = table(&f.src);
        for b in &r.best {
            spec.validate(&b.best.subnet).unwrap();
            let ms = t.predict_ms(&b.best.subnet).unwrap();
            assert!(ms <= b.budget_ms && b.best.latency_ms == ms, "{b:?}");
            assert_eq!(
                r.front[Controller::initial_index(&r.front, b.budget_ms)],
                b.best
            );
        }
        assert!(
            r.front
                .windows(2)
                .all(|w| w[0].latency_ms < w[1].latency_ms && w[0].quality < w[1].quality),
            "{:?}",
            r.front
        );
    }
}

#[test]
fn without_bn_recal_the_plan_is_the_plain_search() {
    let f = Fixture::new();
    let cfg = config(&f.data, &["0.5", "0.7"], None);
    let (plain, _, _) = f.search(&cfg);
    let state = tempfile::tempdir().unwrap();
    let got = f.plan_in(state.path(), &cfg);
    assert_eq!(
        (&got.record.result.best, &got.record.result.front),
        (&plain.best, &plain.front)
    );
    let stored = std::fs::read_to_string(state.path().join("search.json")).unwrap();
    assert!(!stored.contains("recal_pick"), "{stored}");
    // K below 2 re-ranks nothing either.
    let one = f.plan(&config(
        &f.data,
        &["0.5", "0.7"],
        Some(RecalPick {
            k: 1,
            setting: setting(RecalScope::All),
        }),
    ));
    assert_eq!(
        (&one.record.result.best, &one.record.result.front),
        (&plain.best, &plain.front)
    );
}

#[test]
fn a_seed_reproduces_the_pick_and_a_stored_plain_result_is_not_reused_for_it() {
    let f = Fixture::new();
    let pick = RecalPick {
        k: K,
        setting: RecalSetting {
            scope: RecalScope::All,
            guard: Some(MODE),
        },
    };
    let with = config(&f.data, &["0.6", "0.8"], Some(pick));
    let a = f.plan(&with);
    let b = f.plan(&with);
    assert_eq!(
        (&a.record.result.best, &a.record.result.front),
        (&b.record.result.best, &b.record.result.front)
    );
    // One state directory: a plain result first, then the pick searches again (warm-started)
    // rather than serve subnets ranked by statistics they will not serve with; a rerun
    // reuses the picked result.
    let state = tempfile::tempdir().unwrap();
    let plain = f.plan_in(state.path(), &config(&f.data, &["0.6", "0.8"], None));
    assert!(plain.record.config.recal_pick.is_none());
    let picked = f.plan_in(state.path(), &with);
    assert!(!picked.reused_search);
    assert_eq!(picked.record.config.recal_pick, Some(pick));
    let again = f.plan_in(state.path(), &with);
    assert!(again.reused_search);
    assert_eq!(again.record.result.best, picked.record.result.best);
}
