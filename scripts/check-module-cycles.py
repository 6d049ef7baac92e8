#!/usr/bin/env python3
"""Fails if the modules of one crate import each other in a circle.

For every crate (a directory with Cargo.toml and src/), each file under src/ belongs to a
module: src/a.rs and src/a/... are the top-level module `a`. A path `crate::a::...` (in a
`use` or inline) or `super::...` that resolves to another top-level module is an edge. The
same is checked one level down, between the submodules of one top-level directory
(src/a/b.rs and src/a/b/... are `a::b`). Test code is exempt: everything from a file's first
`#[cfg(test)]` line on (unit-test modules sit at the end), as are comments and strings.

A circle is printed as `crate: a -> b -> a` with the files and lines behind each arrow.
Break it by moving the shared item down into a module both can import, not by hiding imports.
Python 3 standard library only.
"""
import os
import re
import sys

ROOT = os.environ.get("CHECK_ROOT") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
)
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text):
    """Source up to the first #[cfg(test)], without comments, strings and char literals."""
    cut = re.search(r"^\s*#\[cfg\(test\)\]", text, re.M)
    if cut:
        text = text[: cut.start()]
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else " ")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not re.match(r"\w", text[i - 1 : i] or " "):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append(" " * 2 + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(rel):
    """Module path of a file relative to src/: ['a', 'b'] for a/b.rs or a/b/mod.rs."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]):
        return []
    return parts


def split_top(s):
    """Top-level comma-separated items of a brace group's inside."""
    items, depth, cur = [], 0, []
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def brace_body(code, start):
    """The text inside the brace group that opens at code[start] == '{'."""
    depth = 0
    for j in range(start, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return code[start + 1 : j]
    return code[start + 1 :]


def targets(code, module):
    """(absolute module path, offset) for every crate:: / super:: path in the code."""
    found = []
    pat = re.compile(r"(?<![A-Za-z0-9_:])((?:crate|(?:super::)*super)::)")
    for m in pat.finditer(code):
        prefix = m.group(1)
        if prefix == "crate::":
            base = []
        else:
            ups = prefix.count("super")
            # A file's module path; super of a::b is a.
            if ups > len(module):
                continue
            base = module[: len(module) - ups]
        rest_at = m.end()
        if rest_at < len(code) and code[rest_at] == "{":
            for item in split_top(brace_body(code, rest_at)):
                first = re.match(IDENT, item)
                if first and first.group(0) not in ("self", "super", "crate"):
                    found.append((base + [first.group(0)], m.start()))
        else:
            first = re.match(IDENT, code[rest_at:])
            if first:
                second = re.match(r"::(" + IDENT + ")", code[rest_at + first.end() :])
                path = base + [first.group(0)]
                if second:
                    path.append(second.group(1))
                found.append((path, m.start()))
    return found


def find_cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def a_circle(graph, comp):
    """One concrete circle through the component's first node (shortest by BFS)."""
    start, members = comp[0], set(comp)
    prev, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [start] + list(reversed(path))[1:] + [start] if path[-1] == start else None
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp + [comp[0]]


def crates():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "target"]
        if "Cargo.toml" in filenames and os.path.isdir(os.path.join(dirpath, "src")):
            yield dirpath


def check_crate(crate_dir):
    src = os.path.join(crate_dir, "src")
    top, sub = {}, {}  # node -> {node: [(file, line)]}
    tops = set()
    files = []
    for dirpath, _, filenames in os.walk(src):
        for f in filenames:
            if f.endswith(".rs"):
                rel = os.path.relpath(os.path.join(dirpath, f), src)
                files.append(rel)
                mod = module_of(rel)
                if mod:
                    tops.add(mod[0])
    for rel in sorted(files):
        mod = module_of(rel)
        with open(os.path.join(src, rel), encoding="utf-8") as fh:
            code = strip_code(fh.read())
        for path, off in targets(code, mod):
            line = code.count("\n", 0, off) + 1
            where = (os.path.relpath(os.path.join(src, rel), ROOT), line)
            if mod and path and path[0] in tops and path[0] != mod[0]:
                top.setdefault(mod[0], {}).setdefault(path[0], []).append(where)
            if (
                len(mod) >= 2
                and len(path) >= 2
                and path[0] == mod[0]
                and path[1] != mod[1]
                and os.path.exists(os.path.join(src, mod[0]))
            ):
                a, b = "::".join(mod[:2]), "::".join(path[:2])
                if is_module(src, path[:2]):
                    sub.setdefault(a, {}).setdefault(b, []).append(where)
    problems = []
    for graph in (top, sub):
        adj = {k: set(v) for k, v in graph.items()}
        for comp in find_cycles(adj):
            circle = a_circle(adj, comp)
            lines = [" -> ".join(circle)]
            if len(comp) > len(circle) - 1:
                lines[0] += f"  (circles join {len(comp)} modules: {', '.join(comp)})"
            for a, b in zip(circle, circle[1:]):
                f, ln = graph[a][b][0]
                more = len(graph[a][b]) - 1
                lines.append(f"    {a} -> {b}: {f}:{ln}" + (f" (+{more} more)" if more else ""))
            problems.append("\n".join(lines))
    return problems


def is_module(src, path):
    base = os.path.join(src, *path)
    return os.path.isfile(base + ".rs") or os.path.isdir(base)


def main():
    status = 0
    for crate_dir in sorted(crates()):
        name = os.path.relpath(crate_dir, ROOT)
        for p in check_crate(crate_dir):
            print(f"{name}: {p}")
            status = 1
    if status:
        print(
            "check-module-cycles: modules of one crate import each other (above); move the "
            "shared item down into a module both can import.",
            file=sys.stderr,
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
