//! Whole-model benchmark (issue 3): `cargo bench --bench kernels`.
//!
//! Side by side in one run, on the same weights: stock candle ops (`ops::set_stock_candle`),
//! our kernels (unfolded BN), our kernels with BN folded (inference rows), and, when
//! `$BENCH_PYTHON` (default `python3`) has `torch` and/or `onnxruntime`, PyTorch CPU and ONNX
//! Runtime through `benches/kernels_peers.py` (which also checks its logits against ours).
//!
//! Protocol: per row, warm-up runs of every column, then interleaved rounds (each round runs
//! every column [`BURST`] times in a row, the order rotating), at least [`MIN_RUNS`] timed runs per column (more
//! for fast models, up to a time budget); min / median / max in ms. The thread cap of the
//! kernels crate (`adaptivenet_kernels::threads::current`) is recorded and given to candle
//! (`CANDLE_NUM_THREADS`), PyTorch and ONNX Runtime. Only the stock-candle columns of the two
//! slowest rows (EfficientNet-Lite0 and the training step, seconds per run) may drop below
//! [`MIN_RUNS`] to keep the whole run within a few minutes: their `n` is printed.
//!
//! Environment: `BENCH_PYTHON` (peers' interpreter; `none` skips them), `ADAPTIVENET_THREADS`
//! (thread cap), `KBENCH_SCALE` (multiplies the time budgets, e.g. `0.2` for a smoke run),
//! `KBENCH_ONLY` (comma-separated row keys: `resnet18,oracle,mobilenet_v2,mobilenet_v2_224,
//! mobilenet_v2_100_96,mobilenet_v2_050_224,lite0,lite0_64,mobilenet_v2_2t,lite0_2t,train_step,dw`;
//! the `_2t` rows run the folded model and the peers at 2 threads),
//! `KBENCH_NO_STOCK=1` (skip the stock-candle columns, e.g. under a profiler),
//! `KBENCH_LAYERS=1` (per inference row, also the folded model's stem, every block and the
//! head timed alone: CPU-time medians, to find the layers that lag a peer's profile),
//! `KBENCH_DIR=path` (write the peers' model files there and keep them, e.g. to profile ONNX
//! Runtime per node on the very same graphs; default: a temporary directory),
//! `KBENCH_GLIBC_ALLOC=1` (leave glibc's allocator at its defaults instead of
//! `adaptivenet_kernels::alloc::retain_freed_memory`, which the binaries call: for A/B runs;
//! `"retain_freed_memory"` in the BENCH line says which ran).
//!
//! Every run is also timed by the process's CPU clock (here and in the peers' script). On a
//! shared host other processes' time slices land in the wall-clock times of whichever side
//! runs while they do (ours and the peers run one after the other, not interleaved: each
//! inference row's peers right after it, in one short stretch of the host's load), so the
//! 1-thread rows also print the folded / ONNX Runtime ratio of the CPU-time medians, the
//! steadier figure there (`{key}_folded_cpu_ms`, `{key}_ort_cpu_ms`, `{key}_ratio_ort_cpu`).
//!
//! Ends with one line `BENCH {json}` (medians in ms, `null` where a column did not run).
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use adaptivenet_core::model::{
    block_forward, head_forward, ops, stem_forward, ArchDescriptor, Model, Params, TrainCtx,
};
use candle_core::{Device, Tensor, Var};
use serde_json::{json, Value};

const MIN_RUNS: usize = 20;
const MAX_RUNS: usize = 300;
/// Floor for the stock-candle columns of the slow rows.
const MIN_RUNS_SLOW: usize = 5;
/// Consecutive runs of one column per round (the peers' script runs the same bursts): a
/// model served back to back finds its weights where its last request left them, and a
/// column run right after another model's (4x the memory traffic for the unfolded one)
/// would not. The median is a warm run's as long as bursts are longer than 2.
const BURST: usize = 5;

type Res<T> = anyhow::Result<T>;

#[derive(Clone, Debug)]
struct Stats {
    ms: Vec<f64>,
    /// Process CPU time of each run (ms; empty where not recorded).
    cpu: Vec<f64>,
}

impl Stats {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    fn min(&self) -> f64 {
        self.sorted()[0]
    }
    fn max(&self) -> f64 {
        *self.sorted().last().unwrap()
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    /// Median process CPU time per run, if recorded.
    fn cpu_median(&self) -> Option<f64> {
        let mut v = self.cpu.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }
    fn from_json(v: &Value) -> Option<Stats> {
        let list = |k: &str| -> Vec<f64> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        let (ms, cpu) = (list("ms"), list("cpu_ms"));
        (!ms.is_empty()).then_some(Stats { ms, cpu })
    }
}

/// One column of a row: a closure timed run by run under a backend.
struct Col<'a> {
    name: &'static str,
    stock: bool,
    /// May drop below `MIN_RUNS` (stock columns of the slow rows).
    slow_ok: bool,
    run: Box<dyn FnMut() -> Res<()> + 'a>,
}

fn scale() -> f64 {
    std::env::var("KBENCH_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0)
}

/// CPU time of the whole process (all threads), ms.
fn process_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_PROCESS_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}

/// One run: (wall ms, process CPU ms).
fn time_one(c: &mut Col) -> Res<(f64, f64)> {
    ops::set_stock_candle(c.stock);
    let (t, c0) = (Instant::now(), process_cpu_ms());
    (c.run)()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let cpu = process_cpu_ms() - c0;
    ops::set_stock_candle(false);
    Ok((ms, cpu))
}

/// Warm-up, then interleaved timed rounds. `budget_s`: time per column aimed at.
fn bench_row(cols: &mut [Col], warmup: usize, budget_s: f64) -> Res<Vec<Stats>> {
    let budget_ms = budget_s * scale() * 1e3;
    let mut est = Vec::new();
    for c in cols.iter_mut() {
        let mut last = f64::INFINITY;
        for _ in 0..warmup.max(1) {
            last = last.min(time_one(c)?.0);
        }
        est.push(last);
    }
    let runs: Vec<usize> = cols
        .iter()
        .zip(&est)
        .map(|(c, &t)| {
            let n = (budget_ms / t) as usize;
            if c.slow_ok {
                n.clamp(MIN_RUNS_SLOW, MAX_RUNS)
            } else {
                n.clamp(MIN_RUNS, MAX_RUNS)
            }
        })
        .collect();
    let rounds = runs.iter().max().unwrap().div_ceil(BURST);
    let mut out = vec![
        Stats {
            ms: Vec::new(),
            cpu: Vec::new(),
        };
        cols.len()
    ];
    let k = cols.len();
    for r in 0..rounds {
        for j in 0..k {
            let i = (j + r) % k;
            for _ in 0..BURST {
                if out[i].ms.len() < runs[i] {
                    let (ms, cpu) = time_one(&mut cols[i])?;
                    out[i].ms.push(ms);
                    out[i].cpu.push(cpu);
                }
            }
        }
    }
    Ok(out)
}

fn arch(json: &str) -> Res<ArchDescriptor> {
    Ok(ArchDescriptor::from_json(json.as_bytes())?)
}

fn rand_tensor(shape: &[usize], seed: u64) -> Res<Tensor> {
    // Deterministic pseudo-random values in [-1, 1) (xorshift; no rand dependency here).
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Replaces identity BN statistics by random ones (folding then changes the weights, as with
/// trained models).
fn perturb_bn(m: &mut Model, seed: u64) -> Res<()> {
    let mut k = seed;
    let mut f = |p: &mut Params| -> Res<()> {
        for (name, t) in p.iter_mut() {
            if !(name.contains("bn") || name.starts_with("downsample.1")) {
                continue;
            }
            k += 1;
            let r = rand_tensor(t.dims(), k)?;
            *t = if name.ends_with("running_var") || name.ends_with(".weight") {
                ((r * 0.5)? + 1.0)?
            } else {
                (r * 0.1)?
            };
        }
        Ok(())
    };
    f(&mut m.stem)?;
    for b in &mut m.blocks {
        f(b)?;
    }
    f(&mut m.head)
}

/// One trainable module: its params as `Var`s.
struct TrainModule {
    vars: BTreeMap<String, Var>,
}

impl TrainModule {
    fn new(p: &Params) -> Res<Self> {
        let vars = p
            .iter()
            .map(|(n, t)| Ok((n.clone(), Var::from_tensor(&t.copy()?)?)))
            .collect::<Res<_>>()?;
        Ok(Self { vars })
    }
    fn params(&self) -> Params {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }
}

/// A ResNet-style model being trained with plain SGD (forward in train mode + CE + backward
/// + update of every parameter and of the BN running statistics).
struct Trainer {
    model: Model,
    stem: TrainModule,
    blocks: Vec<TrainModule>,
    head: TrainModule,
    lr: f64,
}

impl Trainer {
    fn new(model: &Model, lr: f64) -> Res<Self> {
        Ok(Self {
            model: model.clone(),
            stem: TrainModule::new(&model.stem)?,
            blocks: model
                .blocks
                .iter()
                .map(TrainModule::new)
                .collect::<Res<_>>()?,
            head: TrainModule::new(&model.head)?,
            lr,
        })
    }

    fn step(&mut self, x: &Tensor, labels: &Tensor) -> Res<f32> {
        let spec = &self.model.spec;
        let num = &spec.numerics;
        let mut ctxs: Vec<TrainCtx> = (0..self.blocks.len() + 2)
            .map(|_| TrainCtx::new(0.1))
            .collect();
        let mut h = stem_forward(&spec.stem, num, &self.stem.params(), x, Some(&mut ctxs[0]))?;
        for (i, (b, m)) in spec.blocks.iter().zip(&self.blocks).enumerate() {
            h = block_forward(b, num, &m.params(), &h, Some(&mut ctxs[i + 1]))?;
        }
        let last = ctxs.len() - 1;
        let logits = head_forward(
            &spec.head,
            num,
            &self.head.params(),
            &h,
            Some(&mut ctxs[last]),
        )?;
        let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
        let grads = loss.backward()?;
        let modules = std::iter::once(&self.stem)
            .chain(&self.blocks)
            .chain(std::iter::once(&self.head));
        for (m, ctx) in modules.zip(ctxs) {
            for v in m.vars.values() {
                if let Some(g) = grads.get(v.as_tensor()) {
                    v.set(&(v.as_tensor() - (g * self.lr)?)?)?;
                }
            }
            for (bn, mean, var) in ctx.bn_updates {
                m.vars[&format!("{bn}.running_mean")].set(&mean)?;
                m.vars[&format!("{bn}.running_var")].set(&var)?;
            }
        }
        Ok(loss.to_scalar::<f32>()?)
    }
}

struct Row {
    key: &'static str,
    label: &'static str,
    /// stock, ours, ours folded (None = not run).
    stats: [Option<Stats>; 3],
}

/// One inference row of the table.
struct Infer {
    key: &'static str,
    label: &'static str,
    arch_json: &'static str,
    input: [usize; 4],
    budget_s: f64,
    slow_stock: bool,
    /// Thread cap for this row (the kernels crate's and the peers'); `None`: the bench's.
    /// Rows with their own cap time only the folded (deployed) column against the peers.
    threads: Option<usize>,
}

fn infer_row(r: &Infer, peers_dir: &Path) -> Res<Row> {
    let prev = adaptivenet_kernels::threads::max_threads();
    if let Some(t) = r.threads {
        adaptivenet_kernels::threads::set_max_threads(t);
    }
    let row = infer_row_at(r, peers_dir);
    adaptivenet_kernels::threads::set_max_threads(prev);
    row
}

fn infer_row_at(r: &Infer, peers_dir: &Path) -> Res<Row> {
    let (key, label, input, budget_s, slow_stock) =
        (r.key, r.label, r.input, r.budget_s, r.slow_stock);
    let mut m = Model::init(&arch(r.arch_json)?.spec, 42)?;
    perturb_bn(&mut m, 7)?;
    let folded = m.folded()?;
    let x = rand_tensor(&input, 3)?;
    // Check the columns agree before timing them (and hand the logits to the peers).
    let logits = m.forward(&x)?;
    let diff_fold = (&logits - folded.forward(&x)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    ops::set_stock_candle(true);
    let stock_logits = m.forward(&x);
    ops::set_stock_candle(false);
    let diff_stock = (&logits - stock_logits?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    // At this row's input size (the spec's own is the family's default, 224 for Lite0).
    let mut at_input = m.spec.clone();
    at_input.input = [input[1], input[2], input[3]];
    println!(
        "{label}: {} params, {:.3} GMAC at batch 1; max |ours - stock| = {diff_stock:.2e}, \
         max |ours - folded| = {diff_fold:.2e}",
        m.num_params(),
        at_input.macs() as f64 / 1e9
    );
    m.save(
        &peers_dir.join(format!("{key}.json")),
        &peers_dir.join(format!("{key}.safetensors")),
    )?;
    let check: HashMap<String, Tensor> = [
        ("input".to_string(), x.clone()),
        ("logits".to_string(), logits),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&check, peers_dir.join(format!("{key}.check.safetensors")))?;
    if std::env::var("KBENCH_LAYERS").is_ok_and(|v| v == "1") {
        layer_profile(label, &folded, &x, budget_s)?;
    }

    let mut cols = vec![
        Col {
            name: "stock",
            stock: true,
            slow_ok: slow_stock,
            run: Box::new(|| {
                m.forward(&x)?;
                Ok(())
            }),
        },
        Col {
            name: "ours",
            stock: false,
            slow_ok: false,
            run: Box::new(|| {
                m.forward(&x)?;
                Ok(())
            }),
        },
        Col {
            name: "folded",
            stock: false,
            slow_ok: false,
            run: Box::new(|| {
                folded.forward(&x)?;
                Ok(())
            }),
        },
    ];
    if r.threads.is_some() {
        // Only the folded column: stock / unfolded columns at another thread cap add nothing.
        cols.drain(..2);
        let s = run_cols(&mut cols, 2, budget_s, label)?;
        return Ok(Row {
            key,
            label,
            stats: [None, None, s[0].clone()],
        });
    }
    let stats = run_cols(&mut cols, 2, budget_s, label)?;
    Ok(Row {
        key,
        label,
        stats: [stats[0].clone(), stats[1].clone(), stats[2].clone()],
    })
}

/// `KBENCH_LAYERS=1`: the folded model's stem, each block and the head timed alone on the
/// input it sees in the model (interleaved rounds, process CPU time medians), printed one
/// line per layer with its shape, so a slow layer can be matched against a peer's profile.
fn layer_profile(label: &str, m: &Model, x: &Tensor, budget_s: f64) -> Res<()> {
    let num = &m.spec.numerics;
    let mut inputs = vec![x.clone()];
    let mut h = stem_forward(&m.spec.stem, num, &m.stem, x, None)?;
    for (b, p) in m.spec.blocks.iter().zip(&m.blocks) {
        inputs.push(h.clone());
        h = block_forward(b, num, p, &h, None)?;
    }
    inputs.push(h);
    let nb = m.spec.blocks.len();
    let run = |i: usize| -> Res<()> {
        if i == 0 {
            stem_forward(&m.spec.stem, num, &m.stem, &inputs[0], None)?;
        } else if i <= nb {
            block_forward(
                &m.spec.blocks[i - 1],
                num,
                &m.blocks[i - 1],
                &inputs[i],
                None,
            )?;
        } else {
            head_forward(&m.spec.head, num, &m.head, &inputs[i], None)?;
        }
        Ok(())
    };
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); nb + 2];
    let start = Instant::now();
    let budget = budget_s * scale();
    while times[0].len() < MIN_RUNS
        || (start.elapsed().as_secs_f64() < budget && times[0].len() < 500)
    {
        for (i, t) in times.iter_mut().enumerate() {
            let c0 = process_cpu_ms();
            run(i)?;
            t.push(process_cpu_ms() - c0);
        }
    }
    let med = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{label}: folded layers alone, process CPU ms (median of {})",
        times[0].len()
    );
    let mut total = 0.0;
    for (i, t) in times.iter().enumerate() {
        let what = if i == 0 {
            format!("stem {:?}", inputs[0].dims())
        } else if i <= nb {
            format!(
                "block {} {:?} on {:?}",
                i - 1,
                m.spec.blocks[i - 1],
                inputs[i].dims()
            )
        } else {
            format!("head on {:?}", inputs[i].dims())
        };
        total += med(t);
        println!("  {:>8.4}  {what}", med(t));
    }
    println!("  {total:>8.4}  sum");
    Ok(())
}

/// Whether `KBENCH_NO_STOCK=1` drops the stock-candle columns (profiling our kernels).
fn no_stock() -> bool {
    std::env::var("KBENCH_NO_STOCK").is_ok_and(|v| v == "1")
}

/// Benches `cols` (minus the stock ones under [`no_stock`]) and returns one entry per
/// column of `cols`, `None` for a dropped column.
fn run_cols(
    cols: &mut Vec<Col>,
    warmup: usize,
    budget_s: f64,
    label: &str,
) -> Res<Vec<Option<Stats>>> {
    let keep: Vec<bool> = cols.iter().map(|c| !(c.stock && no_stock())).collect();
    let mut i = 0;
    cols.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    let s = bench_row(cols, warmup, budget_s)?;
    print_progress(label, cols, &s);
    let mut s = s.into_iter();
    Ok(keep
        .iter()
        .map(|&k| if k { s.next() } else { None })
        .collect())
}

fn print_progress(label: &str, cols: &[Col], s: &[Stats]) {
    let parts: Vec<String> = cols
        .iter()
        .zip(s)
        .map(|(c, s)| format!("{} {:.2} ms (n={})", c.name, s.median(), s.ms.len()))
        .collect();
    println!("  {label}: {}", parts.join(", "));
}

fn train_row(budget_s: f64, peers_dir: &Path) -> Res<Row> {
    let json = r#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],
        "widths":[16,32,64],"in_channels":1,"num_classes":10}"#;
    let m = Model::init(&arch(json)?.spec, 42)?;
    m.save(
        &peers_dir.join("train_step.json"),
        &peers_dir.join("train_step.safetensors"),
    )?;
    let x = rand_tensor(&[64, 1, 28, 28], 5)?;
    let labels: Vec<u32> = (0..64u32).map(|i| (i * 7 + 3) % 10).collect();
    let labels = Tensor::new(labels.as_slice(), &Device::Cpu)?;
    let mut stock = Trainer::new(&m, 0.01)?;
    let mut ours = Trainer::new(&m, 0.01)?;
    let mut cols = vec![
        Col {
            name: "stock",
            stock: true,
            slow_ok: true,
            run: Box::new(|| {
                stock.step(&x, &labels)?;
                Ok(())
            }),
        },
        Col {
            name: "ours",
            stock: false,
            slow_ok: false,
            run: Box::new(|| {
                ours.step(&x, &labels)?;
                Ok(())
            }),
        },
    ];
    let s = run_cols(&mut cols, 1, budget_s, "ResNet-20 train step b64")?;
    Ok(Row {
        key: "train_step",
        label: "ResNet-20 28x28 train step b64",
        stats: [s[0].clone(), s[1].clone(), None],
    })
}

/// Depthwise 3x3 forward + backward (x and w grads), 32x96x28x28, kernels crate only (stock
/// candle needs seconds per run here: one conv per group).
fn dw_row(budget_s: f64) -> Res<Row> {
    let x = Var::from_tensor(&rand_tensor(&[32, 96, 28, 28], 9)?)?;
    let w = Var::from_tensor(&(rand_tensor(&[96, 1, 3, 3], 10)? * 0.3)?)?;
    let p = adaptivenet_kernels::Conv2dParams::new(1, 1).with_groups(96);
    let mut cols = vec![Col {
        name: "ours",
        stock: false,
        slow_ok: false,
        run: Box::new(|| {
            let y = adaptivenet_kernels::conv2d(x.as_tensor(), w.as_tensor(), None, &p)?;
            let g = y.sum_all()?.backward()?;
            anyhow::ensure!(g.get(x.as_tensor()).is_some() && g.get(w.as_tensor()).is_some());
            Ok(())
        }),
    }];
    let s = bench_row(&mut cols, 2, budget_s)?;
    print_progress("depthwise fwd+bwd", &cols, &s);
    Ok(Row {
        key: "dw",
        label: "depthwise 3x3 fwd+bwd 32x96x28x28",
        stats: [None, s.into_iter().next(), None],
    })
}

/// Runs the peers' script; `None` if the interpreter or the script failed.
fn run_peers(dir: &Path, cfg: &Value) -> Option<Value> {
    let py = std::env::var("BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    if py == "none" || py.is_empty() {
        println!("peers: skipped (BENCH_PYTHON=none)");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/kernels_peers.py");
    let cfg_path = dir.join("peers.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(cfg).ok()?).ok()?;
    println!("peers: {py} {} ...", script.display());
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg(&cfg_path)
        .stderr(std::process::Stdio::inherit())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            println!("peers: cannot run {py}: {e}");
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    for l in stdout.lines().filter(|l| !l.starts_with("PEERS ")) {
        println!("  [peers] {l}");
    }
    if !out.status.success() {
        println!("peers: {py} exited with {}", out.status);
    }
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("PEERS "))
        .and_then(|j| serde_json::from_str(j).ok())
}

/// Merges one peers' run into the results so far: the per-key maps of each peer (and the
/// checks) are unions; versions and threads are the latest run's.
fn merge_peers(acc: &mut Option<Value>, run: Option<Value>) {
    let Some(run) = run else { return };
    let Some(Value::Object(a)) = acc.as_mut() else {
        *acc = Some(run);
        return;
    };
    let Value::Object(r) = run else { return };
    for (k, v) in r {
        if let (Some(Value::Object(old)), Value::Object(new)) = (a.get_mut(&k), &v) {
            old.extend(new.clone());
        } else if !v.is_null() || !a.contains_key(&k) {
            a.insert(k, v);
        }
    }
}

fn peer(peers: &Option<Value>, which: &str, key: &str) -> Option<Stats> {
    peers
        .as_ref()?
        .get(which)?
        .get(key)
        .and_then(Stats::from_json)
}

fn fmt_stats(s: &Option<Stats>) -> String {
    match s {
        Some(s) => format!(
            "{:>9.2} {:>9.2} {:>9.2} {:>4}",
            s.min(),
            s.median(),
            s.max(),
            s.ms.len()
        ),
        None => format!("{:>9} {:>9} {:>9} {:>4}", "-", "-", "-", "-"),
    }
}

fn ratio(a: &Option<Stats>, b: &Option<Stats>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a.median() / b.median()),
        _ => "-".into(),
    }
}

fn med(s: &Option<Stats>) -> Value {
    s.as_ref().map_or(Value::Null, |s| {
        json!((s.median() * 1000.0).round() / 1000.0)
    })
}

fn main() -> Res<()> {
    // As the binaries do: freed feature maps are reused, not unmapped and faulted in again.
    let retain = std::env::var("KBENCH_GLIBC_ALLOC").map_or(true, |v| v != "1")
        && adaptivenet_kernels::alloc::retain_freed_memory();
    // Candle reads its thread count per op (from /proc/cpuinfo unless set): give it ours.
    let threads = adaptivenet_kernels::threads::current();
    // Size rayon's global pool (the kernels crate's) first, from the hardware; then candle's
    // per-op thread count: `CANDLE_NUM_THREADS` (its barrier pool) and `RAYON_NUM_THREADS`
    // (read by candle 0.11.1's `utils::get_num_threads` per matmul/conv, which otherwise
    // parses /proc/cpuinfo on each call).
    let _ = adaptivenet_kernels::threads::available();
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let started = Instant::now();
    println!(
        "adaptivenet whole-model benchmark: {} (CANDLE_NUM_THREADS=RAYON_NUM_THREADS={threads}), {} hardware \
         threads",
        adaptivenet_kernels::threads::describe(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let tmp = tempfile::tempdir()?;
    let kept = std::env::var_os("KBENCH_DIR").map(std::path::PathBuf::from);
    if let Some(k) = &kept {
        std::fs::create_dir_all(k)?;
    }
    let dir = kept.as_deref().unwrap_or(tmp.path());
    let resnet18 =
        r#"{"family":"torchvision.resnet","block":"basic","layers":[2,2,2,2],"num_classes":1000}"#;
    let oracle = r#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],
        "widths":[16,32,64],"in_channels":1,"num_classes":10}"#;
    let mbv2 = r#"{"family":"torchvision.mobilenet_v2","width_mult":0.5,"num_classes":10}"#;
    let lite0 = r#"{"family":"efficientnet_lite","variant":"lite0"}"#;
    // `KBENCH_ONLY=oracle,train_step` runs only those rows (profiling); default: all.
    let only: Option<Vec<String>> = std::env::var("KBENCH_ONLY")
        .ok()
        .map(|s| s.split(',').map(|k| k.trim().to_string()).collect());
    let want = |k: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == k));
    let mbv2_100 = r#"{"family":"torchvision.mobilenet_v2","width_mult":1.0,"num_classes":1000}"#;
    let mbv2_050_1k =
        r#"{"family":"torchvision.mobilenet_v2","width_mult":0.5,"num_classes":1000}"#;
    let row = |key, label, arch_json, input, budget_s, slow_stock, threads| Infer {
        key,
        label,
        arch_json,
        input,
        budget_s,
        slow_stock,
        threads,
    };
    let (in224, in96, in64) = ([1, 3, 224, 224], [1, 3, 96, 96], [1, 3, 64, 64]);
    let infer = [
        row(
            "resnet18",
            "ResNet-18 224 b1",
            resnet18,
            in224,
            4.0,
            false,
            None,
        ),
        row(
            "oracle",
            "ResNet-20 (oracle) 28x28 b1",
            oracle,
            [1, 1, 28, 28],
            1.5,
            false,
            None,
        ),
        row(
            "mobilenet_v2",
            "MobileNetV2 0.5 96x96 b1",
            mbv2,
            in96,
            2.0,
            false,
            None,
        ),
        row(
            "mobilenet_v2_224",
            "MobileNetV2 1.0 224 b1",
            mbv2_100,
            in224,
            4.0,
            true,
            None,
        ),
        row(
            "mobilenet_v2_100_96",
            "MobileNetV2 1.0 96x96 b1",
            mbv2_100,
            in96,
            2.0,
            true,
            None,
        ),
        row(
            "mobilenet_v2_050_224",
            "MobileNetV2 0.5 224 b1",
            mbv2_050_1k,
            in224,
            3.0,
            true,
            None,
        ),
        row(
            "lite0",
            "EfficientNet-Lite0 224 b1",
            lite0,
            in224,
            4.0,
            true,
            None,
        ),
        row(
            "lite0_64",
            "EfficientNet-Lite0 64x64 b1",
            lite0,
            in64,
            2.0,
            true,
            None,
        ),
        row(
            "mobilenet_v2_2t",
            "MobileNetV2 0.5 96x96 b1 2 threads",
            mbv2,
            in96,
            2.0,
            true,
            Some(2),
        ),
        row(
            "lite0_2t",
            "EfficientNet-Lite0 224 b1 2 threads",
            lite0,
            in224,
            4.0,
            true,
            Some(2),
        ),
    ];
    let mut rows = Vec::new();
    let mut row_threads = HashMap::new();
    // Each inference row's peers run right after it, so both sides are timed in the same
    // stretch of a shared host's load (a whole-bench pass apart, the same model's times
    // moved up to 2x between stretches on the 2-vCPU VM).
    let mut peers: Option<Value> = None;
    for r in &infer {
        if want(r.key) {
            let row = infer_row(r, dir)?;
            let t = r.threads.unwrap_or(threads);
            if row.stats[2].is_some() {
                let runs = row.stats[1]
                    .as_ref()
                    .or(row.stats[2].as_ref())
                    .map_or(MIN_RUNS, |s| s.ms.len().clamp(MIN_RUNS, 100));
                let cfg = json!({"threads": threads, "dir": dir, "warmup": 2,
                    "models": [{"key": r.key, "runs": runs, "threads": t}]});
                merge_peers(&mut peers, run_peers(dir, &cfg));
            }
            rows.push(row);
            row_threads.insert(r.key, t);
        }
    }
    if want("train_step") {
        rows.push(train_row(20.0, dir)?);
    }
    if want("dw") {
        rows.push(dw_row(3.0)?);
    }
    let rust_s = started.elapsed().as_secs_f64();

    let runs_of = |key: &str| -> usize {
        rows.iter()
            .find(|r| r.key == key)
            .and_then(|r| r.stats[1].as_ref().or(r.stats[2].as_ref()))
            .map_or(MIN_RUNS, |s| s.ms.len().clamp(MIN_RUNS, 100))
    };
    let has = |k: &str| rows.iter().any(|r| r.key == k);
    if has("train_step") || has("dw") || peers.is_none() {
        let cfg = json!({
            "threads": threads,
            "dir": dir,
            "warmup": 2,
            "models": [],
            "train": has("train_step").then(|| json!(
                {"key": "train_step", "batch": 64, "runs": runs_of("train_step"), "lr": 0.01})),
            "dw": has("dw").then(|| json!({"shape": [32, 96, 28, 28], "runs": runs_of("dw")})),
        });
        merge_peers(&mut peers, run_peers(dir, &cfg));
    }
    let peer_names = |which: &str| -> String {
        peers
            .as_ref()
            .and_then(|p| p.get("versions"))
            .and_then(|v| v.get(which))
            .and_then(Value::as_str)
            .map_or("not available".into(), str::to_string)
    };
    println!(
        "peers: torch {}, onnxruntime {}",
        peer_names("torch"),
        peer_names("onnxruntime")
    );

    println!();
    println!(
        "threads: ours {threads} ({}), candle CANDLE_NUM_THREADS={threads}, torch/ORT {}; \
         times in ms (min / median / max / n runs)",
        adaptivenet_kernels::threads::describe(),
        peers
            .as_ref()
            .and_then(|p| p.get("threads"))
            .map_or("-".into(), |t| t.to_string()),
    );
    println!(
        "{:<36} {:<12} {:>9} {:>9} {:>9} {:>4}",
        "row", "column", "min", "median", "max", "n"
    );
    let mut bench = serde_json::Map::new();
    for r in &rows {
        let torch = peer(&peers, "torch", r.key);
        let ort = peer(&peers, "ort", r.key);
        let cols = [
            ("stock candle", &r.stats[0]),
            ("ours", &r.stats[1]),
            ("ours folded", &r.stats[2]),
            ("onnxruntime", &ort),
            ("pytorch", &torch),
        ];
        for (name, s) in cols {
            if s.is_none() && name != "onnxruntime" && name != "pytorch" {
                continue;
            }
            println!("{:<36} {:<12} {}", r.label, name, fmt_stats(s));
        }
        println!(
            "{:<36} ratios (median): ours/stock {}  folded/stock {}  ours/ORT {}  folded/ORT {}  \
             ours/torch {}  folded/torch {}",
            "",
            ratio(&r.stats[1], &r.stats[0]),
            ratio(&r.stats[2], &r.stats[0]),
            ratio(&r.stats[1], &ort),
            ratio(&r.stats[2], &ort),
            ratio(&r.stats[1], &torch),
            ratio(&r.stats[2], &torch),
        );
        let k = r.key;
        // Rows at their own thread cap report the folded (deployed) time as `{k}_ms`.
        let own_threads = r.stats[1].is_none() && r.stats[2].is_some();
        bench.insert(
            format!("{k}_ms"),
            med(if own_threads {
                &r.stats[2]
            } else {
                &r.stats[1]
            }),
        );
        if r.key != "dw" && !own_threads {
            bench.insert(format!("{k}_stock_ms"), med(&r.stats[0]));
        }
        if r.stats[2].is_some() {
            bench.insert(format!("{k}_folded_ms"), med(&r.stats[2]));
        }
        bench.insert(format!("{k}_torch_ms"), med(&torch));
        if r.key != "train_step" && r.key != "dw" {
            bench.insert(format!("{k}_ort_ms"), med(&ort));
        }
        // Ratios of the deployed path (BN folded for inference rows) to each peer.
        let best = if r.stats[2].is_some() {
            &r.stats[2]
        } else {
            &r.stats[1]
        };
        let rat = |p: &Option<Stats>| match (best, p) {
            (Some(a), Some(b)) => json!((a.median() / b.median() * 1000.0).round() / 1000.0),
            _ => Value::Null,
        };
        if r.key != "train_step" && r.key != "dw" {
            bench.insert(format!("{k}_ratio_ort"), rat(&ort));
        }
        // CPU-time ratio of the deployed path to ONNX Runtime, on rows that ran at 1 thread
        // (at 2 threads CPU time is not the latency).
        let one_thread = row_threads.get(r.key) == Some(&1);
        let cpu = |s: &Option<Stats>| s.as_ref().and_then(Stats::cpu_median);
        if let (true, Some(a), Some(b)) = (one_thread, cpu(best), cpu(&ort)) {
            println!(
                "{:<36} process CPU time (median): folded {a:.2} ms, ORT {b:.2} ms, \
                 folded/ORT {:.2}",
                "",
                a / b
            );
            let r3 = |v: f64| json!((v * 1000.0).round() / 1000.0);
            bench.insert(format!("{k}_folded_cpu_ms"), r3(a));
            bench.insert(format!("{k}_ort_cpu_ms"), r3(b));
            bench.insert(format!("{k}_ratio_ort_cpu"), r3(a / b));
        }
        bench.insert(format!("{k}_ratio_torch"), rat(&torch));
    }
    if let Some(c) = peers.as_ref().and_then(|p| p.get("check")) {
        println!("peers' logits vs ours (max abs diff): {c}");
        bench.insert("peer_check".into(), c.clone());
    }
    bench.insert("threads".into(), json!(threads));
    bench.insert("retain_freed_memory".into(), json!(retain));
    bench.insert(
        "threads_desc".into(),
        json!(adaptivenet_kernels::threads::describe()),
    );
    bench.insert("torch".into(), json!(peer_names("torch")));
    bench.insert("onnxruntime".into(), json!(peer_names("onnxruntime")));
    println!(
        "total {:.0} s (rust rows {rust_s:.0} s)",
        started.elapsed().as_secs_f64()
    );
    println!("BENCH {}", Value::Object(bench));
    Ok(())
}
