"""Architecture rules that import-linter (.importlinter, run by `./dev lint`) cannot express.

- No import cycle among tracker's modules. TYPE_CHECKING imports count, as in .importlinter: a
  module that names another only in its annotations still depends on it.
- No module under tracker/ is longer than MAX_LINES lines.
- bench/ (scripts, not a package) and harness/ never import `tests`.

Each checker is also run on a small input that breaks its rule, so a checker that silently finds
nothing fails too.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400


# --- import cycles -------------------------------------------------------------------------------


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """One shortest cycle [a, b, ..., a] per strongly connected component of `graph`, sorted."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in modules:  # Tarjan's algorithm, iterative
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(edges.get(root, [])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, []))))
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
                if len(component) > 1 or node in edges.get(node, []):
                    components.append(sorted(component))
    return sorted(_shortest_cycle(edges, c) for c in components)


def _shortest_cycle(edges: dict[str, list[str]], component: list[str]) -> list[str]:
    """The shortest path from the component's first module back to itself, inside the component."""
    start, inside = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in edges.get(node, []):
                if child not in inside or child in parents:
                    continue
                parents[child] = node
                if child == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(parents[path[-1]])
                    return path[::-1]
                following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def describe_cycle(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    lines = []
    for importer, imported in itertools.pairwise(cycle):
        details = graph.get_import_details(importer=importer, imported=imported)
        where = ", ".join(f"l.{d['line_number']}: {d['line_contents']}" for d in details)
        lines.append(f"  {importer} -> {imported}" + (f"  ({where})" if where else ""))
    return " -> ".join(cycle) + "\n" + "\n".join(lines)


def test_no_import_cycles_in_tracker() -> None:
    graph = grimp.build_graph("tracker", cache_dir=None)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in tracker:\n" + "\n".join(describe_cycle(graph, c) for c in cycles)


def _write_package(root: Path, name: str, files: dict[str, str]) -> None:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, source in files.items():
        (package / f"{module}.py").write_text(source)


def test_cycle_check_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_package(
        tmp_path,
        "cyclic_pkg",
        {
            "a": "from cyclic_pkg import b\n",
            "b": "from cyclic_pkg import c\n",
            "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyclic_pkg import a\n",
            "d": "from cyclic_pkg import a\n",  # imports into the cycle without being part of it
            "e": "import cyclic_pkg.f\n",
            "f": "import cyclic_pkg.e\n",
        },
    )
    _write_package(tmp_path, "acyclic_pkg", {"a": "from acyclic_pkg import b\n", "b": "import json\n"})
    monkeypatch.syspath_prepend(str(tmp_path))

    graph = grimp.build_graph("cyclic_pkg", cache_dir=None)
    assert import_cycles(graph) == [
        ["cyclic_pkg.a", "cyclic_pkg.b", "cyclic_pkg.c", "cyclic_pkg.a"],
        ["cyclic_pkg.e", "cyclic_pkg.f", "cyclic_pkg.e"],
    ]
    assert "cyclic_pkg.c -> cyclic_pkg.a  (l.3: from cyclic_pkg import a)" in describe_cycle(
        graph, import_cycles(graph)[0]
    )
    assert import_cycles(grimp.build_graph("acyclic_pkg", cache_dir=None)) == []


# --- module size ---------------------------------------------------------------------------------


def oversized(paths: Iterable[Path], limit: int = MAX_LINES) -> list[str]:
    found = []
    for path in sorted(paths):
        count = len(path.read_text(encoding="utf-8").splitlines())
        if count > limit:
            found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {count} lines")
    return found


def test_tracker_modules_are_at_most_400_lines() -> None:
    modules = list((ROOT / "tracker").rglob("*.py"))
    assert len(modules) > 20, "tracker/ not found where expected"
    offenders = oversized(modules)
    assert not offenders, f"modules over {MAX_LINES} lines (split them):\n" + "\n".join(offenders)


def test_size_check_finds_a_long_module(tmp_path: Path) -> None:
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert oversized(tmp_path.glob("*.py")) == [f"{tmp_path / 'long.py'}: {MAX_LINES + 1} lines"]


# --- no test code outside tests/ -----------------------------------------------------------------


def imports_of_tests(source: str) -> list[int]:
    """Line numbers of `import tests[...]`, `from tests[...] import`, and importlib/__import__ calls
    naming `tests` with a literal, anywhere in the module (function bodies included)."""

    def is_tests(name: str | None) -> bool:
        return name is not None and (name == "tests" or name.startswith("tests."))

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(is_tests(alias.name) for alias in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and is_tests(node.module):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            arg = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and is_tests(arg):
                lines.append(node.lineno)
    return sorted(lines)


@pytest.mark.parametrize("folder", ["bench", "harness"])
def test_no_imports_of_tests(folder: str) -> None:
    """bench/ is not a package, so import-linter cannot see it; harness/ is checked here too until it is
    a root package of .importlinter. A missing harness/ has nothing to check."""
    files = sorted((ROOT / folder).rglob("*.py"))
    if folder == "bench":
        assert files, "bench/ has no Python files: moved?"
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {path.read_text(encoding='utf-8').splitlines()[line - 1].strip()}"
        for path in files
        for line in imports_of_tests(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"{folder}/ imports test code:\n" + "\n".join(offenders)


def test_tests_import_check_finds_imports() -> None:
    source = (
        "import os, tests.faultkit\n"
        "from tests import conftest\n"
        "from tests.faultkit import Env\n"
        "def f():\n"
        "    import tests\n"
        "    importlib.import_module('tests.faultkit')\n"
        "    __import__('tests')\n"
        "import testsuite\n"
        "from testsx import y\n"
        "from .tests import z\n"
        "importlib.import_module('testing')\n"
    )
    assert imports_of_tests(source) == [1, 2, 3, 5, 6, 7]
