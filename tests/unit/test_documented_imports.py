"""Every ``bz`` import the documentation and the examples show still works, and none of
them reaches into a private module.

The README, docs/*.md, the plugin guide (tests/spec/custom-plugin-README.md) and the
examples are what users, plugin authors and embedders copy; a name moved or made private
must not leave them an ImportError. The test pins no list: it reads the files.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# `from bz.x import a, b as c` on one line or in parentheses over several; `import bz.x`.
_FROM = re.compile(r"^\s*from\s+(bz(?:\.\w+)*)\s+import\s+(\([^)]*\)|[^\n#]+)", re.MULTILINE)
_IMPORT = re.compile(r"^\s*import\s+(bz(?:\.\w+)*)(?:\s+as\s+\w+)?\s*$", re.MULTILINE)


def documented_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "tests" / "spec" / "custom-plugin-README.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted(p for p in (ROOT / "examples").rglob("*") if p.suffix in (".py", ".md"))
    return files


def documented_imports() -> list[tuple[str, str, str | None]]:
    """``(file, module, name)``; ``name`` is None for ``import module``."""
    found: list[tuple[str, str, str | None]] = []
    for path in documented_files():
        text = path.read_text(encoding="utf-8")
        where = str(path.relative_to(ROOT))
        for match in _FROM.finditer(text):
            names = match.group(2).strip().strip("()")
            for item in names.split(","):
                name = item.split(" as ")[0].strip()
                if name:
                    found.append((where, match.group(1), name))
        found += [(where, match.group(1), None) for match in _IMPORT.finditer(text)]
    return found


IMPORTS = documented_imports()


def test_the_documentation_shows_imports_from_bz() -> None:
    # The reader above finds them: the plugin guide and the examples alone use a dozen.
    modules = {module for _, module, _ in IMPORTS}
    assert {"bz", "bz.plugins", "bz.config", "bz.testing"} <= modules


@pytest.mark.parametrize(
    ("where", "module", "name"), IMPORTS, ids=[f"{w}:{m}:{n}" for w, m, n in IMPORTS]
)
def test_a_documented_import_works_and_is_public(
    where: str, module: str, name: str | None
) -> None:
    assert not any(part.startswith("_") for part in module.split(".")), (
        f"{where} imports from the private module {module}"
    )
    imported = importlib.import_module(module)
    if name is None:
        return
    assert not name.startswith("_"), f"{where} imports the private name {module}.{name}"
    assert hasattr(imported, name), f"{where}: `from {module} import {name}` fails"
    public = getattr(imported, "__all__", None)
    assert public is None or name in public, f"{where}: {module}.{name} is not in __all__"
