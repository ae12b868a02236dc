#!/usr/bin/env python3
"""Checks the architecture rules CI enforces (run by .ci/run; exits non-zero on a violation).

1. No import cycles between the modules of one crate: for every `src/` folder of the workspace,
   each module's references to other modules of its crate (`crate::a::b`, `super::x`, also inside
   `use crate::{a, b}` groups) form a graph that must have no cycle. `lib.rs`, `main.rs` and
   `mod.rs` files only declare and re-export their children, so they are not sources of edges;
   test modules (`#[cfg(test)] mod ...` to the end of a file) are not counted.
2. Dependency rules (`cargo tree -e normal`; skipped with --no-cargo): the routing core stays
   pure (no tokio, hyper, tonic, axum or kube); the gateway and `kvroute-text` link no engine
   (no weights, kernels or model-file readers).

Usage: scripts/check-architecture.py [--no-cargo] [ROOT]
"""

import os
import re
import subprocess
import sys

RUNTIME_CRATES = ("tokio", "hyper", "tonic", "axum", "kube", "k8s-openapi")
# (crate, crates it must not depend on, why)
FORBIDDEN = [
    ("kvroute-routing", RUNTIME_CRATES, "it must stay pure"),
    (
        "kvroute-gateway",
        ("kvroute-engine", "cudarc", "safetensors", "memmap2"),
        "the gateway needs only kvroute-text of a model (no weights, kernels or file readers)",
    ),
    ("kvroute-text", ("kvroute-engine", "tokio"), "it is the light part of a model"),
]
PATH_RE = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)(::\{([^}]*)\})?")
GROUP_RE = re.compile(r"\b(crate|super)::\{([^}]*)\}")
TEST_MOD_RE = re.compile(r"^\s*#\[cfg\(test\)\]\s*\n\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", re.M)


def module_of(src, path):
    """Module path (tuple) of a file under `src`, and whether it only declares children."""
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel[-1] in ("lib", "main") and len(rel) == 1:
        return (), True
    if rel[-1] == "mod":
        return tuple(rel[:-1]), True
    return tuple(rel), False


def code_of(text):
    """The file without its test module and comments."""
    m = TEST_MOD_RE.search(text)
    if m:
        text = text[: m.start()]
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def resolve(modules, base, segments):
    """The longest known module named by `base` + `segments`, or None."""
    path = tuple(base) + tuple(segments)
    for n in range(len(path), 0, -1):
        if path[:n] in modules:
            return path[:n]
    return None


def references(code, module):
    """(base, segments) for every crate-relative path in `code` written in `module`."""
    parent = module[:-1]
    for m in GROUP_RE.finditer(code):
        base = () if m.group(1) == "crate" else parent
        for item in m.group(2).split(","):
            segs = [s for s in item.strip().split("::") if s and s != "self"]
            if segs and re.fullmatch(r"[A-Za-z_]\w*", segs[0]):
                yield base, segs
    for m in PATH_RE.finditer(code):
        base = () if m.group(1) == "crate" else parent
        segs = [s for s in m.group(2).split("::") if s]
        yield base, segs


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check_crate(src):
    files = []
    for d, _, names in os.walk(src):
        files += [os.path.join(d, n) for n in names if n.endswith(".rs")]
    modules = {}
    for f in files:
        mod, declares = module_of(src, f)
        modules[mod] = (f, declares)
    graph = {}
    where = {}
    for mod, (f, declares) in modules.items():
        if declares:
            continue
        with open(f, encoding="utf-8") as fh:
            code = code_of(fh.read())
        for base, segs in references(code, mod):
            target = resolve(modules, base, segs)
            if target is None or target == mod or mod[: len(target)] == target:
                continue
            graph.setdefault(mod, set()).add(target)
            where.setdefault((mod, target), os.path.relpath(f))
    problems = []
    for comp in cycles(graph):
        names = ["::".join(m) for m in comp]
        edges = [
            f"    {'::'.join(a)} -> {'::'.join(b)} ({where[(a, b)]})"
            for a in comp
            for b in sorted(graph.get(a, ()))
            if b in comp
        ]
        problems.append(
            f"{src}: modules import each other in a circle: {', '.join(names)}\n" + "\n".join(edges)
        )
    return problems


def normal_deps(root, crate):
    """The crates `crate` depends on (normal edges, transitively), or an error string."""
    out = subprocess.run(
        ["cargo", "tree", "-p", crate, "-e", "normal", "--prefix", "none"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return None, f"cargo tree -p {crate} failed: {out.stderr.strip()}"
    return {line.split()[0] for line in out.stdout.splitlines() if line.split()}, None


def check_dependency_rules(root):
    problems = []
    for crate, banned, why in FORBIDDEN:
        deps, err = normal_deps(root, crate)
        if err:
            problems.append(err)
            continue
        bad = sorted(deps & set(banned))
        if bad:
            problems.append(f"{crate} depends on {', '.join(bad)}: {why}")
    return problems


def main(argv):
    cargo = "--no-cargo" not in argv
    rest = [a for a in argv if a != "--no-cargo"]
    root = rest[0] if rest else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    problems = []
    srcs = []
    for d, dirs, _ in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("target", ".git", "fuzz", "node_modules")]
        if os.path.basename(d) == "src" and os.path.exists(os.path.join(d, "..", "Cargo.toml")):
            srcs.append(d)
            dirs[:] = []
    for src in sorted(srcs):
        problems += check_crate(src)
    if cargo:
        problems += check_dependency_rules(root)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"architecture: {len(srcs)} crates checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
