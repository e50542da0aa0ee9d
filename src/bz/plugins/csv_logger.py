"""``csv_logger``: the run's scalars as one CSV file, a row per epoch (and per N steps).

Built in (no extra). Writes ``metrics.csv`` into the run directory (``runs/<timestamp>``
unless ``log_dir`` is given): a header, then one row per epoch with the scalars of
:mod:`bz.plugins._scalars` (``loss/training``, ``accuracy/validation``, ``lr``, ...),
and with ``step_interval`` one row every that many optimizer steps (``step/loss``,
``step/grad_norm``, ``step/lr``). ``pandas.read_csv`` reads it as it is.

Columns are stable: ``kind`` (``epoch`` or ``step``), ``epoch`` (counted from 1, as the
console does), ``step`` (the global step), then every scalar in the order first seen.
A row leaves empty the scalars it does not have. When a scalar appears that the header
lacks (the first epoch row after the first step rows, a metric another plugin publishes
later), the file is rewritten with the wider header, so that every row has every column.

Resuming continues the same file: the plugin's state (saved in checkpoints) holds the
file and how many rows it had at that checkpoint; rows written after it are dropped, so
a run killed and resumed has each epoch and step once.
"""

from __future__ import annotations

import csv
import errno
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, hook
from bz.plugins._run_dir import RUN_DIR_KEY, RUNS_ROOT, run_dir_hint, run_directory
from bz.plugins._scalars import LoggerClock, step_scalars

if TYPE_CHECKING:
    from collections.abc import Callable

    from bz.plugins._context import PluginContext

CSV_FILE = "metrics.csv"
"""The file name inside the run directory (or ``log_dir``)."""

FIXED_COLUMNS = ("kind", "epoch", "step")
"""The first columns of every file, in this order."""


@attrs.frozen
class CsvLoggerConfig:
    """Options of ``csv_logger``."""

    log_dir: str | None = None
    """Folder for ``metrics.csv``; default: the run directory (``runs/<timestamp>``)."""
    step_interval: int | None = attrs.field(default=None, validator=at_least(1))
    """Also write a row of batch loss, gradient norm and learning rate every N steps."""


def _cell(value: float | int | str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return repr(value) if isinstance(value, float) else str(value)


class CsvLogger:
    """One CSV row per epoch (and per N steps) with every scalar; rank 0 only.

    Other ranks of a distributed run write nothing.
    """

    Config = CsvLoggerConfig

    def __init__(self, config: CsvLoggerConfig | None = None) -> None:
        self.name = "csv_logger"
        self.config = config or CsvLoggerConfig()
        self.path: Path | None = None
        """The ``metrics.csv`` being written (set at the first row, on rank 0)."""
        self._active = False
        self._columns: list[str] = list(FIXED_COLUMNS)
        self._rows = 0
        self._fresh = True
        """The file is to be started afresh at the first row (not a resumed one)."""
        self._clock = LoggerClock(self, self.config.step_interval, self._log_step)

    end_training_batch: Callable[[PluginContext], None]
    """The step row; present only with ``step_interval``."""
    gradient_norm_every: int
    """Asks the loop for the gradient norm on the steps written (with ``step_interval``)."""

    # -- state: the file and its rows, so a resumed run continues it ---------------------

    def state_dict(self) -> dict[str, Any]:
        """The file written and how many rows it has (checkpointed)."""
        return {"path": str(self.path) if self.path is not None else None, "rows": self._rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the checkpoint's file, without the rows written after it.

        Called on resume, and when ``plugin_errors: "rewind"`` runs a part again: either
        way the file is cut back to the rows it had at that point.
        """
        path, rows = state.get("path"), state.get("rows")
        if not isinstance(path, str) or not isinstance(rows, int):
            self.path, self._rows, self._fresh = None, 0, True
            return
        if self.config.log_dir is not None:
            path = str(Path(self.config.log_dir) / CSV_FILE)
        self.path = Path(path)
        header, written = _read(self.path) if self._active else (None, [])
        if header is None:  # gone, unreadable, or not this process's to write
            self._rows, self._fresh = 0, True
            return
        kept = written[:rows]
        self._rows, self._fresh, self._columns = len(kept), False, header
        _write_all(self.path, header, kept)

    # -- hooks ---------------------------------------------------------------------------

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Start logging (rank 0 only); the file is created with its first row."""
        self._active = context.is_main_process
        self.path = None
        self._rows = 0
        self._fresh = True
        self._columns = list(FIXED_COLUMNS)
        if self._active:
            check_writable(self._folder(context))

    def _folder(self, context: PluginContext) -> Path:
        """Where ``metrics.csv`` will go (nothing created yet)."""
        if self.config.log_dir is not None:
            return Path(self.config.log_dir)
        shared = context.extra.get(RUN_DIR_KEY)
        if isinstance(shared, (str, Path)):
            return Path(shared)
        return run_dir_hint.get() or RUNS_ROOT

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Note the epoch's learning rate and start its clock."""
        if not self._active:
            return
        self._clock.start_epoch(context)

    def _log_step(self, context: PluginContext) -> None:
        """Every ``step_interval`` steps, the step's row (the only per-step host reads)."""
        if not self._active or not self._clock.due(context):
            return
        self._append("step", context, step_scalars(context))

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """The epoch's row."""
        if not self._active:
            return
        self._append("epoch", context, self._clock.epoch_scalars(context))

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """Nothing is held open: every row is on disk once written."""
        self._active = False

    @hook
    def on_exception(self, context: PluginContext) -> None:
        """Nothing to flush (rows are written whole as they come)."""
        self._active = False

    # -- writing -------------------------------------------------------------------------

    def _target(self, context: PluginContext) -> Path:
        if self.path is None:
            self.path = run_directory(context, self.config.log_dir) / CSV_FILE
        return self.path

    def _append(self, kind: str, context: PluginContext, scalars: Mapping[str, float]) -> None:
        path = self._target(context)
        row: dict[str, str] = {
            "kind": kind,
            "epoch": str(context.epoch + 1),
            "step": str(context.global_step),
        }
        row.update({tag: _cell(value) for tag, value in scalars.items()})
        new = [tag for tag in scalars if tag not in self._columns]
        if self._fresh:
            self._fresh = False
            self._columns += new
            _write_all(path, self._columns, [row])
        elif new:
            header, rows = _read(path)
            self._columns = (header or self._columns) + new
            _write_all(path, self._columns, [*rows, row])
        else:
            with path.open("a", encoding="utf-8", newline="") as file:
                csv.DictWriter(file, self._columns, restval="").writerow(row)
        self._rows += 1


def check_writable(folder: Path) -> None:
    """Refuse, before training, a folder the first row could not be written into.

    Nothing is created: the folder, or the nearest part of its path that exists, must
    be a writable folder. Raised in ``start_training_session``, the error quarantines
    the plugin there, as a ``tensorboard`` whose ``log_dir`` cannot be made is; without
    this check the first row failed at the end of the first epoch.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"cannot create {folder} for {CSV_FILE}: not a folder", str(existing)
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"cannot write {CSV_FILE} into {folder}: not writable", str(existing)
        )


def _read(path: Path) -> tuple[list[str] | None, list[dict[str, str]]]:
    """The header and rows of ``path`` (None and none when it is missing or empty)."""
    try:
        with path.open(encoding="utf-8", newline="") as file:
            reader = csv.DictReader(file)
            rows = [dict(row) for row in reader]
            header = list(reader.fieldnames) if reader.fieldnames else None
    except FileNotFoundError:
        return None, []
    return header, rows


def _write_all(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    """Replace ``path`` with ``columns`` and ``rows`` (atomically: never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as CsvLogger(CsvLoggerConfig(**options)).
_: ConfiguredPluginClass[CsvLoggerConfig] = CsvLogger
