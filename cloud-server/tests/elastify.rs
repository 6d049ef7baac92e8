//! Elastification and oracle training on tiny models and synthetic data (seconds on 2 cores).
use std::cell::Cell;

use adaptivenet_cloud::elastify::cli::DataArgs;
use adaptivenet_cloud::elastify::ElastifyArgs;
use adaptivenet_cloud::CloudError;
use adaptivenet_core::data::Dataset;
use adaptivenet_core::data::{AugmentPolicy, Normalize};
use adaptivenet_core::model::{ArchDescriptor, Model, ModelSpec};
use adaptivenet_core::supernet::{
    branches::build_supernet, Choice, ModuleKey, Subnet, Supernet, SupernetConfig,
};
use adaptivenet_train::supernet::{feature_mse, oracle_digest, sandwich_ends};
use adaptivenet_train::train::{accuracy, eval_transform};
use adaptivenet_train::TrainError;
use adaptivenet_train::{
    elastify, evaluate_priors, priors::prior_subnets, train_oracle, train_oracle_resumable,
    BranchBn, DirCheckpoints, ElastifyConfig, InplaceDistill, NoProgress, PathRole, ProgressEvent,
    TrainOracleConfig,
};
use candle_core::{Device, Tensor};
use tokio_util::sync::CancellationToken;

fn spec(layers: &str) -> ModelSpec {
    let json = format!(
        r#"{{"family":"adaptivenet.resnet_small","block":"basic","layers":{layers},"widths":[8,16],"in_channels":1,"num_classes":10}}"#
    );
    ArchDescriptor::from_json(json.as_bytes()).unwrap().spec
}

/// `n` 12x12 grey images: class c has a bright 3x3 patch at a class-specific place plus
/// deterministic noise, so the task is learnable.
fn synthetic(n: usize) -> Dataset {
    let (h, w) = (12, 12);
    let mut images = Vec::with_capacity(n * h * w);
    let mut labels = Vec::with_capacity(n);
    let mut s: u32 = 12345;
    for i in 0..n {
        let c = (i % 10) as u32;
        let (py, px) = (1 + (c as usize / 4) * 3, 1 + (c as usize % 4) * 3);
        for y in 0..h {
            for x in 0..w {
                s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let noise = (s >> 24) as u8 / 4;
                let on = (py..py + 3).contains(&y) && (px..px + 3).contains(&x);
                images.push(if on { 200 + noise / 2 } else { noise });
            }
        }
        labels.push(c);
    }
    let names = (0..10).map(|c| format!("c{c}")).collect();
    Dataset::new(images, labels, (1, h, w), names).unwrap()
}

fn tiny_config() -> ElastifyConfig {
    ElastifyConfig {
        branches: vec!["merge2".into(), "merge3".into()],
        seed: 3,
        stage0_steps: 6,
        stage1_steps: 6,
        batch: 16,
        lr_stage0: 3e-3,
        lr_stage1: 1e-3,
        warmup_steps: 2,
        checkpoint_every: 4,
        ..ElastifyConfig::default()
    }
}

fn field_of(e: impl Into<CloudError>) -> String {
    match e.into() {
        CloudError::InvalidArgument { field, .. } => field,
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

/// Every branch tensor of a supernet, by module and name.
type Tensors = Vec<(String, Vec<f32>)>;

fn branch_tensors(sn: &adaptivenet_core::supernet::Supernet) -> Tensors {
    let mut v = Vec::new();
    for (key, params) in &sn.modules {
        if key.choice == Choice::Original {
            continue;
        }
        for (n, t) in params {
            v.push((
                format!("{key}.{n}"),
                t.flatten_all().unwrap().to_vec1().unwrap(),
            ));
        }
    }
    v
}

#[test]
fn bad_configs_fail_before_work_naming_the_field() {
    let oracle = Model::init(&spec("[1,1]"), 0).unwrap();
    let data = synthetic(20);
    let run = |c: ElastifyConfig, d: &Dataset| {
        let progressed = Cell::new(false);
        let mut sink = |_: &ProgressEvent| progressed.set(true);
        let r = elastify(&oracle, &c, d, &mut sink, None, &CancellationToken::new());
        assert!(!progressed.get(), "no step may run on a bad config");
        field_of(r.expect_err("must fail"))
    };
    let base = tiny_config();
    let unknown = ElastifyConfig {
        branches: vec!["merge2".into(), "merge9".into()],
        ..base.clone()
    };
    assert_eq!(run(unknown, &data), "branches");
    let zero = ElastifyConfig {
        stage0_steps: 0,
        stage1_steps: 0,
        ..base.clone()
    };
    assert_eq!(run(zero, &data), "stage0_steps");
    let lr = ElastifyConfig {
        lr_stage1: 5.0,
        ..base.clone()
    };
    assert_eq!(run(lr, &data), "lr_stage1");
    let nan = ElastifyConfig {
        lr_stage0: f64::NAN,
        ..base.clone()
    };
    assert_eq!(run(nan, &data), "lr_stage0");
    let batch = ElastifyConfig {
        batch: 0,
        ..base.clone()
    };
    assert_eq!(run(batch, &data), "batch");
    let weight = ElastifyConfig {
        original_weight: 0.0,
        ..base.clone()
    };
    assert_eq!(run(weight, &data), "original_weight");
    let many = ElastifyConfig {
        sandwich: true,
        sandwich_random: 17,
        ..base.clone()
    };
    assert_eq!(run(many, &data), "sandwich_random");
    let no_sandwich = ElastifyConfig {
        inplace_distill: InplaceDistill::Largest,
        ..base.clone()
    };
    assert_eq!(run(no_sandwich, &data), "inplace_distill");
    let empty = Dataset::new(vec![], vec![], (1, 12, 12), data.class_names.clone()).unwrap();
    assert_eq!(run(base.clone(), &empty), "data");

    // The CLI entry: a missing dataset folder is named before anything is loaded.
    let tmp = tempfile::tempdir().unwrap();
    let args = ElastifyArgs {
        oracle_arch: tmp.path().join("a.json"),
        oracle_weights: tmp.path().join("w.safetensors"),
        data: DataArgs {
            dataset_dir: Some(tmp.path().join("no-such-dir")),
            ..DataArgs::default()
        },
        out_dir: tmp.path().join("out"),
        branches: vec!["merge2".into()],
        stage0_steps: 1,
        stage1_steps: 1,
        batch: 8,
        lr: 1e-3,
        lr_stage1: 1e-3,
        temperature: 4.0,
        original_weight: 1.0,
        seed: 0,
        checkpoint_every: 0,
        checkpoint_dir: None,
        val_size: 10,
        priors: 4,
    };
    let e = adaptivenet_cloud::elastify::run_elastify(&args, &CancellationToken::new());
    assert_eq!(field_of(e.err().unwrap()), "data");
    let bad_kind = ElastifyArgs {
        branches: vec!["wide".into()],
        ..args
    };
    let e = adaptivenet_cloud::elastify::run_elastify(&bad_kind, &CancellationToken::new());
    assert_eq!(field_of(e.err().unwrap()), "branches");

    let bad_oracle = TrainOracleConfig {
        lr: -1.0,
        ..TrainOracleConfig::default()
    };
    let e = train_oracle(
        &oracle.spec,
        &bad_oracle,
        &data,
        None,
        &mut NoProgress,
        &CancellationToken::new(),
    );
    assert_eq!(field_of(e.err().unwrap()), "lr");
}

/// A briefly trained oracle: its BN statistics describe the data, as a real oracle's do (40
/// steps leave about 1.5 % of the initial statistics; with fewer, a branch started as a copy
/// of an oracle block is scored against features normalised by stale statistics).
fn briefly_trained(spec: &ModelSpec, data: &Dataset) -> Model {
    let quick = TrainOracleConfig {
        steps: 40,
        batch: 32,
        lr: 0.05,
        warmup_steps: 2,
        augment: AugmentPolicy::default(),
        ..TrainOracleConfig::default()
    };
    let never = CancellationToken::new();
    train_oracle(spec, &quick, data, None, &mut NoProgress, &never)
        .unwrap()
        .0
}

#[test]
fn elastify_keeps_the_oracle_exact_and_trains_branches() {
    // Two blocks and merge-2 only: one branch, so every step trains the same module and the
    // stage-0 loss must go down.
    let data = synthetic(160);
    let oracle = briefly_trained(&spec("[1,1]"), &data);
    let config = ElastifyConfig {
        branches: vec!["merge2".into()],
        stage0_steps: 30,
        stage1_steps: 8,
        batch: 32,
        lr_stage0: 1e-2,
        warmup_steps: 0,
        augment: AugmentPolicy::default(),
        checkpoint_every: 0,
        ..tiny_config()
    };
    let before = build_supernet(
        &oracle,
        &SupernetConfig::from_names(&["merge2"], 3).unwrap(),
    )
    .unwrap();
    let (x, _) = data
        .batch_tensor(
            &(0..64).collect::<Vec<_>>(),
            &eval_transform(&Normalize::UnitRange),
            &Device::Cpu,
        )
        .unwrap();
    let branch_path = Subnet::parse("1x").unwrap();
    let mse_before = feature_mse(&before, &branch_path, &x).unwrap();

    let mut events: Vec<ProgressEvent> = Vec::new();
    let mut sink = |e: &ProgressEvent| events.push(e.clone());
    let out = elastify(
        &oracle,
        &config,
        &data,
        &mut sink,
        None,
        &CancellationToken::new(),
    )
    .unwrap();
    let sn = &out.supernet;

    // The all-original subnet is the oracle, bit for bit.
    let a: Vec<f32> = sn
        .forward(&Subnet::original(2), &x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = oracle
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);

    // Branch weights and BN running statistics changed.
    let merge2 = adaptivenet_core::supernet::ModuleKey::new(0, Choice::Merge2);
    let (old, new) = (&before.modules[&merge2], &sn.modules[&merge2]);
    for name in [
        "conv1.weight",
        "conv2.weight",
        "bn2.running_mean",
        "bn2.running_var",
    ] {
        let d = (&old[name] - &new[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 0.0, "{name} did not change");
    }

    // Stage-0 loss decreased, in training and in eval mode on a fixed batch.
    let s0 = &out.report.stages[0];
    assert_eq!(s0.losses.len(), 30);
    assert!(
        s0.tail_mean(5) < 0.7 * s0.head_mean(5),
        "stage-0 training loss {:?}",
        s0.losses
    );
    let mse_after = feature_mse(sn, &branch_path, &x).unwrap();
    assert!(
        mse_after < mse_before,
        "eval feature MSE {mse_before} -> {mse_after}"
    );
    assert_eq!(out.report.stages[1].losses.len(), 8);
    assert!(out.report.stages[1]
        .losses
        .iter()
        .all(|l| l.is_finite() && *l > 0.0));

    // One progress event per step, in order, with stage names and a finishing fraction.
    assert_eq!(events.len(), 38);
    assert!(events
        .windows(2)
        .all(|w| w[1].global_step == w[0].global_step + 1));
    assert_eq!(events[0].stage, "stage0");
    assert_eq!(events[37].stage, "stage1");
    assert_eq!(events[37].fraction(), 1.0);
    assert!(events.iter().all(|e| e.samples_per_sec > 0.0));

    // Readable progress: the paper's schedule trains one random path per step; the smoothed
    // loss is the mean of the stage's last 50 step losses; on this chain every path is the one
    // merge (1 block, all of it a branch), so there is one path size.
    for (k, e) in events.iter().enumerate() {
        let (stage, step) = if k < 30 { (0, k + 1) } else { (1, k - 29) };
        let losses = &out.report.stages[stage].losses[..step];
        let window = &losses[step.saturating_sub(50)..];
        let mean = window.iter().sum::<f64>() / window.len() as f64;
        assert!(
            (e.loss_avg - mean).abs() < 1e-12,
            "{k}: {} vs {mean}",
            e.loss_avg
        );
        assert_eq!(e.loss, losses[step - 1]);
        assert_eq!(e.paths.len(), 1);
        assert_eq!(e.paths[0].role, PathRole::Random);
        assert_eq!(e.paths[0].subnet, branch_path);
        assert_eq!(e.paths[0].loss, e.loss);
        assert_eq!(e.loss_by_blocks.len(), 1);
        let size = &e.loss_by_blocks[0];
        assert_eq!((size.blocks, size.branch_share), (1, 1.0));
        assert_eq!(size.paths, step.min(50));
        assert!((size.loss - mean).abs() < 1e-12);
    }
    assert_eq!(
        out.report.stages[1].loss_by_blocks,
        events[37].loss_by_blocks
    );
}

/// The config of a sandwich run with in-place distillation from the largest path.
fn sandwich_config() -> ElastifyConfig {
    ElastifyConfig {
        sandwich: true,
        sandwich_random: 1,
        inplace_distill: InplaceDistill::Largest,
        ..tiny_config()
    }
}

#[test]
fn sandwich_ends_have_the_fewest_and_most_macs_among_paths_with_a_branch() {
    for kinds in [
        &["merge2", "merge3"][..],
        &["merge2", "merge3", "prune1", "prune2"][..],
        &["prune1"][..],
    ] {
        let oracle = Model::init(&spec("[3,3]"), 1).unwrap();
        let sn = build_supernet(&oracle, &SupernetConfig::from_names(kinds, 0).unwrap()).unwrap();
        let macs: Vec<(Subnet, u64)> = sn
            .spec
            .enumerate(1 << 16)
            .unwrap()
            .into_iter()
            .filter(Subnet::uses_branch)
            .map(|s| {
                let m = sn.spec.subnet_macs(&s).unwrap();
                (s, m)
            })
            .collect();
        let min = macs.iter().map(|m| m.1).min().unwrap();
        let max = macs.iter().map(|m| m.1).max().unwrap();
        assert!(min < max, "{kinds:?}");
        let (small, large) = sandwich_ends(&sn.spec).unwrap();
        for s in [&small, &large] {
            sn.spec.validate(s).unwrap();
            assert!(s.uses_branch(), "{kinds:?}: {s}");
        }
        assert_eq!(
            sn.spec.subnet_macs(&small).unwrap(),
            min,
            "{kinds:?}: {small}"
        );
        assert_eq!(
            sn.spec.subnet_macs(&large).unwrap(),
            max,
            "{kinds:?}: {large}"
        );
        // The all-original path (the oracle) has more MACs still, but trains nothing.
        assert!(sn.spec.subnet_macs(&Subnet::original(6)).unwrap() > max);
    }
}

#[test]
fn a_sandwich_step_trains_the_smallest_and_largest_paths() {
    let oracle = Model::init(&spec("[3,3]"), 2).unwrap();
    let data = synthetic(64);
    let config = ElastifyConfig {
        stage0_steps: 0,
        stage1_steps: 3,
        sandwich: true,
        sandwich_random: 0,
        checkpoint_every: 0,
        ..tiny_config()
    };
    let built = build_supernet(
        &oracle,
        &config
            .kinds_for(&oracle.spec, config.validate().unwrap())
            .unwrap(),
    )
    .unwrap();
    let (small, large) = sandwich_ends(&built.spec).unwrap();
    assert_ne!(small, large);
    let mut events: Vec<ProgressEvent> = Vec::new();
    let mut sink = |e: &ProgressEvent| events.push(e.clone());
    let never = CancellationToken::new();
    let out = elastify(&oracle, &config, &data, &mut sink, None, &never).unwrap();
    assert_eq!(events.len(), 3);
    for e in &events {
        let got: Vec<(&Subnet, PathRole)> = e.paths.iter().map(|p| (&p.subnet, p.role)).collect();
        assert_eq!(
            got,
            [(&large, PathRole::Largest), (&small, PathRole::Smallest)]
        );
        let mean = e.paths.iter().map(|p| p.loss).sum::<f64>() / 2.0;
        assert_eq!(e.loss, mean);
    }
    // Exactly the branches of those two paths trained: their weights and BN statistics moved,
    // every other branch is still as built.
    let on_ends: std::collections::BTreeSet<_> = small
        .steps()
        .chain(large.steps())
        .filter(|k| k.choice != Choice::Original)
        .collect();
    let mut trained = 0;
    for (key, params) in &built.modules {
        if key.choice == Choice::Original {
            continue;
        }
        let new = &out.supernet.modules[key];
        let changed = params.iter().any(|(n, t)| {
            let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = new[n].flatten_all().unwrap().to_vec1().unwrap();
            a != b
        });
        assert_eq!(changed, on_ends.contains(key), "{key}");
        trained += usize::from(changed);
    }
    assert_eq!(trained, on_ends.len());

    // With random paths: the two ends first, then the random draws, each using a branch.
    let config = ElastifyConfig {
        sandwich_random: 2,
        ..config
    };
    let mut events: Vec<ProgressEvent> = Vec::new();
    let mut sink = |e: &ProgressEvent| events.push(e.clone());
    let out = elastify(&oracle, &config, &data, &mut sink, None, &never).unwrap();
    for e in &events {
        let roles: Vec<PathRole> = e.paths.iter().map(|p| p.role).collect();
        assert_eq!(
            roles,
            [
                PathRole::Largest,
                PathRole::Smallest,
                PathRole::Random,
                PathRole::Random
            ]
        );
        assert!(e.paths.iter().all(|p| p.subnet.uses_branch()));
    }
    // Throughput counts every path a step trained: 4 paths of 16 images per step.
    assert_eq!(out.report.stages[1].steps_run, 3);
    assert_eq!(config.paths_per_step(1), 4);
}

#[test]
fn each_schedule_option_changes_the_trained_weights_deterministically() {
    let oracle = Model::init(&spec("[2,1]"), 11).unwrap();
    let data = synthetic(64);
    let base = ElastifyConfig {
        stage0_steps: 2,
        stage1_steps: 4,
        checkpoint_every: 0,
        ..tiny_config()
    };
    let sandwich = ElastifyConfig {
        sandwich: true,
        ..base.clone()
    };
    let variants = [
        ("paper", base.clone()),
        ("sandwich", sandwich.clone()),
        (
            "sandwich, 1 random",
            ElastifyConfig {
                sandwich_random: 1,
                ..sandwich.clone()
            },
        ),
        (
            "in-place from the oracle",
            ElastifyConfig {
                inplace_distill: InplaceDistill::Oracle,
                ..sandwich.clone()
            },
        ),
        (
            "in-place from the largest path",
            ElastifyConfig {
                inplace_distill: InplaceDistill::Largest,
                ..sandwich.clone()
            },
        ),
        (
            "frozen branch BN",
            ElastifyConfig {
                branch_bn: BranchBn::Frozen,
                ..base.clone()
            },
        ),
        (
            "paper, other seed",
            ElastifyConfig {
                seed: 4,
                ..base.clone()
            },
        ),
    ];
    let never = CancellationToken::new();
    let mut results: Vec<(&str, Tensors)> = Vec::new();
    for (name, config) in &variants {
        let run = || {
            elastify(&oracle, config, &data, &mut NoProgress, None, &never)
                .unwrap()
                .supernet
        };
        let (a, b) = (run(), run());
        let w = branch_tensors(&a);
        assert_eq!(w, branch_tensors(&b), "{name}: same seed, same weights");
        for (other, ow) in &results {
            assert_ne!(&w, ow, "{name} trains the same weights as {other}");
        }
        results.push((name, w));
    }
}

/// The subnet that runs `key` and the original blocks everywhere else.
fn one_branch(n: usize, key: ModuleKey) -> Subnet {
    let mut code = vec!['0'; n];
    code[key.pos] = key.choice.symbol();
    for c in code
        .iter_mut()
        .skip(key.pos + 1)
        .take(key.choice.span() - 1)
    {
        *c = 'x';
    }
    Subnet::parse(&code.into_iter().collect::<String>()).unwrap()
}

/// BN statistics of every branch, by module and name.
fn branch_bn_stats(sn: &adaptivenet_core::supernet::Supernet) -> Tensors {
    branch_tensors(sn)
        .into_iter()
        .filter(|(n, _)| n.ends_with("running_mean") || n.ends_with("running_var"))
        .collect()
}

#[test]
fn frozen_branch_bn_trains_on_statistics_estimated_on_oracle_features() {
    let never = CancellationToken::new();
    let oracle = briefly_trained(&spec("[2,1]"), &synthetic(160));
    // As many images as a batch: every calibration batch holds all of them, so the
    // estimate is the statistics of these images.
    let data = synthetic(16);
    let frozen = |s0: u64, s1: u64| ElastifyConfig {
        branch_bn: BranchBn::Frozen,
        stage0_steps: s0,
        stage1_steps: s1,
        batch: 16,
        checkpoint_every: 0,
        ..tiny_config()
    };
    let run = |c: &ElastifyConfig| {
        elastify(&oracle, c, &data, &mut NoProgress, None, &never)
            .unwrap()
            .supernet
    };
    let short = run(&frozen(1, 0));
    let long = run(&frozen(3, 4));
    // Training never moves the statistics; it does move the weights.
    assert_eq!(branch_bn_stats(&short), branch_bn_stats(&long));
    assert_ne!(branch_tensors(&short), branch_tensors(&long));
    // In batch mode the statistics move with every step.
    let batch = run(&ElastifyConfig {
        branch_bn: BranchBn::Batch,
        ..frozen(3, 4)
    });
    assert_ne!(branch_bn_stats(&batch), branch_bn_stats(&long));

    // The estimate is each branch's statistics on the oracle's features at its position:
    // what recalibrating the initial branch along the one-branch path gives.
    let init = build_supernet(&oracle, &frozen(1, 0).validate().unwrap()).unwrap();
    let checked = assert_one_branch_estimates(&init, &short, &data);
    assert!(checked >= 4, "{checked} statistics checked");
    for &key in short
        .modules
        .keys()
        .filter(|k| k.choice != Choice::Original)
    {
        // Not the oracle block's copied statistics: they were re-estimated.
        assert_ne!(
            branch_bn_stats(&init)
                .into_iter()
                .filter(|(n, _)| n.starts_with(&format!("{key}.")))
                .collect::<Vec<_>>(),
            branch_bn_stats(&short)
                .into_iter()
                .filter(|(n, _)| n.starts_with(&format!("{key}.")))
                .collect::<Vec<_>>(),
            "{key}"
        );
    }
}

/// `calibrated` trains exactly as `batch` (same weights), then ships each branch's statistics
/// estimated, with the trained weights, on the oracle's features at its position.
#[test]
fn calibrated_branch_bn_ships_statistics_of_the_trained_branch_on_oracle_features() {
    let never = CancellationToken::new();
    let oracle = briefly_trained(&spec("[2,1]"), &synthetic(160));
    // As many images as a batch: every calibration batch holds all of them.
    let data = synthetic(16);
    let config = |bn: BranchBn| ElastifyConfig {
        branch_bn: bn,
        stage0_steps: 3,
        stage1_steps: 4,
        batch: 16,
        checkpoint_every: 0,
        ..tiny_config()
    };
    let run = |c: &ElastifyConfig| {
        elastify(&oracle, c, &data, &mut NoProgress, None, &never)
            .unwrap()
            .supernet
    };
    let batch = run(&config(BranchBn::Batch));
    let calibrated = run(&config(BranchBn::Calibrated));
    let weights = |sn| {
        let mut v = branch_tensors(sn);
        v.retain(|(n, _)| !(n.ends_with("running_mean") || n.ends_with("running_var")));
        v
    };
    assert_eq!(weights(&batch), weights(&calibrated));
    assert_ne!(branch_bn_stats(&batch), branch_bn_stats(&calibrated));

    let checked = assert_one_branch_estimates(&batch, &calibrated, &data);
    assert!(checked >= 4, "{checked} statistics checked");
}

/// Asserts that every branch's BN running statistics in `got` are those recalibrating
/// `reference`'s branch along its one-branch path on all of `data` gives (to 1e-4: the
/// estimate runs the original blocks BN-folded, ~1e-6 apart); returns how many were checked.
fn assert_one_branch_estimates(reference: &Supernet, got: &Supernet, data: &Dataset) -> usize {
    let t = eval_transform(&Normalize::UnitRange);
    let all: Vec<usize> = (0..data.len()).collect();
    let (x, _) = data.batch_tensor(&all, &t, &Device::Cpu).unwrap();
    let n = reference.spec.num_positions();
    let mut checked = 0;
    for &key in got.modules.keys().filter(|k| k.choice != Choice::Original) {
        let want = reference
            .recalibrate_bn(&one_branch(n, key), [&x], |c| c != Choice::Original)
            .unwrap();
        for (name, t) in &want[&key] {
            if !(name.ends_with("running_mean") || name.ends_with("running_var")) {
                continue;
            }
            let want: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let have: Vec<f32> = got.modules[&key][name]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (g, w) in have.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{key}.{name}: {g} vs {w}"
                );
            }
            checked += 1;
        }
    }
    checked
}

#[test]
fn auto_branch_bn_is_calibrated_for_mbconv_oracles_only() {
    let lite0 = ArchDescriptor::from_json(br#"{"family":"efficientnet_lite"}"#)
        .unwrap()
        .spec;
    assert_eq!(BranchBn::Auto.resolve(&lite0), BranchBn::Calibrated);
    assert_eq!(BranchBn::Auto.resolve(&spec("[2,1]")), BranchBn::Batch);
    assert_eq!(BranchBn::Batch.resolve(&lite0), BranchBn::Batch);
    assert_eq!(BranchBn::Frozen.resolve(&spec("[2,1]")), BranchBn::Frozen);
    assert_eq!(ElastifyConfig::default().branch_bn, BranchBn::Auto);
}

#[test]
fn resume_after_cancel_or_kill_ends_bit_identical() {
    let frozen = ElastifyConfig {
        branch_bn: BranchBn::Frozen,
        ..tiny_config()
    };
    for config in [tiny_config(), sandwich_config(), frozen] {
        resume_ends_bit_identical(config);
    }
}

fn resume_ends_bit_identical(config: ElastifyConfig) {
    let oracle = Model::init(&spec("[2,1]"), 11).unwrap();
    let data = synthetic(64);
    let never = CancellationToken::new();

    // A: uninterrupted.
    let dir_a = tempfile::tempdir().unwrap();
    let ck_a = DirCheckpoints::new(dir_a.path());
    let a = elastify(
        &oracle,
        &config,
        &data,
        &mut NoProgress,
        Some(&ck_a),
        &never,
    )
    .unwrap();
    assert_eq!(a.report.resumed_from, None);

    // B: cancelled in stage 1; keep a copy of the periodic checkpoint at step 4 on the way.
    let dir_b = tempfile::tempdir().unwrap();
    let ck_b = DirCheckpoints::new(dir_b.path());
    let kill_copy = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let mut sink = |e: &ProgressEvent| {
        if e.global_step == 5 {
            std::fs::copy(ck_b.path(), kill_copy.path().join("checkpoint.safetensors")).unwrap();
        }
        if e.global_step == 9 {
            cancel.cancel();
        }
    };
    let r = elastify(&oracle, &config, &data, &mut sink, Some(&ck_b), &cancel);
    assert!(matches!(r, Err(TrainError::Cancelled(_))), "{r:?}");
    let b = elastify(
        &oracle,
        &config,
        &data,
        &mut NoProgress,
        Some(&ck_b),
        &never,
    )
    .unwrap();
    assert_eq!(b.report.resumed_from, Some((1, 3)));
    assert_eq!(branch_tensors(&b.supernet), branch_tensors(&a.supernet));
    assert_eq!(b.report.stages[1].losses, a.report.stages[1].losses);
    // The smoothed losses carry over the resume too.
    assert_eq!(
        b.report.stages[1].loss_by_blocks,
        a.report.stages[1].loss_by_blocks
    );

    // C: "killed" after the periodic checkpoint of step 4 (stage 0), resumed from it.
    let ck_c = DirCheckpoints::new(kill_copy.path());
    let c = elastify(
        &oracle,
        &config,
        &data,
        &mut NoProgress,
        Some(&ck_c),
        &never,
    )
    .unwrap();
    assert_eq!(c.report.resumed_from, Some((0, 4)));
    assert_eq!(branch_tensors(&c.supernet), branch_tensors(&a.supernet));
    assert_eq!(c.report.stages[0].losses, a.report.stages[0].losses);

    // A checkpoint of another config is refused, not silently mixed in.
    let other = ElastifyConfig {
        seed: 4,
        ..config.clone()
    };
    let r = elastify(&oracle, &other, &data, &mut NoProgress, Some(&ck_a), &never);
    assert!(matches!(r, Err(TrainError::FailedPrecondition(_))), "{r:?}");
    assert_ne!(oracle_digest(&oracle).unwrap(), "");
}

#[test]
fn priors_match_direct_evaluation_and_land_in_the_artifact() {
    let oracle = Model::init(&spec("[2,1]"), 5).unwrap();
    let data = synthetic(50);
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    let subnets = prior_subnets(&sn, 100, 0).unwrap();
    assert_eq!(
        subnets.len() as u128,
        sn.spec.count(),
        "small spaces are enumerated"
    );
    let priors = evaluate_priors(
        &sn,
        &subnets,
        &data,
        &Normalize::UnitRange,
        "validation",
        16,
    )
    .unwrap();
    let t = eval_transform(&Normalize::UnitRange);
    for p in &priors {
        let model = sn.materialize(&p.subnet).unwrap();
        let direct = accuracy(&model, &data, &Normalize::UnitRange, 50).unwrap();
        assert_eq!(p.accuracy, direct, "{}", p.subnet);
        assert_eq!(p.samples, 50);
        assert_eq!(p.macs, sn.spec.subnet_macs(&p.subnet).unwrap());
    }
    let (x, _) = data.batch_tensor(&[0, 1], &t, &Device::Cpu).unwrap();
    assert!(x.dims() == [2, 1, 12, 12]);
    let sampled = prior_subnets(&sn, 2, 1).unwrap();
    assert_eq!(
        sampled.len(),
        2,
        "above the limit: the oracle plus sampled subnets, at most 2"
    );
    assert!(sampled.contains(&Subnet::original(3)));

    let dir = tempfile::tempdir().unwrap();
    let input = adaptivenet_core::artifact::InputSpec {
        shape: [1, 12, 12],
        mean: vec![0.5],
        std: vec![0.25],
        class_names: data.class_names.clone(),
    };
    adaptivenet_core::artifact::write_artifact(
        dir.path(),
        &sn,
        input,
        &"0".repeat(64),
        priors.clone(),
    )
    .unwrap();
    let m = adaptivenet_core::artifact::read_manifest(dir.path()).unwrap();
    assert_eq!(m.priors, priors);
}

#[test]
fn oracle_training_learns_and_updates_bn_statistics() {
    let spec = spec("[1,1]");
    let data = synthetic(200);
    let config = TrainOracleConfig {
        steps: 40,
        batch: 32,
        lr: 0.05,
        warmup_steps: 4,
        seed: 1,
        augment: AugmentPolicy::default(),
        ..TrainOracleConfig::default()
    };
    let mut n = 0;
    let mut sink = |_: &ProgressEvent| n += 1;
    let (model, report) = train_oracle(
        &spec,
        &config,
        &data,
        Some(&data),
        &mut sink,
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(n, 40);
    assert!(report.last_loss < 0.8 * report.first_loss, "{report:?}");
    assert!(report.test_accuracy.unwrap() > 0.3, "{report:?}");
    assert!(report.images_per_sec > 0.0);
    let rm = model.stem["bn.running_mean"]
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(rm > 0.0, "BN running statistics were updated");

    // Same seed, same model; and it round-trips through Model::save.
    let (again, _) = train_oracle(
        &spec,
        &config,
        &data,
        None,
        &mut NoProgress,
        &CancellationToken::new(),
    )
    .unwrap();
    let w = |m: &Model| -> Vec<f32> {
        m.blocks[1]["conv2.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(w(&model), w(&again));
    let dir = tempfile::tempdir().unwrap();
    let (ap, wp) = (dir.path().join("a.json"), dir.path().join("w.safetensors"));
    model.save(&ap, &wp).unwrap();
    let loaded = Model::from_files(&ap, &wp).unwrap();
    let x = Tensor::ones((2, 1, 12, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
    let f = |m: &Model| -> Vec<f32> {
        m.forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(f(&model), f(&loaded));
}

/// Every tensor of a model, by module and name (for bit-exact comparisons).
fn all_tensors(m: &Model) -> Vec<(String, Vec<f32>)> {
    let mut mods = vec![("stem".to_string(), &m.stem)];
    for (i, b) in m.blocks.iter().enumerate() {
        mods.push((format!("blocks.{i}"), b));
    }
    mods.push(("head".to_string(), &m.head));
    let mut v = Vec::new();
    for (k, p) in mods {
        let mut names: Vec<_> = p.keys().collect();
        names.sort();
        for n in names {
            v.push((
                format!("{k}.{n}"),
                p[n].flatten_all().unwrap().to_vec1().unwrap(),
            ));
        }
    }
    v
}

#[test]
fn oracle_training_killed_midway_resumes_to_the_uninterrupted_result() {
    let spec = spec("[1,1]");
    let data = synthetic(96);
    let config = TrainOracleConfig {
        steps: 9,
        batch: 16,
        lr: 0.05,
        warmup_steps: 2,
        seed: 3,
        augment: AugmentPolicy {
            crop_padding: 2,
            hflip: true,
        },
        checkpoint_every: 4,
        ..TrainOracleConfig::default()
    };
    let never = CancellationToken::new();
    let (whole, whole_rep) =
        train_oracle(&spec, &config, &data, None, &mut NoProgress, &never).unwrap();

    // Cancelled at step 6 (after the step-4 checkpoint): a checkpoint of step 6 is kept.
    let dir = tempfile::tempdir().unwrap();
    let ck = DirCheckpoints::new(dir.path());
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let mut sink = |e: &ProgressEvent| {
        if e.step == 6 {
            c.cancel();
        }
    };
    let e = train_oracle_resumable(
        &spec,
        &config,
        &data,
        None,
        &mut sink,
        &cancel,
        Some(&ck),
        None,
    )
    .expect_err("cancelled");
    assert!(matches!(e, TrainError::Cancelled(_)), "{e}");
    assert!(ck.path().exists());

    // The resumed run starts at step 7 and ends bit-identical to the uninterrupted one.
    let mut first = None;
    let mut sink = |e: &ProgressEvent| {
        first.get_or_insert(e.step);
    };
    let (resumed, rep) = train_oracle_resumable(
        &spec,
        &config,
        &data,
        None,
        &mut sink,
        &never,
        Some(&ck),
        None,
    )
    .unwrap();
    assert_eq!(first, Some(7));
    assert_eq!(all_tensors(&resumed), all_tensors(&whole));
    assert_eq!(rep.last_loss, whole_rep.last_loss);
    assert_eq!(rep.first_loss, whole_rep.first_loss, "losses carried over");

    // A checkpoint of another recipe is refused, not silently mixed in.
    let other = TrainOracleConfig {
        lr: 0.06,
        ..config.clone()
    };
    let e = train_oracle_resumable(
        &spec,
        &other,
        &data,
        None,
        &mut NoProgress,
        &never,
        Some(&ck),
        None,
    )
    .expect_err("different recipe");
    assert!(matches!(e, TrainError::FailedPrecondition(_)), "{e}");
}
