"""The house rules that a reviewer would otherwise check by eye (doc/architecture.md).

- The layer contracts of ``.importlinter`` hold (import-linter reads the real import graph).
- No import cycle between modules, counting imports under ``TYPE_CHECKING`` and inside functions.
- At most ``MAX_LAZY`` project imports inside functions of product code, each with a comment
  right above it saying why (a heavy dependency loaded lazily, or a child process's entry).
- No product module over ``MAX_MODULE`` lines; no function over ``MAX_FUNCTION`` lines unless
  its docstring says why it must be one function (a Numba driver).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("proto", "cluster", "master", "balancer", "storage", "worker")
MAX_LAZY = 10
MAX_MODULE = 700
MAX_FUNCTION = 80
ONE_FUNCTION = "One function on purpose"  # the docstring phrase of an allowed long function


def product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_layer_contracts_hold():
    # in a child process: import-linter configures logging with dictConfig, which disables every
    # logger that exists already (the cluster's), and later tests read those loggers' records
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: the graph is a few hundred deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_strongly_connected_finds_a_planted_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert strongly_connected(graph) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycle_between_modules():
    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph(*PRODUCT, include_external_packages=False, cache_dir=None)  # no cache in the tree
    assert strongly_connected(graph) == []


def lazy_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, commented) of each project import inside a function of ``path``."""
    source = path.read_text()
    lines = source.splitlines()
    out = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith(".") or name.split(".")[0] in PRODUCT:
                    above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
                    out.append((node.lineno, name, above.startswith("#")))
    return sorted(set(out))


def test_few_imports_inside_functions_each_says_why():
    found = [(module_name(p), line, name, commented) for p in product_files() for line, name, commented in lazy_imports(p)]
    assert len(found) <= MAX_LAZY, f"{len(found)} project imports inside functions (at most {MAX_LAZY}): {found}"
    silent = [(m, line, name) for m, line, name, commented in found if not commented]
    assert not silent, f"say why above each import inside a function: {silent}"


def test_lazy_imports_are_seen(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef f():\n    # why\n    from worker import tiles\n    import json\n"
                      "    from . import sibling\n")
    assert lazy_imports(sample) == [(5, "worker", True), (7, ".", False)]


def test_no_module_over_the_limit():
    big = {module_name(p): n for p in product_files() if (n := len(p.read_text().splitlines())) > MAX_MODULE}
    assert not big, f"modules over {MAX_MODULE} lines: {big}; split them by concern"


def long_functions(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION and ONE_FUNCTION not in (ast.get_docstring(node) or ""):
                out.append((node.name, length))
    return out


def test_no_function_over_the_limit():
    long = {module_name(p): fs for p in product_files() if (fs := long_functions(p))}
    assert not long, f"functions over {MAX_FUNCTION} lines: {long}"
