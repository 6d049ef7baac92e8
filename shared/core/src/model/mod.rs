//! Oracle models as a stem, an ordered chain of blocks and a head.
//!
//! Every family (see [`families`]) lowers to a [`ModelSpec`]; weights are held per module as
//! [`Params`] under canonical local names (`conv1.weight`, `dw.bn.running_var`, ...), which is
//! also how supernet modules are stored. One forward implementation serves the oracle, every
//! subnet and every branch, which is what makes the all-original subnet reproduce the oracle
//! bit for bit.
pub mod families;
pub mod fold;
pub mod init;
pub mod ops;
pub mod spec;
pub mod verify;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

pub use families::{canonical, global_name, ArchDescriptor, Slot};
pub use spec::{Act, BlockSpec, HeadSpec, ModelSpec, Numerics, Padding, StemSpec};

use crate::{CoreError, Result};

/// The tensors of one module under canonical local names.
pub type Params = BTreeMap<String, Tensor>;

/// Train-mode bookkeeping: BN layers normalise with batch statistics and record their new
/// running statistics here (local BN prefix → (mean, var)) for the caller to store.
#[derive(Debug, Default)]
pub struct TrainCtx {
    pub momentum: f64,
    pub bn_updates: Vec<(String, Tensor, Tensor)>,
}

impl TrainCtx {
    pub fn new(momentum: f64) -> Self {
        Self {
            momentum,
            bn_updates: Vec::new(),
        }
    }

    /// Writes the recorded running statistics into `params` and clears the record.
    pub fn apply(&mut self, params: &mut Params) {
        for (prefix, mean, var) in self.bn_updates.drain(..) {
            params.insert(format!("{prefix}.running_mean"), mean);
            params.insert(format!("{prefix}.running_var"), var);
        }
    }
}

fn get<'a>(p: &'a Params, name: &str) -> Result<&'a Tensor> {
    p.get(name).ok_or_else(|| CoreError::MissingTensor {
        name: name.to_string(),
        expected: vec![],
    })
}

/// conv → BN (eval or train) → optional activation. Folded params (no BN tensors, a conv
/// bias instead; see [`fold`]) take one fused conv + bias + activation kernel.
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    x: &Tensor,
    p: &Params,
    conv: &str,
    bn: &str,
    stride: usize,
    groups: usize,
    num: &Numerics,
    act: Option<Act>,
    train: &mut Option<&mut TrainCtx>,
) -> Result<Tensor> {
    if let Some(y) = packed_folded(x, p, conv, stride, groups, num, act, None, train)? {
        return Ok(y);
    }
    let w = get(p, &format!("{conv}.weight"))?;
    let (_, _, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    let pad = num.pad(h, wd, k, stride);
    let Some(g) = p.get(&format!("{bn}.weight")) else {
        if train.is_some() {
            return Err(CoreError::InvalidConfig {
                field: "params".into(),
                reason: format!("{bn}: folded (inference-only) weights cannot train"),
            });
        }
        let bias = get(p, &format!("{conv}.bias"))?;
        if x.track_op() {
            // Frozen folded weights on a path that carries a gradient (e.g. the original
            // blocks after a branch during elastification): the fused kernel has no backward,
            // so run the differentiable conv + bias and the activation separately.
            let y = ops::conv2d_bias(x, w, bias, stride, pad, groups)?;
            return match act {
                Some(a) => ops::activation(&y, a),
                None => Ok(y),
            };
        }
        return ops::conv2d_fused(x, w, bias, stride, pad, groups, act);
    };
    let b = get(p, &format!("{bn}.bias"))?;
    let (m, v) = (
        get(p, &format!("{bn}.running_mean"))?,
        get(p, &format!("{bn}.running_var"))?,
    );
    if let Some(ctx) = train {
        // Conv, train-mode BN and the activation as one kernel op (no conv-output tensor
        // and gradient between them).
        let (y, nm, nv) = ops::conv_bn_train(
            x,
            w,
            stride,
            pad,
            groups,
            g,
            b,
            m,
            v,
            num.bn_eps,
            ctx.momentum,
            act,
        )?;
        ctx.bn_updates.push((bn.to_string(), nm, nv));
        return Ok(y);
    }
    let y = if w.track_op() || g.track_op() {
        // Training through inference-mode BN (a branch on fixed statistics): the BN folded
        // into the conv as differentiable ops on the small parameters, so the backward
        // passes over the feature map once (conv + bias) instead of three times.
        let (scale, shift) = ops::bn_scale_shift(g, b, m, v, num.bn_eps)?;
        let wf = w.broadcast_mul(&scale.reshape((w.dim(0)?, 1, 1, 1))?)?;
        ops::conv2d_bias(x, &wf, &shift, stride, pad, groups)?
    } else {
        let y = ops::conv2d(x, w, stride, pad, groups)?;
        ops::batch_norm_eval(&y, g, b, m, v, num.bn_eps)?
    };
    match act {
        Some(a) => ops::activation(&y, a),
        None => Ok(y),
    }
}

/// Whether [`packed_folded`] runs `conv` on `x`: inference (no training, no gradient, not
/// stock candle) on a folded, packed one-group conv.
fn packed_applies(
    x: &Tensor,
    p: &Params,
    conv: &str,
    groups: usize,
    train: &Option<&mut TrainCtx>,
) -> bool {
    train.is_none()
        && groups == 1
        && !x.track_op()
        && !ops::stock_candle()
        && p.contains_key(&fold::packed_name(conv))
        && p.contains_key(&format!("{conv}.bias"))
}

/// The inference fast path of a folded, pre-packed conv (see [`fold::packed_name`]):
/// `act(conv(x) + bias + residual)` in one kernel with the bias, activation and residual add
/// in its epilogue (1x1 stride 1: the pointwise GEMM; a stride-1 3x3 with a Winograd form
/// (see [`fold::winograd_name`], [`fold::winograd4_name`]) on a map where it wins: Winograd
/// F(4x4, 3x3) or F(2x2, 3x3) as [`adaptivenet_kernels::winograd_tile`] picks; else the
/// direct conv, no im2col).
/// `None` when it does not apply (see [`packed_applies`]; a residual that carries a
/// gradient): the caller then takes the general path.
#[allow(clippy::too_many_arguments)]
fn packed_folded(
    x: &Tensor,
    p: &Params,
    conv: &str,
    stride: usize,
    groups: usize,
    num: &Numerics,
    act: Option<Act>,
    residual: Option<&Tensor>,
    train: &Option<&mut TrainCtx>,
) -> Result<Option<Tensor>> {
    if !packed_applies(x, p, conv, groups, train) || residual.is_some_and(Tensor::track_op) {
        return Ok(None);
    }
    let packed = get(p, &fold::packed_name(conv))?;
    let bias = get(p, &format!("{conv}.bias"))?;
    let (o, c, kh, kw) = get(p, &format!("{conv}.weight"))?.dims4()?;
    let (n, _, h, w) = x.dims4()?;
    let pad = num.pad(h, w, kh, stride);
    if kh == 1 && kw == 1 && stride == 1 && pad == (0, 0, 0, 0) {
        return ops::pointwise_packed(x, packed, o, bias, act, residual).map(Some);
    }
    if stride == 1 {
        let name = match adaptivenet_kernels::winograd_tile(n, c, o, h, w) {
            Some(4) => Some(fold::winograd4_name(conv)),
            Some(_) => Some(fold::winograd_name(conv)),
            None => None,
        };
        if let Some(u) = name.and_then(|name| p.get(&name)) {
            return ops::winograd_packed(x, u, o, bias, pad, act, residual).map(Some);
        }
    }
    ops::conv_packed(x, packed, o, (kh, kw), bias, stride, pad, act, residual).map(Some)
}

/// Folded inference of a residual block's last conv and its join: `act(conv(y) + bias +
/// shortcut(x))` with the join in the conv's epilogue (no separate add + activation pass).
/// `None` when the packed path does not apply to `conv`.
#[allow(clippy::too_many_arguments)]
fn join_folded(
    x: &Tensor,
    y: &Tensor,
    p: &Params,
    conv: &str,
    proj: bool,
    stride: usize,
    num: &Numerics,
    t: &mut Option<&mut TrainCtx>,
) -> Result<Option<Tensor>> {
    if !packed_applies(y, p, conv, 1, t) {
        return Ok(None);
    }
    let sc = shortcut(x, p, proj, stride, num, t)?;
    packed_folded(y, p, conv, 1, 1, num, Some(num.act), Some(&sc), t)
}

/// An MBConv block's depthwise conv + BN + activation.
fn dw_bn(
    x: &Tensor,
    p: &Params,
    stride: usize,
    hidden: usize,
    num: &Numerics,
    t: &mut Option<&mut TrainCtx>,
) -> Result<Tensor> {
    conv_bn(
        x,
        p,
        "dw.conv",
        "dw.bn",
        stride,
        hidden,
        num,
        Some(num.act),
        t,
    )
}

/// Folded inference of an MBConv block's expand conv and depthwise as one kernel, on the
/// large maps where the expanded map would not stay in cache between the two (see
/// [`adaptivenet_kernels::expand_dw_fuses`]). `None` when it does not apply: the caller
/// then runs the two convs.
fn expand_dw_folded(
    x: &Tensor,
    p: &Params,
    stride: usize,
    hidden: usize,
    num: &Numerics,
    t: &Option<&mut TrainCtx>,
) -> Result<Option<Tensor>> {
    let dw_folded = p.contains_key("dw.conv.bias") && !p.contains_key("dw.bn.weight");
    if !dw_folded || !packed_applies(x, p, "expand.conv", 1, t) {
        return Ok(None);
    }
    let dw_w = get(p, "dw.conv.weight")?;
    let (_, _, h, w) = x.dims4()?;
    let k = dw_w.dim(2)?;
    if dw_w.dims4()? != (hidden, 1, k, k)
        || !adaptivenet_kernels::expand_dw_fuses(hidden, h, w, k, stride)
    {
        return Ok(None);
    }
    ops::expand_dw_packed(
        x,
        get(p, &fold::packed_name("expand.conv"))?,
        hidden,
        get(p, "expand.conv.bias")?,
        dw_w,
        get(p, "dw.conv.bias")?,
        stride,
        num.pad(h, w, k, stride),
        Some(num.act),
    )
    .map(Some)
}

/// Runs the stem.
pub fn stem_forward(
    spec: &StemSpec,
    num: &Numerics,
    p: &Params,
    x: &Tensor,
    mut train: Option<&mut TrainCtx>,
) -> Result<Tensor> {
    let y = conv_bn(
        x,
        p,
        "conv",
        "bn",
        spec.stride,
        1,
        num,
        Some(num.act),
        &mut train,
    )?;
    if spec.maxpool {
        ops::max_pool_3x3_s2_p1(&y)
    } else {
        Ok(y)
    }
}

/// Runs one block (original or branch).
pub fn block_forward(
    spec: &BlockSpec,
    num: &Numerics,
    p: &Params,
    x: &Tensor,
    mut train: Option<&mut TrainCtx>,
) -> Result<Tensor> {
    let t = &mut train;
    match *spec {
        BlockSpec::Basic { stride, proj, .. } => {
            let y = conv_bn(x, p, "conv1", "bn1", stride, 1, num, Some(num.act), t)?;
            if let Some(out) = join_folded(x, &y, p, "conv2", proj, stride, num, t)? {
                return Ok(out);
            }
            let y = conv_bn(&y, p, "conv2", "bn2", 1, 1, num, None, t)?;
            residual_out(x, y, p, proj, stride, num, t)
        }
        BlockSpec::Bottleneck { stride, proj, .. } => {
            let y = conv_bn(x, p, "conv1", "bn1", 1, 1, num, Some(num.act), t)?;
            let y = conv_bn(&y, p, "conv2", "bn2", stride, 1, num, Some(num.act), t)?;
            if let Some(out) = join_folded(x, &y, p, "conv3", proj, stride, num, t)? {
                return Ok(out);
            }
            let y = conv_bn(&y, p, "conv3", "bn3", 1, 1, num, None, t)?;
            residual_out(x, y, p, proj, stride, num, t)
        }
        BlockSpec::MbConv {
            hidden,
            stride,
            expand,
            residual,
            ..
        } => {
            // Folded inference on a large map: expand and depthwise as one kernel.
            let fused = if expand {
                expand_dw_folded(x, p, stride, hidden, num, t)?
            } else {
                None
            };
            let h = if let Some(h) = fused {
                h
            } else if expand {
                let h = conv_bn(
                    x,
                    p,
                    "expand.conv",
                    "expand.bn",
                    1,
                    1,
                    num,
                    Some(num.act),
                    t,
                )?;
                dw_bn(&h, p, stride, hidden, num, t)?
            } else {
                dw_bn(x, p, stride, hidden, num, t)?
            };
            if residual {
                // Folded inference: the residual add runs in the projection's epilogue.
                if let Some(y) = packed_folded(&h, p, "project.conv", 1, 1, num, None, Some(x), t)?
                {
                    return Ok(y);
                }
            }
            let y = conv_bn(&h, p, "project.conv", "project.bn", 1, 1, num, None, t)?;
            if residual {
                Ok((y + x)?)
            } else {
                Ok(y)
            }
        }
    }
}

/// ResNet block output: `act(y + shortcut(x))`.
fn residual_out(
    x: &Tensor,
    y: Tensor,
    p: &Params,
    proj: bool,
    stride: usize,
    num: &Numerics,
    t: &mut Option<&mut TrainCtx>,
) -> Result<Tensor> {
    let sc = shortcut(x, p, proj, stride, num, t)?;
    ops::add_act(&y, &sc, num.act)
}

/// A ResNet block's shortcut: a 1x1 conv+BN projection (`downsample.0/1`) when the block
/// changes shape, else the identity.
fn shortcut(
    x: &Tensor,
    p: &Params,
    proj: bool,
    stride: usize,
    num: &Numerics,
    t: &mut Option<&mut TrainCtx>,
) -> Result<Tensor> {
    if !proj {
        return Ok(x.clone());
    }
    conv_bn(
        x,
        p,
        "downsample.0",
        "downsample.1",
        stride,
        1,
        num,
        None,
        t,
    )
}

/// Runs the head: [1x1 conv-BN-act] → global average pool → linear (dropout is eval-identity).
pub fn head_forward(
    spec: &HeadSpec,
    num: &Numerics,
    p: &Params,
    x: &Tensor,
    mut train: Option<&mut TrainCtx>,
) -> Result<Tensor> {
    let x = match spec.conv {
        Some(_) => conv_bn(x, p, "conv", "bn", 1, 1, num, Some(num.act), &mut train)?,
        None => x.clone(),
    };
    let f = ops::global_avg_pool(&x)?;
    let packed = p.get(&fold::packed_name("fc"));
    if let Some(packed) =
        packed.filter(|_| train.is_none() && !f.track_op() && !ops::stock_candle())
    {
        // Folded inference: the classifier as the packed 1x1 GEMM on one pixel per image.
        let (n, feat) = f.dims2()?;
        let classes = get(p, "fc.weight")?.dim(0)?;
        let f = f.reshape((n, feat, 1, 1))?;
        let y = ops::pointwise_packed(&f, packed, classes, get(p, "fc.bias")?, None, None)?;
        return Ok(y.reshape((n, classes))?);
    }
    ops::linear(&f, get(p, "fc.weight")?, get(p, "fc.bias")?)
}

/// A loaded chain model: spec plus weights per module.
#[derive(Clone, Debug)]
pub struct Model {
    pub spec: ModelSpec,
    pub stem: Params,
    pub blocks: Vec<Params>,
    pub head: Params,
}

/// The shapes every module of a spec expects, by slot.
pub fn expected_shapes(spec: &ModelSpec) -> Vec<(Slot, String, Vec<usize>)> {
    let mut out = Vec::new();
    for (n, s) in spec.stem.param_shapes() {
        out.push((Slot::Stem, n, s));
    }
    for (i, b) in spec.blocks.iter().enumerate() {
        for (n, s) in b.param_shapes() {
            out.push((Slot::Block(i), n, s));
        }
    }
    for (n, s) in spec.head.param_shapes() {
        out.push((Slot::Head, n, s));
    }
    out
}

impl Model {
    /// Builds a model from a family's tensors: every expected tensor must be present with its
    /// exact shape, and no unknown tensor may be left over. Tensors are converted to f32.
    pub fn load(arch: &ArchDescriptor, tensors: Vec<(String, Tensor)>) -> Result<Model> {
        let mut by_slot: HashMap<(Slot, String), (String, Tensor)> = HashMap::new();
        for (name, t) in tensors {
            if families::is_ignored_key(&name) {
                continue;
            }
            match arch.canonical_name(&name) {
                Some(key) => {
                    by_slot.insert(key, (name, t));
                }
                None => {
                    return Err(CoreError::UnexpectedTensor {
                        found: t.dims().to_vec(),
                        name,
                    })
                }
            }
        }
        let spec = arch.spec.clone();
        let mut stem = Params::new();
        let mut blocks = vec![Params::new(); spec.blocks.len()];
        let mut head = Params::new();
        for (slot, local, shape) in expected_shapes(&spec) {
            let (orig, t) =
                by_slot
                    .remove(&(slot, local.clone()))
                    .ok_or_else(|| CoreError::MissingTensor {
                        name: family_name_hint(arch, slot, &local),
                        expected: shape.clone(),
                    })?;
            if t.dims() != shape.as_slice() {
                return Err(CoreError::ShapeMismatch {
                    name: orig,
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            let t = t
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .contiguous()?;
            match slot {
                Slot::Stem => stem.insert(local, t),
                Slot::Block(i) => blocks[i].insert(local, t),
                Slot::Head => head.insert(local, t),
            };
        }
        if let Some(((_, _), (name, t))) = by_slot.into_iter().next() {
            return Err(CoreError::UnexpectedTensor {
                name,
                found: t.dims().to_vec(),
            });
        }
        Ok(Model {
            spec,
            stem,
            blocks,
            head,
        })
    }

    /// A freshly initialised model (Kaiming-normal convs, identity BN, PyTorch-default
    /// linear), reproducible for a seed: the starting point of training from scratch.
    pub fn init(spec: &ModelSpec, seed: u64) -> Result<Model> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut fill = |shapes: Vec<(String, Vec<usize>)>| -> Result<Params> {
            shapes
                .into_iter()
                .map(|(n, s)| {
                    let t = init::fresh_tensor(&n, &s, &mut rng)?;
                    Ok((n, t))
                })
                .collect()
        };
        let stem = fill(spec.stem.param_shapes())?;
        let blocks = spec
            .blocks
            .iter()
            .map(|b| fill(b.param_shapes()))
            .collect::<Result<Vec<_>>>()?;
        let head = fill(spec.head.param_shapes())?;
        Ok(Model {
            spec: spec.clone(),
            stem,
            blocks,
            head,
        })
    }

    /// The same model with a fresh classifier for `classes` outputs: the start of fine-tuning
    /// pretrained weights on a dataset with other classes. Only the final linear layer
    /// (`head.fc.*`, every family's classifier) is re-initialised, seeded and PyTorch-default
    /// like [`Model::init`]; the stem, blocks and the head's 1x1 conv (MobileNetV2,
    /// EfficientNet-Lite) keep their weights bit for bit, so the learned features carry over.
    pub fn with_new_head(&self, classes: usize, seed: u64) -> Result<Model> {
        use rand::SeedableRng;
        if classes == 0 {
            return Err(CoreError::InvalidConfig {
                field: "classes".into(),
                reason: "a head needs at least one class".into(),
            });
        }
        let mut spec = self.spec.clone();
        spec.head.classes = classes;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut head = self.head.clone();
        // A folded head's packed classifier belongs to the old weights.
        head.remove(&fold::packed_name("fc"));
        for (n, s) in spec.head.param_shapes() {
            if n.starts_with("fc.") {
                let t = init::fresh_tensor(&n, &s, &mut rng)?;
                head.insert(n, t);
            }
        }
        Ok(Model {
            spec,
            stem: self.stem.clone(),
            blocks: self.blocks.clone(),
            head,
        })
    }

    /// sha256 of every tensor's name, shape and f32 bytes in canonical order: identifies a
    /// model's weights (e.g. the starting point a training checkpoint belongs to).
    pub fn weights_digest(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (n, t) in self.canonical_tensors() {
            h.update(n.as_bytes());
            h.update(format!("{:?}", t.dims()).as_bytes());
            let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// Reads an architecture descriptor and a weight file of any supported format.
    pub fn from_files(arch_json: &std::path::Path, weights: &std::path::Path) -> Result<Model> {
        let bytes = std::fs::read(arch_json).map_err(|e| CoreError::io(arch_json, e))?;
        let arch = ArchDescriptor::from_json(&bytes)?;
        Model::load(&arch, crate::weights::read_tensors(weights)?)
    }

    /// Full forward pass, eval mode.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let num = &self.spec.numerics;
        let mut h = stem_forward(&self.spec.stem, num, &self.stem, x, None)?;
        for (b, p) in self.spec.blocks.iter().zip(&self.blocks) {
            h = block_forward(b, num, p, &h, None)?;
        }
        head_forward(&self.spec.head, num, &self.head, &h, None)
    }

    /// The same model with BN folded into the convs (inference only; see [`fold`]).
    pub fn folded(&self) -> Result<Model> {
        let eps = self.spec.numerics.bn_eps;
        Ok(Model {
            spec: self.spec.clone(),
            stem: fold::fold_params(&self.stem, eps)?,
            blocks: self
                .blocks
                .iter()
                .map(|p| fold::fold_params(p, eps))
                .collect::<Result<_>>()?,
            head: fold::fold_params(&self.head, eps)?,
        })
    }

    /// Trainable parameter count (BN running statistics excluded).
    pub fn num_params(&self) -> u64 {
        self.spec.num_params()
    }

    /// All tensors under canonical global names (`stem.*`, `blocks.N.*`, `head.*`).
    pub fn canonical_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (n, t) in &self.stem {
            out.push((global_name(Slot::Stem, n), t.clone()));
        }
        for (i, p) in self.blocks.iter().enumerate() {
            for (n, t) in p {
                out.push((global_name(Slot::Block(i), n), t.clone()));
            }
        }
        for (n, t) in &self.head {
            out.push((global_name(Slot::Head, n), t.clone()));
        }
        out
    }

    /// Writes the model as a self-contained pair: `adaptivenet.chain` descriptor JSON and a
    /// safetensors file with canonical names (loadable with [`Model::from_files`]).
    pub fn save(&self, arch_path: &std::path::Path, weights_path: &std::path::Path) -> Result<()> {
        let desc = ArchDescriptor::chain(self.spec.clone());
        crate::persist::write_atomic(arch_path, &serde_json::to_vec_pretty(&desc.raw)?)?;
        let bytes = crate::persist::params_to_safetensors(self.canonical_tensors())?;
        crate::persist::write_atomic(weights_path, &bytes)
    }
}

/// The family's own name of a tensor, for error messages ("layer1.0.conv1.weight" rather than
/// the canonical "blocks.0.conv1.weight"); falls back to the canonical name.
fn family_name_hint(arch: &ArchDescriptor, slot: Slot, local: &str) -> String {
    let canonical = global_name(slot, local);
    // Family names are found by searching candidates that map back to the same pair.
    let candidates = candidate_family_names(&arch.spec, slot, local);
    candidates
        .into_iter()
        .find(|c| arch.canonical_name(c) == Some((slot, local.to_string())))
        .unwrap_or(canonical)
}

fn candidate_family_names(spec: &ModelSpec, slot: Slot, local: &str) -> Vec<String> {
    let mut v = vec![global_name(slot, local)];
    match slot {
        Slot::Stem => {
            let l = local.replace("conv.", "").replace("bn.", "");
            v.push(format!("conv1.{l}"));
            v.push(format!("bn1.{l}"));
            v.push(format!("features.0.0.{l}"));
            v.push(format!("features.0.1.{l}"));
            v.push(format!("_conv_stem.{l}"));
            v.push(format!("_bn0.{l}"));
        }
        Slot::Head => {
            let l = local
                .replace("conv.", "")
                .replace("bn.", "")
                .replace("fc.", "");
            let last = spec.blocks.len() + 1;
            v.push(format!("fc.{l}"));
            v.push(format!("classifier.1.{l}"));
            v.push(format!("features.{last}.0.{l}"));
            v.push(format!("features.{last}.1.{l}"));
            v.push(format!("_conv_head.{l}"));
            v.push(format!("_bn1.{l}"));
            v.push(format!("_fc.{l}"));
        }
        Slot::Block(i) => {
            let last = local.rsplit('.').next().unwrap_or(local);
            // The stage of a torchvision ResNet block is not known here: try every one.
            for s in 1..=8 {
                for j in 0..=i {
                    v.push(format!("layer{s}.{j}.{local}"));
                }
            }
            let f = i + 1;
            for p in [
                "conv.0.0", "conv.0.1", "conv.1.0", "conv.1.1", "conv.1", "conv.2", "conv.3",
            ] {
                v.push(format!("features.{f}.{p}.{last}"));
            }
            for p in [
                "_expand_conv",
                "_bn0",
                "_depthwise_conv",
                "_bn1",
                "_project_conv",
                "_bn2",
            ] {
                v.push(format!("_blocks.{i}.{p}.{last}"));
            }
        }
    }
    v
}
