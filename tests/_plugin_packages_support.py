"""Installed-looking plugin packages for tests, without pip.

A folder on ``sys.path`` holding ``<name>-<version>.dist-info/`` (``METADATA`` and
``entry_points.txt``) plus the modules is exactly what ``importlib.metadata`` and the
import system see after ``pip install``, so discovery, loading and listing run the real
code paths in a few milliseconds.
"""

from __future__ import annotations

import sys
import textwrap
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_PACKAGE = REPO / "examples" / "custom-plugin"


def write_distribution(
    root: Path,
    name: str,
    entry_points: Mapping[str, str],
    modules: Mapping[str, str] | None = None,
    version: str = "1.0.0",
) -> Path:
    """Write an installed distribution into ``root``; ``modules`` maps file -> source."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = ["[bz.plugins]", *(f"{key} = {value}" for key, value in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for relative, source in (modules or {}).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    return root


class Packages:
    """Makes fake installed packages visible for one test, and forgets them afterwards."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self._root = root
        self._monkeypatch = monkeypatch
        self._count = 0

    def install(
        self,
        name: str,
        entry_points: Mapping[str, str],
        modules: Mapping[str, str] | None = None,
        version: str = "1.0.0",
    ) -> Path:
        """Write a distribution into its own folder and put that folder on ``sys.path``."""
        self._count += 1
        folder = write_distribution(
            self._root / f"site{self._count}", name, entry_points, modules, version
        )
        self._monkeypatch.syspath_prepend(str(folder))
        return folder

    def install_example(self) -> None:
        """``examples/custom-plugin`` as ``pip install -e`` would expose it."""
        project = tomllib.loads((EXAMPLE_PACKAGE / "pyproject.toml").read_text("utf-8"))
        entry_points = project["project"]["entry-points"]["bz.plugins"]
        self.install(project["project"]["name"], entry_points, version="0.1.0")
        self._monkeypatch.syspath_prepend(str(EXAMPLE_PACKAGE))
        self._monkeypatch.syspath_prepend(str(EXAMPLE_PACKAGE / "src"))


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Packages]:
    """Install fake plugin packages for this test only (modules imported are unloaded)."""
    before = set(sys.modules)
    yield Packages(tmp_path / "packages", monkeypatch)
    for module in set(sys.modules) - before:
        # Fake modules must not leak into the next test, which may reuse their names.
        if not module.startswith(("bz", "torch", "_pytest", "structlog")):
            del sys.modules[module]
