//! The packed inference conv ([`conv_packed`], direct, no im2col) against the im2col + GEMM
//! path ([`conv2d_fused`]) on the conv shapes of ResNet-20 (28x28 Fashion-MNIST, the edge's
//! oracle; batch 1 as served and batch 100 as the search evaluates) and ResNet-18 (224,
//! batch 1). Both with bias + ReLU; the packed one also with the residual add it fuses
//! (`+res`), which the im2col path does as a separate add + ReLU pass (`add_relu`).
//!
//! The packed conv is timed twice: forced to its AVX2 kernel ([`conv_packed_on`]) and on
//! the kernel this CPU picks (AVX-512 where it has avx512f), so the two ISAs compare in one
//! run; ResNet-20's convs also at batch 50, the search's evaluation batch.
//!
//! `cargo bench -p adaptivenet-kernels --bench packed [-- filter]`. One thread. The
//! columns run interleaved, run by run, and each run is timed by the thread's CPU clock as
//! well as the wall clock: on a shared machine the CPU time is the steadier figure (a
//! preempted run's wall time counts the other process). Median of at least 9 runs per
//! column. Ends with one line `BENCH {json}` (per row: CPU-time medians in ms, `im2col_ms`,
//! `avx2_ms`, `packed_ms`, and the ratios `ratio` = im2col / packed and `avx2_over_packed`).

use std::time::Instant;

use adaptivenet_kernels::{
    add_relu, conv2d_fused, conv_packed, conv_packed_on, isa, pack_conv, pack_winograd,
    pack_winograd_tile, threads, winograd_packed_on, winograd_wins, Activation, Conv2dParams, Isa,
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
fn time_cols<const N: usize>(mut cols: [&mut dyn FnMut(); N], budget_ms: f64) -> [(f64, f64); N] {
    cols.iter_mut().for_each(|f| f());
    let mut t: [(Vec<f64>, Vec<f64>); N] = std::array::from_fn(|_| (Vec::new(), Vec::new()));
    let start = Instant::now();
    while t[0].0.len() < 9
        || (start.elapsed().as_secs_f64() * 1e3 < budget_ms && t[0].0.len() < 200)
    {
        for (f, col) in cols.iter_mut().zip(t.iter_mut()) {
            let (c0, w0) = (cpu_ms(), Instant::now());
            f();
            col.0.push(cpu_ms() - c0);
            col.1.push(w0.elapsed().as_secs_f64() * 1e3);
        }
    }
    t.map(|(c, w)| (median(c), median(w)))
}

fn main() {
    threads::set_max_threads(1);
    // As the binaries do: freed outputs are reused, not unmapped, so the batch-50 rows time
    // the kernels rather than the page faults of a fresh multi-MB output per call.
    adaptivenet_kernels::alloc::retain_freed_memory();
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
        sh("r20 3x3/2 32->64 @14", 1, 32, 64, 14, 3, 2, false),
        sh("r20 3x3 64->64 @7 +res", 1, 64, 64, 7, 3, 1, true),
        sh("r20 1x1/2 16->32 @28", 1, 16, 32, 28, 1, 2, false),
        sh("r20 3x3 16->16 @28 +res b100", 100, 16, 16, 28, 3, 1, true),
        sh("r20 3x3/2 32->64 @14 b100", 100, 32, 64, 14, 3, 2, false),
        sh("r20 3x3 64->64 @7 +res b100", 100, 64, 64, 7, 3, 1, true),
        sh("r20 3x3 16->16 @28 +res b50", 50, 16, 16, 28, 3, 1, true),
        sh("r20 3x3/2 16->32 @28 b50", 50, 16, 32, 28, 3, 2, false),
        sh("r20 3x3 32->32 @14 +res b50", 50, 32, 32, 14, 3, 1, true),
        sh("r20 3x3/2 32->64 @14 b50", 50, 32, 64, 14, 3, 2, false),
        sh("r20 3x3 64->64 @7 +res b50", 50, 64, 64, 7, 3, 1, true),
        sh("r20 1x1/2 16->32 @28 b50", 50, 16, 32, 28, 1, 2, false),
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
    // The AVX2 column is the direct conv forced to its AVX2 kernel (`conv_packed_on`), the
    // packed column the kernel this CPU picks (AVX-512 where it has it), same process.
    let avx2 = isa() >= Isa::Avx2;
    println!(
        "one thread; CPU-time medians (wall in brackets), ms; im2col = conv2d_fused (+ add_relu for +res); CPU runs {:?}",
        isa()
    );
    println!("| conv (batch 1 unless bN) | im2col + GEMM | packed AVX2 | packed ({:?}) | im2col / packed | AVX2 / packed |", isa());
    println!("|---|---|---|---|---|---|");
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
        let res = s.residual.then_some(&res);
        let budget = 1500.0;
        let mut im2col = || {
            let act = if res.is_some() {
                Activation::None
            } else {
                Activation::Relu
            };
            let y = conv2d_fused(&x, &w, Some(&b), &p, act).unwrap();
            if let Some(r) = res {
                add_relu(&y, r).unwrap();
            }
        };
        let packed_at = |level: Option<Isa>| {
            let k = (s.k, s.k);
            let act = Activation::Relu;
            match level {
                Some(l) => conv_packed_on(l, &x, &packed, s.o, k, Some(&b), &p, act, res),
                None => conv_packed(&x, &packed, s.o, k, Some(&b), &p, act, res),
            }
            .unwrap();
        };
        let mut old = || {
            if avx2 {
                packed_at(Some(Isa::Avx2))
            }
        };
        let mut new = || packed_at(None);
        let [im2col, old, direct] = time_cols([&mut im2col, &mut old, &mut new], budget);
        println!(
            "| {} | {:.3} ({:.3}) | {:.3} ({:.3}) | {:.3} ({:.3}) | {:.2} | {:.2} |",
            s.name,
            im2col.0,
            im2col.1,
            old.0,
            old.1,
            direct.0,
            direct.1,
            im2col.0 / direct.0,
            old.0 / direct.0
        );
        bench.insert(
            s.name.to_string(),
            serde_json::json!({"im2col_ms": im2col.0, "packed_ms": direct.0,
                "ratio": im2col.0 / direct.0, "avx2_ms": old.0,
                "avx2_over_packed": old.0 / direct.0}),
        );
    }
    winograd_rows(filter.as_deref(), &mut bench);
    println!("BENCH {}", serde_json::Value::Object(bench));
}

/// The stride-1 3x3 convs (pad 1, bias, fused ReLU, `+res` the residual join too): the
/// packed direct conv ([`conv_packed_on`]) against Winograd F(2x2, 3x3)
/// ([`winograd_packed_on`]), at this CPU's widest level and at AVX2, and F(4x4, 3x3)
/// ([`pack_winograd_tile`]) at the widest level, the five interleaved. ResNet-20's at 28x28 input (batch 1 as served, 50 as the search evaluates),
/// ResNet-18's at 224 (batch 1), and off-model shapes that bound [`winograd_wins`]. BENCH
/// keys (and filter names) `wino {name}`: `direct_ms`, `winograd_ms`, `ratio` (direct /
/// Winograd), the same at AVX2 (`avx2_direct_ms`, `avx2_winograd_ms`, `avx2_ratio`: the
/// same kernels again when the CPU's widest level is AVX2), `f4_ms` and `f2_over_f4` (F(2x2)
/// / F(4x4) at the widest level) and `routed` (what [`winograd_wins`] picks).
fn winograd_rows(filter: Option<&str>, bench: &mut serde_json::Map<String, serde_json::Value>) {
    // (name, batch, channels in, out, map, residual)
    let shapes: [(&str, usize, usize, usize, usize, bool); 27] = [
        ("r20 16->16 @28", 1, 16, 16, 28, false),
        ("r20 16->16 @28 +res", 1, 16, 16, 28, true),
        ("r20 32->32 @14 +res", 1, 32, 32, 14, true),
        ("r20 64->64 @7 +res", 1, 64, 64, 7, true),
        ("r20 16->16 @28 b50", 50, 16, 16, 28, false),
        ("r20 16->16 @28 +res b50", 50, 16, 16, 28, true),
        ("r20 32->32 @14 +res b50", 50, 32, 32, 14, true),
        ("r20 64->64 @7 +res b50", 50, 64, 64, 7, true),
        ("r18 64->64 @56 +res", 1, 64, 64, 56, true),
        ("r18 128->128 @28 +res", 1, 128, 128, 28, true),
        ("r18 256->256 @14 +res", 1, 256, 256, 14, true),
        ("r18 512->512 @7 +res", 1, 512, 512, 7, true),
        ("8->8 @28 b50", 50, 8, 8, 28, false),
        ("8->8 @14 b50", 50, 8, 8, 14, false),
        ("16->16 @7 b50", 50, 16, 16, 7, false),
        ("32->32 @7 b50", 50, 32, 32, 7, false),
        ("64->64 @4 b50", 50, 64, 64, 4, false),
        ("128->128 @7 b50", 50, 128, 128, 7, false),
        ("16->16 @14 b1", 1, 16, 16, 14, false),
        ("r20 16->16 @28 b16", 16, 16, 16, 28, false),
        ("16->16 @14 b16", 16, 16, 16, 14, false),
        // The pruned ResNet-20 blocks the search evaluates (inner widths 0.8 and 0.6).
        ("r20 16->13 @28 b100", 100, 16, 13, 28, false),
        ("r20 13->16 @28 +res b100", 100, 13, 16, 28, true),
        ("r20 16->10 @28 b100", 100, 16, 10, 28, false),
        ("r20 10->16 @28 +res b100", 100, 10, 16, 28, true),
        ("r20 32->26 @14 b100", 100, 32, 26, 14, false),
        ("r20 64->38 @7 b100", 100, 64, 38, 7, false),
    ];
    println!();
    println!(
        "one thread; CPU-time medians (wall in brackets), ms; stride-1 3x3 pad 1, bias + ReLU; \
         both at {:?}, then both at AVX2",
        isa()
    );
    println!("| conv (batch 1 unless bN) | packed direct | Winograd F(2,3) | direct / Winograd | Winograd F(4,3) | F(2,3) / F(4,3) | AVX2 direct | AVX2 Winograd | AVX2 ratio | routed |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, n, c, o, hw, residual) in shapes {
        if filter.is_some_and(|f| !format!("wino {name}").contains(f)) {
            continue;
        }
        let p = Conv2dParams::new(1, 1);
        let x = Tensor::randn(0f32, 1f32, (n, c, hw, hw), &Device::Cpu).unwrap();
        let w = (Tensor::randn(0f32, 1f32, (o, c, 3, 3), &Device::Cpu).unwrap()
            * (1.0 / ((c * 9) as f64).sqrt()))
        .unwrap();
        let b = Tensor::randn(0f32, 1f32, o, &Device::Cpu).unwrap();
        let res = Tensor::randn(0f32, 1f32, (n, o, hw, hw), &Device::Cpu).unwrap();
        let res = residual.then_some(&res);
        let packed = pack_conv(&w).unwrap();
        let wino = pack_winograd(&w).unwrap();
        let wino4 = pack_winograd_tile(&w, 4).unwrap();
        let act = Activation::Relu;
        let avx2 = Isa::Avx2.min(isa());
        let (x, b, packed, wino, wino4, p) = (&x, &b, &packed, &wino, &wino4, &p);
        let d = |level: Isa| {
            move || {
                conv_packed_on(level, x, packed, o, (3, 3), Some(b), p, act, res).unwrap();
            }
        };
        let wg = |level: Isa| {
            move || {
                winograd_packed_on(level, x, wino, o, Some(b), p, act, res).unwrap();
            }
        };
        let mut w4 = || {
            winograd_packed_on(isa(), x, wino4, o, Some(b), p, act, res).unwrap();
        };
        let (mut d1, mut w1, mut d2c, mut w2c) = (d(isa()), wg(isa()), d(avx2), wg(avx2));
        let [direct, winograd, f4, d2, w2] =
            time_cols([&mut d1, &mut w1, &mut w4, &mut d2c, &mut w2c], 1000.0);
        let f2_over_f4 = winograd.0 / f4.0;
        let ratio = direct.0 / winograd.0;
        let ratio2 = d2.0 / w2.0;
        let routed = if winograd_wins(n, c, o, hw, hw) {
            "Winograd"
        } else {
            "direct"
        };
        println!(
            "| {name} | {:.3} ({:.3}) | {:.3} ({:.3}) | {ratio:.2} | {:.3} ({:.3}) | {f2_over_f4:.2} | {:.3} | {:.3} | {ratio2:.2} | {routed} |",
            direct.0, direct.1, winograd.0, winograd.1, f4.0, f4.1, d2.0, w2.0
        );
        bench.insert(
            format!("wino {name}"),
            serde_json::json!({"direct_ms": direct.0, "winograd_ms": winograd.0, "ratio": ratio,
                "avx2_direct_ms": d2.0, "avx2_winograd_ms": w2.0, "avx2_ratio": ratio2,
                "f4_ms": f4.0, "f2_over_f4": f2_over_f4,
                "routed": routed}),
        );
    }
}
