"""Boundary tests: the rules the tree is laid out by, checked on the source (Ray-free, no cluster).

- ml/ is Ray-free domain code: importing any ml module loads neither ray nor the Ray layers;
- imports point one way, ml <- actors <- deployments <- cluster <- cli;
- no import cycle between modules, nor between packages;
- nothing outside tests/ cites documents that are not in the repository;
- one home for the clock helpers (ml/clock.py).

Imports are read with `ast` (every import statement, also those inside functions and
`if TYPE_CHECKING:` blocks), so a lazy import breaks a rule just as a top-level one does.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("ml", "actors", "deployments", "cluster", "cli")
RAY_LAYERS = ("ray", *LAYERS[1:])


# ---- the module graph, from the source ------------------------------------------------------------

def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    """Module name -> file, for every .py under the layer packages."""
    out: dict[str, Path] = {}
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[module_name(path)] = path
    return out


@dataclass(frozen=True)
class Import:
    source: str   # importing module
    target: str   # imported module (resolved to a module of the repo when it is one)
    line: int
    text: str     # as written, for messages


def _resolve_relative(source: str, is_package: bool, level: int, module: str | None) -> str:
    base = source.split(".") if is_package else source.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, _known_prefix(alias.name, modules), node.lineno, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(name, is_package, node.level, node.module) if node.level
                    else node.module or "")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in modules else _known_prefix(base, modules)
                yield Import(name, target, node.lineno, f"from {'.' * node.level}{node.module or ''} "
                                                        f"import {alias.name}")


def _known_prefix(dotted: str, modules: dict[str, Path]) -> str:
    """The longest prefix of `dotted` that is a module of the repo (or `dotted` for third-party)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return dotted


def all_imports() -> tuple[dict[str, Path], list[Import]]:
    modules = source_files()
    found: list[Import] = []
    for name, path in modules.items():
        found.extend(imports_of(name, path, modules))
    return modules, found


def where(imp: Import, modules: dict[str, Path]) -> str:
    return f"{modules[imp.source].relative_to(REPO)}:{imp.line}: {imp.text}"


# ---- a. ml/ imports no Ray layer ------------------------------------------------------------------

_IMPORT_ALL_ML = """
import json, pkgutil, sys, importlib
import ml
failed = {}
for info in pkgutil.walk_packages(ml.__path__, "ml."):
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        failed[info.name] = f"{type(exc).__name__}: {exc}"
layers = set(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in layers)
print(json.dumps({"failed": failed, "loaded": loaded}))
"""


def test_importing_every_ml_module_loads_no_ray_layer() -> None:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL_ML, *RAY_LAYERS], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failed"], "ml modules that do not import:\n" + "\n".join(
        f"  {m}: {e}" for m, e in sorted(result["failed"].items()))
    assert not result["loaded"], ("importing every ml module loaded Ray or a Ray layer: "
                                  + ", ".join(result["loaded"]))


def test_ml_source_never_imports_a_ray_layer() -> None:
    """Also the lazy imports the import test above cannot see (inside functions never called)."""
    modules, found = all_imports()
    bad = [where(i, modules) for i in found
           if i.source.split(".")[0] == "ml" and i.target.split(".")[0] in RAY_LAYERS]
    assert not bad, "ml/ must stay Ray-free; these imports break it:\n  " + "\n  ".join(bad)


# ---- b. layer order -------------------------------------------------------------------------------

def test_imports_point_one_way_ml_actors_deployments_cluster_cli() -> None:
    modules, found = all_imports()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for imp in found:
        src, dst = imp.source.split(".")[0], imp.target.split(".")[0]
        if dst in rank and rank[dst] > rank[src]:
            bad.append(f"{where(imp, modules)}   ({src} may not import {dst})")
    assert not bad, ("imports must point one way (ml <- actors <- deployments <- cluster <- cli); "
                     f"{len(bad)} point up:\n  " + "\n  ".join(bad))


# ---- c. no cycles ---------------------------------------------------------------------------------

def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (iterative Tarjan, then a DFS path)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = set()
                    while True:
                        n = stack.pop()
                        on_stack.discard(n)
                        scc.add(n)
                        if n == node:
                            break
                    if len(scc) > 1 or node in graph.get(node, ()):
                        sccs.append(scc)
    return [_cycle_in(scc, graph) for scc in sccs]


def _cycle_in(scc: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the smallest member of a strongly connected component (BFS)."""
    start = min(scc)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in scc:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    return sorted(scc)  # pragma: no cover - an SCC always has a cycle


def _edges(found: list[Import], modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in found:
        if imp.target in modules and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def _package_of(module: str, modules: dict[str, Path]) -> str:
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0] or module


def test_no_import_cycle_between_modules() -> None:
    modules, found = all_imports()
    graph = _edges(found, modules)
    cycles = find_cycles(graph)
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:], strict=False):
            lines.extend(f"      {where(i, modules)}" for i in found if i.source == a and i.target == b)
    assert not cycles, f"{len(cycles)} import cycle(s) between modules:\n  " + "\n  ".join(lines)


def test_no_import_cycle_between_packages() -> None:
    """Modules condensed to their package (a package's own __init__ counts as the package)."""
    modules, found = all_imports()
    graph: dict[str, set[str]] = {}
    why: dict[tuple[str, str], list[Import]] = {}
    for src, targets in _edges(found, modules).items():
        a = _package_of(src, modules)
        graph.setdefault(a, set())
        for dst in targets:
            b = _package_of(dst, modules)
            # a package importing its own subpackages (e.g. an __init__ re-exporting) is no cycle
            if a != b and not b.startswith(a + "."):
                graph[a].add(b)
    for imp in found:
        if imp.target in modules and imp.target != imp.source:
            edge = (_package_of(imp.source, modules), _package_of(imp.target, modules))
            why.setdefault(edge, []).append(imp)
    cycles = find_cycles(graph)
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:], strict=False):
            lines.extend(f"      {where(i, modules)}" for i in why.get((a, b), [])[:5])
    assert not cycles, f"{len(cycles)} import cycle(s) between packages:\n  " + "\n  ".join(lines)


def test_cycle_finder_reports_the_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    cycles = sorted(find_cycles(graph))
    assert cycles == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


# ---- d. no citations of documents that are not in the repository ---------------------------------

CITATIONS = (
    re.compile(r"SPEC §"),
    re.compile(r"SPEC\.md"),
    re.compile(r"\bissue [0-9]+\b", re.IGNORECASE),
    re.compile(r"\bsession [0-9]+\b", re.IGNORECASE),
)
SCANNED_SUFFIXES = (".py", ".md", ".yaml", ".toml", ".json")


def repo_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:  # pragma: no cover - not a git checkout
        pytest.skip(f"git ls-files failed: {exc}")
    return [REPO / line for line in sorted(set(out.splitlines())) if line and (REPO / line).is_file()]


def test_no_citations_of_documents_outside_the_repository() -> None:
    bad = []
    for path in repo_files():
        rel = path.relative_to(REPO)
        if rel.parts[0] == "tests" or path.suffix not in SCANNED_SUFFIXES:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(p.search(line) for p in CITATIONS):
                bad.append(f"{rel}:{n}: {line.strip()[:120]}")
    assert not bad, ("code and docs cite documents that are not in the repository (SPEC, issue N, "
                     "session N); say the rule in words or point to a docs/ file:\n  " + "\n  ".join(bad))


# ---- e. one home for the clock --------------------------------------------------------------------

CLOCK_HELPERS = ("now_ms", "_now_ms")


def test_clock_helpers_live_only_in_ml_clock() -> None:
    bad = []
    for path in repo_files():
        rel = path.relative_to(REPO)
        if path.suffix != ".py" or rel == Path("ml/clock.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in CLOCK_HELPERS:
                bad.append(f"{rel}:{node.lineno}: def {node.name}")
    assert not bad, "clock helpers have one home, ml/clock.py (`from ml.clock import now_ms`):\n  " + \
        "\n  ".join(bad)
