"""The library never imports the command line, and both ways of starting ``bz`` work.

``bz.commands`` (click) sits on top of the library: an embedder who imports bz, runs
training or writes a plugin must not load it, and an import of it from below would
make a cycle again.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

LIBRARY = (
    "bz, bz.config, bz.plugins, bz.metrics, bz.testing, bz._run, bz._setup, "
    "bz.training.trainer, bz.plugins._loader, bz.plugins.optuna_search"
)


def test_the_library_does_not_import_the_commands() -> None:
    code = f"import sys, {LIBRARY}; print(sorted(m for m in sys.modules if 'commands' in m))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_python_dash_m_bz_runs_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bz", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("bz, version ")


def test_the_console_script_is_the_same_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "bz"]
    main = script.load()
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("bz, version ")
