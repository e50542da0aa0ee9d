"""``bz train`` with a plugin that hangs while it loads trains on without it.

An in-process plugin whose import or ``create`` blocks (a sleep, a socket that never
answers) is interrupted after ``plugin_start_timeout``, reported by name with the limit
(one ``plugin_failed`` event, its stage), and training runs to the end without it. One
that cannot be interrupted ends the training process, saying that nothing was trained,
and the supervising ``bz train`` restarts training without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests._child import BZ_CHILD, SHORT_WAITS_ENV
from tests._plugin_packages_support import REPO, write_distribution
from tests._support import TINY_TRAIN_PY, json_events

_MODULES = {
    "hanging_mod/__init__.py": "",
    "hanging_mod/creating.py": """
        import time


        class Hanging:
            name = "hang_create"

            def end_epoch(self, context: object) -> None: ...

            @classmethod
            def create(cls, options: object, run_config: object) -> "Hanging":
                time.sleep(3600)  # waits for a server that never answers
                return cls()
    """,
    "hanging_mod/importing.py": "import time\n\ntime.sleep(3600)\n",
    # As an import stuck in native code that holds the interpreter: no thread of the
    # process runs Python again (libc's sleep, called without letting the GIL go; no
    # signal wakes it, as a deadlocked lock would not wake).
    "hanging_mod/held.py": (
        "import ctypes\nimport signal\n\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGUSR1})\n"
        "ctypes.PyDLL(None).sleep(3600)\n"
    ),
    "hanging_mod/exiting.py": "import os\n\nos._exit(0)\n",
    # As an import that waits in native code which ignores signals (SIGALRM blocked).
    "hanging_mod/blocked.py": (
        "import signal\nimport time\n\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "time.sleep(3600)\n"
    ),
    "hanging_mod/native.py": """
        import signal
        import time


        class Native:
            name = "hang_native"

            def __init__(self) -> None:
                # As native code that never returns to Python and ignores signals.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                time.sleep(3600)
    """,
}
_ENTRIES = {
    "hang_create": "hanging_mod.creating:Hanging",
    "hang_import": "hanging_mod.importing:Plugin",
    "hang_native": "hanging_mod.native:Native",
    "hang_blocked_import": "hanging_mod.blocked:Plugin",
    "hang_held_import": "hanging_mod.held:Plugin",
    "exit_import": "hanging_mod.exiting:Plugin",
}


def _train(
    folder: Path,
    plugins: list[str],
    command: tuple[str, ...] = ("train", "--log-format", "json"),
    *,
    short_waits: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``bz COMMAND`` in its own process; ``short_waits``: through tests/_child.py with
    ``BZ_TEST_SHORT_WAITS`` (a hook that never returns ends the process 2 s after its
    interruption, not 10)."""
    site = write_distribution(folder / "site", "hanging-plugins", _ENTRIES, _MODULES)
    (folder / "train.py").write_text(TINY_TRAIN_PY, encoding="utf-8")
    config: dict[str, Any] = {
        "epochs": 1,
        "device": "cpu",
        "plugins": plugins,
        "plugin_timeout": 2,
        "plugin_start_timeout": 1,
    }
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BZ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site)])
    entry = ["-m", "bz"]
    if short_waits:
        env[SHORT_WAITS_ENV] = "1"
        entry = ["-c", BZ_CHILD]
    return subprocess.run(
        [sys.executable, *entry, *command],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a safety net for a hung run (the defect), not a timing assertion
        check=False,
    )


@pytest.mark.slow
def test_bz_train_goes_on_without_a_plugin_that_hangs_while_loading(tmp_path: Path) -> None:
    done = _train(tmp_path, ["hang_create", "hang_import"])
    assert done.returncode == 0, done.stderr[-3000:]
    failed = {
        e["plugin"]: (e["hook"], e["error"])
        for e in json_events(done.stdout)
        if e["event"] == "plugin_failed"
    }
    # Named where each hung, as every load fault is: the plugin's own line.
    folder = tmp_path / "site" / "hanging_mod"
    assert failed == {
        name: (
            stage,
            f"{folder / module}:{line}: PluginStartTimeout: plugin {name!r} took longer than "
            f"plugin_start_timeout (1 s) in its {stage}",
        )
        for name, stage, module, line in (
            ("hang_create", "create", "creating.py", 12),
            ("hang_import", "import", "importing.py", 3),
        )
    }
    (run,) = (tmp_path / ".bz" / "checkpoints").iterdir()
    assert (run / "model.pt").exists()  # trained to the end without them


@pytest.mark.slow
def test_a_plugin_that_cannot_be_interrupted_while_loading_is_restarted_without(
    tmp_path: Path,
) -> None:
    # Signals blocked (native code): EXIT_AFTER_S after the interruption (10 s; 2 s
    # here) bz names it and ends the training process, which has trained nothing;
    # `bz train` restarts without it.
    done = _train(tmp_path, ["hang_native"], short_waits=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("bz:")]
    assert lines[:2] == [
        "bz: error: plugin 'hang_native' did not return 2 s after it was interrupted "
        "(plugin 'hang_native' ran longer than plugin_start_timeout (1 s)); ending the run "
        "while plugins load, before training started: nothing was trained",
        "bz: training exited with code 1 without finishing in plugin 'hang_native' "
        "(while loading, in its create); restarting from the run's newest checkpoint "
        "(from the start if it has none) without it (restart 1 of 3)",
    ]
    (run,) = (tmp_path / ".bz" / "checkpoints").iterdir()
    assert (run / "model.pt").exists()  # trained to the end without it


@pytest.mark.slow
def test_bz_check_config_names_a_plugin_that_hangs_while_it_imports(tmp_path: Path) -> None:
    # check-config imports each listed plugin and checks its options (it creates none):
    # a hang there is bounded the same way, and is one line, exit 2.
    done = _train(tmp_path, ["hang_import"], ("check-config",))
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        "PluginStartTimeout: plugin 'hang_import' took longer than plugin_start_timeout "
        "(1 s) in its import"
    ) in done.stderr


@pytest.mark.slow
def test_bz_check_config_names_an_import_that_cannot_be_interrupted(tmp_path: Path) -> None:
    # No supervisor here: 10 s after the interruption bz names the plugin and the line
    # its import hangs at, as check-config names every plugin it cannot check; exit 2.
    done = _train(tmp_path, ["hang_blocked_import"], ("check-config",))
    assert done.returncode == 2, done.stderr[-3000:]
    module = tmp_path / "site" / "hanging_mod" / "blocked.py"
    assert done.stderr.splitlines() == [
        f"bz: error: bzconfig.json: plugin 'hang_blocked_import' failed in import: "
        f"{module}:5: PluginStartTimeout: plugin 'hang_blocked_import' took longer than "
        "plugin_start_timeout (1 s) in its import, and did not return 10 s after it was "
        "interrupted (native code that ignores signals?)"
    ]


@pytest.mark.slow
def test_bz_check_config_names_an_import_stuck_holding_the_interpreter(tmp_path: Path) -> None:
    # Nothing in that process runs: `bz check-config` checks in a child it watches, and
    # names the plugin and its line once the limit and 15 s have passed; exit 2.
    done = _train(tmp_path, ["hang_held_import"], ("check-config",))
    assert done.returncode == 2, done.stderr[-3000:]
    module = tmp_path / "site" / "hanging_mod" / "held.py"
    (line,) = done.stderr.splitlines()
    prefix = (
        f"bz: error: bzconfig.json: plugin 'hang_held_import' failed in import: {module}:5: "
        "PluginStartTimeout: plugin 'hang_held_import' hung in native code in its import for "
    )
    assert line.startswith(prefix), line
    assert line.endswith(" s (killed)"), line


@pytest.mark.slow
def test_bz_check_config_reports_a_plugin_that_ends_the_process_while_imported(
    tmp_path: Path,
) -> None:
    # `os._exit(0)` in the plugin's import: no report of the checks was written, so the
    # check did not succeed (it exited 0 with no output): the plugin is named, exit 2.
    done = _train(tmp_path, ["exit_import"], ("check-config",))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "bz: error: bzconfig.json: plugin 'exit_import' failed in import: the process "
        "exited with code 0 without finishing"
    ]
