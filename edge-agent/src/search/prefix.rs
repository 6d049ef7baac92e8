//! Evaluating many subnets on the local data, and speed-up 4, shared-prefix reuse: the subnets
//! of a generation form a prefix tree over their (position, choice) steps; it is evaluated
//! depth-first per chunk of images, keeping the activation at each branching node while its
//! subtree runs and dropping it afterwards.
//!
//! Memory bound: the activations held at once are those of the branching nodes on the current
//! path. If holding one more would exceed the bound, that subtree's subnets are evaluated one
//! by one from the cached stem output instead (same results, more work).
//!
//! Across generations ([`ReuseCache`]): children inherit the prefix of a parent up to their
//! first changed position, so activations at tree nodes are kept after their generation, as
//! far as a second memory bound allows, and only while they lie on a current parent's path
//! ([`ReuseCache::keep_prefixes_of`]); a node found there is not recomputed, nor is anything
//! above it unless another child needs it. Results are bit-identical either way: an entry is
//! the same module output on the same images, only computed once.
//!
//! Parallelism: the images of a range are split into `threads` contiguous parts, each run by
//! one worker (scoped threads) through the whole tree; per-image results are concatenated in
//! image order, so the outcome does not depend on the thread count. Each worker gets an equal
//! share of the memory bound. Results are per-image correctness masks, which racing (see the
//! search module) compares pairwise between subnets.
use std::collections::BTreeMap;
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
    /// Block-module forward calls times the images each ran on (exact; sums across calls
    /// without the rounding of `module_applications`).
    pub image_module_calls: u64,
    /// Largest number of bytes of activations held at branching nodes at once (one worker).
    pub peak_cached_bytes: usize,
    /// Bytes held by the cross-generation cache after the call (all workers).
    pub reuse_cached_bytes: usize,
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

/// A prefix of a subnet: its first (position, choice) steps.
type Path = Vec<(usize, i8)>;

#[derive(Debug, Default)]
struct Node {
    step: (usize, i8),
    /// Steps from the stem to this node, inclusive.
    path: Path,
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
                        let mut path = nodes[cur].path.clone();
                        path.push(step);
                        nodes.push(Node {
                            step,
                            path,
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

/// Which images a chunk holds: (batch of the set, offset in it, length).
type ChunkKey = (usize, usize, usize);

/// A contiguous run of images inside one batch of the set.
struct Chunk<'a> {
    key: ChunkKey,
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
                key: (b, i, len),
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

struct Cached {
    act: Tensor,
    bytes: usize,
}

/// One worker's share of the cross-generation cache: a worker's chunks are fixed by the range
/// and the worker count, so what it caches never depends on thread timing.
#[derive(Default)]
struct Part {
    entries: BTreeMap<ChunkKey, BTreeMap<Path, Cached>>,
    bytes: usize,
    cap: usize,
}

impl Part {
    fn get(&self, key: ChunkKey, path: &[(usize, i8)]) -> Option<&Tensor> {
        self.entries.get(&key)?.get(path).map(|c| &c.act)
    }

    fn put(&mut self, key: ChunkKey, path: &[(usize, i8)], act: &Tensor) {
        let bytes = act.elem_count() * act.dtype().size_in_bytes();
        if self.bytes + bytes > self.cap {
            return;
        }
        let old = self.entries.entry(key).or_default().insert(
            path.to_vec(),
            Cached {
                act: act.clone(),
                bytes,
            },
        );
        self.bytes = self.bytes + bytes - old.map_or(0, |c| c.bytes);
    }
}

/// Speed-up 4 across generations: node activations kept between evaluations (see the module
/// documentation), within `max_bytes` shared equally by the evaluation workers.
pub struct ReuseCache {
    max_bytes: usize,
    parts: Vec<Part>,
}

impl ReuseCache {
    pub fn new(max_bytes: usize) -> Self {
        ReuseCache {
            max_bytes,
            parts: Vec::new(),
        }
    }

    /// Bytes of activations held.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes).sum()
    }

    /// The per-worker shares for `workers` workers; a different worker count starts afresh.
    fn parts(&mut self, workers: usize) -> &mut [Part] {
        if self.parts.len() != workers {
            self.parts = (0..workers)
                .map(|_| Part {
                    cap: self.max_bytes / workers.max(1),
                    ..Part::default()
                })
                .collect();
        }
        &mut self.parts
    }

    /// Keeps only entries on the path of one of `parents` (children are made from parents
    /// only, so nothing else can be hit), most passes saved per byte first (depth times the
    /// number of parents sharing the prefix, over the size), within half the bound: the other
    /// half takes the next generation's new nodes, some of which will be parents.
    pub fn keep_prefixes_of(&mut self, parents: &[Subnet]) {
        let paths: Vec<Path> = parents.iter().map(|p| p.steps().collect()).collect();
        for part in &mut self.parts {
            let mut ranked = Vec::new();
            for (key, m) in std::mem::take(&mut part.entries) {
                for (path, c) in m {
                    let sharing = paths
                        .iter()
                        .filter(|p| p.len() > path.len() && p[..path.len()] == path[..])
                        .count();
                    if sharing > 0 {
                        let value = (sharing * path.len()) as f64 / c.bytes.max(1) as f64;
                        ranked.push((value, key, path, c));
                    }
                }
            }
            // Stable sort: ties keep the deterministic (chunk, path) order.
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            part.bytes = 0;
            for (_, key, path, c) in ranked {
                if part.bytes + c.bytes <= part.cap / 2 {
                    part.bytes += c.bytes;
                    part.entries.entry(key).or_default().insert(path, c);
                }
            }
        }
    }
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
    /// Cross-generation cache share, and this chunk's key in it.
    reuse: Option<&'a mut Part>,
    key: ChunkKey,
    /// Per node: its activation is in the cross-generation cache.
    hit: Vec<bool>,
    /// Per node: its activation is needed (for its head, or for a child not in the cache).
    needs: Vec<bool>,
}

impl<'a> Dfs<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        supernet: &'a Supernet,
        tree: &'a Tree,
        subnets: &'a [Subnet],
        chunk: &'a Chunk<'_>,
        masks: &'a mut Masks,
        max_cache_bytes: usize,
        reuse: Option<&'a mut Part>,
    ) -> Self {
        let n = tree.nodes.len();
        let hit: Vec<bool> = (0..n)
            .map(|v| {
                v > 0
                    && reuse
                        .as_ref()
                        .is_some_and(|p| p.get(chunk.key, &tree.nodes[v].path).is_some())
            })
            .collect();
        // Children come after their parent in `nodes`, so one backward sweep settles `needs`.
        let mut needs = vec![false; n];
        for v in (0..n).rev() {
            let node = &tree.nodes[v];
            needs[v] = node.leaf.is_some() || node.children.iter().any(|&c| needs[c] && !hit[c]);
        }
        Dfs {
            supernet,
            tree,
            subnets,
            stem: &chunk.stem,
            targets: chunk.targets,
            masks,
            calls: 0,
            cached: 0,
            peak: 0,
            max_cache_bytes,
            reuse,
            key: chunk.key,
            hit,
            needs,
        }
    }

    /// The activation of child `c` of a node whose activation is `h`: from the cache, or
    /// computed (and offered to the cache unless `c` ends a subnet, which no later subnet can
    /// extend); `None` when nothing below `c` needs it.
    fn child(&mut self, c: usize, h: Option<&Tensor>) -> Result<Option<Tensor>> {
        if !self.needs[c] {
            return Ok(None);
        }
        let node = &self.tree.nodes[c];
        if self.hit[c] {
            if let Some(t) = self
                .reuse
                .as_ref()
                .and_then(|p| p.get(self.key, &node.path))
            {
                return Ok(Some(t.clone()));
            }
        }
        let h = h.ok_or_else(|| {
            EdgeError::config("prefix evaluation", "a node's activation was not kept")
        })?;
        let (p, id) = node.step;
        self.calls += 1;
        let out = self.supernet.forward_module(p, id, h)?;
        if !node.children.is_empty() {
            if let Some(part) = self.reuse.as_mut() {
                part.put(self.key, &node.path, &out);
            }
        }
        Ok(Some(out))
    }

    fn visit(&mut self, node: usize, h: Option<Tensor>) -> Result<()> {
        if let Some(l) = self.tree.nodes[node].leaf {
            let h = h.as_ref().ok_or_else(|| {
                EdgeError::config(
                    "prefix evaluation",
                    "a subnet's final activation is missing",
                )
            })?;
            let logits = self.supernet.forward_head(h)?;
            mark(&mut self.masks[l], &logits, self.targets)?;
        }
        let tree = self.tree;
        let children = &tree.nodes[node].children;
        // Children computed from `h`; it is held while more than one of them is pending.
        let mut pending = children
            .iter()
            .filter(|&&c| self.needs[c] && !self.hit[c])
            .count();
        let held = match &h {
            Some(t) if pending > 1 => t.elem_count() * t.dtype().size_in_bytes(),
            _ => 0,
        };
        if self.cached + held > self.max_cache_bytes {
            return self.fallback(node);
        }
        self.cached += held;
        self.peak = self.peak.max(self.cached);
        let mut h = h;
        for &c in children {
            let from_h = self.needs[c] && !self.hit[c];
            let hc = self.child(c, h.as_ref())?;
            if from_h {
                pending -= 1;
                if pending == 0 {
                    h = None;
                }
            }
            self.visit(c, hc)?;
        }
        self.cached -= held;
        Ok(())
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
    mut reuse: Option<&mut Part>,
) -> Result<(Masks, u64, usize)> {
    let mut masks: Masks = vec![Vec::new(); subnets.len()];
    let (mut image_calls, mut peak) = (0u64, 0usize);
    for ch in group {
        let n = ch.targets.len() as u64;
        match (method, tree) {
            (Method::Prefix { .. }, Some(tree)) => {
                let mut dfs = Dfs::new(
                    supernet,
                    tree,
                    subnets,
                    ch,
                    &mut masks,
                    max_cache_bytes,
                    reuse.as_deref_mut(),
                );
                dfs.visit(0, Some(ch.stem.clone()))?;
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
    evaluate_masks_reusing(supernet, set, subnets, range, method, threads, None)
}

/// [`evaluate_masks`] that also takes node activations from, and leaves them in, `reuse`
/// (used by [`Method::Prefix`] only); the masks are the same with or without it.
pub fn evaluate_masks_reusing(
    supernet: &Supernet,
    set: &EvalSet,
    subnets: &[Subnet],
    range: Range<usize>,
    method: Method,
    threads: usize,
    mut reuse: Option<&mut ReuseCache>,
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
    let mut parts: Vec<Option<&mut Part>> = match (reuse.as_deref_mut(), method) {
        (Some(r), Method::Prefix { .. }) => r.parts(groups.len()).iter_mut().map(Some).collect(),
        _ => (0..groups.len()).map(|_| None).collect(),
    };
    let tree = tree.as_ref();
    let results: Vec<Result<(Masks, u64, usize)>> = std::thread::scope(|scope| {
        let mut work = groups.iter().zip(parts.iter_mut().map(Option::take));
        let first = work.next();
        let handles: Vec<_> = work
            .map(|(g, part)| {
                scope
                    .spawn(move || run_worker(supernet, subnets, tree, g, method, per_worker, part))
            })
            .collect();
        let mut out = Vec::with_capacity(groups.len());
        if let Some((g, part)) = first {
            out.push(run_worker(
                supernet, subnets, tree, g, method, per_worker, part,
            ));
        }
        for h in handles {
            out.push(h.join().unwrap_or_else(|_| {
                Err(EdgeError::config("evaluation", "a worker thread panicked"))
            }));
        }
        out
    });
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
        image_module_calls: image_calls,
        peak_cached_bytes: peak,
        reuse_cached_bytes: reuse.map_or(0, |r| r.bytes()),
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
