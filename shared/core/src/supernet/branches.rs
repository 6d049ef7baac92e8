//! Branch construction with pretraining-assisted initialisation (METHOD.md §1).
//!
//! A merge branch is a copy of the first block of its span with the span's largest stride and
//! the span's output channels; every tensor whose shape matches block i's is copied (convs, BN
//! affine and running statistics), re-shaped ones start fresh (Kaiming-normal convs, identity
//! BN). A span whose one reshaping block is not its first starts from that block instead
//! ([`merge_source`]): an MBConv chain copies it whole, a ResNet chain width-prunes it to the
//! paper's shape. A pruned branch keeps the inner channels with the largest L2 filter norms,
//! with their pretrained weights.
use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{BranchKind, Choice, ChoiceSpec, ModuleKey, Supernet, SupernetConfig, SupernetSpec};
use crate::model::init::fresh_tensor;
use crate::model::{BlockSpec, Model, ModelSpec, Params};
use crate::{CoreError, Result};

/// Fraction of inner channels a prune level removes, per family.
pub fn prune_ratio(block: &BlockSpec, kind: BranchKind) -> f64 {
    match (block.is_mbconv(), kind) {
        (true, BranchKind::Prune1) => 0.25,
        (true, _) => 0.5,
        (false, BranchKind::Prune1) => 0.2,
        (false, _) => 0.4,
    }
}

/// The spec of a branch of `kind` at position `i`, or `None` where the rules forbid it.
pub fn branch_spec(oracle: &ModelSpec, i: usize, kind: BranchKind) -> Option<BlockSpec> {
    branch_fit(oracle, i, kind).ok()
}

/// The spec of a branch of `kind` at position `i`, or why the rules (METHOD.md §1) forbid it
/// there: a span past the end of the chain, a merged span with more than one strided block
/// (a single depthwise / 3x3 stride cannot reproduce two reductions), pruning the last block
/// or an MBConv block without an expansion (it has no expanded channels to remove).
pub fn branch_fit(
    oracle: &ModelSpec,
    i: usize,
    kind: BranchKind,
) -> std::result::Result<BlockSpec, String> {
    let blocks = &oracle.blocks;
    let n = blocks.len();
    let first = blocks
        .get(i)
        .ok_or_else(|| format!("the chain has {n} blocks"))?;
    match kind {
        BranchKind::Merge2 | BranchKind::Merge3 => {
            let span = kind.span();
            if i + span > n {
                return Err(format!(
                    "a span of {span} from block {i} passes the end of the {n}-block chain"
                ));
            }
            let strides: Vec<usize> = blocks[i..i + span].iter().map(|b| b.stride()).collect();
            // At most one strided block: a single conv stride must reproduce the span's
            // spatial reduction (this is the MBConv rule, and keeps ResNet shapes exact too).
            let strided = strides.iter().filter(|&&s| s != 1).count();
            if strided > 1 {
                return Err(format!(
                    "blocks {i}..={} hold {strided} strided blocks; a merge may hold at most one",
                    i + span - 1
                ));
            }
            let src = merge_source(blocks, i, span);
            if src != i && first.is_mbconv() {
                // The span's one reshaping block, copied whole (see `merge_source`).
                return Ok(blocks[src].clone());
            }
            let stride = strides.into_iter().max().unwrap_or(1);
            let cout = blocks[i + span - 1].cout();
            Ok(match *first {
                BlockSpec::Basic { cin, mid, .. } => BlockSpec::Basic {
                    cin,
                    mid,
                    cout,
                    stride,
                    proj: BlockSpec::needs_proj(cin, cout, stride),
                },
                BlockSpec::Bottleneck { cin, mid, .. } => BlockSpec::Bottleneck {
                    cin,
                    mid,
                    cout,
                    stride,
                    proj: BlockSpec::needs_proj(cin, cout, stride),
                },
                BlockSpec::MbConv {
                    cin,
                    hidden,
                    kernel,
                    expand,
                    ..
                } => BlockSpec::MbConv {
                    cin,
                    hidden,
                    cout,
                    kernel,
                    stride,
                    expand,
                    residual: stride == 1 && cin == cout,
                },
            })
        }
        BranchKind::Prune1 | BranchKind::Prune2 => {
            if i + 1 == n {
                return Err(format!(
                    "block {i} is the last block, which is never pruned"
                ));
            }
            if let BlockSpec::MbConv { expand: false, .. } = first {
                return Err(format!(
                    "block {i} is an MBConv block without an expansion conv: it has no \
                     expanded channels to prune"
                ));
            }
            let keep = kept_channels(first.inner(), prune_ratio(first, kind));
            if keep == first.inner() {
                return Err(format!(
                    "block {i} has {} inner channels: too few to prune",
                    first.inner()
                ));
            }
            let mut b = first.clone();
            match &mut b {
                BlockSpec::Basic { mid, .. } | BlockSpec::Bottleneck { mid, .. } => *mid = keep,
                BlockSpec::MbConv { hidden, .. } => *hidden = keep,
            }
            Ok(b)
        }
    }
}

/// The block of the span `i..i + span` whose weights a merge branch there starts from.
///
/// The paper copies the first block (`i`) and starts every re-shaped tensor fresh. A span
/// that crosses a stage boundary holds exactly one block that changes the feature's shape
/// (the stage's strided or widening first block), and every other block of the span is a
/// residual block `x + f(x)` of unchanged shape. The reshaping block alone then has the merged
/// branch's input and output shapes: the branch starts as the span with its residual blocks
/// dropped, a working approximation, instead of a block whose random projection makes every
/// path through it guess (on EfficientNet-Lite0 such paths stayed at chance after
/// elastification). An MBConv branch copies that block whole (kernel size and width
/// included); a ResNet branch keeps the paper's cheaper shape (the first block's inner width)
/// and starts as the reshaping block width-pruned to it, its shortcut projection and output
/// BN copied. Returns `i` when the span has no single reshaping block.
pub fn merge_source(blocks: &[BlockSpec], i: usize, span: usize) -> usize {
    if blocks.get(i..i + span).is_none() {
        return i;
    }
    let reshaping: Vec<usize> = (i..i + span)
        .filter(|&j| blocks[j].stride() != 1 || blocks[j].cin() != blocks[j].cout())
        .collect();
    match reshaping.as_slice() {
        [t] => *t,
        _ => i,
    }
}

/// Names of the tensors a merge branch of `kind` at `i` starts fresh: those its source block
/// ([`merge_source`]) has no tensor of the same name and shape for. Empty for a prune branch
/// or a branch that does not fit.
pub fn fresh_names(oracle: &ModelSpec, i: usize, kind: BranchKind) -> Vec<String> {
    let Ok(target) = branch_fit(oracle, i, kind) else {
        return Vec::new();
    };
    if kind.span() < 2 {
        return Vec::new();
    }
    if pruned_source(&oracle.blocks, i, kind.span(), &target).is_some() {
        return Vec::new();
    }
    let source = oracle.blocks[merge_source(&oracle.blocks, i, kind.span())].param_shapes();
    target
        .param_shapes()
        .into_iter()
        .filter(|t| !source.contains(t))
        .map(|(name, _)| name)
        .collect()
}

/// Refuses a config that asks for a branch kind fitting no position of `oracle`'s chain (so
/// the request could only be silently ignored), naming the kind and why each block refuses
/// it. Kinds that fit some positions are built there and skipped elsewhere, as the method's
/// rules say.
pub fn check_kinds_fit(oracle: &ModelSpec, config: &SupernetConfig) -> Result<()> {
    for &kind in &config.branches {
        let mut why = Vec::new();
        for i in 0..oracle.blocks.len() {
            match branch_fit(oracle, i, kind) {
                Ok(_) => break,
                Err(reason) => why.push(reason),
            }
        }
        if why.len() == oracle.blocks.len() {
            return Err(CoreError::InvalidConfig {
                field: "branches".into(),
                reason: format!(
                    "{} does not fit any block of this {} chain: {}",
                    kind.name(),
                    oracle.family,
                    why.join("; ")
                ),
            });
        }
    }
    Ok(())
}

/// `config` with the kinds that fit no position of `oracle`'s chain left out: what a default
/// set of kinds (not named by the developer) means for a small or unusual oracle, e.g. the
/// default `merge3` on a three-block chain whose strides leave no room for it.
pub fn keep_fitting_kinds(oracle: &ModelSpec, config: &SupernetConfig) -> SupernetConfig {
    let mut c = config.clone();
    c.branches
        .retain(|&kind| (0..oracle.blocks.len()).any(|i| branch_fit(oracle, i, kind).is_ok()));
    c
}

fn kept_channels(c: usize, ratio: f64) -> usize {
    ((c as f64 * (1.0 - ratio)).round() as usize).clamp(1, c)
}

/// The supernet's choices per position for a config (no weights).
pub fn supernet_spec(oracle: &ModelSpec, config: &SupernetConfig) -> SupernetSpec {
    let positions = (0..oracle.blocks.len())
        .map(|i| {
            let mut v = vec![ChoiceSpec {
                id: Choice::Original,
                span: 1,
                block: oracle.blocks[i].clone(),
            }];
            for &k in &config.branches {
                if let Some(block) = branch_spec(oracle, i, k) {
                    v.push(ChoiceSpec {
                        id: k.choice(),
                        span: k.span(),
                        block,
                    });
                }
            }
            v
        })
        .collect();
    SupernetSpec {
        oracle: oracle.clone(),
        branches: config.branches.clone(),
        positions,
    }
}

/// Builds the supernet of an oracle: original modules are shared (same tensors, so the
/// all-original subnet is the oracle bit for bit); branches initialised from the oracle.
pub fn build_supernet(oracle: &Model, config: &SupernetConfig) -> Result<Supernet> {
    let spec = supernet_spec(&oracle.spec, config);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut modules = BTreeMap::new();
    for (i, choices) in spec.positions.iter().enumerate() {
        for c in choices {
            let params = match c.id.kind() {
                None => oracle.blocks[i].clone(),
                Some(k) if k.span() > 1 => {
                    let blocks = &oracle.spec.blocks;
                    match pruned_source(blocks, i, k.span(), &c.block) {
                        Some(src) => prune(&blocks[src], &oracle.blocks[src], &c.block)?,
                        None => {
                            let src = merge_source(blocks, i, k.span());
                            inherit(&oracle.blocks[src], &c.block, &mut rng)?
                        }
                    }
                }
                Some(_) => prune(&oracle.spec.blocks[i], &oracle.blocks[i], &c.block)?,
            };
            modules.insert(ModuleKey::new(i, c.id), params);
        }
    }
    Ok(Supernet {
        spec,
        stem: oracle.stem.clone(),
        head: oracle.head.clone(),
        modules,
    })
}

/// The block a ResNet merge branch `target` over `i..i + span` starts from width-pruned (see
/// [`merge_source`]), if it does: a reshaping source other than `i` of the same block type,
/// input, output and stride, and no fewer inner channels.
fn pruned_source(blocks: &[BlockSpec], i: usize, span: usize, target: &BlockSpec) -> Option<usize> {
    let src = merge_source(blocks, i, span);
    (src != i && prunes_to(&blocks[src], target)).then_some(src)
}

fn prunes_to(src: &BlockSpec, target: &BlockSpec) -> bool {
    let same_type = matches!(
        (src, target),
        (BlockSpec::Basic { .. }, BlockSpec::Basic { .. })
            | (BlockSpec::Bottleneck { .. }, BlockSpec::Bottleneck { .. })
    );
    same_type
        && src.cin() == target.cin()
        && src.cout() == target.cout()
        && src.stride() == target.stride()
        && target.inner() <= src.inner()
}

/// Copies every tensor whose name and shape match the source block; fresh otherwise.
fn inherit(src: &Params, target: &BlockSpec, rng: &mut ChaCha8Rng) -> Result<Params> {
    let mut out = Params::new();
    for (name, shape) in target.param_shapes() {
        let t = match src.get(&name) {
            Some(t) if t.dims() == shape.as_slice() => t.copy()?,
            _ => fresh_tensor(&name, &shape, rng)?,
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Indices of the `keep` output channels of a conv weight with the largest L2 norms, ascending.
fn top_channels(w: &Tensor, keep: usize) -> Result<Tensor> {
    let o = w.dim(0)?;
    let norms: Vec<f32> = w
        .reshape((o, ()))?
        .to_dtype(DType::F32)?
        .sqr()?
        .sum(1)?
        .to_vec1()?;
    let mut idx: Vec<u32> = (0..o as u32).collect();
    // Stable order for ties keeps the result deterministic.
    idx.sort_by(|&a, &b| {
        norms[b as usize]
            .total_cmp(&norms[a as usize])
            .then(a.cmp(&b))
    });
    let mut kept: Vec<u32> = idx.into_iter().take(keep).collect();
    kept.sort_unstable();
    Ok(Tensor::from_vec(kept, keep, &Device::Cpu)?)
}

fn select(p: &Params, name: &str, dim: usize, idx: &Tensor) -> Result<Tensor> {
    let t = p.get(name).ok_or_else(|| CoreError::MissingTensor {
        name: name.to_string(),
        expected: vec![],
    })?;
    Ok(t.index_select(idx, dim)?.contiguous()?)
}

fn select_bn(p: &Params, out: &mut Params, bn: &str, idx: &Tensor) -> Result<()> {
    for part in crate::model::spec::BN_PARTS {
        let name = format!("{bn}.{part}");
        out.insert(name.clone(), select(p, &name, 0, idx)?);
    }
    Ok(())
}

/// Width-prunes a block's inner channels by L2 magnitude of the producing convs' filters.
fn prune(orig: &BlockSpec, p: &Params, target: &BlockSpec) -> Result<Params> {
    let keep = target.inner();
    let mut out = Params::new();
    let copy = |out: &mut Params, name: &str| -> Result<()> {
        if let Some(t) = p.get(name) {
            out.insert(name.to_string(), t.copy()?);
        }
        Ok(())
    };
    match orig {
        BlockSpec::Basic { .. } => {
            let a = top_channels(
                p.get("conv1.weight")
                    .ok_or_else(|| missing("conv1.weight"))?,
                keep,
            )?;
            out.insert("conv1.weight".into(), select(p, "conv1.weight", 0, &a)?);
            select_bn(p, &mut out, "bn1", &a)?;
            out.insert("conv2.weight".into(), select(p, "conv2.weight", 1, &a)?);
            for part in crate::model::spec::BN_PARTS {
                copy(&mut out, &format!("bn2.{part}"))?;
            }
        }
        BlockSpec::Bottleneck { .. } => {
            let a = top_channels(
                p.get("conv1.weight")
                    .ok_or_else(|| missing("conv1.weight"))?,
                keep,
            )?;
            let w2 = select(p, "conv2.weight", 1, &a)?;
            let b = top_channels(&w2, keep)?;
            out.insert("conv1.weight".into(), select(p, "conv1.weight", 0, &a)?);
            select_bn(p, &mut out, "bn1", &a)?;
            out.insert("conv2.weight".into(), w2.index_select(&b, 0)?.contiguous()?);
            select_bn(p, &mut out, "bn2", &b)?;
            out.insert("conv3.weight".into(), select(p, "conv3.weight", 1, &b)?);
            for part in crate::model::spec::BN_PARTS {
                copy(&mut out, &format!("bn3.{part}"))?;
            }
        }
        BlockSpec::MbConv { .. } => {
            let h = top_channels(
                p.get("expand.conv.weight")
                    .ok_or_else(|| missing("expand.conv.weight"))?,
                keep,
            )?;
            out.insert(
                "expand.conv.weight".into(),
                select(p, "expand.conv.weight", 0, &h)?,
            );
            select_bn(p, &mut out, "expand.bn", &h)?;
            out.insert("dw.conv.weight".into(), select(p, "dw.conv.weight", 0, &h)?);
            select_bn(p, &mut out, "dw.bn", &h)?;
            out.insert(
                "project.conv.weight".into(),
                select(p, "project.conv.weight", 1, &h)?,
            );
            for part in crate::model::spec::BN_PARTS {
                copy(&mut out, &format!("project.bn.{part}"))?;
            }
        }
    }
    if matches!(
        orig,
        BlockSpec::Basic { proj: true, .. } | BlockSpec::Bottleneck { proj: true, .. }
    ) {
        copy(&mut out, "downsample.0.weight")?;
        for part in crate::model::spec::BN_PARTS {
            copy(&mut out, &format!("downsample.1.{part}"))?;
        }
    }
    // Every expected tensor must be present with its shape (guards the code above).
    for (name, shape) in target.param_shapes() {
        match out.get(&name) {
            Some(t) if t.dims() == shape.as_slice() => {}
            Some(t) => {
                return Err(CoreError::ShapeMismatch {
                    name,
                    expected: shape,
                    found: t.dims().to_vec(),
                })
            }
            None => return Err(missing(&name)),
        }
    }
    Ok(out)
}

fn missing(name: &str) -> CoreError {
    CoreError::MissingTensor {
        name: name.to_string(),
        expected: vec![],
    }
}
