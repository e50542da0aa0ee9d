"""The run directory: one folder per run that the logging plugins share.

``tensorboard``, ``run_log`` and ``profiler`` write into a folder of their own when
their options name one. Otherwise they share the run directory: the first of them to
ask creates ``runs/<timestamp>`` (``runs/<timestamp>-2`` when two runs start in the
same second) and records it in ``context.extra["run_dir"]``, where the others — and any
third-party plugin — find it. ``bz report`` reads the same folder.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bz.plugins._context import PluginContext

RUN_DIR_KEY = "run_dir"
"""``context.extra`` key holding the shared run directory (a string)."""

RUNS_ROOT = Path("runs")

# `bz tune` names each trial's folder (runs/<study>/trial-<n>) through this variable, so
# the plugins of a trial need no options of their own.
run_dir_hint: ContextVar[Path | None] = ContextVar("bz_run_dir_hint", default=None)


def run_directory(context: PluginContext, requested: str | None = None) -> Path:
    """The folder a logging plugin writes into, created if needed.

    ``requested`` (the plugin's own option) wins; otherwise the run's shared folder,
    created on first use.
    """
    if requested is not None:
        path = Path(requested)
        path.mkdir(parents=True, exist_ok=True)
        return path
    shared = context.extra.get(RUN_DIR_KEY)
    if isinstance(shared, (str, Path)):
        path = Path(shared)
        path.mkdir(parents=True, exist_ok=True)
        return path
    hint = run_dir_hint.get()
    path = _fresh(hint if hint is not None else RUNS_ROOT / time.strftime("%Y%m%d-%H%M%S"))
    context.extra[RUN_DIR_KEY] = str(path)
    return path


def _fresh(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``...: the first that did not exist (race-free)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = base, 1
    while True:
        try:
            candidate.mkdir()
        except FileExistsError:
            number += 1
            candidate = base.with_name(f"{base.name}-{number}")
            continue
        return candidate
