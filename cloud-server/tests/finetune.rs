//! Fine-tuning: training from given weights with a fresh head (`Model::with_new_head` +
//! `train_oracle_resumable(.., init)`) on tiny models and synthetic data.
use adaptivenet_core::data::{AugmentPolicy, Dataset};
use adaptivenet_core::model::{ArchDescriptor, Model, ModelSpec};
use adaptivenet_train::TrainError;
use adaptivenet_train::{
    train_oracle, train_oracle_resumable, DirCheckpoints, NoProgress, ProgressEvent,
    TrainOracleConfig,
};
use tokio_util::sync::CancellationToken;

fn spec(classes: usize) -> ModelSpec {
    let json = format!(
        r#"{{"family":"adaptivenet.resnet_small","block":"basic","layers":[1,1],"widths":[8,16],"in_channels":1,"num_classes":{classes}}}"#
    );
    ArchDescriptor::from_json(json.as_bytes()).unwrap().spec
}

/// `n` 12x12 grey images of `classes` classes: class c has a bright 3x3 patch at a
/// class-specific place (offset by `shift`) plus deterministic noise.
fn synthetic(n: usize, classes: usize, shift: usize, seed: u32) -> Dataset {
    let (h, w) = (12, 12);
    let mut images = Vec::with_capacity(n * h * w);
    let mut labels = Vec::with_capacity(n);
    let mut s = seed;
    for i in 0..n {
        let c = i % classes;
        let p = (c + shift) % 10;
        let (py, px) = (1 + (p / 4) * 3, 1 + (p % 4) * 3);
        for y in 0..h {
            for x in 0..w {
                s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let noise = (s >> 24) as u8 / 4;
                let on = (py..py + 3).contains(&y) && (px..px + 3).contains(&x);
                images.push(if on { 200 + noise / 2 } else { noise });
            }
        }
        labels.push(c as u32);
    }
    let names = (0..classes).map(|c| format!("c{c}")).collect();
    Dataset::new(images, labels, (1, h, w), names).unwrap()
}

fn config(steps: u64, lr: f64, seed: u64) -> TrainOracleConfig {
    TrainOracleConfig {
        steps,
        batch: 32,
        lr,
        warmup_steps: 2,
        seed,
        augment: AugmentPolicy::default(),
        checkpoint_every: 0,
        ..TrainOracleConfig::default()
    }
}

/// A 10-class "pretrained" model, then fine-tuned to a 4-class task with a new head.
fn pretrained() -> Model {
    let data = synthetic(200, 10, 0, 12345);
    let never = CancellationToken::new();
    let (m, _) = train_oracle(
        &spec(10),
        &config(30, 0.05, 1),
        &data,
        None,
        &mut NoProgress,
        &never,
    )
    .unwrap();
    m
}

#[test]
fn fine_tuning_with_a_new_head_learns_the_new_classes() {
    let base = pretrained();
    let init = base.with_new_head(4, 9).unwrap();
    let train = synthetic(160, 4, 5, 777);
    let test = synthetic(80, 4, 5, 4242);
    let never = CancellationToken::new();
    let mut n = 0;
    let mut sink = |_: &ProgressEvent| n += 1;
    let (tuned, report) = train_oracle_resumable(
        &init.spec,
        &config(25, 0.02, 2),
        &train,
        Some(&test),
        &mut sink,
        &never,
        None,
        Some(&init),
    )
    .unwrap();
    assert_eq!(n, 25);
    assert_eq!(tuned.spec.head.classes, 4);
    assert!(report.last_loss < 0.7 * report.first_loss, "{report:?}");
    // Chance is 25 %.
    assert!(report.test_accuracy.unwrap() > 0.6, "{report:?}");
    // It trained from the given weights, not from a fresh initialisation: the first loss is
    // that of `init` (a fresh head over pretrained features), which a seeded from-scratch run
    // of the same recipe does not reproduce.
    let (scratch, scratch_rep) = train_oracle(
        &init.spec,
        &config(25, 0.02, 2),
        &train,
        None,
        &mut NoProgress,
        &never,
    )
    .unwrap();
    assert_ne!(scratch_rep.first_loss, report.first_loss);
    assert_ne!(
        scratch.weights_digest().unwrap(),
        tuned.weights_digest().unwrap()
    );
}

#[test]
fn fine_tune_checkpoints_resume_only_onto_the_same_initial_weights() {
    let base = pretrained();
    let init = base.with_new_head(4, 9).unwrap();
    let train = synthetic(96, 4, 5, 777);
    let mut cfg = config(8, 0.02, 2);
    cfg.checkpoint_every = 4;
    let never = CancellationToken::new();
    let (whole, _) = train_oracle_resumable(
        &init.spec,
        &cfg,
        &train,
        None,
        &mut NoProgress,
        &never,
        None,
        Some(&init),
    )
    .unwrap();

    // Cancelled at step 5: the checkpoint is kept, the resumed run ends where the whole one did.
    let dir = tempfile::tempdir().unwrap();
    let ck = DirCheckpoints::new(dir.path());
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let mut sink = |e: &ProgressEvent| {
        if e.step == 5 {
            c.cancel();
        }
    };
    let e = train_oracle_resumable(
        &init.spec,
        &cfg,
        &train,
        None,
        &mut sink,
        &cancel,
        Some(&ck),
        Some(&init),
    )
    .expect_err("cancelled");
    assert!(matches!(e, TrainError::Cancelled(_)), "{e}");

    // Another starting point (another head seed) with the same recipe is refused.
    let other = base.with_new_head(4, 10).unwrap();
    let e = train_oracle_resumable(
        &other.spec,
        &cfg,
        &train,
        None,
        &mut NoProgress,
        &never,
        Some(&ck),
        Some(&other),
    )
    .expect_err("another init");
    assert!(matches!(e, TrainError::FailedPrecondition(_)), "{e}");
    // So is training from scratch onto the fine-tune's checkpoint.
    let e = train_oracle_resumable(
        &init.spec,
        &cfg,
        &train,
        None,
        &mut NoProgress,
        &never,
        Some(&ck),
        None,
    )
    .expect_err("from scratch");
    assert!(matches!(e, TrainError::FailedPrecondition(_)), "{e}");

    let mut first = None;
    let mut sink = |e: &ProgressEvent| {
        first.get_or_insert(e.step);
    };
    let (resumed, _) = train_oracle_resumable(
        &init.spec,
        &cfg,
        &train,
        None,
        &mut sink,
        &never,
        Some(&ck),
        Some(&init),
    )
    .unwrap();
    assert_eq!(first, Some(6));
    assert_eq!(
        resumed.weights_digest().unwrap(),
        whole.weights_digest().unwrap()
    );
}

#[test]
fn initial_weights_of_another_architecture_are_refused() {
    let base = pretrained();
    let train = synthetic(64, 4, 5, 777);
    let e = train_oracle_resumable(
        &spec(4),
        &config(2, 0.02, 2),
        &train,
        None,
        &mut NoProgress,
        &CancellationToken::new(),
        None,
        Some(&base),
    )
    .expect_err("10-class weights for a 4-class spec");
    assert!(e.to_string().contains("init"), "{e}");
}

/// Writes `data` as raw IDX files `<prefix>-images-idx3-ubyte` / `<prefix>-labels-idx1-ubyte`.
fn write_idx(dir: &std::path::Path, prefix: &str, data: &Dataset) {
    let mut img = Vec::new();
    img.extend_from_slice(&2051u32.to_be_bytes());
    for d in [data.len(), data.height, data.width] {
        img.extend_from_slice(&(d as u32).to_be_bytes());
    }
    img.extend_from_slice(&data.images);
    let mut lab = Vec::new();
    lab.extend_from_slice(&2049u32.to_be_bytes());
    lab.extend_from_slice(&(data.len() as u32).to_be_bytes());
    lab.extend(data.labels.iter().map(|&l| l as u8));
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
}

#[test]
fn the_cli_fine_tunes_from_weight_files_with_the_fine_tune_defaults() {
    use adaptivenet_cloud::elastify::cli::{DataArgs, DataFormatArg, FINETUNE_DEFAULTS};
    use adaptivenet_cloud::elastify::{run_train_oracle, TrainOracleArgs};
    let tmp = tempfile::tempdir().unwrap();
    let base = pretrained();
    let (arch, weights) = (
        tmp.path().join("base.json"),
        tmp.path().join("base.safetensors"),
    );
    base.save(&arch, &weights).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, "train", &synthetic(160, 4, 5, 777));
    write_idx(&data, "t10k", &synthetic(80, 4, 5, 4242));
    let out = tmp.path().join("out");
    let args = TrainOracleArgs {
        arch: None,
        init_arch: Some(arch),
        init_weights: Some(weights),
        data: DataArgs {
            dataset_dir: Some(data),
            format: DataFormatArg::Idx,
            crop_padding: Some(0),
            ..DataArgs::default()
        },
        out_dir: out.clone(),
        epochs: None,
        max_steps: Some(25),
        batch: 32,
        lr: None,
        warmup_epochs: None,
        weight_decay: 5e-4,
        seed: 2,
        checkpoint_every: 10,
        checkpoint_dir: None,
    };
    let report = run_train_oracle(&args, &CancellationToken::new()).unwrap();
    assert!(report.test_accuracy.unwrap() > 0.6, "{report:?}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("train-report.json")).unwrap()).unwrap();
    assert_eq!(json["mode"], "fine-tune");
    assert_eq!(json["classes"], 4);
    assert_eq!(json["lr"], FINETUNE_DEFAULTS.lr);
    let tuned = Model::from_files(
        &out.join("oracle.arch.json"),
        &out.join("oracle.safetensors"),
    )
    .unwrap();
    assert_eq!(tuned.spec.head.classes, 4);
    // The stem started from the pretrained weights: fine-tuning moved it far less than the
    // distance to a fresh initialisation of the same seed.
    let dist = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let fresh = Model::init(&tuned.spec, 2).unwrap();
    let moved = dist(&tuned.stem["conv.weight"], &base.stem["conv.weight"]);
    assert!(moved > 0.0, "fine-tuning trained the stem");
    assert!(
        moved < 0.5 * dist(&tuned.stem["conv.weight"], &fresh.stem["conv.weight"]),
        "{moved}"
    );
}
