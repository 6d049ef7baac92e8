#!/usr/bin/env python3
"""PyTorch peer of the elastification steps timed by `cargo bench --bench accuracy_latency`.

Called as `$BENCH_PYTHON elastify_peer.py CONFIG.json`. The bench writes the supernet (oracle
spec, every module's block spec and weights) and the exact paths its own stage-0 and stage-1
steps trained; this script runs the same steps in PyTorch on CPU, as
`adaptivenet_train::supernet::train_step` does them:
- the frozen oracle's features at every block boundary (eval-mode BN, no gradient);
- the path from its first branch: original blocks frozen in eval mode, branches in train-mode
  BN; stage 0 feeds each branch a detached input and averages the MSE of each branch's output
  against the oracle's feature at the same boundary; stage 1 runs to the head and takes
  `ce_weight * CE + (1 - ce_weight) * T^2 * KL` against the oracle's logits;
- one backward pass and one AdamW step over the branches' parameters.
The blocks are built by the chain interpreter of `shared/core/benches/kernels_peers.py`. The
batch is random (no data loading or augmentation, which the Rust side includes, so the ratio
errs against us). Prints progress and, last, one line `PEER {json}` with the per-step wall
and process CPU times.
"""
import contextlib
import io
import json
import os
import sys
import time

CFG = json.load(open(sys.argv[1]))
THREADS = int(CFG["threads"])
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(THREADS)

try:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
except Exception as e:  # noqa: BLE001
    print(f"torch not available: {type(e).__name__}: {str(e)[:200]}")
    print("PEER " + json.dumps({"torch": None}))
    sys.exit(0)

sys.path.insert(0, CFG["interpreter_dir"])
with contextlib.redirect_stdout(io.StringIO()):  # its notes on ONNX Runtime are not ours
    import kernels_peers as kp  # noqa: E402  (reads this CONFIG for its thread count)

torch.set_num_threads(THREADS)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass


def main():
    spec = CFG["oracle_spec"]
    act = spec["numerics"]["act"]
    modules = CFG["modules"]  # key -> {"block": BlockSpec, "pos", "span", "branch"}
    w = load_file(CFG["weights"])
    params = {}
    train_vars = []
    for name, t in w.items():
        t = t.float().contiguous()
        key = name.split(".", 1)[0]
        if key in modules and modules[key]["branch"] and not name.endswith(("running_mean", "running_var")):
            t.requires_grad_(True)
            train_vars.append(t)
        params[name] = t
    frozen = kp.TorchEmit(spec, params, training=False)
    branch = kp.TorchEmit(spec, params, training=True)
    originals = sorted((m["pos"], k) for k, m in modules.items() if not m["branch"])
    n = len(originals)
    c, h, wd = CFG["input"]
    batch = int(CFG["batch"])
    g = torch.Generator().manual_seed(3)
    x = torch.randn((batch, c, h, wd), generator=g)
    y = torch.randint(0, int(CFG["classes"]), (batch,), generator=g)
    temp, ce_w = float(CFG["temperature"]), float(CFG["ce_weight"])
    out = {"torch": torch.__version__, "threads": THREADS, "stages": []}
    for stage, st in enumerate(CFG["stages"]):
        opt = torch.optim.AdamW(train_vars, lr=float(st["lr"]), weight_decay=float(CFG["weight_decay"]))
        times, cpu = [], []
        for path in st["paths"]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps = [modules[k] | {"key": k} for k in path]
            first = next(i for i, m in enumerate(steps) if m["branch"])
            last_end = max(m["pos"] + m["span"] for m in steps if m["branch"])
            need = last_end if stage == 0 else n
            with torch.no_grad():
                f, hw = kp.stem(spec, frozen, x, (h, wd))
                teacher = [(f, hw)]
                for _, k in originals[:need]:
                    f, hw = kp.block(frozen, modules[k]["block"], f"{k}.", f, hw, act)
                    teacher.append((f, hw))
                t_logits = kp.head(spec, frozen, f, hw) if stage == 1 else None
            f, hw = teacher[steps[first]["pos"]]
            terms = []
            for m in steps[first:]:
                if stage == 0 and m["pos"] >= last_end:
                    break
                emit = branch if m["branch"] else frozen
                if stage == 0 and CFG["stage0_detach_inputs"]:
                    f = f.detach()
                if stage == 0 and not m["branch"]:
                    with torch.no_grad():
                        f, hw = kp.block(emit, m["block"], f"{m['key']}.", f, hw, act)
                    continue
                f, hw = kp.block(emit, m["block"], f"{m['key']}.", f, hw, act)
                if stage == 0:
                    terms.append(F.mse_loss(f, teacher[m["pos"] + m["span"]][0]))
            if stage == 0:
                loss = torch.stack(terms).mean()
            else:
                logits = kp.head(spec, frozen, f, hw)
                kd = F.kl_div(F.log_softmax(logits / temp, 1), F.log_softmax(t_logits / temp, 1),
                              reduction="batchmean", log_target=True) * temp * temp
                loss = ce_w * F.cross_entropy(logits, y) + (1 - ce_w) * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out["stages"].append({"step_s": times, "step_cpu_s": cpu})
        warm = int(CFG["warmup"])
        med = lambda v: sorted(v[warm:])[len(v[warm:]) // 2]  # noqa: E731
        print(f"stage {stage}: torch {1e3 * med(cpu):.1f} ms/step CPU ({1e3 * med(times):.1f} wall), median of "
              f"{len(times) - warm} (after {warm} warm-up), batch {batch}, {THREADS} thread(s)", flush=True)
    print("PEER " + json.dumps(out))


if __name__ == "__main__":
    main()
