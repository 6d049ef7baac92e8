//! Variation operators on subnet codes. Every operator ends with [`repair`], so whatever it
//! does to individual positions, the result is a valid code of the supernet.
use adaptivenet_core::supernet::{Choice, ModuleKey, Subnet, SupernetSpec};
use rand::Rng;

use crate::profile::LatencyTable;
use crate::Result;

fn span_of(spec: &SupernetSpec, pos: usize, id: Choice) -> usize {
    spec.choice(ModuleKey::new(pos, id)).map_or(1, |c| c.span)
}

/// Makes any vector of choices a valid code: orphan `x` and unavailable or overflowing choices
/// become `0`; a merge start overwrites the positions it covers.
pub fn repair(spec: &SupernetSpec, v: &mut [Choice]) {
    let n = v.len();
    let mut i = 0;
    while i < n {
        let id = v[i];
        let ok = id != Choice::Covered
            && spec
                .choice(ModuleKey::new(i, id))
                .is_some_and(|c| i + c.span <= n);
        if !ok {
            v[i] = Choice::Original;
            i += 1;
            continue;
        }
        let span = span_of(spec, i, id);
        for x in v.iter_mut().take(i + span).skip(i + 1) {
            *x = Choice::Covered;
        }
        i += span;
    }
}

/// The start of the segment covering position `i`.
fn segment_start(v: &[Choice], mut i: usize) -> usize {
    while i > 0 && v[i] == Choice::Covered {
        i -= 1;
    }
    i
}

/// Re-draws each position with probability `p` among the choices that fit there (a new merge
/// overwrites what it covers; re-drawing a covered position first splits its merge into
/// originals). Returns the child and the positions the mutation decided, which latency
/// compensation must not touch. At least one position changes.
pub fn mutate<R: Rng>(
    spec: &SupernetSpec,
    parent: &Subnet,
    p: f64,
    rng: &mut R,
) -> (Subnet, Vec<usize>) {
    let n = parent.len();
    let mut v = parent.0.clone();
    let mut touched = Vec::new();
    let mut hits: Vec<usize> = (0..n)
        .filter(|_| rng.random_bool(p.clamp(0.0, 1.0)))
        .collect();
    if hits.is_empty() {
        hits.push(rng.random_range(0..n));
    }
    for i in hits {
        let cur = v[i];
        let fits: Vec<Choice> = spec.positions[i]
            .iter()
            .filter(|c| i + c.span <= n && c.id != cur)
            .map(|c| c.id)
            .collect();
        if fits.is_empty() {
            continue;
        }
        let new = fits[rng.random_range(0..fits.len())];
        if cur == Choice::Covered {
            let s = segment_start(&v, i);
            let span = span_of(spec, s, v[s]);
            for x in v.iter_mut().skip(s).take(span) {
                *x = Choice::Original;
            }
        } else {
            let span = span_of(spec, i, cur);
            for x in v.iter_mut().skip(i + 1).take(span - 1) {
                *x = Choice::Original;
            }
        }
        v[i] = new;
        repair(spec, &mut v);
        touched.extend(i..i + span_of(spec, i, new));
    }
    (Subnet(v), touched)
}

/// One-point crossover at a random cut, with span fix-ups at the cut (a merge of `a` that
/// straddles the cut keeps its span; an orphan `x` of `b` becomes an original block).
pub fn crossover<R: Rng>(spec: &SupernetSpec, a: &Subnet, b: &Subnet, rng: &mut R) -> Subnet {
    let n = a.len();
    if n < 2 {
        return a.clone();
    }
    let cut = rng.random_range(1..n);
    let mut v: Vec<Choice> = a.0[..cut].iter().chain(&b.0[cut..]).copied().collect();
    repair(spec, &mut v);
    Subnet(v)
}

/// All tilings of positions `start..end` by choices that fit inside the window.
fn tilings(spec: &SupernetSpec, start: usize, end: usize) -> Vec<Vec<Choice>> {
    if start == end {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for c in &spec.positions[start] {
        if start + c.span <= end {
            for rest in tilings(spec, start + c.span, end) {
                let mut t = vec![c.id];
                t.extend(std::iter::repeat_n(Choice::Covered, c.span - 1));
                t.extend(rest);
                out.push(t);
            }
        }
    }
    out
}

fn window_ms(table: &LatencyTable, start: usize, ids: &[Choice]) -> Result<f64> {
    let mut t = 0.0;
    for (k, &id) in ids.iter().enumerate() {
        if id != Choice::Covered {
            t += table.scaled_module_ms(ModuleKey::new(start + k, id))?;
        }
    }
    Ok(t)
}

/// Latency-preserving fix-up (speed-up 3): after a mutation changed latency by `delta` ms,
/// re-tile one window of up to three positions *outside* the mutated ones (merge, un-merge or
/// re-split a pair or triple) so that the total change is as close to zero as possible.
/// Returns the remaining change. Only applied when it strictly reduces `|delta|`.
pub fn compensate(
    spec: &SupernetSpec,
    table: &LatencyTable,
    child: &mut Subnet,
    delta: f64,
    frozen: &[usize],
) -> Result<f64> {
    let v = &child.0;
    let n = v.len();
    // Segment starts of the child.
    let starts: Vec<usize> = (0..n).filter(|&i| v[i] != Choice::Covered).collect();
    let mut best: Option<(f64, usize, Vec<Choice>)> = None;
    for (k, &s) in starts.iter().enumerate() {
        for m in 1..=3 {
            let end = starts.get(k + m).copied().unwrap_or(n);
            if k + m > starts.len() || end - s > 3 {
                break;
            }
            if (s..end).any(|p| frozen.contains(&p)) {
                break;
            }
            let cur = window_ms(table, s, &v[s..end])?;
            for t in tilings(spec, s, end) {
                if t.as_slice() == &v[s..end] {
                    continue;
                }
                let d = delta + window_ms(table, s, &t)? - cur;
                if best.as_ref().is_none_or(|b| d.abs() < b.0.abs()) {
                    best = Some((d, s, t));
                }
            }
            if end == n {
                break;
            }
        }
    }
    match best {
        Some((d, s, t)) if d.abs() < delta.abs() => {
            child.0[s..s + t.len()].copy_from_slice(&t);
            Ok(d)
        }
        _ => Ok(delta),
    }
}

/// Speed-up 2: a random subnet whose table latency is steered into `[lo, hi]` ms. Walks left
/// to right choosing uniformly among the choices that keep the band reachable (by the suffix
/// minimum / maximum latency); the caller checks the result, since reachability of the
/// interval ends does not guarantee a path lands inside it.
pub fn sample_in_band<R: Rng>(
    spec: &SupernetSpec,
    table: &LatencyTable,
    lo: f64,
    hi: f64,
    rng: &mut R,
) -> Result<Subnet> {
    let n = spec.num_positions();
    let mut min_suf = vec![f64::INFINITY; n + 1];
    let mut max_suf = vec![f64::NEG_INFINITY; n + 1];
    min_suf[n] = 0.0;
    max_suf[n] = 0.0;
    for i in (0..n).rev() {
        for c in &spec.positions[i] {
            if i + c.span <= n {
                let m = table.scaled_module_ms(ModuleKey::new(i, c.id))?;
                min_suf[i] = min_suf[i].min(m + min_suf[i + c.span]);
                max_suf[i] = max_suf[i].max(m + max_suf[i + c.span]);
            }
        }
    }
    let mut acc = table.fixed_ms();
    let mut v = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let mut fits = Vec::new();
        let mut ok = Vec::new();
        for c in &spec.positions[i] {
            if i + c.span > n {
                continue;
            }
            let m = table.scaled_module_ms(ModuleKey::new(i, c.id))?;
            fits.push((c.id, c.span, m));
            let j = i + c.span;
            if acc + m + min_suf[j] <= hi && acc + m + max_suf[j] >= lo {
                ok.push((c.id, c.span, m));
            }
        }
        let pool = if ok.is_empty() { &fits } else { &ok };
        let (id, span, m) = pool[rng.random_range(0..pool.len())];
        v.push(id);
        v.extend(std::iter::repeat_n(Choice::Covered, span - 1));
        acc += m;
        i += span;
    }
    Ok(Subnet(v))
}

/// The subnet with the smallest calibrated table latency (dynamic programming over positions).
pub fn cheapest(spec: &SupernetSpec, table: &LatencyTable) -> Result<Subnet> {
    let n = spec.num_positions();
    let mut best: Vec<(f64, Choice, usize)> = vec![(f64::INFINITY, Choice::Original, 1); n + 1];
    best[n] = (0.0, Choice::Original, 0);
    for i in (0..n).rev() {
        for c in &spec.positions[i] {
            if i + c.span <= n {
                let t = table.scaled_module_ms(ModuleKey::new(i, c.id))? + best[i + c.span].0;
                if t < best[i].0 {
                    best[i] = (t, c.id, c.span);
                }
            }
        }
    }
    let mut v = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let (_, id, span) = best[i];
        v.push(id);
        v.extend(std::iter::repeat_n(Choice::Covered, span - 1));
        i += span;
    }
    Ok(Subnet(v))
}
