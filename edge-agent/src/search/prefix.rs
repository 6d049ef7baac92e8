//! Speed-up 4, shared-prefix reuse: the subnets of a generation form a prefix tree over their
//! (position, choice) steps; it is evaluated depth-first per data batch, keeping the activation
//! at each branching node while its subtree runs and dropping it afterwards.
//!
//! Memory bound: the activations held at once are those of the branching nodes on the current
//! path. If holding one more would exceed `max_cache_bytes`, that subtree's subnets are
//! evaluated one by one from the cached stem output instead (same results, more work).
use adaptivenet_core::supernet::{Subnet, Supernet};
use candle_core::Tensor;

use crate::quality::{count_correct, EvalSet};
use crate::Result;

/// Work done by one evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalStats {
    /// Block-module forward calls (summed over batches).
    pub module_applications: usize,
    /// Largest number of bytes of activations held at branching nodes at once.
    pub peak_cached_bytes: usize,
}

#[derive(Debug, Default)]
struct Node {
    step: (usize, i8),
    children: Vec<usize>,
    /// Index of the subnet ending here.
    leaf: Option<usize>,
}

struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    fn build(subnets: &[Subnet]) -> Tree {
        let mut nodes = vec![Node::default()];
        for (k, s) in subnets.iter().enumerate() {
            let mut cur = 0;
            for step in s.steps() {
                let found = nodes[cur]
                    .children
                    .iter()
                    .copied()
                    .find(|&c| nodes[c].step == step);
                cur = match found {
                    Some(c) => c,
                    None => {
                        nodes.push(Node {
                            step,
                            ..Node::default()
                        });
                        let id = nodes.len() - 1;
                        nodes[cur].children.push(id);
                        id
                    }
                };
            }
            nodes[cur].leaf = Some(k);
        }
        Tree { nodes }
    }

    fn leaves_under(&self, node: usize, out: &mut Vec<usize>) {
        if let Some(l) = self.nodes[node].leaf {
            out.push(l);
        }
        for &c in &self.nodes[node].children {
            self.leaves_under(c, out);
        }
    }
}

struct Dfs<'a> {
    supernet: &'a Supernet,
    tree: &'a Tree,
    subnets: &'a [Subnet],
    stem: &'a Tensor,
    targets: &'a [u32],
    correct: &'a mut [usize],
    stats: &'a mut EvalStats,
    cached: usize,
    max_cache_bytes: usize,
}

impl Dfs<'_> {
    fn apply(&mut self, node: usize, h: &Tensor) -> Result<Tensor> {
        let (p, id) = self.tree.nodes[node].step;
        self.stats.module_applications += 1;
        Ok(self.supernet.forward_module(p, id, h)?)
    }

    fn visit(&mut self, node: usize, h: Tensor) -> Result<()> {
        if let Some(l) = self.tree.nodes[node].leaf {
            let logits = self.supernet.forward_head(&h)?;
            self.correct[l] += count_correct(&logits, self.targets)?;
        }
        let children = &self.tree.nodes[node].children;
        match children.len() {
            0 => Ok(()),
            1 => {
                let c = children[0];
                let h2 = self.apply(c, &h)?;
                drop(h);
                self.visit(c, h2)
            }
            _ => {
                let bytes = h.elem_count() * h.dtype().size_in_bytes();
                if self.cached + bytes > self.max_cache_bytes {
                    return self.fallback(node);
                }
                self.cached += bytes;
                self.stats.peak_cached_bytes = self.stats.peak_cached_bytes.max(self.cached);
                for &c in children {
                    let h2 = self.apply(c, &h)?;
                    self.visit(c, h2)?;
                }
                self.cached -= bytes;
                Ok(())
            }
        }
    }

    /// Evaluates every subnet below `node` on its own, from the stem output.
    fn fallback(&mut self, node: usize) -> Result<()> {
        let mut leaves = Vec::new();
        for &c in &self.tree.nodes[node].children {
            self.tree.leaves_under(c, &mut leaves);
        }
        for l in leaves {
            let s = &self.subnets[l];
            let mut h = self.stem.clone();
            for (p, id) in s.steps() {
                self.stats.module_applications += 1;
                h = self.supernet.forward_module(p, id, &h)?;
            }
            let logits = self.supernet.forward_head(&h)?;
            self.correct[l] += count_correct(&logits, self.targets)?;
        }
        Ok(())
    }
}

/// Qualities (percent) of `subnets` via the prefix tree; identical to evaluating each subnet
/// on its own, with fewer module applications.
pub fn evaluate_prefix(
    supernet: &Supernet,
    set: &EvalSet,
    subnets: &[Subnet],
    max_cache_bytes: usize,
) -> Result<(Vec<f64>, EvalStats)> {
    let tree = Tree::build(subnets);
    let mut correct = vec![0usize; subnets.len()];
    let mut stats = EvalStats::default();
    for (b, targets) in set.targets.iter().enumerate() {
        let mut dfs = Dfs {
            supernet,
            tree: &tree,
            subnets,
            stem: &set.stem_out[b],
            targets,
            correct: &mut correct,
            stats: &mut stats,
            cached: 0,
            max_cache_bytes,
        };
        dfs.visit(0, set.stem_out[b].clone())?;
    }
    Ok((correct.iter().map(|&c| set.percent(c)).collect(), stats))
}

/// Qualities of `subnets` one by one (`from_stem`: speed-up 1 on; off: the plain baseline).
pub fn evaluate_each(
    supernet: &Supernet,
    set: &EvalSet,
    subnets: &[Subnet],
    from_stem: bool,
) -> Result<(Vec<f64>, EvalStats)> {
    let mut stats = EvalStats::default();
    let mut out = Vec::with_capacity(subnets.len());
    for s in subnets {
        out.push(set.evaluate(supernet, s, from_stem)?);
        stats.module_applications += s.steps().count() * set.targets.len();
    }
    Ok((out, stats))
}
