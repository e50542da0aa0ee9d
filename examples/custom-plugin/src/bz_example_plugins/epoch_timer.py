"""``epoch_timer``: a structural plugin (no base class) with an attrs ``Config``.

bz structures the plugin's JSON options into :class:`EpochTimerConfig` (unknown keys
and wrong types are errors naming the JSON path) and creates the plugin as
``EpochTimer(config)``. Its state goes into checkpoints, so the total time survives a
resume.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, hook

if TYPE_CHECKING:
    from bz.plugins import PluginContext

_log = structlog.get_logger("bz_example_plugins")


@attrs.frozen
class EpochTimerConfig:
    """Options of ``epoch_timer``."""

    metric: str = "epoch_seconds"
    """Name of the training metric the epoch's duration is reported under."""
    warn_after: float | None = attrs.field(default=None, validator=at_least(0.0))
    """Log a warning when an epoch takes longer than this many seconds."""


class EpochTimer:
    """Times every epoch and reports it as a training metric."""

    name = "epoch_timer"
    Config = EpochTimerConfig

    def __init__(self, config: EpochTimerConfig | None = None) -> None:
        self.config = config or EpochTimerConfig()
        self.total_seconds = 0.0
        self.epochs_timed = 0
        self._started = 0.0

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Start the clock."""
        self._started = time.perf_counter()

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """Stop the clock; add the duration to ``training_metrics``."""
        seconds = time.perf_counter() - self._started
        self.total_seconds += seconds
        self.epochs_timed += 1
        context.training_metrics[self.config.metric] = seconds
        if self.config.warn_after is not None and seconds > self.config.warn_after:
            _log.warning("slow_epoch", plugin=self.name, epoch=context.epoch, seconds=seconds)

    def state_dict(self) -> dict[str, Any]:
        """Totals so far (saved in checkpoints)."""
        return {"total_seconds": self.total_seconds, "epochs_timed": self.epochs_timed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the totals on resume."""
        self.total_seconds = float(state["total_seconds"])
        self.epochs_timed = int(state["epochs_timed"])


# Checked by mypy, free at run time: EpochTimer is created as EpochTimer(EpochTimerConfig).
_contract: ConfiguredPluginClass[EpochTimerConfig] = EpochTimer
