//! The ops of one EfficientNet-Lite0 training step, layer by layer (`cargo bench -p
//! adaptivenet-kernels --bench train_layers [-- filter]`): every distinct conv of Lite0 at
//! 3x64x64 and batch 32 (TF-SAME padding, as the model runs it) forward, backward to the
//! input and backward to the weight, and train-mode BN (fused with ReLU6 where the model
//! has one) forward and backward on every activation shape, each timed alone on 1 thread (median thread CPU time of repeated runs,
//! so that other processes on a shared host do not count) and multiplied by
//! how often the step runs it. The totals per kind say where a step's kernel time goes; the
//! whole step (with candle's autograd bookkeeping) is `adaptivenet-train`'s `train_step` bench.
//!
//! Backward times are the autograd backward of the op alone (seeded with ones, one argument
//! tracking a gradient), so they include candle's zero-fill and add of that gradient, as in
//! training. Ends with one `BENCH {json}` line.
use std::collections::BTreeMap;
use std::time::Instant;

use adaptivenet_kernels::{batch_norm_train_act, conv2d, threads, Activation, Conv2dParams};
use candle_core::{Device, Tensor, Var};
use serde_json::json;

const N: usize = 32;
const SIDE: usize = 64;

fn randn(dims: &[usize], scale: f64) -> Tensor {
    (Tensor::randn(0f32, 1f32, dims, &Device::Cpu).unwrap() * scale).unwrap()
}

/// Median wall time (ms) of `f`, which returns the part of its time to count.
fn median_ms(mut f: impl FnMut() -> f64, budget_ms: f64) -> f64 {
    f();
    let mut v = Vec::new();
    let start = Instant::now();
    while v.len() < 5 || (start.elapsed().as_secs_f64() * 1e3 < budget_ms && v.len() < 400) {
        v.push(f());
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time of the calling thread, ms: on a shared host other processes' time slices do not
/// count (with 1 kernel thread every op runs on the caller).
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = cpu_ms();
    f();
    cpu_ms() - t
}

/// One conv of the network: input `[N, c, h, h]`, weight `[o, c/groups, k, k]`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ConvLayer {
    kind: &'static str,
    c: usize,
    o: usize,
    h: usize,
    k: usize,
    s: usize,
    groups: usize,
}

impl ConvLayer {
    fn name(&self) -> String {
        format!(
            "{} {}x{}/{} {}->{} @{}",
            self.kind, self.k, self.k, self.s, self.c, self.o, self.h
        )
    }
    fn params(&self) -> Conv2dParams {
        Conv2dParams::same((self.h, self.h), (self.k, self.k), (self.s, self.s))
            .with_groups(self.groups)
    }
    fn out(&self) -> usize {
        self.h.div_ceil(self.s)
    }
    fn flops(&self) -> f64 {
        let o = self.out();
        2.0 * (N * self.o * o * o * (self.c / self.groups) * self.k * self.k) as f64
    }
}

/// Lite0's convs and its BN shapes `[N, C, H, H]` with whether ReLU6 follows (with
/// multiplicity).
#[allow(clippy::type_complexity)]
fn network() -> (
    BTreeMap<ConvLayer, usize>,
    BTreeMap<(usize, usize, bool), usize>,
) {
    let mut convs = BTreeMap::new();
    let mut acts = BTreeMap::new();
    let mut conv = |l: ConvLayer| *convs.entry(l).or_insert(0) += 1;
    let mut act = |c: usize, h: usize, relu6: bool| *acts.entry((c, h, relu6)).or_insert(0) += 1;
    // (repeats, kernel, first stride, expand ratio, out channels), as `families.rs`.
    let stages = [
        (1, 3, 1, 1, 16),
        (2, 3, 2, 6, 24),
        (2, 5, 2, 6, 40),
        (3, 3, 2, 6, 80),
        (3, 5, 1, 6, 112),
        (4, 5, 2, 6, 192),
        (1, 3, 1, 6, 320),
    ];
    let mut h = SIDE / 2;
    let mut cin = 32;
    conv(ConvLayer {
        kind: "stem",
        c: 3,
        o: 32,
        h: SIDE,
        k: 3,
        s: 2,
        groups: 1,
    });
    act(32, h, true);
    for (reps, k, s0, e, cout) in stages {
        for i in 0..reps {
            let s = if i == 0 { s0 } else { 1 };
            let hid = cin * e;
            if e != 1 {
                conv(ConvLayer {
                    kind: "pw",
                    c: cin,
                    o: hid,
                    h,
                    k: 1,
                    s: 1,
                    groups: 1,
                });
                act(hid, h, true);
            }
            conv(ConvLayer {
                kind: "dw",
                c: hid,
                o: hid,
                h,
                k,
                s,
                groups: hid,
            });
            h = h.div_ceil(s);
            act(hid, h, true);
            conv(ConvLayer {
                kind: "pw",
                c: hid,
                o: cout,
                h,
                k: 1,
                s: 1,
                groups: 1,
            });
            act(cout, h, false);
            cin = cout;
        }
    }
    conv(ConvLayer {
        kind: "pw",
        c: cin,
        o: 1280,
        h,
        k: 1,
        s: 1,
        groups: 1,
    });
    act(1280, h, true);
    (convs, acts)
}

fn main() {
    adaptivenet_kernels::alloc::retain_freed_memory();
    threads::set_max_threads(1);
    threads::size_candle_pool(1);
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let budget: f64 = std::env::var("LAYERS_BUDGET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150.0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "Lite0 training ops at 3x{SIDE}x{SIDE}, batch {N}, {}, load {}",
        threads::describe(),
        load.split_whitespace().next().unwrap_or("?")
    );
    println!("| op | count | fwd ms | bwd data ms | bwd weight ms | total x count ms | fwd GF/s |");
    println!("|---|---|---|---|---|---|---|");
    let (convs, acts) = network();
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    let mut rows = Vec::new();
    for (l, count) in &convs {
        let name = l.name();
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let p = l.params();
        let x = randn(&[N, l.c, l.h, l.h], 1.0);
        let w = randn(&[l.o, l.c / l.groups, l.k, l.k], 0.2);
        let fwd = median_ms(|| timed(|| drop(conv2d(&x, &w, None, &p).unwrap())), budget);
        let xv = Var::from_tensor(&x).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let bwd_data = if l.kind == "stem" {
            0.0
        } else {
            median_ms(
                || {
                    let y = conv2d(xv.as_tensor(), &w, None, &p).unwrap();
                    timed(|| drop(y.backward().unwrap()))
                },
                budget,
            )
        };
        let bwd_w = median_ms(
            || {
                let y = conv2d(&x, wv.as_tensor(), None, &p).unwrap();
                timed(|| drop(y.backward().unwrap()))
            },
            budget,
        );
        let c = *count as f64;
        let tot = (fwd + bwd_data + bwd_w) * c;
        println!(
            "| {name} | {count} | {fwd:.3} | {bwd_data:.3} | {bwd_w:.3} | {tot:.2} | {:.1} |",
            l.flops() / fwd / 1e6
        );
        for (part, v) in [("fwd", fwd), ("bwd data", bwd_data), ("bwd weight", bwd_w)] {
            *totals.entry(format!("{} {part}", l.kind)).or_default() += v * c;
        }
        rows.push(json!({"op": name, "count": count, "fwd_ms": fwd,
            "bwd_data_ms": bwd_data, "bwd_weight_ms": bwd_w}));
    }
    for (&(ch, h, relu6), count) in &acts {
        let name = format!("bn{} {ch} @{h}", if relu6 { "+relu6" } else { "" });
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let act = if relu6 {
            Activation::Relu6
        } else {
            Activation::None
        };
        let x = randn(&[N, ch, h, h], 1.0);
        let g = (randn(&[ch], 0.1) + 1.0).unwrap();
        let b = randn(&[ch], 0.1);
        let (xv, gv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&g).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let fwd = median_ms(
            || timed(|| drop(batch_norm_train_act(&x, &g, &b, 1e-3, act).unwrap())),
            budget,
        );
        let bwd = median_ms(
            || {
                let (y, _, _) =
                    batch_norm_train_act(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), 1e-3, act)
                        .unwrap();
                timed(|| drop(y.backward().unwrap()))
            },
            budget,
        );
        let c = *count as f64;
        println!(
            "| {name} | {count} | {fwd:.3} | {bwd:.3} | - | {:.2} | - |",
            (fwd + bwd) * c
        );
        *totals.entry("bn fwd".into()).or_default() += fwd * c;
        *totals.entry("bn bwd".into()).or_default() += bwd * c;
        rows.push(json!({"op": name, "count": count, "fwd_ms": fwd, "bwd_ms": bwd}));
    }
    println!("\n| kind | ms per step |");
    println!("|---|---|");
    let mut sum = 0.0;
    for (k, v) in &totals {
        println!("| {k} | {v:.1} |");
        sum += v;
    }
    println!("| all | {sum:.1} |");
    println!(
        "BENCH {}",
        json!({"bench": "train_layers", "batch": N, "side": SIDE, "threads": 1,
            "total_ms": sum, "totals_ms": totals, "rows": rows})
    );
}
