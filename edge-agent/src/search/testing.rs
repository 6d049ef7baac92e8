//! Fixtures of the search's unit tests: a small merge-only supernet and a seeded image set.
use adaptivenet_core::model::init::fresh_tensor;
use adaptivenet_core::model::{ArchDescriptor, Model, Params};
use adaptivenet_core::supernet::{branches::build_supernet, ModuleKey, Supernet, SupernetConfig};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::quality::{EvalSet, QualityMode};

/// An untrained supernet of a random ResNet whose merge branches take the paper's
/// initialisation (the span's first block, re-shaped tensors fresh) instead of the library's
/// start from a stage-crossing span's strided block: their half-random convs spread the
/// subnets' agreement with the oracle widely, as an early supernet's are, so racing has
/// hopeless candidates to drop and the search real differences to find.
pub(super) fn supernet() -> Supernet {
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[4,8,16],"in_channels":1,"num_classes":10}"#,
    )
    .unwrap();
    let oracle = Model::init(&arch.spec, 5).unwrap();
    let mut sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for (i, choices) in sn.spec.positions.clone().iter().enumerate() {
        for c in choices.iter().filter(|c| c.span > 1) {
            let first = &oracle.blocks[i];
            let params: Params = c
                .block
                .param_shapes()
                .into_iter()
                .map(|(name, shape)| {
                    let t = match first.get(&name) {
                        Some(t) if t.dims() == shape.as_slice() => t.clone(),
                        _ => fresh_tensor(&name, &shape, &mut rng).unwrap(),
                    };
                    (name, t)
                })
                .collect();
            sn.modules.insert(ModuleKey::new(i, c.id), params);
        }
    }
    sn
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
