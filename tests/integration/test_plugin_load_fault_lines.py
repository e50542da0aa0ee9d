"""A plugin that fails while loading is reported at its own file and line.

An exception its code raises (at import, in ``load_config``, ``create`` or the
constructor) keeps its traceback, the plugin's frames in it (``--log-format json``'s
``plugin_failed`` event, ``bz check-config --traceback``), and its one line, which has
no traceback on the console, names the plugin's innermost line too. A problem
bz finds by looking at the plugin (a hook's signature, a misspelled hook, a bad
default) is raised from bz's own code, so its message names the definition's line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tests._plugin_packages_support import Packages, packages
from tests._support import json_events

from bz.commands import cli

__all__ = ["packages"]  # the fixture, imported for the tests below

_MODULES = {
    "lines_mod/__init__.py": "",
    "lines_mod/importing.py": (
        "import json\n\n\ndef connect() -> None:\n    raise OSError('no server')\n\n\nconnect()\n"
    ),
    "lines_mod/plugins.py": """
        import attrs


        class Creating:
            name = "creating"

            def __init__(self) -> None:
                self.open()

            def open(self) -> None:
                raise ValueError("cannot open")

            def end_epoch(self, context: object) -> None: ...


        class Signature:
            name = "signature"

            def end_epoch(self) -> None: ...


        class Misspelled:
            name = "misspelled"

            def end_epoh(self, context: object) -> None: ...


        class Defaults:
            name = "defaults"

            @attrs.frozen
            class Config:
                every: int = "10"  # type: ignore[assignment]

            def __init__(self, config: object) -> None: ...
    """,
}

_ENTRIES = {
    "importing": "lines_mod.importing:Plugin",
    "creating": "lines_mod.plugins:Creating",
    "signature": "lines_mod.plugins:Signature",
    "misspelled": "lines_mod.plugins:Misspelled",
    "defaults": "lines_mod.plugins:Defaults",
}


def _faults(packages: Packages, project: Callable[..., Path]) -> tuple[Path, dict[str, Any]]:
    site = packages.install("lines-plugins", _ENTRIES, _MODULES)
    project({"epochs": 1, "plugins": list(_ENTRIES)})
    trained = CliRunner().invoke(cli, ["train", "--log-format", "json"])
    assert trained.exit_code == 0, trained.output  # trained without them
    events = [e for e in json_events(trained.stdout) if e["event"] == "plugin_failed"]
    return site / "lines_mod", {e["plugin"]: e for e in events}


@pytest.mark.parametrize(
    ("plugin", "line", "end"),
    [
        ("signature", 20, "end_epoch(self) -> None cannot be called as end_epoch(self, context)"),
        (
            "misspelled",
            26,
            "end_epoh is not a hook (did you mean end_epoch?); rename it, or "
            "start its name with _ if it is a helper",
        ),
        ("defaults", 32, "Defaults.Config.every: default '10' does not fit its type"),
    ],
)
def test_a_problem_found_by_looking_names_the_definitions_line(
    packages: Packages, project: Callable[..., Path], plugin: str, line: int, end: str
) -> None:
    folder, faults = _faults(packages, project)
    error = faults[plugin]["error"]
    assert end in error
    assert error.endswith(f" (at {folder / 'plugins.py'}:{line})"), error


def test_an_exception_at_import_names_the_plugins_line(
    packages: Packages, project: Callable[..., Path]
) -> None:
    folder, faults = _faults(packages, project)
    assert faults["importing"]["error"] == (
        "PluginImportError: lines_mod.importing:Plugin (from lines-plugins 1.0.0) failed to "
        f"import: {folder / 'importing.py'}:5: OSError: no server"
    )
    # The JSON traceback still holds the plugin's own frames (the cause's).
    frames = [
        (f["filename"], f["lineno"]) for s in faults["importing"]["exception"] for f in s["frames"]
    ]
    assert (str(folder / "importing.py"), 5) in frames


def test_an_exception_in_the_constructor_keeps_the_plugins_frames(
    packages: Packages, project: Callable[..., Path]
) -> None:
    folder, faults = _faults(packages, project)
    (stack,) = faults["creating"]["exception"]
    lines = [(f["filename"], f["lineno"]) for f in stack["frames"]]
    assert lines[-2:] == [(str(folder / "plugins.py"), 9), (str(folder / "plugins.py"), 12)]
    # Its one line names the innermost of them, as an import failure's does.
    assert faults["creating"]["error"] == f"{folder / 'plugins.py'}:12: ValueError: cannot open"
