"""The plan of the house, checked: imports inside ``src/bz`` point one way.

DEVELOPERS.md's layout promises that no module of bz imports another that (directly or
through others) imports it back, and that the library never imports the command line
(``bz.commands``): programs that embed bz get the library without click's commands.
Imports inside functions count (they run, later). Imports under ``if TYPE_CHECKING:``
do not run, but they are a plan too: a type-only import back up the house means the lower
module knows the one above it, so no cycle is allowed counting them either.
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


def _imports(node: ast.AST, typing: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements under ``node``; those under ``if TYPE_CHECKING:`` only
    when ``typing``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            branches = [*child.body, *child.orelse] if typing else child.orelse
            yield from (n for e in branches for n in _imports_of(e, typing))
            continue
        yield from _imports_of(child, typing)


def _imports_of(node: ast.AST, typing: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _imports(node, typing)


def _package_of(module: str) -> list[str]:
    path = MODULES[module]
    parts = module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def imports_of(module: str, *, typing: bool = False) -> set[str]:
    """The bz modules ``module`` imports when it runs (``typing``: or type-checks)."""
    found: set[str] = set()
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in _imports(tree, typing):
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
TYPED_GRAPH = {module: imports_of(module, typing=True) for module in MODULES}
"""The graph counting ``if TYPE_CHECKING:`` imports too."""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for target in sorted(graph[module]):
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

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_graph_is_read_from_the_real_source() -> None:
    # The checks below would pass on an empty graph: make sure it is the house we know.
    assert "bz.commands.main" in GRAPH
    assert "bz.training.loop" in GRAPH["bz.training.trainer"]
    assert "bz.plugins._context" in GRAPH["bz.training.loop"]
    # Type-only imports are read as well, and only into the typed graph.
    assert "bz.plugins._sandbox" in TYPED_GRAPH["bz.training.loop"]
    assert "bz.plugins._sandbox" not in GRAPH["bz.training.loop"]
    assert all(GRAPH[module] <= TYPED_GRAPH[module] for module in MODULES)


def test_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []


def test_no_import_cycle_counting_type_only_imports() -> None:
    assert _cycles(TYPED_GRAPH) == []


def test_the_library_never_imports_the_command_line() -> None:
    # `python -m bz` is the command line's other door, not the library.
    command_line = {"bz.commands", "bz.__main__"}
    library = [m for m in GRAPH if m not in command_line and not m.startswith("bz.commands.")]
    offenders = {
        module: sorted(t for t in GRAPH[module] if t.startswith("bz.commands"))
        for module in library
    }
    assert {module: targets for module, targets in offenders.items() if targets} == {}
