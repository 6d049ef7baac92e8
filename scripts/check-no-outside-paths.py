#!/usr/bin/env python3
"""Fails when a tracked file names a `shared` directory outside the repository.

A checkout must work with nothing beside it: tests, docs and scripts may not read fixtures or
references from a sibling `shared` folder next to the clone. The repository has its own
`shared/` (the core crates), so a relative reference is accepted only when it names something
that exists in this checkout from one of the places a path is resolved against: the file's
own folder, its crate (the nearest folder with a Cargo.toml, for `CARGO_MANIFEST_DIR`) or the
repository root (scripts cd there). An absolute path into a `shared` folder is refused too.

Prints file:line and the reference for each offender, exits 1 if there is any. Stdlib only.
"""
import os
import re
import subprocess
import sys

# One or more parent steps, then `shared`, then the rest of the path.
RELATIVE = re.compile(r"((?:\.\./)+)(shared(?:/[\w.@+-]+)*)")
# An absolute path (at the start of a word or string) with a `shared` folder in it.
ABSOLUTE = re.compile(r"(?:^|[\s\"'`(=:,])(/(?!\.)[\w.-]+(?:/[\w.-]+)*/shared(?:/[\w.@+-]*)?)")


def tracked(root):
    out = subprocess.run(
        ["git", "-C", root, "ls-files", "-z"], check=True, capture_output=True
    ).stdout
    return [p for p in out.decode().split("\0") if p]


def crate_dir(root, rel):
    d = os.path.dirname(rel)
    while True:
        if os.path.isfile(os.path.join(root, d, "Cargo.toml")):
            return d
        if not d:
            return None
        d = os.path.dirname(d)


def inside(root, path):
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def resolves_in_repo(root, rel, ups, tail):
    bases = {os.path.dirname(rel), ""}
    c = crate_dir(root, rel)
    if c is not None:
        bases.add(c)
    for b in bases:
        target = os.path.normpath(os.path.join(root, b, ups + tail))
        if inside(root, target) and os.path.exists(target):
            return True
    return False


def main():
    root = os.path.realpath(
        subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True
        ).stdout.decode().strip()
    )
    bad = []
    for rel in tracked(root):
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue  # binary
        text = data.decode("utf-8", "replace")
        for n, line in enumerate(text.splitlines(), 1):
            for m in RELATIVE.finditer(line):
                if not resolves_in_repo(root, rel, m.group(1), m.group(2)):
                    bad.append(f"{rel}:{n}: {m.group(0)} (not in this checkout)")
            for m in ABSOLUTE.finditer(line):
                bad.append(f"{rel}:{n}: {m.group(1)} (an absolute path)")
    if bad:
        print("tracked files name a shared folder outside the repository:", file=sys.stderr)
        for b in bad:
            print("  " + b, file=sys.stderr)
        print(
            "a clone has nothing beside it: commit what the tests and docs need under the "
            "repository (e.g. shared/core/tests/fixtures) and refer to it there",
            file=sys.stderr,
        )
        return 1
    print("no tracked file names a shared folder outside the repository")
    return 0


if __name__ == "__main__":
    sys.exit(main())
