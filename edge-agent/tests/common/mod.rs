//! Fixtures shared by the edge agent's plan and evaluation tests.
use std::path::Path;

use adaptivenet_core::artifact::{write_artifact, InputSpec};
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::{branches::build_supernet, SupernetConfig};
use adaptivenet_edge::serve::ArtifactSource;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Classes of [`artifact`]'s head.
pub const CLASSES: usize = 10;

/// A narrow ResNet-20 supernet (widths 4/8/16, merge-only, untrained, init seed 6) for
/// 1x28x28 inputs, written as an artifact under `dir`: its init predicts a few classes on
/// [`Stripes`] and its label-free front has several points.
pub fn artifact(dir: &Path) -> ArtifactSource {
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[4,8,16],"in_channels":1,"num_classes":10}"#,
    )
    .unwrap();
    let oracle = Model::init(&arch.spec, 6).unwrap();
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.5],
        std: vec![0.5],
        class_names: (0..CLASSES).map(|i| format!("class{i}")).collect(),
    };
    write_artifact(dir, &sn, input, &"0".repeat(64), vec![]).unwrap();
    ArtifactSource::open(dir).unwrap()
}

/// Seeded 28x28 grey images of stripes at random frequencies, angles and contrasts (an
/// untrained network then predicts several classes, and its subnets disagree on some).
pub struct Stripes(ChaCha8Rng);

impl Stripes {
    pub fn new(seed: u64) -> Self {
        Stripes(ChaCha8Rng::seed_from_u64(seed))
    }

    /// The next image, row-major pixels.
    pub fn next_image(&mut self) -> Vec<u8> {
        let rng = &mut self.0;
        let (fx, fy): (f32, f32) = (rng.random_range(-0.8..0.8), rng.random_range(-0.8..0.8));
        let (phase, contrast, base): (f32, f32, f32) = (
            rng.random_range(0.0..6.3),
            rng.random_range(10.0..127.0),
            rng.random_range(60.0..190.0),
        );
        let mut px = Vec::with_capacity(28 * 28);
        for y in 0..28 {
            for x in 0..28 {
                let v = base + contrast * (fx * x as f32 + fy * y as f32 + phase).sin();
                px.push(v.clamp(0.0, 255.0) as u8);
            }
        }
        px
    }
}
