//! Fixtures of the search's unit tests: a small merge-only supernet and a seeded image set.
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::{branches::build_supernet, Supernet, SupernetConfig};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::quality::{EvalSet, QualityMode};

pub(super) fn supernet() -> Supernet {
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[4,8,16],"in_channels":1,"num_classes":10}"#,
    )
    .unwrap();
    build_supernet(
        &Model::init(&arch.spec, 5).unwrap(),
        &SupernetConfig::merge_only(),
    )
    .unwrap()
}

/// Seeded images (deterministic, unlike `Tensor::randn`), contrast rising per batch.
pub(super) fn eval_set(sn: &Supernet, batches: usize, batch: usize) -> EvalSet {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let inputs = (0..batches)
        .map(|b| {
            let scale = 1.0 + b as f32 * 0.1;
            let v: Vec<f32> = (0..batch * 28 * 28)
                .map(|_| rng.random_range(-scale..scale))
                .collect();
            Tensor::from_vec(v, (batch, 1, 28, 28), &Device::Cpu).unwrap()
        })
        .collect();
    EvalSet::from_batches(sn, inputs, None, QualityMode::OracleAgreement).unwrap()
}
