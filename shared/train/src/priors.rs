//! Priors: top-1 accuracy of the oracle and of a sample of subnets on a validation
//! split, for [`adaptivenet_core::artifact::write_artifact`].
//!
//! The stem runs once per batch (stem caching) and subnets are evaluated in sorted order,
//! resuming each from the deepest feature it shares with the previous one (prefix reuse).
use std::collections::BTreeSet;

use adaptivenet_core::artifact::Prior;
use adaptivenet_core::data::{Dataset, Normalize};
use adaptivenet_core::supernet::{ModuleKey, Subnet, Supernet};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, TrainError};
use crate::train::{correct, eval_transform};

/// The subnets to evaluate: the oracle, then every subnet if there are at most `max`, else
/// up to `max - 1` distinct random subnets that use a branch (seeded). Sorted by code.
pub fn prior_subnets(sn: &Supernet, max: usize, seed: u64) -> Result<Vec<Subnet>> {
    let n = sn.spec.num_positions();
    let mut set = BTreeSet::new();
    set.insert(Subnet::original(n));
    if let Some(all) = sn.spec.enumerate(max.max(1)) {
        set.extend(all);
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tries = 0;
        while set.len() < max && tries < max * 50 {
            set.insert(sn.spec.sample(&mut rng, true)?);
            tries += 1;
        }
    }
    Ok(set.into_iter().collect())
}

/// Evaluates `subnets` (see [`prior_subnets`]) on `data` normalised by `normalize` (the
/// dataset's input spec); `split` names the data in the priors (e.g. `validation`).
pub fn evaluate_priors(
    sn: &Supernet,
    subnets: &[Subnet],
    data: &Dataset,
    normalize: &Normalize,
    split: &str,
    batch: usize,
) -> Result<Vec<Prior>> {
    if data.is_empty() {
        return Err(TrainError::invalid(
            "validation",
            "the validation split is empty",
        ));
    }
    for s in subnets {
        sn.spec.validate(s)?;
    }
    let t = eval_transform(normalize);
    let mut hits = vec![0u64; subnets.len()];
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let (x, y) = data.batch_tensor(chunk, &t, &Device::Cpu)?;
        let stem = sn.forward_stem(&x)?;
        // (steps of the prefix, feature after it), deepest last.
        let mut stack: Vec<(ModuleKey, Tensor)> = Vec::new();
        for (k, s) in subnets.iter().enumerate() {
            let steps: Vec<ModuleKey> = s.steps().collect();
            let shared = stack
                .iter()
                .zip(&steps)
                .take_while(|((a, _), b)| a == *b)
                .count();
            stack.truncate(shared);
            for &key in &steps[shared..] {
                let input = stack.last().map_or(&stem, |(_, f)| f);
                let out = sn.forward_module(key, input)?;
                stack.push((key, out));
            }
            let h = stack.last().map_or(&stem, |(_, f)| f);
            hits[k] += correct(&sn.forward_head(h)?, &y)?;
        }
    }
    subnets
        .iter()
        .zip(hits)
        .map(|(s, h)| {
            Ok(Prior {
                subnet: s.clone(),
                macs: sn.spec.subnet_macs(s)?,
                accuracy: h as f64 / data.len() as f64,
                samples: data.len() as u64,
                split: split.to_string(),
            })
        })
        .collect()
}
