//! Optional BN recalibration (beyond the paper): recompute the BN running statistics of a
//! subnet's branch modules on local images. Branches are initialised from the oracle's
//! blocks and trained on the cloud's data; on a device whose data is skewed (or on a path
//! whose inputs differ from what a branch saw in training) their statistics can be off.
//!
//! The subnet runs path-level (each module sees the subnet's own features), recalibrated
//! modules in train mode, with the running statistics set to the plain average over all
//! batches ([`Supernet::recalibrate_bn`]), then BN is folded as for serving.
//!
//! Nothing else changes: weights, other modules, stem and head stay as shipped.
//!
//! A switch reads the artifact once ([`load_shipped`]): recalibration, the guard's shipped
//! baseline and the modules out of scope all come from that read.
//!
//! [`Supernet::recalibrate_bn`]: adaptivenet_core::supernet::Supernet::recalibrate_bn
use std::collections::BTreeMap;

use adaptivenet_core::artifact::load_supernet;
use adaptivenet_core::data::Dataset;
use adaptivenet_core::model::{fold::fold_params, Params};
use adaptivenet_core::supernet::{Choice, ModuleKey, Subnet, Supernet};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{ArtifactSource, Recalibration, Server};
use crate::quality::{search_batches, top1, EvalSet, QualityMode};
use crate::{EdgeError, Result};

/// Module weights by module, as [`super::Server::switch_with`] takes them.
pub type Modules = BTreeMap<ModuleKey, Params>;

/// Which modules of the subnet to recalibrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecalScope {
    /// Branch modules only (not [`Choice::Original`]): the original blocks are the oracle's.
    Branches,
    /// Every module on the path.
    All,
}

/// BN recalibration as an agent serves with it (`edge-agent run --bn-recal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecalSetting {
    pub scope: RecalScope,
    /// `auto`: recalibrated statistics are kept only where they meet these targets at least
    /// as often as the shipped ones (labels, or the oracle's top-1 for a label-free agent).
    pub guard: Option<QualityMode>,
}

/// Batch of the recalibration images: the statistics are a plain average over batches, so
/// whoever reproduces the served modules (`edge-agent evaluate`) must batch the same way.
pub const RECAL_BATCH: usize = 250;

/// The recalibration an agent sets on its server: the images its search scored (the first
/// `images` of `ds` in the seeded shuffle, all with 0) and, for `auto`, the guard's targets.
pub fn local_recalibration(
    src: &ArtifactSource,
    ds: &Dataset,
    images: usize,
    seed: u64,
    setting: RecalSetting,
) -> Result<Recalibration> {
    let (inputs, labels) = search_batches(&src.manifest.input, ds, images, RECAL_BATCH, seed)?;
    let guard = match setting.guard {
        None => None,
        Some(QualityMode::Labelled) => Some(labels),
        Some(QualityMode::OracleAgreement) => {
            let oracle = Subnet::original(src.manifest.supernet_spec().num_positions());
            let sn = src.load(Some(std::slice::from_ref(&oracle)))?;
            Some(
                inputs
                    .iter()
                    .map(|x| top1(&sn.forward(&oracle, x)?))
                    .collect::<Result<Vec<_>>>()?,
            )
        }
    };
    Ok(Recalibration {
        inputs,
        scope: setting.scope,
        guard,
    })
}

/// Scores subnets as an agent recalibrating with `recal` would serve them, for the search's
/// recal pick ([`crate::search::recal_pick`]): each subnet is installed by a scratch
/// [`Server`]'s switch, so the recalibrated modules, the `auto` guard's verdict and the
/// modules out of scope are exactly what serving installs (a score of anything else would
/// rank subnets by statistics they never serve with); then it is scored on `set` by the
/// search's own quality function, from the cached stem outputs (the stem is never
/// recalibrated).
pub fn served_quality<'a>(
    src: &ArtifactSource,
    recal: Recalibration,
    set: &'a EvalSet,
) -> Result<impl FnMut(&Subnet) -> Result<f64> + 'a> {
    let oracle = Subnet::original(src.manifest.supernet_spec().num_positions());
    let server = Server::start(src.clone(), &oracle, 1)?;
    server.set_recalibration(recal);
    Ok(move |s: &Subnet| {
        server.switch(s)?;
        let m = server.active();
        set.evaluate(&m.supernet, &m.subnet, true)
    })
}

/// Stem, head and `subnet`'s modules as shipped, BN not folded (verified like every load).
pub fn load_shipped(src: &ArtifactSource, subnet: &Subnet) -> Result<Supernet> {
    Ok(load_supernet(
        &src.dir,
        &src.manifest,
        Some(std::slice::from_ref(subnet)),
    )?)
}

/// Recalibrated, BN-folded modules of `subnet` (only those in `scope`), ready for
/// [`super::Server::switch_with`]. Empty when the subnet has no module in scope.
pub fn recalibrate(
    src: &ArtifactSource,
    subnet: &Subnet,
    inputs: &[Tensor],
    scope: RecalScope,
) -> Result<Modules> {
    check_inputs(inputs)?;
    recalibrate_loaded(&load_shipped(src, subnet)?, subnet, inputs, scope)
}

fn check_inputs(inputs: &[Tensor]) -> Result<()> {
    if inputs.is_empty() {
        return Err(EdgeError::NoData(
            "BN recalibration needs local images".into(),
        ));
    }
    Ok(())
}

/// [`recalibrate`] on weights already read by [`load_shipped`] (BN not folded).
pub fn recalibrate_loaded(
    sn: &Supernet,
    subnet: &Subnet,
    inputs: &[Tensor],
    scope: RecalScope,
) -> Result<Modules> {
    check_inputs(inputs)?;
    let eps = sn.spec.oracle.numerics.bn_eps;
    let wanted = |c: Choice| scope == RecalScope::All || c != Choice::Original;
    if !subnet.steps().any(|k| wanted(k.choice)) {
        return Ok(BTreeMap::new());
    }
    sn.recalibrate_bn(subnet, inputs, wanted)?
        .into_iter()
        .map(|(key, p)| Ok((key, fold_params(&p, eps)?)))
        .collect()
}

/// The guard of `--bn-recal auto`: statistics fitted to a skewed device's data can hurt
/// badly (on the Fashion-MNIST bench, a footwear-only device lost 27 points of accuracy on
/// its own classes), so recalibrated modules `recal` are kept only if `subnet` predicts
/// `targets` (per batch of `inputs`: labels, or the oracle's top-1 when label-free) at least
/// as often with them as with the shipped statistics (`shipped`: [`load_shipped`], folded).
/// Returns the modules to install (the recalibrated ones, or the shipped ones, so that
/// nothing recalibrated for an earlier path is reused) and whether recalibration was kept.
pub fn guard(
    shipped: &Supernet,
    subnet: &Subnet,
    recal: Modules,
    inputs: &[Tensor],
    targets: &[Vec<u32>],
) -> Result<(Modules, bool)> {
    if targets.len() != inputs.len() {
        return Err(EdgeError::config(
            "targets",
            format!(
                "{} target batches for {} input batches",
                targets.len(),
                inputs.len()
            ),
        ));
    }
    let mut fitted = shipped.clone();
    let keys: Vec<ModuleKey> = recal.keys().copied().collect();
    fitted.modules.extend(recal);
    let (mut before, mut after) = (0, 0);
    for (x, y) in inputs.iter().zip(targets) {
        before += crate::quality::count_correct(&shipped.forward(subnet, x)?, y)?;
        after += crate::quality::count_correct(&fitted.forward(subnet, x)?, y)?;
    }
    let kept = after >= before;
    tracing::info!(
        "BN recalibration guard for {subnet}: {before} -> {after} of {} local targets met, {}",
        targets.iter().map(Vec::len).sum::<usize>(),
        if kept { "kept" } else { "refused" }
    );
    let from = if kept { &fitted } else { shipped };
    let modules = keys
        .into_iter()
        .filter_map(|k| from.modules.get(&k).map(|p| (k, p.clone())))
        .collect();
    Ok((modules, kept))
}
