"""A complete bz plugin: file logging, options, error handling and performance numbers.

``custom_logger`` writes one line per epoch (text or JSON Lines) with the losses, the
metrics, the epoch's duration and its throughput (batches per second, and samples per
second when ``hyperparameters.batch_size`` is set), then a summary when training ends.

- Options: an attrs ``Config`` class; bz checks the JSON against it (unknown keys,
  wrong types and out-of-range values are errors with the JSON path).
- Errors: a log file that cannot be opened is reported once and the plugin stays quiet;
  anything else it raises is caught by bz's sandbox, which quarantines the plugin and
  trains on. ``on_exception`` flushes the file when training fails.
- Static checking: ``@hook`` lets mypy check each hook's signature, and the annotated
  ``_contract`` at the end checks that ``CustomLoggerPlugin(Config)`` is how it is made.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import attrs
import structlog

from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, hook

if TYPE_CHECKING:
    from bz.plugins import PluginContext

_log = structlog.get_logger("custom_logger")


@attrs.frozen
class CustomLoggerConfig:
    """Options of ``custom_logger``."""

    log_file: str = "training.log"
    """Where to write, relative to the working directory; folders are created."""
    format: Literal["text", "jsonl"] = "text"
    """``text`` for people, ``jsonl`` (one JSON object per line) for programs."""
    log_interval: int = attrs.field(default=1, validator=at_least(1))
    """Write every N-th epoch (the last epoch is always written)."""
    append: bool = False
    """Append to an existing file instead of replacing it."""


class CustomLoggerPlugin:
    """Writes losses, metrics and throughput to a file, one line per epoch."""

    name = "custom_logger"
    Config = CustomLoggerConfig

    def __init__(self, config: CustomLoggerConfig | None = None) -> None:
        self.config = config or CustomLoggerConfig()
        self._file: TextIO | None = None
        self._epoch_started = 0.0
        self._session_started = 0.0
        self._epochs_written = 0
        self._epoch_seconds: list[float] = []

    # -- hooks -------------------------------------------------------------------------

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Open the log file (or report, once, that it cannot be opened)."""
        self._session_started = time.perf_counter()
        if not context.is_main_process:
            return  # one file per run, not one per process
        path = Path(self.config.log_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a" if self.config.append else "w", encoding="utf-8")
        except OSError as exc:
            # A missing log must not stop training: say so once and do nothing more.
            _log.warning("log_file_unavailable", plugin=self.name, path=str(path), error=str(exc))
            self._file = None
            return
        self._write({"event": "start", "epochs": context.epochs, "device": str(context.device)})

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Start the epoch's clock."""
        self._epoch_started = time.perf_counter()

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """Write the epoch's line: losses, metrics, seconds, batches/s, samples/s."""
        seconds = time.perf_counter() - self._epoch_started
        self._epoch_seconds.append(seconds)
        last = context.epoch + 1 == context.epochs
        if self._file is None or (context.epoch % self.config.log_interval and not last):
            return
        batches = context.training_batch_count
        record: dict[str, Any] = {
            "event": "epoch",
            "epoch": context.epoch,
            "training_loss": context.training_loss,
            "seconds": round(seconds, 4),
            "batches_per_second": round(batches / seconds, 2) if seconds > 0 else None,
        }
        batch_size = context.hyperparameters.get("batch_size")
        if isinstance(batch_size, int) and seconds > 0:
            record["samples_per_second"] = round(batches * batch_size / seconds, 1)
        if context.validation_batch_count:
            record["validation_loss"] = context.validation_loss
        record.update({f"train_{k}": v for k, v in context.training_metrics.items()})
        record.update({f"val_{k}": v for k, v in context.validation_metrics.items()})
        self._write(record)
        self._epochs_written += 1

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """Write the summary line and close the file."""
        total = time.perf_counter() - self._session_started
        timed = self._epoch_seconds
        self._write(
            {
                "event": "end",
                "epochs": len(timed),
                "seconds": round(total, 4),
                "mean_epoch_seconds": round(sum(timed) / len(timed), 4) if timed else None,
            }
        )
        self._close()

    @hook
    def on_exception(self, context: PluginContext) -> None:
        """Training is failing: record why, and make sure the file is on disk."""
        error = context.exception
        self._write({"event": "failed", "error": repr(error) if error is not None else None})
        self._close()

    # -- the file ----------------------------------------------------------------------

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        if self.config.format == "jsonl":
            line = json.dumps(record)
        else:
            line = " ".join(f"{key}={_show(value)}" for key, value in record.items())
        self._file.write(line + "\n")
        # Flushed per line so the log is complete even if the process is killed.
        self._file.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _show(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


_contract: ConfiguredPluginClass[CustomLoggerConfig] = CustomLoggerPlugin
