"""Import hygiene of eao_jax/ and tfds_builders/: no private library modules, no import cycles.

Read statically with ast (nothing is imported), so function-level imports count too: a cycle
closed inside a function still ties the two modules together, and a private import inside a
function still breaks on a library upgrade. Imports under ``if TYPE_CHECKING:`` never run and
are left out.
"""

from __future__ import annotations

import ast
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("eao_jax", "tfds_builders")
# Libraries whose `_src` trees are private: they move without notice between releases.
PRIVATE_PREFIXES = ("jax._src", "jaxlib._src", "flax._src", "orbax.checkpoint._src", "grain._src")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@functools.cache
def _imports(module: str) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in ``module``; ``from a import b`` gives ``a.b``."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    skipped: set[int] = set()
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _own_target(name: str) -> str | None:
    """The module of ours that importing ``name`` runs (``from pkg import func`` -> ``pkg``)."""
    while name and name not in MODULES:
        if name.split(".")[0] not in PACKAGES:
            return None
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        targets = {_own_target(name) for _, name in _imports(module)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
                    work.append((child, iter(sorted(graph[child]))))
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
                    found.append(sorted(component))
    return sorted(found)


def private_imports(prefixes: tuple[str, ...] = PRIVATE_PREFIXES) -> list[str]:
    """``path:line: name`` of every import of a private library module."""
    hits = []
    for module, path in MODULES.items():
        for line, name in _imports(module):
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                hits.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    return hits


# --------------------------------------------------------------------------------------------
# The checkers themselves


def test_cycle_finder_finds_each_cycle_once():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"g"}}
    assert cycles(graph) == [["a", "b", "c"], ["e", "f"]]  # a self-import is not a cycle between modules
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_read_from_every_level_and_resolved():
    graph = import_graph()
    assert set(MODULES) >= {"eao_jax", "eao_jax.distributed", "eao_jax.main", "tfds_builders"}
    # main imports `from eao_jax import console, distributed` at the top and `train` inside main().
    assert {"eao_jax.console", "eao_jax.distributed", "eao_jax.train"} <= graph["eao_jax.main"]
    assert all(t in MODULES for targets in graph.values() for t in targets)


# --------------------------------------------------------------------------------------------
# The checks


def test_no_import_cycles_among_our_modules():
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_library_imports():
    hits = private_imports()
    assert hits == [], "private library imports:\n" + "\n".join(hits)
