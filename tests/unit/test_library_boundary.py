"""Both ways of starting ``bz`` run the same command line.

(That the library never imports ``bz.commands`` is checked on the import graph, in
``test_import_graph.py``.)
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest


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
