#!/usr/bin/env python3
"""Writes tiny PyTorch checkpoints (legacy and zip formats) without PyTorch.

Stand-in `torch` modules make Python's own pickle emit exactly the GLOBALs, persistent ids and
REDUCE calls that torch.save does (protocol 2, OrderedDict state dict with `_metadata`,
`_rebuild_tensor_v2`, `_rebuild_parameter`, int64 `num_batches_tracked`, permuted strides, shared
storages, a legacy storage view). `expected.json` holds every float tensor's values computed here
by explicit index arithmetic, independent of the Rust reader. Run from this folder:
    python3 make_pth_fixtures.py
"""
import collections, io, itertools, json, pickle, struct, sys, types, zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


def _fn(mod, name):
    def f(*a):
        raise RuntimeError("stand-in")
    f.__module__, f.__name__, f.__qualname__ = mod.__name__, name, name
    setattr(mod, name, f)
    return f


rebuild_tensor_v2 = _fn(utils, "_rebuild_tensor_v2")
rebuild_parameter = _fn(utils, "_rebuild_parameter")

STYPES = {}  # name -> (class, struct code)
for name, code in [("FloatStorage", "f"), ("DoubleStorage", "d"), ("HalfStorage", "e"), ("LongStorage", "q")]:
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)
    STYPES[name] = (cls, code)


class Storage:
    def __init__(self, key, stype, values, view=None):
        self.key, self.stype, self.values, self.view = key, stype, values, view

    def data(self):
        return struct.pack("<%d%s" % (len(self.values), STYPES[self.stype][1]), *self.values)


class Tensor:
    def __init__(self, storage, offset, size, stride, param=False):
        self.storage, self.offset, self.size, self.stride, self.param = storage, offset, size, stride, param

    def __reduce_ex__(self, proto):
        t = (rebuild_tensor_v2, (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, collections.OrderedDict()))
        if self.param:
            inner = Tensor(self.storage, self.offset, self.size, self.stride)
            return (rebuild_parameter, (inner, True, collections.OrderedDict()))
        return t

    def values(self):
        st = self.storage.values
        base = self.offset + (self.storage.view[1] if self.storage.view else 0)
        out = []
        for idx in itertools.product(*[range(d) for d in self.size]):
            out.append(st[base + sum(i * s for i, s in zip(idx, self.stride))])
        return out


def state_dict():
    # conv.weight: OIHW (4,3,2,2) view of an HWIO (2,2,3,4) storage, like TF-converted weights.
    conv = Storage("0", "FloatStorage", [i * 0.5 - 7.0 for i in range(48)])
    bn = Storage("1", "FloatStorage", [1.0 + i / 8 for i in range(8)])  # weight and bias share it
    nbt = Storage("2", "LongStorage", [42])
    half = Storage("3", "HalfStorage", [0.5, -1.25, 3.0])
    dbl = Storage("4", "DoubleStorage", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    fc = Storage("5", "FloatStorage", [0.1 * i for i in range(6)])
    sd = collections.OrderedDict()
    sd["conv.weight"] = Tensor(conv, 0, (4, 3, 2, 2), (1, 4, 24, 12))
    sd["bn.weight"] = Tensor(bn, 0, (4,), (1,))
    sd["bn.bias"] = Tensor(bn, 4, (4,), (1,))
    sd["bn.num_batches_tracked"] = Tensor(nbt, 0, (), ())
    sd["half.w"] = Tensor(half, 0, (3,), (1,))
    sd["double.w"] = Tensor(dbl, 1, (2, 2), (1, 2))  # transposed, offset 1
    sd["fc.weight"] = Tensor(fc, 0, (2, 3), (3, 1), param=True)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])
    return sd


def pickle_obj(obj, pid):
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    p.persistent_id = pid
    p.dump(obj)
    return buf.getvalue()


def legacy(obj):
    storages = {}

    def pid(o):
        if isinstance(o, Storage):
            storages[o.key] = o
            cls = STYPES[o.stype][0]
            view = None if o.view is None else (o.view[0], o.view[1], o.view[2])
            return ("storage", cls, o.key, "cpu", len(o.values), view)
        return None

    out = io.BytesIO()
    for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(x, out, protocol=2)
    out.write(pickle_obj(obj, pid))
    keys = sorted(storages)
    pickle.dump(keys, out, protocol=2)
    for k in keys:
        out.write(struct.pack("<q", len(storages[k].values)))
        out.write(storages[k].data())
    return out.getvalue()


def zipped(obj, prefix):
    storages = {}

    def pid(o):
        if isinstance(o, Storage):
            storages[o.key] = o
            return ("storage", STYPES[o.stype][0], o.key, "cpu", len(o.values))
        return None

    pkl = pickle_obj(obj, pid)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr(prefix + "/data.pkl", pkl)
        z.writestr(prefix + "/byteorder", b"little")
        for k in sorted(storages):
            z.writestr(prefix + "/data/" + k, storages[k].data())
        z.writestr(prefix + "/version", b"3\n")
    return out.getvalue()


def expected(sd):
    # A list, not an object: JSON readers need not keep key order.
    return [{"name": k, "shape": list(t.size), "values": t.values()}
            for k, t in sd.items() if t.storage.stype != "LongStorage"]


sd = state_dict()
with open("tiny_legacy.pth", "wb") as f:
    f.write(legacy(sd))
with open("tiny_zip.pth", "wb") as f:
    f.write(zipped(sd, "tiny_zip"))
with open("tiny_zip_nested.pth", "wb") as f:
    f.write(zipped({"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}}, "archive"))

# A legacy file whose tensor reads a storage view: root storage "9", view "9v" at offset 2.
root = Storage("9", "FloatStorage", [10.0, 11.0, 12.0, 13.0, 14.0, 15.0], view=("9v", 2, 3))
view_sd = collections.OrderedDict([("v", Tensor(root, 1, (2,), (1,)))])
with open("tiny_legacy_view.pth", "wb") as f:
    f.write(legacy(view_sd))

with open("expected.json", "w") as f:
    json.dump({"state_dict": expected(sd), "view": expected(view_sd)}, f, indent=1)
