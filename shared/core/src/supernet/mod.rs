//! The supernet: the oracle's chain plus branches per position, and the subnet space.
//!
//! # Layout
//! - [`code`]: subnet codes and their string form.
//! - [`branches`]: building merge / prune branches from the oracle's weights.
//! - this module: [`SupernetSpec`] (which choices stand where, shapes, costs), counting,
//!   enumeration and sampling of subnets, and [`Supernet`] (spec + module weights) with the
//!   forward pass of any subnet and export of one subnet as a standalone [`Model`].
pub mod branches;
pub mod code;

use std::collections::BTreeMap;

use candle_core::Tensor;
use rand::Rng;
use serde::{Deserialize, Serialize};

pub use code::{BranchKind, Choice, ModuleKey, Subnet};

use crate::model::{
    block_forward, head_forward, spec::count_params, stem_forward, BlockSpec, Model, ModelSpec,
    Params, TrainCtx,
};
use crate::{CoreError, Result};

/// Which branch kinds to build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupernetConfig {
    pub branches: Vec<BranchKind>,
    /// Seed of the fresh (Kaiming) initialisation of re-shaped tensors.
    #[serde(default)]
    pub seed: u64,
}

impl SupernetConfig {
    /// Merge-2 and merge-3 only (the configuration the reference numbers use).
    pub fn merge_only() -> Self {
        Self {
            branches: vec![BranchKind::Merge2, BranchKind::Merge3],
            seed: 0,
        }
    }

    /// Parses branch names such as `["merge2", "merge3", "prune1"]`.
    pub fn from_names<S: AsRef<str>>(names: &[S], seed: u64) -> Result<Self> {
        let mut branches = Vec::new();
        for n in names {
            let k = BranchKind::parse(n.as_ref())?;
            if !branches.contains(&k) {
                branches.push(k);
            }
        }
        branches.sort();
        Ok(Self { branches, seed })
    }
}

/// One choice at a position, with the block that runs for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoiceSpec {
    /// Stored as the research code's integer id (see [`Choice`]).
    pub id: Choice,
    /// Number of original blocks replaced.
    pub span: usize,
    pub block: BlockSpec,
}

/// Shapes and choices of a supernet; no weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SupernetSpec {
    pub oracle: ModelSpec,
    pub branches: Vec<BranchKind>,
    /// `positions[i]` lists the choices at block position i; id 0 always comes first.
    pub positions: Vec<Vec<ChoiceSpec>>,
}

impl SupernetSpec {
    pub fn num_positions(&self) -> usize {
        self.positions.len()
    }

    pub fn choice(&self, key: ModuleKey) -> Option<&ChoiceSpec> {
        self.positions
            .get(key.pos)?
            .iter()
            .find(|c| c.id == key.choice)
    }

    /// Checks a subnet against this supernet: length, spans, availability of every choice.
    pub fn validate(&self, s: &Subnet) -> Result<()> {
        if s.len() != self.num_positions() {
            return Err(CoreError::InvalidSubnet {
                position: s.len().min(self.num_positions()),
                reason: format!(
                    "code has {} positions, the supernet has {}",
                    s.len(),
                    self.num_positions()
                ),
            });
        }
        s.check_spans()?;
        for key in s.steps() {
            if self.choice(key).is_none() {
                return Err(CoreError::InvalidSubnet {
                    position: key.pos,
                    reason: format!(
                        "choice '{}' is not available at position {}",
                        key.choice, key.pos
                    ),
                });
            }
        }
        Ok(())
    }

    /// The smallest and largest (parameters, MACs) of any subnet, each minimised and
    /// maximised on its own (dynamic programming over positions; no enumeration, so it
    /// holds for spaces far too large to list). `((params_min, params_max), (macs_min,
    /// macs_max))`, MACs at the oracle's default input size.
    pub fn cost_range(&self) -> ((u64, u64), (u64, u64)) {
        let o = &self.oracle;
        let [_, h, w] = o.input;
        let shapes = o.block_shapes(h, w);
        let last = shapes.last().expect("block_shapes is never empty");
        let fixed_params =
            count_params(&o.stem.param_shapes()) + count_params(&o.head.param_shapes());
        let fixed_macs = o.stem.macs(&o.numerics, h, w) + o.head.macs(last[1], last[2]);
        let n = self.num_positions();
        // best[i] = (min params, max params, min macs, max macs) from position i to the end.
        let mut best: Vec<Option<[u64; 4]>> = vec![None; n + 1];
        best[n] = Some([0; 4]);
        for i in (0..n).rev() {
            let [_, hi, wi] = shapes[i];
            for c in self.positions[i].iter().filter(|c| i + c.span <= n) {
                let Some(rest) = best[i + c.span] else {
                    continue;
                };
                let p = count_params(&c.block.param_shapes());
                let m = c.block.macs(&o.numerics, hi, wi);
                let v = [rest[0] + p, rest[1] + p, rest[2] + m, rest[3] + m];
                best[i] = Some(match best[i] {
                    None => v,
                    Some(b) => [
                        b[0].min(v[0]),
                        b[1].max(v[1]),
                        b[2].min(v[2]),
                        b[3].max(v[3]),
                    ],
                });
            }
        }
        let b = best[0].unwrap_or([0; 4]);
        (
            (fixed_params + b[0], fixed_params + b[1]),
            (fixed_macs + b[2], fixed_macs + b[3]),
        )
    }

    /// Exact number of subnets (dynamic programming over positions).
    pub fn count(&self) -> u128 {
        let n = self.num_positions();
        let mut ways = vec![0u128; n + 1];
        ways[n] = 1;
        for i in (0..n).rev() {
            ways[i] = self.positions[i]
                .iter()
                .filter(|c| i + c.span <= n)
                .map(|c| ways[i + c.span])
                .fold(0u128, |a, b| a.saturating_add(b));
        }
        ways[0]
    }

    /// Every subnet, in lexicographic order of positions' choice lists; `None` if there are
    /// more than `limit`.
    pub fn enumerate(&self, limit: usize) -> Option<Vec<Subnet>> {
        if self.count() > limit as u128 {
            return None;
        }
        let n = self.num_positions();
        let mut out = Vec::new();
        let mut cur = Vec::with_capacity(n);
        fn rec(spec: &SupernetSpec, i: usize, cur: &mut Vec<Choice>, out: &mut Vec<Subnet>) {
            let n = spec.num_positions();
            if i == n {
                out.push(Subnet(cur.clone()));
                return;
            }
            for c in &spec.positions[i] {
                if i + c.span > n {
                    continue;
                }
                let len = cur.len();
                cur.push(c.id);
                cur.extend(std::iter::repeat_n(Choice::Covered, c.span - 1));
                rec(spec, i + c.span, cur, out);
                cur.truncate(len);
            }
        }
        rec(self, 0, &mut cur, &mut out);
        Some(out)
    }

    /// A random valid subnet: uniform over the choices at each position, left to right.
    /// With `require_branch`, resamples until at least one branch is used.
    pub fn sample<R: Rng>(&self, rng: &mut R, require_branch: bool) -> Result<Subnet> {
        self.sample_weighted(rng, require_branch, 1.0)
    }

    /// As [`sample`](Self::sample), but at each position the original block is drawn with
    /// weight `original_weight` against 1 for every branch. Below 1 this shifts training
    /// towards paths with fewer blocks, the ones tight latency budgets pick (on this 9-block
    /// chain, 0.5 raises the share of 4-block paths from 31% to 49%). `1.0` is exactly
    /// `sample`, draw for draw.
    pub fn sample_weighted<R: Rng>(
        &self,
        rng: &mut R,
        require_branch: bool,
        original_weight: f64,
    ) -> Result<Subnet> {
        if !(original_weight.is_finite() && original_weight > 0.0) {
            return Err(CoreError::InvalidConfig {
                field: "original_weight".into(),
                reason: format!("{original_weight} is not a positive weight"),
            });
        }
        if require_branch && self.count() <= 1 {
            return Err(CoreError::InvalidConfig {
                field: "branches".into(),
                reason: "the supernet has no branch: only the original path exists".into(),
            });
        }
        let n = self.num_positions();
        loop {
            let mut v = Vec::with_capacity(n);
            let mut i = 0;
            while i < n {
                let fits: Vec<&ChoiceSpec> = self.positions[i]
                    .iter()
                    .filter(|c| i + c.span <= n)
                    .collect();
                let c = if original_weight == 1.0 {
                    fits[rng.random_range(0..fits.len())]
                } else {
                    let w = |c: &ChoiceSpec| {
                        if c.id == Choice::Original {
                            original_weight
                        } else {
                            1.0
                        }
                    };
                    let mut r = rng.random::<f64>() * fits.iter().map(|&c| w(c)).sum::<f64>();
                    let mut pick = fits[fits.len() - 1];
                    for &c in &fits {
                        if r < w(c) {
                            pick = c;
                            break;
                        }
                        r -= w(c);
                    }
                    pick
                };
                v.push(c.id);
                v.extend(std::iter::repeat_n(Choice::Covered, c.span - 1));
                i += c.span;
            }
            let s = Subnet(v);
            if !require_branch || s.uses_branch() {
                return Ok(s);
            }
        }
    }

    /// The block specs a subnet runs, in order.
    pub fn subnet_blocks(&self, s: &Subnet) -> Result<Vec<BlockSpec>> {
        self.validate(s)?;
        Ok(s.steps()
            .map(|k| self.choice(k).expect("validated above").block.clone())
            .collect())
    }

    /// The spec of a subnet as a standalone chain model.
    pub fn subnet_spec(&self, s: &Subnet) -> Result<ModelSpec> {
        let mut spec = self.oracle.clone();
        spec.blocks = self.subnet_blocks(s)?;
        spec.family = "adaptivenet.chain".into();
        Ok(spec)
    }

    /// MACs of a subnet at the oracle's default input size.
    pub fn subnet_macs(&self, s: &Subnet) -> Result<u64> {
        Ok(self.subnet_spec(s)?.macs())
    }

    /// Trainable parameters of the whole supernet (every module once).
    pub fn num_params(&self) -> u64 {
        count_params(&self.oracle.stem.param_shapes())
            + count_params(&self.oracle.head.param_shapes())
            + self
                .positions
                .iter()
                .flatten()
                .map(|c| count_params(&c.block.param_shapes()))
                .sum::<u64>()
    }
}

/// A supernet with (some of) its module weights in memory. Edge devices load only the modules
/// of the subnets they run; the cloud holds all of them.
#[derive(Clone, Debug)]
pub struct Supernet {
    pub spec: SupernetSpec,
    pub stem: Params,
    pub head: Params,
    /// Module → weights.
    pub modules: BTreeMap<ModuleKey, Params>,
}

impl Supernet {
    /// The weights of one module, or an error naming it if not loaded.
    pub fn module(&self, key: ModuleKey) -> Result<&Params> {
        self.modules.get(&key).ok_or_else(|| CoreError::Artifact {
            module: key.name(),
            reason: "module weights are not loaded".into(),
        })
    }

    /// Folds BN into the convs of every loaded module, in place: inference only (profiling,
    /// search, serving), several times faster per layer; results equal to ~1e-5.
    pub fn fold(&mut self) -> Result<()> {
        let eps = self.spec.oracle.numerics.bn_eps;
        self.stem = crate::model::fold::fold_params(&self.stem, eps)?;
        self.head = crate::model::fold::fold_params(&self.head, eps)?;
        for p in self.modules.values_mut() {
            *p = crate::model::fold::fold_params(p, eps)?;
        }
        Ok(())
    }

    /// The spec of one module, or an error naming its position if the supernet has none.
    fn choice_spec(&self, key: ModuleKey) -> Result<&ChoiceSpec> {
        self.spec
            .choice(key)
            .ok_or_else(|| CoreError::InvalidSubnet {
                position: key.pos,
                reason: format!("choice '{}' not available", key.choice),
            })
    }

    /// Runs the stem (the part every subnet shares; cache its output).
    pub fn forward_stem(&self, x: &Tensor) -> Result<Tensor> {
        stem_forward(
            &self.spec.oracle.stem,
            &self.spec.oracle.numerics,
            &self.stem,
            x,
            None,
        )
    }

    /// Runs one module, eval mode.
    pub fn forward_module(&self, key: ModuleKey, x: &Tensor) -> Result<Tensor> {
        let choice = self.choice_spec(key)?;
        block_forward(
            &choice.block,
            &self.spec.oracle.numerics,
            self.module(key)?,
            x,
            None,
        )
    }

    /// BN recalibration: the weights of `subnet`'s modules whose choice id satisfies `which`,
    /// with every BN's running statistics re-estimated on `batches` (one forward of the path
    /// per batch, those modules in train mode, the others in eval mode; the statistics are
    /// the equally weighted mean over the batches). A weight-shared branch keeps statistics
    /// averaged over every path it was trained on; re-estimating them on one path and on the
    /// data it will see fits them to that path. Labels are not needed. Needs unfolded weights
    /// (folded ones fail, naming `params`); the stem and the head keep theirs.
    pub fn recalibrate_bn<'a>(
        &self,
        subnet: &Subnet,
        batches: impl IntoIterator<Item = &'a Tensor>,
        which: impl Fn(Choice) -> bool,
    ) -> Result<BTreeMap<ModuleKey, Params>> {
        self.spec.validate(subnet)?;
        let steps: Vec<ModuleKey> = subnet.steps().collect();
        let mut out = BTreeMap::new();
        for &key in steps.iter().filter(|k| which(k.choice)) {
            out.insert(key, self.module(key)?.clone());
        }
        let mut n = 0usize;
        for x in batches {
            n += 1;
            let mut h = self.forward_stem(x)?;
            for &key in &steps {
                let Some(p) = out.get_mut(&key) else {
                    h = self.forward_module(key, &h)?;
                    continue;
                };
                // Momentum 1/n: the running value becomes the mean of the n batch values.
                let mut ctx = TrainCtx::new(1.0 / n as f64);
                h = self.forward_module_train(key, p, &h, &mut ctx)?;
                if ctx.bn_updates.is_empty() {
                    return Err(CoreError::InvalidConfig {
                        field: "supernet".into(),
                        reason: format!("module {key} has no BN statistics to recalibrate"),
                    });
                }
                ctx.apply(p);
            }
        }
        if n == 0 {
            return Err(CoreError::InvalidConfig {
                field: "batches".into(),
                reason: "no data to recalibrate BN statistics on".into(),
            });
        }
        Ok(out)
    }

    /// Runs one module in inference mode (BN on its running statistics) with explicitly given
    /// weights: differentiable in them when they are variables, e.g. a branch training with
    /// its BN statistics fixed.
    pub fn forward_module_with(
        &self,
        key: ModuleKey,
        params: &Params,
        x: &Tensor,
    ) -> Result<Tensor> {
        let choice = self.choice_spec(key)?;
        block_forward(&choice.block, &self.spec.oracle.numerics, params, x, None)
    }

    /// Runs one module in train mode (batch-statistics BN; updates recorded in `ctx`), with
    /// explicitly given weights (e.g. trainable variables).
    pub fn forward_module_train(
        &self,
        key: ModuleKey,
        params: &Params,
        x: &Tensor,
        ctx: &mut TrainCtx,
    ) -> Result<Tensor> {
        let choice = self.choice_spec(key)?;
        block_forward(
            &choice.block,
            &self.spec.oracle.numerics,
            params,
            x,
            Some(ctx),
        )
    }

    pub fn forward_head(&self, h: &Tensor) -> Result<Tensor> {
        head_forward(
            &self.spec.oracle.head,
            &self.spec.oracle.numerics,
            &self.head,
            h,
            None,
        )
    }

    /// Runs a subnet's blocks from position `from` on the feature `h` entering it.
    pub fn forward_blocks_from(&self, s: &Subnet, from: usize, h: &Tensor) -> Result<Tensor> {
        let mut h = h.clone();
        for key in s.steps().filter(|k| k.pos >= from) {
            h = self.forward_module(key, &h)?;
        }
        Ok(h)
    }

    /// Full forward pass of a subnet, eval mode.
    pub fn forward(&self, s: &Subnet, x: &Tensor) -> Result<Tensor> {
        self.spec.validate(s)?;
        let h = self.forward_stem(x)?;
        let h = self.forward_blocks_from(s, 0, &h)?;
        self.forward_head(&h)
    }

    /// Exports one subnet as a standalone model (its own weights and an explicit chain spec).
    pub fn materialize(&self, s: &Subnet) -> Result<Model> {
        let spec = self.spec.subnet_spec(s)?;
        let blocks = s
            .steps()
            .map(|k| self.module(k).cloned())
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            spec,
            stem: self.stem.clone(),
            blocks,
            head: self.head.clone(),
        })
    }
}
