"""The plan of the house, checked: imports inside ``src/bz`` point one way.

DEVELOPERS.md's layout promises that no module of bz imports another that (directly or
through others) imports it back, and that the library never imports the command line
(``bz.commands``): programs that embed bz get the library without click's commands.
Imports under ``if TYPE_CHECKING:`` do not run, so they do not count; imports inside
functions do (they run, later).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import bz

SOURCE = Path(bz.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for e in child.orelse for n in _runtime_imports_of(e))
            continue
        yield from _runtime_imports_of(child)


def _runtime_imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _runtime_imports(node)


def _package_of(module: str) -> list[str]:
    path = MODULES[module]
    parts = module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def imports_of(module: str) -> set[str]:
    """The bz modules ``module`` imports when it runs."""
    found: set[str] = set()
    for node in _runtime_imports(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
            continue
        base = node.module or ""
        if node.level:
            package = _package_of(module)
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([node.module] if node.module else [])])
        for alias in node.names:
            # `from bz.plugins import _sandbox` names a module; `from bz import run` does not.
            submodule = f"{base}.{alias.name}"
            found.add(submodule if submodule in MODULES else base)
    return found & MODULES.keys() - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(GRAPH[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return found


def test_the_graph_is_read_from_the_real_source() -> None:
    # The checks below would pass on an empty graph: make sure it is the house we know.
    assert "bz.commands.main" in GRAPH
    assert "bz.training.loop" in GRAPH["bz.training.trainer"]
    assert "bz.plugins._context" in GRAPH["bz.training.loop"]


def test_no_import_cycle() -> None:
    assert _cycles() == []


def test_the_library_never_imports_the_command_line() -> None:
    # `python -m bz` is the command line's other door, not the library.
    command_line = {"bz.commands", "bz.__main__"}
    library = [m for m in GRAPH if m not in command_line and not m.startswith("bz.commands.")]
    offenders = {
        module: sorted(t for t in GRAPH[module] if t.startswith("bz.commands"))
        for module in library
    }
    assert {module: targets for module, targets in offenders.items() if targets} == {}
