//! Optional BN recalibration (beyond the paper): recompute the BN running statistics of a
//! subnet's branch modules on local images. Branches are initialised from the oracle's
//! blocks and trained on the cloud's data; on a device whose data is skewed (or on a path
//! whose inputs differ from what a branch saw in training) their statistics can be off.
//!
//! The subnet runs path-level (each module sees the subnet's own features), recalibrated
//! modules in train mode, with the running statistics set to the plain average over all
//! batches (momentum `1/(k+1)` for batch `k`), then BN is folded as for serving. Nothing
//! else changes: weights, other modules, stem and head stay as shipped.
use std::collections::BTreeMap;

use adaptivenet_core::artifact::load_supernet;
use adaptivenet_core::model::{fold::fold_params, Params, TrainCtx};
use adaptivenet_core::supernet::Subnet;
use candle_core::Tensor;

use super::ArtifactSource;
use crate::{EdgeError, Result};

/// Which modules of the subnet to recalibrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecalScope {
    /// Branch modules only (choice id != 0): the original blocks are the oracle's.
    Branches,
    /// Every module on the path.
    All,
}

/// Recalibrated, BN-folded modules of `subnet` (only those in `scope`), ready for
/// [`super::Server::switch_with`]. Empty when the subnet has no module in scope.
pub fn recalibrate(
    src: &ArtifactSource,
    subnet: &Subnet,
    inputs: &[Tensor],
    scope: RecalScope,
) -> Result<BTreeMap<(usize, i8), Params>> {
    if inputs.is_empty() {
        return Err(EdgeError::NoData(
            "BN recalibration needs local images".into(),
        ));
    }
    let mut sn = load_supernet(&src.dir, &src.manifest, Some(std::slice::from_ref(subnet)))?;
    let eps = sn.spec.oracle.numerics.bn_eps;
    let wanted = |id: i8| scope == RecalScope::All || id != 0;
    let steps: Vec<(usize, i8)> = subnet.steps().collect();
    if !steps.iter().any(|&(_, id)| wanted(id)) {
        return Ok(BTreeMap::new());
    }
    for (k, x) in inputs.iter().enumerate() {
        let mut h = sn.forward_stem(x)?;
        for &(p, id) in &steps {
            if wanted(id) {
                let mut ctx = TrainCtx::new(1.0 / (k as f64 + 1.0));
                let params = sn.module(p, id)?.clone();
                h = sn.forward_module_train(p, id, &params, &h, &mut ctx)?;
                if let Some(m) = sn.modules.get_mut(&(p, id)) {
                    ctx.apply(m);
                }
            } else {
                h = sn.forward_module(p, id, &h)?;
            }
        }
    }
    steps
        .iter()
        .filter(|&&(_, id)| wanted(id))
        .map(|&(p, id)| Ok(((p, id), fold_params(sn.module(p, id)?, eps)?)))
        .collect()
}
