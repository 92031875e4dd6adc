"""Every module under valve/ imports, and the runtime's module-level import graph has no cycle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "valve"
OPTIONAL = {"torch", "cuda"}  # the extras (valve[torch], valve[cuda]): a module needing them may skip


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "proto" not in p.relative_to(PACKAGE).parts}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports(name: str) -> None:
    try:
        importlib.import_module(name)
    except ImportError as e:
        top = (e.name or "").split(".")[0]
        if top in OPTIONAL:
            pytest.skip(f"{name} needs the optional {top}")
        raise


def imports_of(path: Path, name: str, known: set[str], lazy: bool = False) -> set[str]:
    """The valve modules `name` imports: at module level (also under if/try) when it is imported, and with `lazy`
    also those its functions import when called."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for a in node.names:  # `from pkg import module` imports the module
                    out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
            elif lazy or isinstance(node, (ast.If, ast.Try)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, (ast.stmt, ast.excepthandler))])

    visit(ast.parse(path.read_text(), str(path)).body)
    return {m for m in out if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def runtime_graph(lazy: bool = False) -> dict[str, set[str]]:
    known = set(MODULES)
    return {n: {m for m in imports_of(p, n, known, lazy) if m.startswith("valve.runtime")}
            for n, p in MODULES.items() if n.startswith("valve.runtime")}


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-lazy-imports"])
def test_runtime_import_graph_has_no_cycle(lazy: bool) -> None:
    graph = runtime_graph(lazy)
    assert "valve.runtime.memory.backend" in graph["valve.runtime.memory.pool"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_find_cycle_reports_the_path() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_sees_module_level_and_lazy_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from valve.runtime import control\nfrom valve.runtime.memory.pool import KVPool\n"
                   "try:\n    import valve.runtime.sim\nexcept ImportError:\n    pass\n"
                   "def f():\n    if True:\n        from . import cli\n")
    known = set(MODULES)
    eager = {"valve.runtime.control", "valve.runtime.memory.pool", "valve.runtime.sim"}
    assert imports_of(src, "valve.runtime.x", known) == eager
    assert imports_of(src, "valve.runtime.x", known, lazy=True) == eager | {"valve.runtime.cli"}
