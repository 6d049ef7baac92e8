//! One EfficientNet-Lite0 training step (`cargo bench -p adaptivenet-train --bench
//! train_step`): train-mode forward, cross-entropy, backward and the SGD update, as the
//! oracle fine-tune runs it (`oracle.rs`), at 3x64x64, batch 32, on 1 thread by default.
//!
//! The step's throughput decides how long a Lite0 fine-tune and its elastification take
//! (both run the same MBConv ops forward and backward), so this is where MBConv training
//! speed is measured. The weights are a seeded fresh init with a 10-class head and the data
//! a seeded synthetic batch whose label shows in the pixels, so a run is a pure function of
//! its knobs: the per-step losses it prints must match between two builds of the kernels
//! to the tolerance the kernels' tests state.
//!
//! Knobs (environment): `STEP_BATCH` (32), `STEP_SIDE` (64), `STEP_STEPS` (timed steps, 12),
//! `STEP_WARMUP` (2), `STEP_THREADS` (the kernels' cap, 1), `STEP_LR` (0.02).
//! The table gives the median and min of forward (with the loss), backward and update per
//! step (wall time) and of the whole step's thread CPU time (other processes' time slices
//! on a shared host excluded), samples/s from the median step by both, and the losses; the
//! last line is `BENCH {json}`.
use std::time::Instant;

use adaptivenet_core::model::{
    block_forward, head_forward, stem_forward, ArchDescriptor, Model, TrainCtx,
};
use adaptivenet_kernels::threads;
use adaptivenet_train::optim::{Optimizer, Sgd};
use adaptivenet_train::train::{cross_entropy, TrainModule, BN_MOMENTUM};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const CLASSES: usize = 10;
const SEED: u64 = 21;
/// Distinct synthetic batches, used in turn.
const BATCHES: usize = 4;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T> {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .with_context(|| format!("{key}={v}: not a valid value")),
        Err(_) => Ok(default),
    }
}

/// A seeded batch: per image a class-dependent stripe pattern plus noise, normalised to
/// about [-1, 1] (EfficientNet-Lite's input range).
fn batch(b: usize, side: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = Vec::with_capacity(b * 3 * side * side);
    let mut y = Vec::with_capacity(b);
    for _ in 0..b {
        let label = rng.random_range(0..CLASSES);
        y.push(label as u32);
        for c in 0..3 {
            for i in 0..side {
                for j in 0..side {
                    let stripe = ((i * (label + 1) + j * (c + 1)) / 4) % 2;
                    let v = stripe as f32 * 0.8 - 0.4 + rng.random_range(-0.5f32..0.5);
                    x.push(v);
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(x, (b, 3, side, side), &Device::Cpu)?,
        Tensor::from_vec(y, b, &Device::Cpu)?,
    ))
}

/// CPU time of the calling thread, ms. With 1 kernel thread (and candle's pool sized to 1)
/// the whole step runs on the caller, so this is the step's CPU time without the time slices
/// other processes of a shared host take.
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn main() -> Result<()> {
    adaptivenet_kernels::alloc::retain_freed_memory();
    let b: usize = env_or("STEP_BATCH", 32)?;
    let side: usize = env_or("STEP_SIDE", 64)?;
    let steps: usize = env_or("STEP_STEPS", 12)?;
    let warmup: usize = env_or("STEP_WARMUP", 2)?;
    let nthreads: usize = env_or("STEP_THREADS", 1)?;
    let lr: f64 = env_or("STEP_LR", 0.02)?;
    threads::set_max_threads(nthreads.max(1));
    threads::size_candle_pool(nthreads.max(1));

    let arch = ArchDescriptor::from_json(br#"{"family":"efficientnet_lite","variant":"lite0"}"#)?;
    let mut spec = arch.spec.clone();
    spec.input = [3, side, side];
    let model = Model::init(&spec, SEED)?.with_new_head(CLASSES, SEED)?;
    let spec = model.spec.clone();
    let mut stem = TrainModule::new(&model.stem)?;
    let mut blocks = model
        .blocks
        .iter()
        .map(TrainModule::new)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut head = TrainModule::new(&model.head)?;
    let mut vars: Vec<_> = stem.named_vars("stem").collect();
    for (i, m) in blocks.iter().enumerate() {
        vars.extend(m.named_vars(&format!("blocks.{i}")));
    }
    vars.extend(head.named_vars("head"));
    let mut opt = Sgd::new(0.9, true, 4e-5);
    let data = (0..BATCHES)
        .map(|i| batch(b, side, SEED + i as u64))
        .collect::<Result<Vec<_>>>()?;

    let num = &spec.numerics;
    let (mut fwd, mut bwd, mut upd, mut losses) = (vec![], vec![], vec![], vec![]);
    let mut cpu = vec![];
    for step in 0..warmup + steps {
        let (x, y) = &data[step % BATCHES];
        let c0 = cpu_ms();
        let t0 = Instant::now();
        let mut c = TrainCtx::new(BN_MOMENTUM);
        let mut h = stem_forward(&spec.stem, num, &stem.params(), x, Some(&mut c))?;
        stem.apply(&mut c);
        for (bs, m) in spec.blocks.iter().zip(blocks.iter_mut()) {
            h = block_forward(bs, num, &m.params(), &h, Some(&mut c))?;
            m.apply(&mut c);
        }
        let logits = head_forward(&spec.head, num, &head.params(), &h, Some(&mut c))?;
        head.apply(&mut c);
        let loss = cross_entropy(&logits, y)?;
        let lv = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&vars, &grads, lr)?;
        drop(grads);
        let t3 = Instant::now();
        let c3 = cpu_ms();
        losses.push(lv);
        if step >= warmup {
            cpu.push(c3 - c0);
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
            upd.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    let total: Vec<f64> = (0..fwd.len()).map(|i| fwd[i] + bwd[i] + upd[i]).collect();
    let step_ms = median(&total);
    let sps = b as f64 / (step_ms / 1e3);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load1 = load.split_whitespace().next().unwrap_or("?").to_string();

    println!(
        "EfficientNet-Lite0 training step, 3x{side}x{side}, batch {b}, {}, {steps} timed steps after {warmup}, load {load1}",
        threads::describe()
    );
    println!("| phase | median ms | min ms |");
    println!("|---|---|---|");
    for (name, v) in [
        ("forward + loss", &fwd),
        ("backward", &bwd),
        ("SGD update", &upd),
        ("step", &total),
    ] {
        println!("| {name} | {:.1} | {:.1} |", median(v), min(v));
    }
    println!(
        "| step, thread CPU time | {:.1} | {:.1} |",
        median(&cpu),
        min(&cpu)
    );
    let cpu_sps = b as f64 / (median(&cpu) / 1e3);
    println!("samples/s (median step): {sps:.1} wall, {cpu_sps:.1} by CPU time");
    println!(
        "losses: {}",
        losses
            .iter()
            .map(|l| format!("{l:.6}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "BENCH {}",
        json!({
            "bench": "train_step",
            "model": "efficientnet_lite0",
            "side": side,
            "batch": b,
            "threads": threads::current(),
            "steps": steps,
            "load1": load1,
            "forward_ms": median(&fwd),
            "backward_ms": median(&bwd),
            "update_ms": median(&upd),
            "step_ms": step_ms,
            "step_min_ms": min(&total),
            "samples_per_s": sps,
            "step_cpu_ms": median(&cpu),
            "samples_per_cpu_s": cpu_sps,
            "losses": losses,
        })
    );
    Ok(())
}
