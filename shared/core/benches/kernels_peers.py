#!/usr/bin/env python3
"""Peers of `cargo bench --bench kernels`: PyTorch CPU and ONNX Runtime on the same weights.

Called by `benches/kernels.rs` as `$BENCH_PYTHON kernels_peers.py CONFIG.json`. The bench
writes every model as an `adaptivenet.chain` descriptor (`KEY.json`, the family-independent
spec) plus canonical safetensors weights (`KEY.safetensors`), and a check file
(`KEY.check.safetensors`: `input`, our `logits`). This script re-creates each chain model
from the spec (one generic interpreter, mirroring `adaptivenet_core::model::{stem,block,
head}_forward`): as a PyTorch function and as an ONNX graph built directly with the `onnx`
helper API (no torch needed for the ORT column). It checks both against our logits, then
times them with the bench's protocol (warm-up, interleaved rounds, the bench's thread count).

Prints progress lines and, last, one line `PEERS {json}`:
`{"threads", "versions": {"torch", "onnxruntime"}, "torch": {KEY: {"ms": [...], "cpu_ms": [...]}},
"ort": {...},
"check": {...}}`. A peer that is not installed is `null`; nothing here is required.
"""
import json
import os
import sys
import time

CFG = json.load(open(sys.argv[1]))
THREADS = int(CFG["threads"])
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(THREADS)
DIR = CFG.get("dir")  # absent when another peer script imports this one for its interpreter
WARMUP = int(CFG.get("warmup", 2))

try:
    import numpy as np
    from safetensors.numpy import load_file
except Exception as e:  # noqa: BLE001
    print(f"numpy/safetensors not available ({e}): no peers")
    print("PEERS " + json.dumps({"threads": THREADS, "versions": {}, "torch": None, "ort": None}))
    sys.exit(0)

try:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
except Exception as e:  # noqa: BLE001
    print(f"torch not available: {type(e).__name__}: {str(e)[:200]}")
    torch = None

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort
except Exception as e:  # noqa: BLE001
    print(f"onnx/onnxruntime not available: {type(e).__name__}: {str(e)[:200]}")
    ort = None


def load(key):
    spec = json.load(open(os.path.join(DIR, f"{key}.json")))["spec"]
    w = load_file(os.path.join(DIR, f"{key}.safetensors"))
    return spec, w


def pads(num, h, w, k, s):
    """(top, bottom, left, right), as `Numerics::pad`."""
    if num["padding"] == "symmetric":
        return (k // 2,) * 4

    def total(i):
        out = -(-i // s)
        return max((max(out - 1, 0)) * s + k - i, 0)

    th, tw = total(h), total(w)
    return (th // 2, th - th // 2, tw // 2, tw - tw // 2)


def out_size(i, k, s, p0, p1):
    return (i + p0 + p1 - k) // s + 1


def block(emit, b, p, x, hw, act):
    """One block of a chain (`p` its parameter prefix, `act` the numerics' activation)."""
    t = b["type"]
    inp, in_hw = x, hw
    if t == "basic":
        y, hw2 = emit.conv_bn(x, hw, p, "conv1", "bn1", b["stride"], 1, act)
        y, hw2 = emit.conv_bn(y, hw2, p, "conv2", "bn2", 1, 1, None)
        sc = emit.conv_bn(inp, in_hw, p, "downsample.0", "downsample.1", b["stride"], 1, None)[0] if b["proj"] else inp
        return emit.act(emit.add(y, sc), act), hw2
    if t == "bottleneck":
        y, hw2 = emit.conv_bn(x, hw, p, "conv1", "bn1", 1, 1, act)
        y, hw2 = emit.conv_bn(y, hw2, p, "conv2", "bn2", b["stride"], 1, act)
        y, hw2 = emit.conv_bn(y, hw2, p, "conv3", "bn3", 1, 1, None)
        sc = emit.conv_bn(inp, in_hw, p, "downsample.0", "downsample.1", b["stride"], 1, None)[0] if b["proj"] else inp
        return emit.act(emit.add(y, sc), act), hw2
    if t == "mb_conv":
        h, hw2 = (emit.conv_bn(x, hw, p, "expand.conv", "expand.bn", 1, 1, act) if b["expand"] else (x, hw))
        h, hw2 = emit.conv_bn(h, hw2, p, "dw.conv", "dw.bn", b["stride"], b["hidden"], act)
        y, hw2 = emit.conv_bn(h, hw2, p, "project.conv", "project.bn", 1, 1, None)
        return (emit.add(y, inp) if b["residual"] else y), hw2
    raise ValueError(f"unknown block type {t}")


def stem(spec, emit, x, hw):
    st = spec["stem"]
    x, hw = emit.conv_bn(x, hw, "stem.", "conv", "bn", st["stride"], 1, spec["numerics"]["act"])
    if st["maxpool"]:
        x, hw = emit.maxpool(x, hw)
    return x, hw


def head(spec, emit, x, hw):
    if spec["head"].get("conv"):
        x, hw = emit.conv_bn(x, hw, "head.", "conv", "bn", 1, 1, spec["numerics"]["act"])
    return emit.head(x)


def walk(spec, emit, x, hw):
    """Generic chain interpreter. `emit` supplies conv_bn(x, hw, prefix, conv, bn, stride,
    groups, act) -> (y, hw), add, act, maxpool, head; mirrors the Rust forward functions."""
    act = spec["numerics"]["act"]
    x, hw = stem(spec, emit, x, hw)
    for i, b in enumerate(spec["blocks"]):
        x, hw = block(emit, b, f"blocks.{i}.", x, hw, act)
    return head(spec, emit, x, hw)


# ---------------------------------------------------------------- PyTorch


class TorchEmit:
    def __init__(self, spec, params, training=False, momentum=0.1):
        self.num = spec["numerics"]
        self.p = params  # name -> tensor (parameters require grad when training)
        self.training = training
        self.momentum = momentum

    def conv_bn(self, x, hw, pre, conv, bn, stride, groups, act):
        w = self.p[f"{pre}{conv}.weight"]
        k = w.shape[2]
        t, b, l, r = pads(self.num, hw[0], hw[1], k, stride)
        if t == b == l == r:
            y = F.conv2d(x, w, None, stride, t, 1, groups)
        else:
            y = F.conv2d(F.pad(x, (l, r, t, b)), w, None, stride, 0, 1, groups)
        y = F.batch_norm(
            y,
            self.p[f"{pre}{bn}.running_mean"],
            self.p[f"{pre}{bn}.running_var"],
            self.p[f"{pre}{bn}.weight"],
            self.p[f"{pre}{bn}.bias"],
            self.training,
            self.momentum,
            self.num["bn_eps"],
        )
        return self.act(y, act), (out_size(hw[0], k, stride, t, b), out_size(hw[1], k, stride, l, r))

    def act(self, x, act):
        if act == "relu":
            return F.relu(x)
        if act == "relu6":
            return F.relu6(x)
        return x

    def add(self, a, b):
        return a + b

    def maxpool(self, x, hw):
        return F.max_pool2d(x, 3, 2, 1), (out_size(hw[0], 3, 2, 1, 1), out_size(hw[1], 3, 2, 1, 1))

    def head(self, x):
        f = x.mean((2, 3))
        return F.linear(f, self.p["head.fc.weight"], self.p["head.fc.bias"])


def torch_params(w, trainable=False):
    out = {}
    for n, a in w.items():
        t = torch.from_numpy(np.ascontiguousarray(a)).float()
        if trainable and not (n.endswith("running_mean") or n.endswith("running_var")):
            t.requires_grad_(True)
        out[n] = t
    return out


# ---------------------------------------------------------------- ONNX


class OnnxEmit:
    def __init__(self, spec, weights):
        self.num = spec["numerics"]
        self.w = weights
        self.nodes = []
        self.inits = {}
        self.k = 0

    def name(self, base):
        self.k += 1
        return f"{base}_{self.k}"

    def init(self, n):
        if n not in self.inits:
            self.inits[n] = numpy_helper.from_array(np.ascontiguousarray(self.w[n]).astype(np.float32), n)
        return n

    def conv_bn(self, x, hw, pre, conv, bn, stride, groups, act):
        wn = f"{pre}{conv}.weight"
        k = self.w[wn].shape[2]
        t, b, l, r = pads(self.num, hw[0], hw[1], k, stride)
        y = self.name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv", [x, self.init(wn)], [y], kernel_shape=[k, k], strides=[stride, stride],
                pads=[t, l, b, r], group=groups,
            )
        )
        z = self.name("bn")
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [y] + [self.init(f"{pre}{bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")],
                [z], epsilon=float(self.num["bn_eps"]),
            )
        )
        return self.act(z, act), (out_size(hw[0], k, stride, t, b), out_size(hw[1], k, stride, l, r))

    def act(self, x, act):
        if act is None:
            return x
        y = self.name(act)
        if act == "relu":
            self.nodes.append(helper.make_node("Relu", [x], [y]))
        else:
            if "c0" not in self.inits:
                self.inits["c0"] = numpy_helper.from_array(np.array(0.0, np.float32), "c0")
                self.inits["c6"] = numpy_helper.from_array(np.array(6.0, np.float32), "c6")
            self.nodes.append(helper.make_node("Clip", [x, "c0", "c6"], [y]))
        return y

    def add(self, a, b):
        y = self.name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [y]))
        return y

    def maxpool(self, x, hw):
        y = self.name("maxpool")
        self.nodes.append(helper.make_node("MaxPool", [x], [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
        return y, (out_size(hw[0], 3, 2, 1, 1), out_size(hw[1], 3, 2, 1, 1))

    def head(self, x):
        g, f = self.name("gap"), self.name("flat")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [g]))
        self.nodes.append(helper.make_node("Flatten", [g], [f], axis=1))
        self.nodes.append(
            helper.make_node("Gemm", [f, self.init("head.fc.weight"), self.init("head.fc.bias")], ["logits"], transB=1)
        )
        return "logits"


def onnx_session(spec, w, shape, threads=THREADS):
    e = OnnxEmit(spec, w)
    walk(spec, e, "input", (shape[2], shape[3]))
    graph = helper.make_graph(
        e.nodes, "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], spec["head"]["classes"]])],
        list(e.inits.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- timing


# Consecutive runs of one column per round, as the Rust side's BURST.
BURST = 5


def bench(cols, runs):
    """cols: {name: fn}. Warm-up, then interleaved rounds (rotating order) of BURST runs of
    each column, `runs` per column. Returns ({name: wall ms per run}, {name: process CPU ms
    per run})."""
    names = list(cols)
    for n in names:
        for _ in range(WARMUP):
            cols[n]()
    out = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range((runs + BURST - 1) // BURST):
        for j in range(len(names)):
            n = names[(j + r) % len(names)]
            for _ in range(BURST):
                if len(out[n]) >= runs:
                    break
                t, c = time.perf_counter(), time.process_time()
                cols[n]()
                out[n].append((time.perf_counter() - t) * 1e3)
                cpu[n].append((time.process_time() - c) * 1e3)
    return out, cpu


def med(v):
    s = sorted(v)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def main():
    res = {
        "threads": THREADS,
        "versions": {
            "torch": torch.__version__ if torch else None,
            "onnxruntime": ort.__version__ if ort else None,
        },
        "torch": {} if torch else None,
        "ort": {} if ort else None,
        "check": {},
    }
    for m in CFG["models"]:
        key = m["key"]
        # A row may run at its own thread count (the bench's 2-thread rows).
        th = int(m.get("threads", THREADS))
        if torch is not None:
            torch.set_num_threads(th)
        spec, w = load(key)
        chk = load_file(os.path.join(DIR, f"{key}.check.safetensors"))
        x, ours = chk["input"], chk["logits"]
        cols = {}
        if torch is not None:
            tp = torch_params(w)
            tx = torch.from_numpy(x)
            em = TorchEmit(spec, tp)

            def tf(em=em, tx=tx):
                with torch.inference_mode():
                    return walk(spec, em, tx, (tx.shape[2], tx.shape[3]))

            res["check"][f"{key}_torch"] = float(np.abs(tf().numpy() - ours).max())
            cols["torch"] = tf
        if ort is not None:
            try:
                sess = onnx_session(spec, w, x.shape, th)

                def of(sess=sess, x=x):
                    return sess.run(None, {"input": x})[0]

                res["check"][f"{key}_ort"] = float(np.abs(of() - ours).max())
                cols["ort"] = of
            except Exception as e:  # noqa: BLE001
                print(f"{key}: ORT failed: {type(e).__name__}: {str(e)[:300]}")
        if not cols:
            continue
        if len(cols) == 2:
            res["check"][f"{key}_torch_vs_ort"] = float(np.abs(np.asarray(cols["torch"]()) - cols["ort"]()).max())
        t, cpu = bench(cols, int(m["runs"]))
        for n, v in t.items():
            res[n][key] = {"ms": v, "cpu_ms": cpu[n]}
        print(f"{key} ({th} threads): " + ", ".join(f"{n} {med(v):.2f} ms (n={len(v)})" for n, v in t.items()), flush=True)
    if torch is not None:
        torch.set_num_threads(THREADS)

    if torch is not None and CFG.get("train"):
        tr = CFG["train"]
        spec, w = load(tr["key"])
        p = torch_params(w, trainable=True)
        g = torch.Generator().manual_seed(5)
        c, h, wd = spec["input"]
        x = torch.rand((tr["batch"], c, h, wd), generator=g) * 2 - 1
        labels = torch.tensor([(i * 7 + 3) % 10 for i in range(tr["batch"])])
        em = TorchEmit(spec, p, training=True)
        lr = float(tr["lr"])

        def step():
            logits = walk(spec, em, x, (h, wd))
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            with torch.no_grad():
                for t in p.values():
                    if t.grad is not None:
                        t -= lr * t.grad
                        t.grad = None
            return loss

        t, _ = bench({"torch": step}, int(tr["runs"]))
        res["torch"]["train_step"] = {"ms": t["torch"]}
        print(f"train_step: torch {med(t['torch']):.2f} ms (n={len(t['torch'])})", flush=True)

    if torch is not None and CFG.get("dw"):
        d = CFG["dw"]
        g = torch.Generator().manual_seed(9)
        n_, c_, h_, w_ = d["shape"]
        gx = torch.rand((n_, c_, h_, w_), generator=g).requires_grad_(True)
        gw = (torch.rand((c_, 1, 3, 3), generator=g) * 0.3).requires_grad_(True)

        def dw():
            y = F.conv2d(gx, gw, None, 1, 1, 1, c_)
            y.sum().backward()
            gx.grad = None
            gw.grad = None

        t, _ = bench({"torch": dw}, int(d["runs"]))
        res["torch"]["dw"] = {"ms": t["torch"]}
        print(f"dw: torch {med(t['torch']):.2f} ms (n={len(t['torch'])})", flush=True)

    print("PEERS " + json.dumps(res))


if __name__ == "__main__":
    main()
