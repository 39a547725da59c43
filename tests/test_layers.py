"""The package's shape, read from its source: no import cycle between kdcache's modules (the
command line included), no function longer than a screen, and an install that names every package
and nothing called plain ``cli``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (pyproject.toml's package-dir)
ROOTS = {REPO / "kdcache": "kdcache", REPO / "cli": "kdcache.cli"}
MAX_FUNCTION_LINES = 80
#: (file, qualified name) allowed to be longer: GemNet-OC's constructor mirrors the reference
#: implementation's argument list and block set-up one to one
LONG_FUNCTIONS_ALLOWED = {("kdcache/models/gemnet_oc/model.py", "GemNetOC.__init__")}


def _modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module of kdcache and kdcache.cli."""
    found = {}
    for root, package in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.AST):
    """Every import statement of a module, deferred ones (in a function) included: a deferred
    import that closes a loop only hides the cycle until that function runs. Imports under
    ``if TYPE_CHECKING`` never run and are left out."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The kdcache modules an import statement of ``module`` loads (a name imported from a
    package resolves to its submodule when there is one)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    out = set()
    for alias in node.names:
        if f"{base}.{alias.name}" in known:
            out.add(f"{base}.{alias.name}")
        elif base in known:
            out.add(base)
    return out


def _named_modules(tree: ast.AST, known: set[str]) -> set[str]:
    """Modules a module loads by name with ``importlib.import_module``: the strings it holds that
    name one (``"kdcache.models.painn"`` or ``"kdcache.models.painn:PaiNN"``)."""
    calls = any(isinstance(n, ast.Call) and isinstance(n.func, (ast.Attribute, ast.Name))
                and getattr(n.func, "attr", getattr(n.func, "id", None)) == "import_module" for n in ast.walk(tree))
    if not calls:
        return set()
    strings = (n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))
    return {s.split(":")[0] for s in strings if s.split(":")[0] in known}


def module_imports(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``module`` (source text ``source``) imports."""
    tree = ast.parse(source)
    edges = _named_modules(tree, known)
    for node in _import_statements(tree):
        edges |= _targets(node, module, is_package, known)
    return edges - {module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the kdcache modules it imports."""
    modules = _modules()
    known = set(modules)
    return {name: module_imports(path.read_text(), name, path.name == "__init__.py", known)
            for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_the_import_walker_sees_every_kind_of_import():
    known = {"kdcache", "kdcache.cli", "kdcache.cli.common", "kdcache.keys", "kdcache.models",
             "kdcache.models.painn", "kdcache.store", "kdcache.store.reader"}
    source = """
from typing import TYPE_CHECKING
import numpy
from . import common
from .. import keys as K
from kdcache.store import reader, FeatureStore
if TYPE_CHECKING:
    from kdcache.models import PotentialModel
def later():
    import importlib
    return importlib.import_module("kdcache.models.painn")
"""
    edges = module_imports(source, "kdcache.cli.main", False, known)
    # relative imports resolve inside kdcache.cli; a name resolves to its submodule where there is
    # one, else to its package; a deferred and a by-name import count; a type-only one does not
    assert edges == {"kdcache.cli.common", "kdcache.keys", "kdcache.store.reader", "kdcache.store",
                     "kdcache.models.painn"}
    assert module_imports("from . import reader\nfrom .reader import X", "kdcache.store", True, known) == {
        "kdcache.store.reader"}
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    assert set(import_graph()) >= {"kdcache", "kdcache.cli.main", "kdcache.store.reader"}


def test_no_import_cycle():
    cycles = import_cycles(import_graph())
    assert not cycles, "modules that import each other (directly or around a loop): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def _paths_from(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Each module ``start`` reaches -> one shortest chain of imports to it (breadth first)."""
    paths, todo = {start: [start]}, [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] - set(paths)):
            paths[w] = paths[v] + [w]
            todo.append(w)
    return paths


def test_reading_a_store_needs_no_model_code():
    """Opening, reading and checking a store never loads a model nor the module that runs a
    teacher, not even from a deferred import (stage two must not import the teacher)."""
    paths = _paths_from(import_graph(), "kdcache.store.reader")
    teacher_side = [p for m, p in paths.items() if m.startswith(("kdcache.models", "kdcache.teachers"))
                    or m == "kdcache.store.extract"]
    assert not teacher_side, "kdcache.store.reader reaches teacher code: " + " -> ".join(
        min(teacher_side, key=len))


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function, nested ones and methods included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _functions(node, name + ".")
        else:
            yield from _functions(node, prefix)


def test_no_function_is_longer_than_a_screen():
    too_long = []
    for path in _modules().values():
        rel = path.relative_to(REPO).as_posix()
        for name, node in _functions(ast.parse(path.read_text(), filename=rel)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and (rel, name) not in LONG_FUNCTIONS_ALLOWED:
                too_long.append(f"{rel}:{node.lineno} {name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(too_long)


def test_the_install_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert sorted(settings["packages"]) == sorted(packages)
    assert settings["package-dir"] == {"kdcache.cli": "cli"}


def test_the_command_line_installs_inside_kdcache(tmp_path):
    """Outside the checkout, ``kdcache.cli`` is this repository's cli/ folder and no top-level
    ``cli`` comes from it (it would collide with any other project's ``cli``)."""
    probe = ("import importlib.util, kdcache.cli.main as m; spec = importlib.util.find_spec('cli'); "
             "print(m.__file__); print(spec.origin if spec else None)")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    main_file, top_level_cli = res.stdout.split()
    # editable: the checkout's cli/main.py; from a wheel: site-packages/kdcache/cli/main.py
    assert Path(main_file).parent.name == "cli" and Path(main_file).name == "main.py"
    assert top_level_cli == "None" or not Path(top_level_cli).is_relative_to(REPO)
