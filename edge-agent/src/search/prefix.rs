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
//! far as a second memory bound allows, those on a current parent's path first
//! ([`ReuseCache::keep_prefixes_of`]); a node found there is not recomputed, nor is anything
//! above it unless another child needs it. Results are bit-identical either way: an entry is
//! the same module output on the same images, only computed once.
//!
//! Cost: the search's time is the module passes it runs (a profile of the standard bench
//! search: 97 % in the conv kernels, the tree walk, the cache and allocation about 1 %), and
//! the saving is the passes a bound lets it skip, so the agent sizes the bound from the
//! device's free memory when it profiles (`profile/memory.rs`). Reading a kept activation
//! back costs nothing measurable: with a 2 GiB bound (far above the L2, about 4x the
//! reported L3 of the bench host) the CPU time per pass was that of a 256 MiB one.
//!
//! Cells: every batch of the set is cut into two fixed halves, the cells, and evaluation runs
//! chunk by chunk, a chunk being the part of one cell inside the range. The cross-generation
//! cache is kept per cell (each with its images' share of the bound), so an entry made by a
//! full-set pass is found by a racing round over the first 100 images and vice versa, and
//! what is cached never depends on the range's split or the number of workers.
//!
//! Parallelism: the cells of a range are split into `threads` contiguous groups of nearly
//! equal image counts, each run by one worker (scoped threads) through the whole tree;
//! per-image results are concatenated in image order, so the outcome does not depend on the
//! thread count. Each worker gets an equal share of the per-generation memory bound. Results
//! are per-image correctness masks, which racing (`racing.rs`) compares pairwise between
//! subnets.
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use adaptivenet_core::supernet::{ModuleKey, Subnet, Supernet};
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

/// A prefix of a subnet: its first modules.
type Path = Vec<ModuleKey>;

#[derive(Debug, Default)]
struct Node {
    step: ModuleKey,
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

/// A contiguous run of images inside one cell (half a batch) of the set.
struct Chunk<'a> {
    key: ChunkKey,
    /// The chunk is a whole cell: the cross-generation cache holds whole cells only.
    whole_cell: bool,
    input: Tensor,
    stem: Tensor,
    targets: &'a [u32],
}

/// The chunks of `range` (its parts inside each cell), split into at most `parts` non-empty
/// contiguous groups of nearly equal image counts.
fn chunks<'a>(set: &'a EvalSet, range: &Range<usize>, parts: usize) -> Result<Vec<Vec<Chunk<'a>>>> {
    let n = range.len();
    let mut pieces = Vec::new();
    let mut off = 0;
    for (b, t) in set.targets.iter().enumerate() {
        let len = t.len();
        let half = len.div_ceil(2);
        for (clo, chi) in [(0, half), (half, len)] {
            let (s, e) = ((off + clo).max(range.start), (off + chi).min(range.end));
            if s < e {
                pieces.push((s - range.start, b, s - off, e - s, e - s == chi - clo));
            }
        }
        off += len;
    }
    let parts = parts.clamp(1, pieces.len().max(1));
    let mut out: Vec<Vec<Chunk<'a>>> = (0..parts).map(|_| Vec::new()).collect();
    for (start, b, i, len, whole_cell) in pieces {
        // The group whose equal share of the range holds the chunk's first image.
        out[(start * parts / n.max(1)).min(parts - 1)].push(Chunk {
            key: (b, i, len),
            whole_cell,
            input: set.inputs[b].narrow(0, i, len)?,
            stem: set.stem_out[b].narrow(0, i, len)?,
            targets: &set.targets[b][i..i + len],
        });
    }
    out.retain(|g| !g.is_empty());
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

/// One cell's share of the cross-generation cache. A cell is evaluated by one worker at a
/// time and in the same order of calls whatever the worker count, so what it caches never
/// depends on thread timing.
#[derive(Default)]
struct Part {
    entries: BTreeMap<Path, Cached>,
    bytes: usize,
    cap: usize,
}

impl Part {
    fn get(&self, path: &[ModuleKey]) -> Option<&Tensor> {
        self.entries.get(path).map(|c| &c.act)
    }

    fn put(&mut self, path: &[ModuleKey], act: &Tensor) {
        let bytes = act.elem_count() * act.dtype().size_in_bytes();
        if self.bytes + bytes > self.cap {
            return;
        }
        let old = self.entries.insert(
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
/// documentation), within `max_bytes` shared by the cells in proportion to their images.
pub struct ReuseCache {
    max_bytes: usize,
    cells: BTreeMap<ChunkKey, Part>,
}

impl ReuseCache {
    pub fn new(max_bytes: usize) -> Self {
        ReuseCache {
            max_bytes,
            cells: BTreeMap::new(),
        }
    }

    /// Bytes of activations held.
    pub fn bytes(&self) -> usize {
        self.cells.values().map(|p| p.bytes).sum()
    }

    /// The shares of the cells `keys` of a set of `set_len` images, created empty when new.
    fn cells_for(
        &mut self,
        keys: &BTreeSet<ChunkKey>,
        set_len: usize,
    ) -> BTreeMap<ChunkKey, &mut Part> {
        let max = self.max_bytes;
        for &k in keys {
            self.cells.entry(k).or_insert_with(|| Part {
                cap: (max / set_len.max(1)).saturating_mul(k.2),
                ..Part::default()
            });
        }
        self.cells
            .iter_mut()
            .filter(|(k, _)| keys.contains(*k))
            .map(|(k, p)| (*k, p))
            .collect()
    }

    /// Keeps what the next generation is likeliest to hit, within half the bound (the other
    /// half takes the next generation's new nodes, some of which will be parents): first the
    /// entries on the path of one of `parents`, since every child starts with a parent's
    /// prefix, most passes saved per byte first (depth times the number of parents sharing
    /// the prefix, over the size); then, room allowing, the others, most depth per byte
    /// first: a child's later nodes can meet an older subnet's prefix, and a raced-out
    /// subnet scored on more images needs its own. (With a bound a quarter of the memory of
    /// the bench host, keeping those cut the passes of the standard search by a further 5 %.)
    pub fn keep_prefixes_of(&mut self, parents: &[Subnet]) {
        let paths: Vec<Path> = parents.iter().map(|p| p.steps().collect()).collect();
        for part in self.cells.values_mut() {
            let mut ranked = Vec::new();
            for (path, c) in std::mem::take(&mut part.entries) {
                let sharing = paths
                    .iter()
                    .filter(|p| p.len() > path.len() && p[..path.len()] == path[..])
                    .count();
                let per_byte = |n: usize| n as f64 / c.bytes.max(1) as f64;
                let on_path = (sharing > 0, per_byte(sharing * path.len()));
                ranked.push((on_path, per_byte(path.len()), path, c));
            }
            // Stable sort, best first: ties keep the deterministic path order.
            ranked.sort_by(|a, b| {
                (b.0 .0.cmp(&a.0 .0))
                    .then(b.0 .1.total_cmp(&a.0 .1))
                    .then(b.1.total_cmp(&a.1))
            });
            part.bytes = 0;
            for (_, _, path, c) in ranked {
                if part.bytes + c.bytes <= part.cap / 2 {
                    part.bytes += c.bytes;
                    part.entries.insert(path, c);
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
    /// This chunk's cell in the cross-generation cache.
    reuse: Option<&'a mut Part>,
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
                        .is_some_and(|p| p.get(&tree.nodes[v].path).is_some())
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
            if let Some(t) = self.reuse.as_ref().and_then(|p| p.get(&node.path)) {
                return Ok(Some(t.clone()));
            }
        }
        let h = h.ok_or_else(|| {
            EdgeError::config("prefix evaluation", "a node's activation was not kept")
        })?;
        self.calls += 1;
        let out = self.supernet.forward_module(node.step, h)?;
        if !node.children.is_empty() {
            if let Some(part) = self.reuse.as_mut() {
                part.put(&node.path, &out);
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
            for key in s.steps() {
                self.calls += 1;
                h = self.supernet.forward_module(key, &h)?;
            }
            let logits = self.supernet.forward_head(&h)?;
            mark(&mut self.masks[l], &logits, self.targets)?;
        }
        Ok(())
    }
}

/// One worker: its chunks in order, each with its cell of the cross-generation cache (if
/// any). Returns masks, image-weighted calls and peak bytes.
fn run_worker(
    supernet: &Supernet,
    subnets: &[Subnet],
    tree: Option<&Tree>,
    group: &[Chunk<'_>],
    method: Method,
    max_cache_bytes: usize,
    reuse: Vec<Option<&mut Part>>,
) -> Result<(Masks, u64, usize)> {
    let mut masks: Masks = vec![Vec::new(); subnets.len()];
    let (mut image_calls, mut peak) = (0u64, 0usize);
    for (ch, part) in group.iter().zip(reuse) {
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
                    part,
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
    let mut cells = match (reuse.as_deref_mut(), method) {
        (Some(r), Method::Prefix { .. }) => {
            let keys = groups
                .iter()
                .flatten()
                .filter(|c| c.whole_cell)
                .map(|c| c.key)
                .collect();
            r.cells_for(&keys, set.len)
        }
        _ => BTreeMap::new(),
    };
    let parts: Vec<Vec<Option<&mut Part>>> = groups
        .iter()
        .map(|g| g.iter().map(|c| cells.remove(&c.key)).collect())
        .collect();
    let tree = tree.as_ref();
    let results: Vec<Result<(Masks, u64, usize)>> = std::thread::scope(|scope| {
        let mut work = groups.iter().zip(parts);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::testing::{eval_set, supernet};

    #[test]
    fn evaluation_does_not_depend_on_workers_or_method_and_ranges_compose() {
        let sn = supernet();
        let set = eval_set(&sn, 3, 10);
        let subnets = sn.spec.enumerate(1000).unwrap();
        let subnets: Vec<Subnet> = subnets.into_iter().step_by(7).collect();
        let each = Method::Each { from_stem: false };
        let (a, sa) = evaluate_masks(&sn, &set, &subnets, 0..30, each, 1).unwrap();
        let prefix = Method::Prefix {
            max_cache_bytes: usize::MAX,
        };
        let (b, sb) = evaluate_masks(&sn, &set, &subnets, 0..30, prefix, 3).unwrap();
        assert_eq!(a, b);
        assert!(sb.module_applications < sa.module_applications);
        // Split at an image inside a batch, with two workers.
        let (lo, _) = evaluate_masks(&sn, &set, &subnets, 0..13, prefix, 2).unwrap();
        let (hi, _) = evaluate_masks(&sn, &set, &subnets, 13..30, prefix, 2).unwrap();
        for ((l, h), full) in lo.iter().zip(&hi).zip(&a) {
            assert_eq!([l.as_slice(), h.as_slice()].concat(), *full);
        }
        assert!(evaluate_masks(&sn, &set, &subnets, 0..31, prefix, 1).is_err());
    }

    #[test]
    fn cross_generation_reuse_changes_the_work_not_the_results() {
        let sn = supernet();
        let set = eval_set(&sn, 3, 10);
        let all = sn.spec.enumerate(1000).unwrap();
        let parents: Vec<Subnet> = all.iter().step_by(7).cloned().collect();
        // Children differ from every parent but share prefixes with them.
        let children: Vec<Subnet> = all
            .iter()
            .step_by(5)
            .filter(|s| !parents.contains(s))
            .cloned()
            .collect();
        let prefix = Method::Prefix {
            max_cache_bytes: usize::MAX,
        };
        let (truth, plain) = evaluate_masks(&sn, &set, &children, 0..30, prefix, 1).unwrap();
        for workers in [1, 2] {
            let mut cache = ReuseCache::new(usize::MAX / 2);
            evaluate_masks_reusing(
                &sn,
                &set,
                &parents,
                0..30,
                prefix,
                workers,
                Some(&mut cache),
            )
            .unwrap();
            let held = cache.bytes();
            assert!(held > 0);
            cache.keep_prefixes_of(&parents);
            assert_eq!(cache.bytes(), held, "every entry lies on a parent's path");
            let (m, st) = evaluate_masks_reusing(
                &sn,
                &set,
                &children,
                0..30,
                prefix,
                workers,
                Some(&mut cache),
            )
            .unwrap();
            assert_eq!(m, truth, "{workers} workers");
            assert!(
                st.module_applications < plain.module_applications,
                "{} vs {}",
                st.module_applications,
                plain.module_applications
            );
            // Cells, not the range's split, key the cache: a racing-style first round (the
            // first batch, on the other worker count) finds what the full passes cached.
            let other = 3 - workers;
            let (first_round, plain_round) =
                evaluate_masks(&sn, &set, &children, 0..10, prefix, other).unwrap();
            let (m, st) = evaluate_masks_reusing(
                &sn,
                &set,
                &children,
                0..10,
                prefix,
                other,
                Some(&mut cache),
            )
            .unwrap();
            assert_eq!(m, first_round, "{other} workers on the first round");
            assert!(
                st.image_module_calls < plain_round.image_module_calls,
                "{} vs {}",
                st.image_module_calls,
                plain_round.image_module_calls
            );
            // Off every parent's path, entries stay while there is room.
            let before = cache.bytes();
            cache.keep_prefixes_of(&[]);
            assert_eq!(cache.bytes(), before);
        }
        // A bound too small for any activation: same masks, no saving.
        let mut tiny = ReuseCache::new(1);
        evaluate_masks_reusing(&sn, &set, &parents, 0..30, prefix, 1, Some(&mut tiny)).unwrap();
        let (m, st) =
            evaluate_masks_reusing(&sn, &set, &children, 0..30, prefix, 1, Some(&mut tiny))
                .unwrap();
        assert_eq!(
            (m, st.module_applications),
            (truth, plain.module_applications)
        );
    }

    #[test]
    fn kept_entries_are_those_on_parents_paths_first_then_the_deepest_per_byte() {
        use adaptivenet_core::supernet::Choice::{Original, Prune1};
        let key = |pos, c| ModuleKey::new(pos, c);
        let act = || Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu);
        // One cell whose half bound holds three of the four 16-byte entries.
        let mut cache = ReuseCache::new(usize::MAX);
        let mut part = Part {
            cap: 2 * 48,
            ..Part::default()
        };
        let on_parent_1 = vec![key(0, Original)];
        let on_parent_2 = vec![key(0, Original), key(1, Original)];
        let off_deep = vec![key(0, Prune1), key(1, Original), key(2, Original)];
        let off_shallow = vec![key(0, Prune1)];
        for p in [&off_shallow, &on_parent_1, &off_deep, &on_parent_2] {
            part.put(p, &act().unwrap());
        }
        assert_eq!(part.bytes, 64);
        cache.cells.insert((0, 0, 1), part);
        cache.keep_prefixes_of(&[Subnet(vec![Original; 3])]);
        let kept: Vec<&Path> = cache.cells[&(0, 0, 1)].entries.keys().collect();
        assert_eq!(kept, [&off_deep, &on_parent_1, &on_parent_2]);
        assert_eq!(cache.bytes(), 48);
        // A tighter bound keeps the parent's deeper prefix (more passes saved per byte).
        cache.cells.get_mut(&(0, 0, 1)).unwrap().cap = 2 * 16;
        cache.keep_prefixes_of(&[Subnet(vec![Original; 3])]);
        let kept: Vec<&Path> = cache.cells[&(0, 0, 1)].entries.keys().collect();
        assert_eq!(kept, [&on_parent_2]);
    }
}
