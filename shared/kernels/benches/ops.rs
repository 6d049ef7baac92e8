//! Per-op timing, ours vs stock candle 0.11 (CPU, f32). Not a test.
//!
//! `cargo bench -p adaptivenet-kernels --bench ops [-- filter]`
//!
//! For each op: median wall time of repeated runs for ours with 1 thread, ours with 2 threads
//! (FLOP threshold forced to 0), ours under the default policy, and candle (its own default
//! thread count, printed). Ends with one `BENCH {json}` line. Backward passes are seeded by
//! `y.backward()` (a contiguous all-ones output gradient) for ours and candle alike.

use std::time::Instant;

use adaptivenet_kernels::{
    conv2d, conv2d_fused, global_avg_pool, max_pool2d, threads, Activation, Conv2dParams,
};
use candle_core::{Device, Tensor, Var};

fn median_ms(mut f: impl FnMut(), budget_ms: f64, max_runs: usize) -> f64 {
    f(); // warm-up (allocations, buffers, page faults)
    let mut v = Vec::new();
    let start = Instant::now();
    while v.len() < 3 || (start.elapsed().as_secs_f64() * 1e3 < budget_ms && v.len() < max_runs) {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn randn(dims: &[usize], scale: f64) -> Tensor {
    (Tensor::randn(0f32, 1f32, dims, &Device::Cpu).unwrap() * scale).unwrap()
}

struct Row {
    name: String,
    gflop: f64,
    ours1: f64,
    ours2: f64,
    policy: f64,
    policy_threads: usize,
    candle: f64,
}

#[derive(Clone, Copy)]
enum Mode {
    One,
    Two,
    Policy,
}

fn set_mode(m: Mode) -> usize {
    match m {
        Mode::One => {
            threads::set_max_threads(1);
            threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
        }
        Mode::Two => {
            threads::set_max_threads(2);
            threads::set_flop_threshold(0);
        }
        Mode::Policy => {
            threads::set_max_threads(0);
            threads::set_flop_threshold(threads::DEFAULT_FLOP_THRESHOLD);
        }
    }
    threads::current()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn measure(
    rows: &mut Vec<Row>,
    name: String,
    flops: f64,
    budget: f64,
    ours: &mut dyn FnMut(),
    candle: &mut dyn FnMut(),
) {
    // The three thread settings of ours are interleaved run by run (1t, 2t, policy, 1t, ...)
    // so that load from other processes on this shared machine hits them alike.
    let modes = [Mode::One, Mode::Two, Mode::Policy];
    let mut times: [Vec<f64>; 3] = Default::default();
    for m in modes {
        set_mode(m);
        ours(); // warm-up
    }
    let start = Instant::now();
    while times[0].len() < 3
        || (start.elapsed().as_secs_f64() * 1e3 < 3.0 * budget && times[0].len() < 200)
    {
        for (k, m) in modes.into_iter().enumerate() {
            set_mode(m);
            let t = Instant::now();
            ours();
            times[k].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let [t1, t2, tp] = times;
    let (ours1, ours2, policy) = (median(t1), median(t2), median(tp));
    set_mode(Mode::Policy);
    let policy_threads = threads::for_flops(flops as u64);
    // ADAPTIVENET_BENCH_NO_CANDLE=1 skips candle (for profiling ours alone).
    let candle = if std::env::var_os("ADAPTIVENET_BENCH_NO_CANDLE").is_some() {
        f64::NAN
    } else {
        median_ms(&mut *candle, budget, 200)
    };
    let gf = |ms: f64| flops / ms / 1e6;
    println!(
        "{name:<44} {:>8.3} GFLOP | ours 1t {ours1:>9.3} ms {:>6.1} GF/s | 2t {ours2:>9.3} ms {:>6.1} GF/s | policy({policy_threads}t) {policy:>9.3} ms | candle {candle:>9.3} ms {:>6.1} GF/s | x{:.2}",
        flops / 1e9,
        gf(ours1),
        gf(ours2),
        gf(candle),
        candle / policy
    );
    rows.push(Row {
        name,
        gflop: flops / 1e9,
        ours1,
        ours2,
        policy,
        policy_threads,
        candle,
    });
}

struct ConvShape {
    name: &'static str,
    n: usize,
    c: usize,
    o: usize,
    hw: usize,
    k: usize,
    s: usize,
    groups: usize,
}

fn conv_bench(rows: &mut Vec<Row>, cs: &ConvShape, train: bool, filter: &Option<String>) {
    let label = format!(
        "{} {}{}",
        cs.name,
        if train { "fwd+bwd" } else { "fwd" },
        format_args!(" n{}", cs.n)
    );
    if let Some(f) = filter {
        if !label.contains(f.as_str()) {
            return;
        }
    }
    let pad = cs.k / 2;
    let p = Conv2dParams::new(cs.s, pad).with_groups(cs.groups);
    let cg = cs.c / cs.groups;
    let x = randn(&[cs.n, cs.c, cs.hw, cs.hw], 1.0);
    let w = randn(&[cs.o, cg, cs.k, cs.k], 0.1);
    let b = randn(&[cs.o], 0.1);
    let oh = (cs.hw + 2 * pad - cs.k) / cs.s + 1;
    let fwd_flops = 2.0 * (cs.n * cs.o * oh * oh * cg * cs.k * cs.k) as f64;
    let budget = 400.0;
    if !train {
        let mut ours = || {
            conv2d_fused(&x, &w, Some(&b), &p, Activation::Relu).unwrap();
        };
        let mut candle = || {
            x.conv2d(&w, pad, cs.s, 1, cs.groups)
                .unwrap()
                .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
                .unwrap()
                .relu()
                .unwrap();
        };
        measure(rows, label, fwd_flops, budget, &mut ours, &mut candle);
    } else {
        let xv = Var::from_tensor(&x).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let bv = Var::from_tensor(&b).unwrap();
        let mut ours = || {
            let y = conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), &p).unwrap();
            y.backward().unwrap();
        };
        let mut candle = || {
            let y = xv
                .as_tensor()
                .conv2d(wv.as_tensor(), pad, cs.s, 1, cs.groups)
                .unwrap()
                .broadcast_add(&bv.as_tensor().reshape((1, (), 1, 1)).unwrap())
                .unwrap();
            y.backward().unwrap();
        };
        measure(rows, label, 3.0 * fwd_flops, budget, &mut ours, &mut candle);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a substring filter.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let candle_threads = candle_core::utils::get_num_threads();
    println!(
        "# adaptivenet-kernels ops bench: available threads {}, policy: {} (default cap without {}: {}), candle threads {}",
        threads::available(),
        threads::describe(),
        threads::ENV_VAR,
        threads::default_threads(),
        candle_threads
    );
    let mut rows = Vec::new();
    let shapes = [
        // ResNet-18, 224x224, batch 1.
        ConvShape {
            name: "r18 conv1 7x7s2 3->64 @224",
            n: 1,
            c: 3,
            o: 64,
            hw: 224,
            k: 7,
            s: 2,
            groups: 1,
        },
        ConvShape {
            name: "r18 l1 3x3 64->64 @56",
            n: 1,
            c: 64,
            o: 64,
            hw: 56,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "r18 l2 3x3s2 64->128 @56",
            n: 1,
            c: 64,
            o: 128,
            hw: 56,
            k: 3,
            s: 2,
            groups: 1,
        },
        ConvShape {
            name: "r18 l2 1x1s2 64->128 @56",
            n: 1,
            c: 64,
            o: 128,
            hw: 56,
            k: 1,
            s: 2,
            groups: 1,
        },
        ConvShape {
            name: "r18 l2 3x3 128->128 @28",
            n: 1,
            c: 128,
            o: 128,
            hw: 28,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "r18 l3 3x3 256->256 @14",
            n: 1,
            c: 256,
            o: 256,
            hw: 14,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "r18 l4 3x3 512->512 @7",
            n: 1,
            c: 512,
            o: 512,
            hw: 7,
            k: 3,
            s: 1,
            groups: 1,
        },
        // Edge case: small maps, batch 1.
        ConvShape {
            name: "edge 3x3 16->16 @28",
            n: 1,
            c: 16,
            o: 16,
            hw: 28,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "edge 3x3 32->32 @28",
            n: 1,
            c: 32,
            o: 32,
            hw: 28,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "edge 3x3 64->64 @28",
            n: 1,
            c: 64,
            o: 64,
            hw: 28,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "edge 1x1 32->64 @28",
            n: 1,
            c: 32,
            o: 64,
            hw: 28,
            k: 1,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "edge dw3x3 96 @28",
            n: 1,
            c: 96,
            o: 96,
            hw: 28,
            k: 3,
            s: 1,
            groups: 96,
        },
        // ResNet-20 (CIFAR) shapes.
        ConvShape {
            name: "r20 3x3 16->16 @32",
            n: 1,
            c: 16,
            o: 16,
            hw: 32,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "r20 3x3 32->32 @16",
            n: 1,
            c: 32,
            o: 32,
            hw: 16,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "r20 3x3 64->64 @8",
            n: 1,
            c: 64,
            o: 64,
            hw: 8,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "r20 3x3 16->16 @32",
            n: 64,
            c: 16,
            o: 16,
            hw: 32,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "r20 3x3s2 16->32 @32",
            n: 64,
            c: 16,
            o: 32,
            hw: 32,
            k: 3,
            s: 2,
            groups: 1,
        },
        ConvShape {
            name: "r20 3x3 64->64 @8",
            n: 64,
            c: 64,
            o: 64,
            hw: 8,
            k: 3,
            s: 1,
            groups: 1,
        },
    ];
    for cs in &shapes {
        conv_bench(&mut rows, cs, false, &filter);
    }
    let train_shapes = [
        ConvShape {
            name: "r20 3x3 16->16 @32",
            n: 64,
            c: 16,
            o: 16,
            hw: 32,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "r20 3x3 32->32 @16",
            n: 64,
            c: 32,
            o: 32,
            hw: 16,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "r20 3x3 64->64 @8",
            n: 64,
            c: 64,
            o: 64,
            hw: 8,
            k: 3,
            s: 1,
            groups: 1,
        },
        ConvShape {
            name: "dw3x3 96 @28",
            n: 32,
            c: 96,
            o: 96,
            hw: 28,
            k: 3,
            s: 1,
            groups: 96,
        },
    ];
    for cs in &train_shapes {
        conv_bench(&mut rows, cs, true, &filter);
    }

    // Pooling.
    let run_pool = filter
        .as_deref()
        .is_none_or(|f| "maxpool gap".contains(f) || f.contains("pool"));
    if run_pool {
        let x = randn(&[1, 64, 112, 112], 1.0);
        let flops = (64 * 56 * 56 * 9) as f64;
        // candle has no padded max-pool: it runs the same kernel/stride unpadded (55x55 out).
        measure(
            &mut rows,
            "maxpool 3x3s2p1 64@112 fwd n1".into(),
            flops,
            300.0,
            &mut || {
                max_pool2d(&x, (3, 3), (2, 2), (1, 1)).unwrap();
            },
            &mut || {
                x.max_pool2d_with_stride(3, 2).unwrap();
            },
        );
        let x = randn(&[64, 64, 16, 16], 1.0);
        let xv = Var::from_tensor(&x).unwrap();
        measure(
            &mut rows,
            "maxpool 2x2s2 64@16 fwd+bwd n64".into(),
            (64 * 64 * 8 * 8 * 4 * 2) as f64,
            300.0,
            &mut || {
                let y = max_pool2d(xv.as_tensor(), (2, 2), (2, 2), (0, 0)).unwrap();
                y.backward().unwrap();
            },
            &mut || {
                let y = xv.as_tensor().max_pool2d(2).unwrap();
                y.backward().unwrap();
            },
        );
        let x = randn(&[64, 64, 8, 8], 1.0);
        let xv = Var::from_tensor(&x).unwrap();
        measure(
            &mut rows,
            "gap 64@8 fwd+bwd n64".into(),
            (64 * 64 * 64 * 2) as f64,
            300.0,
            &mut || {
                let y = global_avg_pool(xv.as_tensor()).unwrap();
                y.backward().unwrap();
            },
            &mut || {
                let y = xv.as_tensor().mean((2, 3)).unwrap();
                y.backward().unwrap();
            },
        );
    }
    set_mode(Mode::Policy);

    let mut json = format!(
        "{{\"policy\":\"{}\",\"available_threads\":{},\"candle_threads\":{},\"ops\":[",
        threads::describe(),
        threads::available(),
        candle_threads
    );
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "{{\"op\":\"{}\",\"gflop\":{:.4},\"ours_1t_ms\":{:.4},\"ours_2t_ms\":{:.4},\"ours_policy_ms\":{:.4},\"policy_threads\":{},\"candle_ms\":{:.4},\"speedup_vs_candle\":{:.3}}}",
            r.name, r.gflop, r.ours1, r.ours2, r.policy, r.policy_threads, r.candle, r.candle / r.policy
        ));
    }
    json.push_str("]}");
    println!("BENCH {json}");
}
