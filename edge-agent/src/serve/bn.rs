//! Optional BN recalibration (beyond the paper): recompute the BN running statistics of a
//! subnet's branch modules on local images. Branches are initialised from the oracle's
//! blocks and trained on the cloud's data; on a device whose data is skewed (or on a path
//! whose inputs differ from what a branch saw in training) their statistics can be off.
//!
//! The subnet runs path-level (each module sees the subnet's own features), recalibrated
//! modules in train mode, with the running statistics set to the plain average over all
//! batches ([`Supernet::recalibrate_bn`]), then BN is folded as for serving.
//!
//! [`Supernet::recalibrate_bn`]: adaptivenet_core::supernet::Supernet::recalibrate_bn Nothing
//! else changes: weights, other modules, stem and head stay as shipped.
use std::collections::BTreeMap;

use adaptivenet_core::artifact::load_supernet;
use adaptivenet_core::model::{fold::fold_params, Params};
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
    let sn = load_supernet(&src.dir, &src.manifest, Some(std::slice::from_ref(subnet)))?;
    let eps = sn.spec.oracle.numerics.bn_eps;
    let wanted = |id: i8| scope == RecalScope::All || id != 0;
    if !subnet.steps().any(|(_, id)| wanted(id)) {
        return Ok(BTreeMap::new());
    }
    sn.recalibrate_bn(subnet, inputs, wanted)?
        .into_iter()
        .map(|(key, p)| Ok((key, fold_params(&p, eps)?)))
        .collect()
}
