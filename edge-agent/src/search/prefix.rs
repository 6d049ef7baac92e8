//! Evaluating many subnets on the local data, and speed-up 4, shared-prefix reuse: the subnets
//! of a generation form a prefix tree over their (position, choice) steps; it is evaluated
//! depth-first per chunk of images, keeping the activation at each branching node while its
//! subtree runs and dropping it afterwards.
//!
//! Memory bound: the activations held at once are those of the branching nodes on the current
//! path. If holding one more would exceed the bound, that subtree's subnets are evaluated one
//! by one from the cached stem output instead (same results, more work).
//!
//! Parallelism: the images of a range are split into `threads` contiguous parts, each run by
//! one worker (scoped threads) through the whole tree; per-image results are concatenated in
//! image order, so the outcome does not depend on the thread count. Each worker gets an equal
//! share of the memory bound. Results are per-image correctness masks, which racing (see the
//! search module) compares pairwise between subnets.
use std::ops::Range;

use adaptivenet_core::supernet::{Subnet, Supernet};
use candle_core::Tensor;

use crate::quality::{top1, EvalSet};
use crate::{EdgeError, Result};

/// Work done by one evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalStats {
    /// Block-module forward calls in equivalent passes over the whole set: calls on a chunk
    /// count in proportion to its share of the set's images, so figures compare across chunk
    /// sizes, thread counts and partial (racing) passes.
    pub module_applications: usize,
    /// Largest number of bytes of activations held at branching nodes at once (one worker).
    pub peak_cached_bytes: usize,
}

/// How to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Prefix tree from the cached stem outputs, with a bound on cached activations (bytes,
    /// shared equally by the workers).
    Prefix { max_cache_bytes: usize },
    /// Each subnet on its own; `from_stem` starts from the cached stem outputs (speed-up 1),
    /// otherwise every image runs through the whole network (the plain baseline).
    Each { from_stem: bool },
}

/// Per-subnet correctness masks over an image range, in image order.
pub type Masks = Vec<Vec<bool>>;

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

/// A contiguous run of images inside one batch of the set.
struct Chunk<'a> {
    input: Tensor,
    stem: Tensor,
    targets: &'a [u32],
}

/// The chunks of `range`, split into `parts` contiguous groups of nearly equal image counts.
fn chunks<'a>(set: &'a EvalSet, range: &Range<usize>, parts: usize) -> Result<Vec<Vec<Chunk<'a>>>> {
    let n = range.len();
    let parts = parts.clamp(1, n.max(1));
    let mut out = Vec::with_capacity(parts);
    for p in 0..parts {
        let lo = range.start + n * p / parts;
        let hi = range.start + n * (p + 1) / parts;
        let mut group = Vec::new();
        let mut off = 0;
        for (b, t) in set.targets.iter().enumerate() {
            let (blo, bhi) = (off, off + t.len());
            off = bhi;
            let (s, e) = (lo.max(blo), hi.min(bhi));
            if s >= e {
                continue;
            }
            let (i, len) = (s - blo, e - s);
            group.push(Chunk {
                input: set.inputs[b].narrow(0, i, len)?,
                stem: set.stem_out[b].narrow(0, i, len)?,
                targets: &t[i..i + len],
            });
        }
        out.push(group);
    }
    Ok(out)
}

fn mark(mask: &mut Vec<bool>, logits: &Tensor, targets: &[u32]) -> Result<()> {
    let pred = top1(logits)?;
    mask.extend(pred.iter().zip(targets).map(|(p, t)| p == t));
    Ok(())
}

/// One worker's state while it walks the tree over one chunk.
struct Dfs<'a> {
    supernet: &'a Supernet,
    tree: &'a Tree,
    subnets: &'a [Subnet],
    stem: &'a Tensor,
    targets: &'a [u32],
    masks: &'a mut Masks,
    calls: u64,
    cached: usize,
    peak: usize,
    max_cache_bytes: usize,
}

impl Dfs<'_> {
    fn apply(&mut self, node: usize, h: &Tensor) -> Result<Tensor> {
        let (p, id) = self.tree.nodes[node].step;
        self.calls += 1;
        Ok(self.supernet.forward_module(p, id, h)?)
    }

    fn visit(&mut self, node: usize, h: Tensor) -> Result<()> {
        if let Some(l) = self.tree.nodes[node].leaf {
            let logits = self.supernet.forward_head(&h)?;
            mark(&mut self.masks[l], &logits, self.targets)?;
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
                self.peak = self.peak.max(self.cached);
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
                self.calls += 1;
                h = self.supernet.forward_module(p, id, &h)?;
            }
            let logits = self.supernet.forward_head(&h)?;
            mark(&mut self.masks[l], &logits, self.targets)?;
        }
        Ok(())
    }
}

/// One worker: its chunks in order. Returns masks, image-weighted calls and peak bytes.
fn run_worker(
    supernet: &Supernet,
    subnets: &[Subnet],
    tree: Option<&Tree>,
    group: &[Chunk<'_>],
    method: Method,
    max_cache_bytes: usize,
) -> Result<(Masks, u64, usize)> {
    let mut masks: Masks = vec![Vec::new(); subnets.len()];
    let (mut image_calls, mut peak) = (0u64, 0usize);
    for ch in group {
        let n = ch.targets.len() as u64;
        match (method, tree) {
            (Method::Prefix { .. }, Some(tree)) => {
                let mut dfs = Dfs {
                    supernet,
                    tree,
                    subnets,
                    stem: &ch.stem,
                    targets: ch.targets,
                    masks: &mut masks,
                    calls: 0,
                    cached: 0,
                    peak: 0,
                    max_cache_bytes,
                };
                dfs.visit(0, ch.stem.clone())?;
                image_calls += dfs.calls * n;
                peak = peak.max(dfs.peak);
            }
            _ => {
                let from_stem = !matches!(method, Method::Each { from_stem: false });
                for (k, s) in subnets.iter().enumerate() {
                    let logits = if from_stem {
                        let h = supernet.forward_blocks_from(s, 0, &ch.stem)?;
                        supernet.forward_head(&h)?
                    } else {
                        supernet.forward(s, &ch.input)?
                    };
                    mark(&mut masks[k], &logits, ch.targets)?;
                    image_calls += s.steps().count() as u64 * n;
                }
            }
        }
    }
    Ok((masks, image_calls, peak))
}

/// Per-image correctness of every subnet on the images `range` of the set (image order), with
/// `threads` workers.
pub fn evaluate_masks(
    supernet: &Supernet,
    set: &EvalSet,
    subnets: &[Subnet],
    range: Range<usize>,
    method: Method,
    threads: usize,
) -> Result<(Masks, EvalStats)> {
    if range.end > set.len || range.start > range.end {
        return Err(EdgeError::config(
            "evaluation range",
            format!("{range:?} outside the {} images of the set", set.len),
        ));
    }
    if subnets.is_empty() || range.is_empty() {
        return Ok((vec![Vec::new(); subnets.len()], EvalStats::default()));
    }
    let groups = chunks(set, &range, threads)?;
    let tree = match method {
        Method::Prefix { .. } => Some(Tree::build(subnets)),
        Method::Each { .. } => None,
    };
    let per_worker = match method {
        Method::Prefix { max_cache_bytes } => max_cache_bytes / groups.len(),
        Method::Each { .. } => 0,
    };
    let results: Vec<Result<(Masks, u64, usize)>> = if groups.len() == 1 {
        vec![run_worker(
            supernet,
            subnets,
            tree.as_ref(),
            &groups[0],
            method,
            per_worker,
        )]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = groups[1..]
                .iter()
                .map(|g| {
                    let tree = tree.as_ref();
                    scope.spawn(move || run_worker(supernet, subnets, tree, g, method, per_worker))
                })
                .collect();
            let mut out = vec![run_worker(
                supernet,
                subnets,
                tree.as_ref(),
                &groups[0],
                method,
                per_worker,
            )];
            for h in handles {
                out.push(h.join().unwrap_or_else(|_| {
                    Err(EdgeError::config("evaluation", "a worker thread panicked"))
                }));
            }
            out
        })
    };
    let mut masks: Masks = vec![Vec::with_capacity(range.len()); subnets.len()];
    let (mut image_calls, mut peak) = (0u64, 0usize);
    for r in results {
        let (m, c, p) = r?;
        for (dst, src) in masks.iter_mut().zip(m) {
            dst.extend(src);
        }
        image_calls += c;
        peak = peak.max(p);
    }
    let stats = EvalStats {
        module_applications: (image_calls as f64 / set.len.max(1) as f64).round() as usize,
        peak_cached_bytes: peak,
    };
    Ok((masks, stats))
}

fn percents(set: &EvalSet, masks: &Masks) -> Vec<f64> {
    masks
        .iter()
        .map(|m| set.percent(m.iter().filter(|&&c| c).count()))
        .collect()
}

/// Qualities (percent) of `subnets` via the prefix tree on one thread; identical to
/// evaluating each subnet on its own, with fewer module applications.
pub fn evaluate_prefix(
    supernet: &Supernet,
    set: &EvalSet,
    subnets: &[Subnet],
    max_cache_bytes: usize,
) -> Result<(Vec<f64>, EvalStats)> {
    let (m, st) = evaluate_masks(
        supernet,
        set,
        subnets,
        0..set.len,
        Method::Prefix { max_cache_bytes },
        1,
    )?;
    Ok((percents(set, &m), st))
}

/// Qualities of `subnets` one by one on one thread (`from_stem`: speed-up 1 on; off: the
/// plain baseline).
pub fn evaluate_each(
    supernet: &Supernet,
    set: &EvalSet,
    subnets: &[Subnet],
    from_stem: bool,
) -> Result<(Vec<f64>, EvalStats)> {
    let (m, st) = evaluate_masks(
        supernet,
        set,
        subnets,
        0..set.len,
        Method::Each { from_stem },
        1,
    )?;
    Ok((percents(set, &m), st))
}
