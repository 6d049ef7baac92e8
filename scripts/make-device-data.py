#!/usr/bin/env python3
"""Writes per-device local data sets (Fashion-MNIST IDX layout) for the quickstart's agents.

Each device gets its own folder of t10k-style IDX files drawn from the Fashion-MNIST test split,
so devices see different class distributions (the paper's data-aware setting):
  all       every class, uniformly
  footwear  mostly Sandal / Sneaker / Ankle boot (classes 5, 7, 9)
  dirichlet a Dirichlet(alpha) class mix
"""
import gzip, os, random, struct, sys

def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        size = rows * cols
        return [data[16 + i * size:16 + (i + 1) * size] for i in range(n)], (rows, cols)
    return list(data[8:8 + n]), None

def write_idx(dirname, images, labels, shape):
    os.makedirs(dirname, exist_ok=True)
    rows, cols = shape
    for name, payload, header in (
        ("t10k-images-idx3-ubyte.gz", b"".join(images), struct.pack(">IIII", 2051, len(images), rows, cols)),
        ("t10k-labels-idx1-ubyte.gz", bytes(labels), struct.pack(">II", 2049, len(labels))),
    ):
        with gzip.open(os.path.join(dirname, name), "wb") as f:
            f.write(header + payload)

def main(src, out, n, seed):
    images, shape = read_idx(os.path.join(src, "t10k-images-idx3-ubyte.gz"))
    labels, _ = read_idx(os.path.join(src, "t10k-labels-idx1-ubyte.gz"))
    rng = random.Random(seed)
    by_class = {c: [i for i, l in enumerate(labels) if l == c] for c in range(10)}
    def draw(weights):
        total = sum(weights)
        idx = []
        for _ in range(n):
            r, acc = rng.random() * total, 0.0
            for c, w in enumerate(weights):
                acc += w
                if r <= acc:
                    idx.append(rng.choice(by_class[c]))
                    break
        return idx
    alpha = [rng.gammavariate(0.5, 1.0) for _ in range(10)]
    mixes = {
        "all": [1.0] * 10,
        "footwear": [0.02 if c not in (5, 7, 9) else 1.0 for c in range(10)],
        "dirichlet": alpha,
    }
    for name, w in mixes.items():
        idx = draw(w)
        write_idx(os.path.join(out, name), [images[i] for i in idx], [labels[i] for i in idx], shape)
        counts = [sum(1 for i in idx if labels[i] == c) for c in range(10)]
        print(f"device data {name:9}: {n} images, per class {counts}")

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1000, 7)
