"""Subprocesses for the checkpoint-store tests: ``bz`` that dies, stalls or fails where
the environment says, at the store's own seams (no knowledge of the loop needed).

* ``BZ_TEST_KILL_BEFORE=NAME`` / ``BZ_TEST_KILL_AFTER=NAME``: SIGKILL right before or
  right after the rename that puts file ``NAME`` in place (``epoch-0004.pt``,
  ``model.pt.json``, ...).
* ``BZ_TEST_KILL_IN=NAME``: SIGKILL halfway through writing ``NAME``'s bytes.
* ``BZ_TEST_PAUSE_BEFORE=NAME``: before that rename, create ``paused`` in the current
  folder and wait until ``release`` appears there.
* ``BZ_TEST_FAIL=NAME,NAME`` (or ``*``): writing those files fails with ENOSPC, as on
  a full disk.
* ``BZ_TEST_SIGNAL=INT|TERM|KILL`` with ``BZ_TEST_SIGNAL_AT_STEP=N``: as in
  :mod:`tests._fault_support`.

The kill tests start those subprocesses with :func:`start_child` / :func:`run_child`
and compare the final checkpoints with :func:`final_state`; :func:`train_each` trains
several projects in one process (the clean reference runs, which nothing interrupts);
:func:`train_here` resumes a killed run in the test's own process (it reads only what
the killed process left on disk, so an interpreter of its own adds nothing).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tests._child import FAULT_CHILD, STORE_CHILD
from tests._fault_support import REPO_ROOT, RESUME_TRAIN_PY, write_half_and_die
from tests._fault_support import child_main as fault_child_main

SETUP_MARKER = "setup-ran"

TRAIN_PY = (
    "from pathlib import Path\n"
    "from tests._fault_support import resume_setup\n\n\n"
    "def setup(config):\n"
    f"    Path({SETUP_MARKER!r}).touch()\n"
    "    return resume_setup(config)\n"
)
"""``train.py`` that leaves ``setup-ran`` behind, so tests see whether setup() ran."""

__all__ = [
    "FAULT_CHILD",
    "RESUME_TRAIN_PY",
    "SETUP_MARKER",
    "STORE_CHILD",
    "TRAIN_PY",
    "child_env",
    "child_main",
    "final_state",
    "run_child",
    "start_child",
    "train_each",
    "train_here",
]


def child_env(**faults: str) -> dict[str, str]:
    """The test's environment less ``BZ_TEST_*`` and ``BZ_CONFIG``, with the repository
    importable (``tests._*`` modules) and ``faults`` added."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("BZ_TEST_") and key != "BZ_CONFIG"
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(faults)
    return env


def start_child(
    folder: Path, *args: str, child: str = FAULT_CHILD, **faults: str
) -> subprocess.Popen[str]:
    """``bz ARGS`` (``train --log-format json`` without ``args``) in ``folder``, in its own
    process with the ``faults`` in its environment; stdout and stderr in one pipe."""
    return subprocess.Popen(
        [sys.executable, "-c", child, *(args or ("train", "--log-format", "json"))],
        cwd=folder,
        env=child_env(**faults),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_child(
    folder: Path, *args: str, child: str = FAULT_CHILD, **faults: str
) -> tuple[int, str]:
    """:func:`start_child`, waited for: its exit code and output (stdout and stderr)."""
    process = start_child(folder, *args, child=child, **faults)
    output, _ = process.communicate(timeout=600)  # a safety net for a hung child
    return process.returncode, output


def final_state(folder: Path, epochs: int) -> dict[str, torch.Tensor]:
    """The model and optimizer state of the checkpoint after epoch ``epochs`` (counted
    from 1) of the one run in ``folder``, by name (``optimizer.<index>.<key>``)."""
    (run_dir,) = (folder / ".bz" / "checkpoints").iterdir()
    path = run_dir / f"epoch-{epochs:04d}.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state: dict[str, torch.Tensor] = dict(payload["model"])
    for index, per_param in payload["optimizer"]["state"].items():
        for key, value in per_param.items():
            state[f"optimizer.{index}.{key}"] = value
    return state


def train_here(folder: Path, *args: str) -> tuple[int, str]:
    """``bz train --log-format json ARGS`` in ``folder``, run by this process (click's
    runner, no supervisor, no faults): its exit code and output, as :func:`run_child`."""
    import pytest
    from click.testing import CliRunner

    from bz.commands import cli

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("BZ_CONFIG", raising=False)
        result = CliRunner().invoke(cli, ["train", "--log-format", "json", *args])
    return result.exit_code, result.stdout + result.stderr


EXIT_CODE_FILE = "exit-code"
"""What :func:`train_each` leaves in each folder: the exit code of its ``bz train``."""


def train_each(folders: list[Path]) -> None:
    """``bz train`` in each folder in turn, in one process started for them (one
    interpreter start instead of one per run); each folder gets :data:`EXIT_CODE_FILE`."""
    code = (
        "import sys; from tests._checkpoint_support import train_each_main; "
        "train_each_main(sys.argv[1:])"
    )
    subprocess.run(
        [sys.executable, "-c", code, *map(str, folders)],
        env=child_env(),
        capture_output=True,
        timeout=900,  # a safety net for a hung child, not a timing assertion
        check=False,
    )


def train_each_main(folders: list[str]) -> None:
    """The process :func:`train_each` starts."""
    from bz import commands as cli

    for folder in folders:
        os.chdir(folder)
        try:
            cli.main(["train", "--log-format", "json"])
            code: object = 0
        except SystemExit as exit_:
            code = exit_.code
        Path(EXIT_CODE_FILE).write_text(str(code if isinstance(code, int) else 1))


def _final_name(tmp: str) -> str:
    # ".epoch-0004.pt.1234.tmp" -> "epoch-0004.pt"
    return os.path.basename(tmp)[1:].rsplit(".", 2)[0]


def child_main() -> None:
    """Install the faults the environment asks for, then run ``bz`` with the arguments."""
    from bz.training.checkpoint import store as _checkpoint_store

    kill_before = os.environ.get("BZ_TEST_KILL_BEFORE")
    kill_after = os.environ.get("BZ_TEST_KILL_AFTER")
    pause_before = os.environ.get("BZ_TEST_PAUSE_BEFORE")
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        name = os.path.basename(os.fspath(dst))
        if name == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)
        if name == pause_before:
            Path("paused").touch()
            while not Path("release").exists():
                time.sleep(0.05)
        real_replace(src, dst)
        if name == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace  # type: ignore[assignment]  # the test's fault injection

    kill_in = os.environ.get("BZ_TEST_KILL_IN")
    if kill_in:
        real_save = torch.save

        def save(obj: object, file: Any, *args: Any, **kwargs: Any) -> None:
            target = getattr(getattr(file, "file", None), "name", "")
            if _final_name(str(target)) != kill_in:
                real_save(obj, file, *args, **kwargs)
                return
            write_half_and_die(real_save, obj, file)

        torch.save = save  # type: ignore[assignment]  # the test's fault injection

    failing = os.environ.get("BZ_TEST_FAIL")
    if failing:
        names = set(failing.split(","))
        real_write_tmp = _checkpoint_store.write_tmp

        def write_tmp(path: Path, write: Any) -> tuple[Path, int, str]:
            if "*" in names or path.name in names:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write_tmp(path, write)

        _checkpoint_store.write_tmp = write_tmp

    fault_child_main()  # signals at a step, then bz itself


if __name__ == "__main__":
    child_main()
    sys.exit(0)
