//! Deterministic index splits: seeded shuffles, stratified splits, search hold-outs, and the
//! per-device partitions of the data-aware experiment (Dirichlet, class filters).
//!
//! Every function is a pure function of its arguments and a `u64` seed driving a
//! [`ChaCha8Rng`]. The shuffle and the Gamma sampler are implemented here on top of the raw
//! ChaCha stream (whose values `rand_chacha` keeps stable), so a split never changes when
//! `rand` changes its sampling algorithms. Returned index lists are sorted ascending, which
//! keeps [`super::Dataset::subset`] in file order; shuffle per epoch when training.
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{CoreError, Result};

/// Sizes of the parts of a split.
#[derive(Clone, Debug, PartialEq)]
pub enum Split {
    /// Fractions of the whole, each in `0..=1`, summing to at most 1. Part sizes are
    /// apportioned by largest remainder; when the fractions sum to 1 every index is assigned.
    Fractions(Vec<f64>),
    /// Exact part sizes summing to at most `n`; indices beyond the sum are left out.
    Counts(Vec<usize>),
}

impl Split {
    /// A random split of `0..n` (see [`split_indices`]).
    pub fn indices(&self, n: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
        split_indices(n, self, seed)
    }

    /// A split of `0..labels.len()` whose parts keep the class proportions of `labels`
    /// (each per-class count is within one of its exact proportion). Part sizes are
    /// exactly those of the unstratified split.
    pub fn stratified(&self, labels: &[u32], seed: u64) -> Result<Vec<Vec<usize>>> {
        let n = labels.len();
        let targets = self.part_sizes(n)?;
        let classes = class_indices(labels);
        let quotas = stratified_quotas(&targets, &classes.iter().map(Vec::len).collect::<Vec<_>>());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut parts: Vec<Vec<usize>> = targets.iter().map(|&t| Vec::with_capacity(t)).collect();
        for (mut members, q) in classes.into_iter().zip(quotas) {
            shuffle(&mut members, &mut rng);
            let mut rest = &members[..];
            for (part, k) in parts.iter_mut().zip(q) {
                let (take, tail) = rest.split_at(k);
                part.extend_from_slice(take);
                rest = tail;
            }
        }
        parts.iter_mut().for_each(|p| p.sort_unstable());
        Ok(parts)
    }

    /// The size of every part for `n` items.
    pub fn part_sizes(&self, n: usize) -> Result<Vec<usize>> {
        match self {
            Split::Counts(counts) => {
                let total = counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
                match total {
                    Some(t) if t <= n => Ok(counts.clone()),
                    _ => Err(invalid(
                        "split.counts",
                        format!("counts {counts:?} sum to more than the {n} items"),
                    )),
                }
            }
            Split::Fractions(fr) => {
                if fr
                    .iter()
                    .any(|f| !(f.is_finite() && (0.0..=1.0).contains(f)))
                {
                    return Err(invalid(
                        "split.fractions",
                        format!("{fr:?}: each fraction must be in 0..=1"),
                    ));
                }
                let sum: f64 = fr.iter().sum();
                if sum > 1.0 + 1e-9 {
                    return Err(invalid(
                        "split.fractions",
                        format!("{fr:?} sum to {sum} > 1"),
                    ));
                }
                let total = ((sum * n as f64).round() as usize).min(n);
                let exact: Vec<f64> = fr.iter().map(|f| f * n as f64).collect();
                let mut sizes: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
                let mut order: Vec<usize> = (0..fr.len()).collect();
                order.sort_by(|&a, &b| {
                    let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
                    rb.total_cmp(&ra).then(a.cmp(&b))
                });
                let assigned: usize = sizes.iter().sum();
                for &p in order.iter().cycle().take(total.saturating_sub(assigned)) {
                    sizes[p] += 1;
                }
                Ok(sizes)
            }
        }
    }
}

/// A random split of `0..n` into parts sized by `split`, each sorted ascending.
pub fn split_indices(n: usize, split: &Split, seed: u64) -> Result<Vec<Vec<usize>>> {
    let sizes = split.part_sizes(n)?;
    let all = shuffled_indices(n, seed);
    let mut rest = &all[..];
    Ok(sizes
        .into_iter()
        .map(|k| {
            let (take, tail) = rest.split_at(k);
            rest = tail;
            let mut part = take.to_vec();
            part.sort_unstable();
            part
        })
        .collect())
}

/// How many items [`holdout`] sets aside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holdout {
    /// Exactly this many of every class (e.g. 100 per class = 1,000 Fashion-MNIST images).
    PerClass(usize),
    /// This many in total, stratified by class.
    Total(usize),
}

/// Splits `0..labels.len()` into `(rest, held)`, both sorted; used to hold out the
/// architecture-search images from the training set.
pub fn holdout(labels: &[u32], held: Holdout, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    let n = labels.len();
    let (rest, held) = match held {
        Holdout::Total(k) => {
            if k > n {
                return Err(invalid(
                    "holdout",
                    format!("cannot hold out {k} of {n} items"),
                ));
            }
            let mut parts = Split::Counts(vec![n - k, k]).stratified(labels, seed)?;
            let held = parts.pop().unwrap_or_default();
            (parts.pop().unwrap_or_default(), held)
        }
        Holdout::PerClass(k) => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (mut rest, mut held) = (Vec::with_capacity(n), Vec::new());
            for (class, mut members) in class_indices(labels).into_iter().enumerate() {
                if members.is_empty() {
                    continue;
                }
                if members.len() < k {
                    return Err(invalid(
                        "holdout",
                        format!("class {class} has {} items, fewer than {k}", members.len()),
                    ));
                }
                shuffle(&mut members, &mut rng);
                held.extend_from_slice(&members[..k]);
                rest.extend_from_slice(&members[k..]);
            }
            rest.sort_unstable();
            held.sort_unstable();
            (rest, held)
        }
    };
    Ok((rest, held))
}

/// Partitions `0..labels.len()` over `num_devices` devices with class proportions drawn from
/// a symmetric Dirichlet(`alpha`) per class (Hsu et al. 2019): small `alpha` gives each device
/// few classes, large `alpha` approaches an IID split. Every index lands on exactly one
/// device; a device may receive nothing when `alpha` is small.
pub fn dirichlet_partition(
    labels: &[u32],
    num_devices: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    if num_devices == 0 {
        return Err(invalid("num_devices", "must be at least 1".into()));
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(invalid("alpha", format!("{alpha}: must be finite and > 0")));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut devices = vec![Vec::new(); num_devices];
    for mut members in class_indices(labels) {
        if members.is_empty() {
            continue;
        }
        let p = dirichlet(&mut rng, alpha, num_devices);
        shuffle(&mut members, &mut rng);
        let n_c = members.len();
        let (mut start, mut cum) = (0usize, 0f64);
        for (d, dev) in devices.iter_mut().enumerate() {
            cum += p[d];
            let end = if d + 1 == num_devices {
                n_c
            } else {
                ((cum * n_c as f64).floor() as usize).clamp(start, n_c)
            };
            dev.extend_from_slice(&members[start..end]);
            start = end;
        }
    }
    devices.iter_mut().for_each(|d| d.sort_unstable());
    Ok(devices)
}

/// Indices whose label is one of `classes` (e.g. a device that only sees footwear: 5, 7, 9).
pub fn class_filter(labels: &[u32], classes: &[u32]) -> Vec<usize> {
    labels
        .iter()
        .enumerate()
        .filter(|(_, l)| classes.contains(l))
        .map(|(i, _)| i)
        .collect()
}

/// `out[c]` lists the indices with label `c`, ascending; `out.len()` is the largest label + 1.
pub fn class_indices(labels: &[u32]) -> Vec<Vec<usize>> {
    let k = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut out = vec![Vec::new(); k];
    for (i, &l) in labels.iter().enumerate() {
        out[l as usize].push(i);
    }
    out
}

/// `0..n` in a seeded random order (Fisher-Yates).
pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    shuffle(&mut v, &mut ChaCha8Rng::seed_from_u64(seed));
    v
}

/// Fisher-Yates on the raw ChaCha stream, stable across `rand` versions.
fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, below(rng, i as u64 + 1) as usize);
    }
}

/// Uniform integer in `0..bound` (Lemire's widening multiply with rejection; unbiased).
fn below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let m = rng.next_u64() as u128 * bound as u128;
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// Uniform in the open interval (0, 1).
fn unit_open(rng: &mut ChaCha8Rng) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let (u1, u2) = (unit_open(rng), unit_open(rng));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `ln X` for `X ~ Gamma(shape, 1)` (Marsaglia & Tsang 2000). Logs keep tiny shapes usable:
/// for `shape < 1` the boost `X = Y * U^(1/shape)` underflows to 0 in linear space.
fn ln_gamma_sample(rng: &mut ChaCha8Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        return ln_gamma_sample(rng, shape + 1.0) + unit_open(rng).ln() / shape;
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        if unit_open(rng).ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return (d * v).ln();
        }
    }
}

/// A draw from the symmetric Dirichlet(`alpha`) over `k` outcomes.
fn dirichlet(rng: &mut ChaCha8Rng, alpha: f64, k: usize) -> Vec<f64> {
    let logs: Vec<f64> = (0..k).map(|_| ln_gamma_sample(rng, alpha)).collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|x| x / sum).collect()
}

/// Per-class, per-part counts: `out[c][p]`, with `sum_c out[c][p] == targets[p]` exactly and
/// `out[c][p]` within one of `targets[p] * sizes[c] / n`.
fn stratified_quotas(targets: &[usize], sizes: &[usize]) -> Vec<Vec<usize>> {
    let n: usize = sizes.iter().sum();
    let mut out = vec![vec![0usize; targets.len()]; sizes.len()];
    if n == 0 {
        return out;
    }
    let mut slack: Vec<usize> = sizes.to_vec();
    let mut remainders = vec![vec![0u128; targets.len()]; sizes.len()];
    for (c, &size) in sizes.iter().enumerate() {
        for (p, &t) in targets.iter().enumerate() {
            let exact = t as u128 * size as u128;
            out[c][p] = (exact / n as u128) as usize;
            remainders[c][p] = exact % n as u128;
            slack[c] -= out[c][p];
        }
    }
    for (p, &t) in targets.iter().enumerate() {
        let mut deficit = t - out.iter().map(|row| row[p]).sum::<usize>();
        // Largest remainder first; classes with no slack left cannot give more.
        let mut order: Vec<usize> = (0..sizes.len()).collect();
        order.sort_by(|&a, &b| remainders[b][p].cmp(&remainders[a][p]).then(a.cmp(&b)));
        for &c in &order {
            if deficit == 0 {
                break;
            }
            if slack[c] > 0 {
                out[c][p] += 1;
                slack[c] -= 1;
                deficit -= 1;
            }
        }
    }
    out
}

fn invalid(field: &str, reason: String) -> CoreError {
    CoreError::InvalidConfig {
        field: field.to_string(),
        reason,
    }
}
