//! `edge-agent evaluate` and the library check behind it: the plan scored against labels on
//! the device, on a narrow ResNet-20 supernet (widths 4/8/16, merge-only) with synthetic
//! images whose labels are set to one model's predictions, so every expected score is known.
mod common;

use std::process::Command;

use adaptivenet_core::data::Dataset;
use adaptivenet_core::supernet::Subnet;
use adaptivenet_edge::evaluate::{evaluate_plan, labels_for_model, PlanEval};
use adaptivenet_edge::profile::LatencyTable;
use adaptivenet_edge::quality::{top1, transform_for, EvalSet, QualityMode};
use adaptivenet_edge::search::{self, Budget, BudgetResult, Candidate, SearchConfig};
use adaptivenet_edge::serve::bn::{RecalScope, RecalSetting};
use adaptivenet_edge::serve::ArtifactSource;
use adaptivenet_edge::state::SearchRecord;
use candle_core::Device;
use common::{artifact, Stripes, CLASSES};

/// Images the search scores, of `IMAGES` local ones.
const SEARCH_IMAGES: usize = 60;
const IMAGES: usize = 150;

/// [`Stripes`] (seed 11), all labelled 0.
fn dataset() -> Dataset {
    let mut stripes = Stripes::new(11);
    let images: Vec<u8> = (0..IMAGES).flat_map(|_| stripes.next_image()).collect();
    Dataset::new(
        images,
        vec![0; IMAGES],
        (1, 28, 28),
        (0..CLASSES).map(|i| format!("class{i}")).collect(),
    )
    .unwrap()
}

/// `subnet`'s top-1 on every image of `ds`, in index order (as shipped, BN folded).
fn predictions(src: &ArtifactSource, ds: &Dataset, subnet: &Subnet) -> Vec<u32> {
    let sn = src.load(Some(std::slice::from_ref(subnet))).unwrap();
    let t = transform_for(&src.manifest.input, ds).unwrap();
    let idx: Vec<usize> = (0..ds.len()).collect();
    idx.chunks(50)
        .flat_map(|c| {
            let (x, _) = ds.batch_tensor(c, &t, &Device::Cpu).unwrap();
            top1(&sn.forward(subnet, &x).unwrap()).unwrap()
        })
        .collect()
}

/// A label-free search over the first `SEARCH_IMAGES` images, as `adapt::plan` runs it.
fn search(src: &ArtifactSource, ds: &Dataset) -> SearchRecord {
    let sn = src.load(None).unwrap();
    let cfg = SearchConfig {
        population: 16,
        generations: 3,
        seed: 5,
        ..SearchConfig::default()
    };
    let set = EvalSet::from_dataset(
        &sn,
        &src.manifest.input,
        ds,
        SEARCH_IMAGES,
        100,
        QualityMode::OracleAgreement,
        cfg.seed,
    )
    .unwrap();
    let table = LatencyTable::from_macs(&sn.spec, 1.0);
    let n = sn.spec.num_positions();
    let budgets: Vec<f64> = [0.6, 0.8]
        .iter()
        .map(|&f| Budget::Fraction(f).resolve(&table, n).unwrap())
        .collect();
    let result = search::search(&sn, &table, &set, &budgets, &cfg, |_, _| {}).unwrap();
    assert_eq!(result.stats.images, SEARCH_IMAGES);
    SearchRecord {
        config: cfg,
        result,
    }
}

fn oracle(src: &ArtifactSource) -> Subnet {
    Subnet::original(src.manifest.supernet_spec().num_positions())
}

#[test]
fn labels_equal_to_the_oracle_make_accuracy_agreement_and_the_search_pick_the_labelled_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = artifact(dir.path());
    let mut ds = dataset();
    ds.labels = predictions(&src, &ds, &oracle(&src));
    let rec = search(&src, &ds);
    assert!(rec.result.front.len() > 2, "{:?}", rec.result.front);
    let e: PlanEval = evaluate_plan(&src, &rec, &ds, None).unwrap();
    assert_eq!((e.images, e.search_images), (IMAGES, SEARCH_IMAGES));
    assert_eq!(e.oracle_accuracy, 100.0);
    assert_eq!(e.budgets.len(), 2);
    for (b, r) in e.budgets.iter().zip(&rec.result.best) {
        let c = &b.chosen;
        assert_eq!(c.subnet, r.best.subnet);
        assert_eq!(c.accuracy, c.agreement);
        // The same images as the search, the same score: the check reproduces the search.
        assert_eq!(c.search_images_accuracy, c.search_quality);
        assert_eq!(c.search_quality, r.best.quality);
        assert_eq!(b.labelled_pick.subnet, c.subnet);
        assert!((b.retained - c.accuracy / 100.0).abs() < 1e-12);
    }
}

#[test]
fn labels_from_a_cheaper_subnet_make_it_the_labelled_pick() {
    let dir = tempfile::tempdir().unwrap();
    let src = artifact(dir.path());
    let mut ds = dataset();
    // A front of two: a cheaper subnet that disagrees with the oracle on some images but
    // not all, and the oracle, the search's choice for a budget that admits both.
    let sn = src.load(None).unwrap();
    let table = LatencyTable::from_macs(&sn.spec, 1.0);
    let top = oracle(&src);
    let o = predictions(&src, &ds, &top);
    let cheaper = sn
        .spec
        .enumerate(1000)
        .unwrap()
        .into_iter()
        .find(|s| {
            let same = predictions(&src, &ds, s)
                .iter()
                .zip(&o)
                .filter(|(a, b)| a == b)
                .count();
            0 < same && same < ds.len()
        })
        .expect("a subnet that partly agrees with the oracle");
    let candidate = |s: &Subnet, quality: f64| Candidate {
        subnet: s.clone(),
        latency_ms: table.predict_ms(s).unwrap(),
        quality,
    };
    let (x, y) = (candidate(&cheaper, 50.0), candidate(&top, 100.0));
    assert!(x.latency_ms < y.latency_ms);
    let mut rec = search(&src, &ds);
    rec.result.front = vec![x.clone(), y.clone()];
    rec.result.best = vec![BudgetResult {
        budget_ms: y.latency_ms,
        best: y.clone(),
    }];
    ds.labels = predictions(&src, &ds, &cheaper);
    let e = evaluate_plan(&src, &rec, &ds, None).unwrap();
    let got = &e.budgets[0];
    assert_eq!(got.chosen.subnet, top);
    assert_eq!(got.chosen.search_quality, 100.0);
    assert_eq!(got.chosen.agreement, 100.0);
    assert!(got.chosen.accuracy < 100.0, "{got:?}");
    assert_eq!(got.chosen.accuracy, e.oracle_accuracy);
    assert_eq!(got.retained, 1.0);
    assert_eq!(got.labelled_pick.subnet, cheaper);
    assert_eq!(got.labelled_pick.accuracy, 100.0);
    assert_eq!(got.labelled_pick.search_quality, 50.0);
    assert_eq!(got.labelled_pick.latency_ms, x.latency_ms);
    // Accuracy against these labels, agreement against the oracle: different things now.
    assert_eq!(
        got.labelled_pick.agreement,
        cheapest_agreement(&src, &ds, &cheaper)
    );
    assert!(got.labelled_pick.agreement < 100.0);
}

fn cheapest_agreement(src: &ArtifactSource, ds: &Dataset, s: &Subnet) -> f64 {
    let a = predictions(src, ds, s);
    let o = predictions(src, ds, &oracle(src));
    100.0 * a.iter().zip(&o).filter(|(x, y)| x == y).count() as f64 / ds.len() as f64
}

#[test]
fn the_recalibration_guard_never_scores_the_served_subnet_lower_on_its_images() {
    let dir = tempfile::tempdir().unwrap();
    let src = artifact(dir.path());
    let mut ds = dataset();
    ds.labels = predictions(&src, &ds, &oracle(&src));
    let rec = search(&src, &ds);
    let off = evaluate_plan(&src, &rec, &ds, None).unwrap();
    let guarded = RecalSetting {
        scope: RecalScope::All,
        guard: Some(QualityMode::Labelled),
    };
    let auto = evaluate_plan(&src, &rec, &ds, Some(guarded)).unwrap();
    let all = RecalSetting {
        scope: RecalScope::All,
        guard: None,
    };
    let unguarded = evaluate_plan(&src, &rec, &ds, Some(all)).unwrap();
    for ((a, o), u) in auto
        .budgets
        .iter()
        .zip(&off.budgets)
        .zip(&unguarded.budgets)
    {
        // The guard keeps recalibrated statistics only where they meet the labels of the
        // search's images at least as often: the check must use exactly those images.
        assert!(
            a.chosen.search_images_accuracy >= o.chosen.search_images_accuracy,
            "{a:?} vs {o:?}"
        );
        let kept = a.chosen.search_images_accuracy == u.chosen.search_images_accuracy;
        let refused = a.chosen.search_images_accuracy == o.chosen.search_images_accuracy;
        assert!(kept || refused, "{a:?} is neither {u:?} nor {o:?}");
        // The oracle's reference is the shipped one either way.
        assert_eq!(auto.oracle_accuracy, off.oracle_accuracy);
    }
}

#[test]
fn local_labels_map_to_the_model_classes_by_name_or_stay_indices() {
    let model: Vec<String> = ["shirt", "bag", "boot"].map(String::from).to_vec();
    let ds = |names: &[&str], labels: Vec<u32>| {
        let n = labels.len();
        Dataset::new(
            vec![0; n * 4],
            labels,
            (1, 2, 2),
            names.iter().map(|s| s.to_string()).collect(),
        )
        .unwrap()
    };
    // Folders sorted by name: boot=0, shirt=1 locally; the model's order is shirt, bag, boot.
    let named = ds(&["boot", "shirt"], vec![0, 1, 1, 0]);
    assert_eq!(labels_for_model(&named, &model).unwrap(), vec![2, 0, 0, 2]);
    let indices = ds(&["0", "1", "2"], vec![2, 1, 0]);
    assert_eq!(labels_for_model(&indices, &model).unwrap(), vec![2, 1, 0]);
    let partial = ds(&["boot", "sandal"], vec![0, 1]);
    let err = labels_for_model(&partial, &model).unwrap_err().to_string();
    assert!(
        err.contains("sandal") && !err.contains("\"boot\","),
        "{err}"
    );
    let too_many = ds(&["0", "1", "2", "3"], vec![3]);
    assert!(labels_for_model(&too_many, &model).is_err());
}

fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn evaluate_command_scores_the_stored_search_and_explains_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    let (code, _, err) = agent(&[
        "demo-artifact",
        "--out",
        art.to_str().unwrap(),
        "--widths",
        "4,8,16",
    ]);
    assert_eq!(code, 0, "{err}");
    // An ImageFolder labelled by class index (folders 0, 1, 2).
    let data = dir.path().join("data");
    for c in 0..3u8 {
        let d = data.join(c.to_string());
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..6u8 {
            let img = image::GrayImage::from_fn(28, 28, |x, y| {
                image::Luma([(x as u8).wrapping_mul(c * 40 + i).wrapping_add(y as u8)])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
    let state = dir.path().join("state");
    let (a, s, d) = (
        art.to_str().unwrap(),
        state.to_str().unwrap(),
        data.to_str().unwrap(),
    );
    let eval = |extra: &[&str]| {
        let mut v = vec![
            "evaluate",
            "--artifact",
            a,
            "--state",
            s,
            "--data",
            d,
            "--label-free",
        ];
        v.extend_from_slice(extra);
        agent(&v)
    };
    let (code, _, err) = eval(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("no search result"), "{err}");
    let (code, _, err) = agent(&["evaluate", "--state", s, "--data", d]);
    assert_eq!(code, 1);
    assert!(err.contains("no synced supernet"), "{err}");

    // The agent serves with BN recalibration guarded by agreement; evaluate must rebuild the
    // same modules: its guard sees the same counts on the same images. (The run's recal
    // pick checks its candidates first: the served subnet's check is the run's last.)
    let (code, out, err) = agent(&[
        "run",
        "--artifact",
        a,
        "--state",
        s,
        "--data",
        d,
        "--rounds",
        "2",
        "--validate",
        "0",
        "--images",
        "12",
        "--population",
        "8",
        "--generations",
        "1",
        "--label-free",
        "--bn-recal",
        "auto",
        "--duration",
        "1",
        "--no-replay",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("BN recalibration (all modules) of"), "{out}");
    let guard_line = |log: &str, last: bool| {
        let mut lines: Vec<&str> = log.lines().collect();
        if last {
            lines.reverse();
        }
        lines
            .into_iter()
            .find_map(|l| {
                l.split_once("BN recalibration guard for ")
                    .map(|(_, r)| r.to_string())
            })
            .unwrap_or_else(|| panic!("no guard line in {log}"))
    };
    assert!(err.contains("recal pick at "), "{err}");
    let served_guard = guard_line(&err, true);
    let (code, out, err) = eval(&["--bn-recal", "auto", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(guard_line(&err, false), served_guard);
    let e: PlanEval = serde_json::from_str(out.trim()).unwrap();
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("search.json")).unwrap()).unwrap();
    let best = &stored["data"]["result"]["best"][0]["best"];
    assert_eq!((e.images, e.search_images), (18, 12));
    assert_eq!(e.budgets.len(), 1);
    let c = &e.budgets[0].chosen;
    assert_eq!(c.subnet.to_string(), best["subnet"].as_str().unwrap());
    assert_eq!(c.search_quality, best["quality"].as_f64().unwrap());
    assert!((0.0..=100.0).contains(&c.accuracy) && (0.0..=100.0).contains(&e.oracle_accuracy));

    let (code, out, err) = eval(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("18 labelled local images (12 of them scored by the search, by agreement with the oracle)"), "{out}");
    assert!(
        out.contains(&format!("oracle accuracy {:.2}%", e.oracle_accuracy)),
        "{out}"
    );
    assert!(out.contains(&format!("chosen {}", c.subnet)), "{out}");
    assert!(out.contains("best of the front by labels:"), "{out}");
}
