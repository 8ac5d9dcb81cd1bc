"""The package's import graph, read from the source with `ast`: dependencies flow one way.

- no cycle among the package's modules (imports under `if TYPE_CHECKING:` excluded);
- nothing under runner/ imports `ray` or `shardquant.cluster` (executors are found through
  entry points, runner/execution/backends.py);
- algorithms/ imports nothing of the runner (only itself and the kernels).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"runner": "shardquant", "algorithms": "shardquant.algorithms", "kernels": "shardquant.kernels",
           "cluster": "shardquant.cluster"}


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their own name)."""
    out = {}
    for folder, base in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([base, *parts])
            if folder == "runner" and parts and parts[0] in ("algorithms", "kernels", "cluster"):
                continue
            out[name] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imported_names(path: Path, module: str) -> set[str]:
    """Absolute names `path` imports (module-level and inside functions), relative ones resolved;
    for `from X import y` both X and X.y (y may be a submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (parent packages of a target not counted)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        graph[name] = {n for n in imported_names(path, name) if n in files and n != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_real_imports():
    """The graph is not empty by mistake: known edges are found, relative imports resolved."""
    g = import_graph()
    assert "shardquant.execution.worker" in g["shardquant.cluster.ray_executor"]
    assert "shardquant.algorithms.quantizer" in g["shardquant.algorithms.gptq"]
    assert "shardquant.config" in g["shardquant.pipeline"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("forbidden", ["ray", "shardquant.cluster"])
def test_runner_imports_no_cluster(forbidden):
    files = module_files()
    bad = [
        f"{name} imports {n}" for name, path in files.items()
        if not name.startswith(("shardquant.cluster", "shardquant.algorithms", "shardquant.kernels"))
        for n in sorted(imported_names(path, name))
        if n == forbidden or n.startswith(f"{forbidden}.")
    ]
    assert bad == []


def test_algorithms_import_nothing_of_the_runner():
    files = module_files()
    allowed = ("shardquant.algorithms", "shardquant.kernels")
    bad = [
        f"{name} imports {n}" for name, path in files.items() if name.startswith("shardquant.algorithms")
        for n in sorted(imported_names(path, name))
        if n.startswith("shardquant") and not n.startswith(allowed)
    ]
    assert bad == []
