//! The packed inference conv ([`conv_packed`], direct, no im2col) against the im2col + GEMM
//! path ([`conv2d_fused`]) on the conv shapes of ResNet-20 (28x28 Fashion-MNIST, the edge's
//! oracle; batch 1 as served and batch 100 as the search evaluates) and ResNet-18 (224,
//! batch 1). Both with bias + ReLU; the packed one also with the residual add it fuses
//! (`+res`), which the im2col path does as a separate add + ReLU pass (`add_relu`).
//!
//! `cargo bench -p adaptivenet-kernels --bench packed [-- filter]`. One thread. The two
//! columns run interleaved, run by run, and each run is timed by the thread's CPU clock as
//! well as the wall clock: on a shared machine the CPU time is the steadier figure (a
//! preempted run's wall time counts the other process). Median of at least 9 runs per
//! column. Ends with one line `BENCH {json}` (per row: CPU-time medians in ms and the ratio).

use std::time::Instant;

use adaptivenet_kernels::{
    add_relu, conv2d_fused, conv_packed, pack_conv, pack_winograd, threads, winograd_packed,
    winograd_wins, Activation, Conv2dParams,
};
use candle_core::{Device, Tensor};

fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Shape {
    name: &'static str,
    n: usize,
    c: usize,
    o: usize,
    hw: usize,
    k: usize,
    s: usize,
    residual: bool,
}

/// (cpu ms, wall ms) medians of each column, interleaved.
fn time_pair(mut a: impl FnMut(), mut b: impl FnMut(), budget_ms: f64) -> [(f64, f64); 2] {
    a();
    b();
    let mut t = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    let start = Instant::now();
    while t[0].0.len() < 9
        || (start.elapsed().as_secs_f64() * 1e3 < budget_ms && t[0].0.len() < 200)
    {
        for (i, col) in t.iter_mut().enumerate() {
            let (c0, w0) = (cpu_ms(), Instant::now());
            if i == 0 {
                a()
            } else {
                b()
            }
            col.0.push(cpu_ms() - c0);
            col.1.push(w0.elapsed().as_secs_f64() * 1e3);
        }
    }
    t.map(|(c, w)| (median(c), median(w)))
}

fn main() {
    threads::set_max_threads(1);
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let sh = |name, n, c, o, hw, k, s, residual| Shape {
        name,
        n,
        c,
        o,
        hw,
        k,
        s,
        residual,
    };
    let shapes = [
        sh("r20 stem 3x3 1->16 @28", 1, 1, 16, 28, 3, 1, false),
        sh("r20 3x3 16->16 @28", 1, 16, 16, 28, 3, 1, false),
        sh("r20 3x3 16->16 @28 +res", 1, 16, 16, 28, 3, 1, true),
        sh("r20 3x3/2 16->32 @28", 1, 16, 32, 28, 3, 2, false),
        sh("r20 3x3 32->32 @14 +res", 1, 32, 32, 14, 3, 1, true),
        sh("r20 3x3 64->64 @7 +res", 1, 64, 64, 7, 3, 1, true),
        sh("r20 1x1/2 16->32 @28", 1, 16, 32, 28, 1, 2, false),
        sh("r20 3x3 16->16 @28 +res b100", 100, 16, 16, 28, 3, 1, true),
        sh("r20 3x3/2 32->64 @14 b100", 100, 32, 64, 14, 3, 2, false),
        sh("r20 3x3 64->64 @7 +res b100", 100, 64, 64, 7, 3, 1, true),
        sh("r18 stem 7x7/2 3->64 @224", 1, 3, 64, 224, 7, 2, false),
        sh("mbv2 stem 3x3/2 3->32 @224", 1, 3, 32, 224, 3, 2, false),
        sh("3x3 2->16 @28 (K=18)", 1, 2, 16, 28, 3, 1, false),
        sh("3x3 4->16 @28 (K=36)", 1, 4, 16, 28, 3, 1, false),
        sh("r18 3x3 64->64 @56 +res", 1, 64, 64, 56, 3, 1, true),
        sh("r18 3x3/2 64->128 @56", 1, 64, 128, 56, 3, 2, false),
        sh("r18 3x3 128->128 @28 +res", 1, 128, 128, 28, 3, 1, true),
        sh("r18 3x3 256->256 @14 +res", 1, 256, 256, 14, 3, 1, true),
        sh("r18 3x3 512->512 @7 +res", 1, 512, 512, 7, 3, 1, true),
    ];
    println!("one thread; CPU-time medians (wall in brackets), ms; im2col = conv2d_fused (+ add_relu for +res)");
    println!("| conv (batch 1 unless bN) | im2col + GEMM | packed direct | im2col / packed |");
    println!("|---|---|---|---|");
    let mut bench = serde_json::Map::new();
    for s in &shapes {
        if filter
            .as_ref()
            .is_some_and(|f| !s.name.contains(f.as_str()))
        {
            continue;
        }
        let pad = s.k / 2;
        let p = Conv2dParams::new(s.s, pad);
        let x = Tensor::randn(0f32, 1f32, (s.n, s.c, s.hw, s.hw), &Device::Cpu).unwrap();
        let w = (Tensor::randn(0f32, 1f32, (s.o, s.c, s.k, s.k), &Device::Cpu).unwrap()
            * (1.0 / ((s.c * s.k * s.k) as f64).sqrt()))
        .unwrap();
        let b = Tensor::randn(0f32, 1f32, s.o, &Device::Cpu).unwrap();
        let packed = pack_conv(&w).unwrap();
        let oh = (s.hw + 2 * pad - s.k) / s.s + 1;
        let res = Tensor::randn(0f32, 1f32, (s.n, s.o, oh, oh), &Device::Cpu).unwrap();
        let budget = 1500.0;
        let [im2col, direct] = if s.residual {
            time_pair(
                || {
                    let y = conv2d_fused(&x, &w, Some(&b), &p, Activation::None).unwrap();
                    add_relu(&y, &res).unwrap();
                },
                || {
                    conv_packed(
                        &x,
                        &packed,
                        s.o,
                        (s.k, s.k),
                        Some(&b),
                        &p,
                        Activation::Relu,
                        Some(&res),
                    )
                    .unwrap();
                },
                budget,
            )
        } else {
            time_pair(
                || {
                    conv2d_fused(&x, &w, Some(&b), &p, Activation::Relu).unwrap();
                },
                || {
                    conv_packed(
                        &x,
                        &packed,
                        s.o,
                        (s.k, s.k),
                        Some(&b),
                        &p,
                        Activation::Relu,
                        None,
                    )
                    .unwrap();
                },
                budget,
            )
        };
        println!(
            "| {} | {:.3} ({:.3}) | {:.3} ({:.3}) | {:.2} |",
            s.name,
            im2col.0,
            im2col.1,
            direct.0,
            direct.1,
            im2col.0 / direct.0
        );
        bench.insert(
            s.name.to_string(),
            serde_json::json!({"im2col_ms": im2col.0, "packed_ms": direct.0,
                "ratio": im2col.0 / direct.0}),
        );
    }
    winograd_rows(filter.as_deref(), &mut bench);
    println!("BENCH {}", serde_json::Value::Object(bench));
}

/// The stride-1 3x3 convs (pad 1, bias, fused ReLU, `+res` the residual join too): the
/// packed direct conv ([`conv_packed`]) against Winograd F(2x2, 3x3) ([`winograd_packed`]),
/// interleaved. ResNet-20's at 28x28 input (batch 1 as served, 50 as the search evaluates),
/// ResNet-18's at 224 (batch 1), and off-model shapes that bound [`winograd_wins`]. BENCH
/// keys (and filter names) `wino {name}`: `direct_ms`, `winograd_ms`, `ratio` (direct /
/// Winograd), `routed` (what [`winograd_wins`] picks).
fn winograd_rows(filter: Option<&str>, bench: &mut serde_json::Map<String, serde_json::Value>) {
    // (name, batch, channels in = out, map, residual)
    let shapes: [(&str, usize, usize, usize, bool); 19] = [
        ("r20 16->16 @28", 1, 16, 28, false),
        ("r20 16->16 @28 +res", 1, 16, 28, true),
        ("r20 32->32 @14 +res", 1, 32, 14, true),
        ("r20 64->64 @7 +res", 1, 64, 7, true),
        ("r20 16->16 @28 b50", 50, 16, 28, false),
        ("r20 16->16 @28 +res b50", 50, 16, 28, true),
        ("r20 32->32 @14 +res b50", 50, 32, 14, true),
        ("r20 64->64 @7 +res b50", 50, 64, 7, true),
        ("r18 64->64 @56 +res", 1, 64, 56, true),
        ("r18 128->128 @28 +res", 1, 128, 28, true),
        ("r18 256->256 @14 +res", 1, 256, 14, true),
        ("r18 512->512 @7 +res", 1, 512, 7, true),
        ("8->8 @28 b50", 50, 8, 28, false),
        ("8->8 @14 b50", 50, 8, 14, false),
        ("16->16 @7 b50", 50, 16, 7, false),
        ("32->32 @7 b50", 50, 32, 7, false),
        ("64->64 @4 b50", 50, 64, 4, false),
        ("128->128 @7 b50", 50, 128, 7, false),
        ("16->16 @14 b1", 1, 16, 14, false),
    ];
    println!();
    println!(
        "one thread; CPU-time medians (wall in brackets), ms; stride-1 3x3 pad 1, bias + ReLU"
    );
    println!("| conv (batch 1 unless bN) | packed direct | Winograd F(2,3) | direct / Winograd | routed |");
    println!("|---|---|---|---|---|");
    for (name, n, c, hw, residual) in shapes {
        if filter.is_some_and(|f| !format!("wino {name}").contains(f)) {
            continue;
        }
        let p = Conv2dParams::new(1, 1);
        let x = Tensor::randn(0f32, 1f32, (n, c, hw, hw), &Device::Cpu).unwrap();
        let w = (Tensor::randn(0f32, 1f32, (c, c, 3, 3), &Device::Cpu).unwrap()
            * (1.0 / ((c * 9) as f64).sqrt()))
        .unwrap();
        let b = Tensor::randn(0f32, 1f32, c, &Device::Cpu).unwrap();
        let res = Tensor::randn(0f32, 1f32, (n, c, hw, hw), &Device::Cpu).unwrap();
        let res = residual.then_some(&res);
        let packed = pack_conv(&w).unwrap();
        let wino = pack_winograd(&w).unwrap();
        let act = Activation::Relu;
        let [direct, winograd] = time_pair(
            || {
                conv_packed(&x, &packed, c, (3, 3), Some(&b), &p, act, res).unwrap();
            },
            || {
                winograd_packed(&x, &wino, c, Some(&b), &p, act, res).unwrap();
            },
            1000.0,
        );
        let ratio = direct.0 / winograd.0;
        let routed = if winograd_wins(c, c, hw, hw) {
            "Winograd"
        } else {
            "direct"
        };
        println!(
            "| {name} | {:.3} ({:.3}) | {:.3} ({:.3}) | {ratio:.2} | {routed} |",
            direct.0, direct.1, winograd.0, winograd.1
        );
        bench.insert(
            format!("wino {name}"),
            serde_json::json!({"direct_ms": direct.0, "winograd_ms": winograd.0, "ratio": ratio,
                "routed": routed}),
        );
    }
}
