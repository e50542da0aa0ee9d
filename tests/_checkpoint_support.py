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
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tests._fault_support import RESUME_TRAIN_PY, write_half_and_die
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

__all__ = ["RESUME_TRAIN_PY", "SETUP_MARKER", "TRAIN_PY", "child_main"]


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
