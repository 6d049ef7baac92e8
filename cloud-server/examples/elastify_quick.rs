//! A tiny end-to-end elastification on real Fashion-MNIST: briefly train a ResNet-20 oracle,
//! elastify it (merge-2 + merge-3), evaluate a few subnets, print losses and throughput.
//!
//! `cargo run -p adaptivenet-cloud --example elastify_quick -- --oracle-steps 100`
//! Needs the assets (`scripts/fetch-assets.sh`).
use adaptivenet_cloud::elastify::cli::RESNET20_FASHION;
use adaptivenet_core::data::{fashion_mnist, shuffled_indices, AugmentPolicy, Normalize};
use adaptivenet_core::model::ArchDescriptor;
use adaptivenet_train::pipeline::split_validation;
use adaptivenet_train::priors::prior_subnets;
use adaptivenet_train::train::accuracy;
use adaptivenet_train::{
    elastify, evaluate_priors, train_oracle, ElastifyConfig, NoProgress, TrainOracleConfig,
};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
struct Opts {
    /// Oracle training steps (0: random initialisation).
    #[arg(long, default_value_t = 60)]
    oracle_steps: u64,
    #[arg(long, default_value_t = 30)]
    stage0_steps: u64,
    #[arg(long, default_value_t = 30)]
    stage1_steps: u64,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Training images used (a seeded subset of the 60,000).
    #[arg(long, default_value_t = 10000)]
    train_images: usize,
    /// Test images for the oracle's accuracy.
    #[arg(long, default_value_t = 2000)]
    test_images: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = Opts::parse();
    let dir = adaptivenet_core::assets_dir().join("fashion-mnist");
    if !dir.join("train-images-idx3-ubyte.gz").exists() {
        println!(
            "Fashion-MNIST not found in {} (run scripts/fetch-assets.sh); nothing to do",
            dir.display()
        );
        return Ok(());
    }
    let full = fashion_mnist(&dir, true)?;
    let mut pick = shuffled_indices(full.len(), o.seed)[..o.train_images.min(full.len())].to_vec();
    pick.sort_unstable();
    let (train, val) = split_validation(&full.subset(&pick)?, 500, o.seed)?;
    let test_all = fashion_mnist(&dir, false)?;
    let test = test_all.subset(&(0..o.test_images.min(test_all.len())).collect::<Vec<_>>())?;
    let spec = ArchDescriptor::from_json(RESNET20_FASHION.as_bytes())?.spec;
    println!(
        "ResNet-20: {} params; train {} / val {} / test {} images; rayon threads {}",
        spec.num_params(),
        train.len(),
        val.len(),
        test.len(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
    let never = CancellationToken::new();

    let oracle = if o.oracle_steps > 0 {
        let cfg = TrainOracleConfig {
            steps: o.oracle_steps,
            batch: o.batch,
            warmup_steps: (o.oracle_steps / 10).max(1),
            seed: o.seed,
            normalize: fashion_normalize(),
            augment: fashion_augment(),
            ..TrainOracleConfig::default()
        };
        let (m, r) = train_oracle(&spec, &cfg, &train, Some(&test), &mut NoProgress, &never)?;
        println!(
            "oracle: {} steps, loss {:.4} -> {:.4} (last-50 mean {:.4}), {:.1} images/s, \
             {:.1} s, test acc {:.2}%",
            r.steps,
            r.first_loss,
            r.last_loss,
            r.final_mean_loss,
            r.images_per_sec,
            r.train_time.as_secs_f64(),
            100.0 * r.test_accuracy.unwrap_or(f64::NAN)
        );
        m
    } else {
        let m = adaptivenet_core::model::Model::init(&spec, o.seed)?;
        println!(
            "oracle: random init, test acc {:.2}%",
            100.0 * accuracy(&m, &test, &fashion_normalize(), 500)?
        );
        m
    };

    let cfg = ElastifyConfig {
        stage0_steps: o.stage0_steps,
        stage1_steps: o.stage1_steps,
        batch: o.batch,
        seed: o.seed,
        warmup_steps: 5,
        checkpoint_every: 0,
        normalize: fashion_normalize(),
        augment: fashion_augment(),
        ..ElastifyConfig::default()
    };
    let out = elastify(&oracle, &cfg, &train, &mut NoProgress, None, &never)?;
    let sn = &out.supernet;
    println!(
        "supernet: {} subnets, {} params ({:.2}x the oracle)",
        sn.spec.count(),
        sn.spec.num_params(),
        sn.spec.num_params() as f64 / spec.num_params() as f64
    );
    for (i, s) in out.report.stages.iter().enumerate() {
        if s.steps == 0 {
            continue;
        }
        println!(
            "stage {i}: {} steps, loss first-5 {:.4} -> last-5 {:.4}, {:.1} samples/s, {:.1} s",
            s.steps,
            s.head_mean(5),
            s.tail_mean(5),
            s.samples_per_sec,
            s.time.as_secs_f64()
        );
    }
    let subnets = prior_subnets(sn, 8, o.seed)?;
    let t0 = std::time::Instant::now();
    let priors = evaluate_priors(sn, &subnets, &val, &fashion_normalize(), "validation", 250)?;
    println!(
        "priors: {} subnets on {} validation images in {:.1} s",
        priors.len(),
        val.len(),
        t0.elapsed().as_secs_f64()
    );
    for p in &priors {
        println!(
            "  {}  {:>9} MACs  acc {:.2}%",
            p.subnet,
            p.macs,
            100.0 * p.accuracy
        );
    }
    Ok(())
}

/// This program reads Fashion-MNIST explicitly: its training-set statistics on `x / 255`.
fn fashion_normalize() -> Normalize {
    Normalize::MeanStd {
        mean: vec![0.2860],
        std: vec![0.3530],
    }
}

/// The reference recipe's augmentation for Fashion-MNIST: pad-2 random crop + flip.
fn fashion_augment() -> AugmentPolicy {
    AugmentPolicy {
        crop_padding: 2,
        hflip: true,
    }
}
