"""The import graph of src/ddpm has no cycles.

Every ``import`` and ``from ... import`` in every module counts, at module level and inside
functions alike (a function-level import still ties the two modules together); only imports
under ``if TYPE_CHECKING:`` are left out. ``from pkg import name`` is an edge to ``pkg.name``
when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ddpm

SRC = Path(ddpm.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes of ``tree``, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    pkg = ".".join(base + ([node.module] if node.module else []))
                else:
                    pkg = node.module or ""
                targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in files else pkg for a in node.names]
            for t in targets:
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_checker_sees_cycles():
    # the checker itself can fail: a two-module cycle and a longer one are found, a chain is not
    g = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(map(sorted, find_cycles(g))) == [["a", "b"], ["c", "d", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_finds_relative_and_function_level_imports():
    g = import_graph()
    assert "ddpm.checkpoint" in g["ddpm.api"]            # from .checkpoint import ... (module level)
    assert "ddpm.training.loop" in g["ddpm.api"]         # from .training.loop import ... (in a function)
    assert "ddpm.distributed" in g["ddpm.training.step"]  # from .. import distributed


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in src/ddpm: " + "; ".join(" <-> ".join(c) for c in cycles)
