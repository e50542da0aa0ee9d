"""``run_log``: the run as JSON lines, one per epoch, that ``bz report`` turns into plots.

Built in (no extra). Writes ``run_log.jsonl`` into the run directory
(``runs/<timestamp>`` unless ``log_dir`` is given). Every line is a JSON object whose
``event`` says what it is:

* ``start``: time, configured epochs, hyperparameters, device, world size, plugins.
* ``step`` (only with ``step_interval``): epoch, global step, that batch's loss, the
  gradient norm before clipping and the learning rates.
* ``epoch``: losses, training and validation metrics, learning rates, seconds, the
  global step, and the scalars other plugins published in ``context.extra["scalars"]``.
* ``end``: epochs completed, whether training stopped early, total seconds, the active
  plugins and what plugins left in ``context.extra`` (their summaries).
* ``failed`` instead of ``end`` when training fails, with the error.

Lines are written as they happen (line-buffered), so a crashed run keeps its history.
Numbers that are not finite (a diverged loss) are written as ``null``.

``step_interval`` reads the batch loss and the gradient norm back to the host every that
many steps: one device synchronisation each time, none on the other steps. Leave it off
on GPUs unless you need it; every 50 or 100 steps costs little.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any, TextIO

import attrs

from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, Order, hook
from bz.plugins._run_dir import run_directory
from bz.plugins._scalars import (
    EXTRA_SCALARS_KEY,
    LoggerClock,
    extra_scalars,
    learning_rates,
    step_scalars,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from bz.plugins._context import PluginContext

RUN_LOG_FILE = "run_log.jsonl"
"""The file name ``bz report`` looks for inside a run directory."""

# Keys of context.extra written elsewhere in the log (or not worth writing).
_EXTRA_SKIPPED = frozenset({"active_plugins", EXTRA_SCALARS_KEY, "run_dir"})


@attrs.frozen
class RunLogConfig:
    """Options of ``run_log``."""

    log_dir: str | None = None
    """Folder for ``run_log.jsonl``; default: the run directory (``runs/<timestamp>``)."""
    step_interval: int | None = attrs.field(default=None, validator=at_least(1))
    """Also log the batch loss, gradient norm and learning rate every N steps (null: never)."""


def json_safe(value: Any) -> Any:
    """``value`` made JSON-writable: non-finite floats become None, unknowns strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return json_safe(item())  # a 0-d tensor or numpy scalar someone left in extra
    return str(value)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunLog:
    """One JSON line per epoch (and optionally per N steps); rank 0 only.

    Other ranks of a distributed run write nothing. Read the result with
    ``bz report RUN_DIR``.
    """

    Config = RunLogConfig
    order = Order(last=True)
    """It reports the epoch: after every other plugin, so it sees the metrics they add."""

    def __init__(self, config: RunLogConfig | None = None) -> None:
        self.name = "run_log"
        self.config = config or RunLogConfig()
        self.path: Path | None = None
        """The ``run_log.jsonl`` being written (set when training starts, on rank 0)."""
        self._file: TextIO | None = None
        self._started = 0.0
        self._epochs_done = 0
        self._clock = LoggerClock(self, self.config.step_interval, self._log_step)

    end_training_batch: Callable[[PluginContext], None]
    """The step line; present only with ``step_interval``."""
    gradient_norm_every: int
    """Asks the loop for the gradient norm on the steps logged (with ``step_interval``)."""

    # -- writing ------------------------------------------------------------------------

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(json_safe(record), separators=(",", ":")) + "\n")

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Open the log and write the ``start`` line (rank 0 only)."""
        if not context.is_main_process:
            return
        self.path = run_directory(context, self.config.log_dir) / RUN_LOG_FILE
        # Line-buffered: each record reaches the file as soon as it is written.
        self._file = self.path.open("a", encoding="utf-8", buffering=1)
        self._started = time.perf_counter()
        self._write(
            {
                "event": "start",
                "time": _now(),
                "epochs": context.epochs,
                "hyperparameters": context.hyperparameters,
                "device": str(context.device) if context.device is not None else None,
                "world_size": context.world_size,
                "plugins": context.extra.get("active_plugins", []),
                "training_batches_per_epoch": context.training_batches_per_epoch,
                "validation_batches_per_epoch": context.validation_batches_per_epoch,
            }
        )

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Start the epoch's clock; note the learning rate the epoch trains with."""
        if self._file is None:
            return
        self._clock.start_epoch(context)

    def _log_step(self, context: PluginContext) -> None:
        """Every ``step_interval`` steps, the step's line (its only host reads)."""
        if self._file is None or not self._clock.due(context):
            return
        scalars = step_scalars(context)
        self._write(
            {
                "event": "step",
                "epoch": context.epoch,
                "step": context.global_step,
                "batch": context.batch_index,
                "loss": scalars.get("step/loss"),
                "grad_norm": scalars.get("step/grad_norm"),
                "lr": learning_rates(context.optimizer),
            }
        )

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """The epoch's line."""
        if self._file is None:
            return
        validated = context.validation_batch_count > 0
        self._epochs_done = context.epoch + 1
        self._write(
            {
                "event": "epoch",
                "epoch": context.epoch,
                "step": context.global_step,
                "time": _now(),
                "seconds": self._clock.epoch_seconds(),
                "training_loss": context.training_loss,
                "validation_loss": context.validation_loss if validated else None,
                "training_metrics": context.training_metrics,
                "validation_metrics": context.validation_metrics,
                "lr": self._clock.rates,
                "scalars": extra_scalars(context),
            }
        )

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """The ``end`` line, with the plugins' summaries; close the file."""
        if self._file is None:
            return
        self._write(
            {
                "event": "end",
                "time": _now(),
                "epochs_completed": self._epochs_done,
                "stopped_early": context.should_stop_training
                and self._epochs_done < context.epochs,
                "seconds": time.perf_counter() - self._started,
                "plugins": context.extra.get("active_plugins", []),
                "extra": {
                    key: value for key, value in context.extra.items() if key not in _EXTRA_SKIPPED
                },
            }
        )
        self._close()

    @hook
    def on_exception(self, context: PluginContext) -> None:
        """The ``failed`` line (``interrupted`` for Ctrl-C / SIGTERM: the run resumes);
        close the file."""
        if self._file is None:
            return
        error = context.exception
        self._write(
            {
                "event": "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                "time": _now(),
                "epoch": context.epoch,
                "step": context.global_step,
                "error": f"{type(error).__name__}: {error}" if error is not None else None,
                "seconds": time.perf_counter() - self._started,
            }
        )
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as RunLog(RunLogConfig(**options)).
_: ConfiguredPluginClass[RunLogConfig] = RunLog
