"""``keep_best``: which epoch-end checkpoints a metric says to keep.

A run's folder keeps the ``keep_last`` newest verified checkpoints and, with
``keep_best``, the ``count`` best epoch-end ones by the monitored value each sidecar
records. Ties go to the older checkpoint, so a checkpoint among the best is never
pushed out by one that is merely as good. Since a checkpoint leaves only when ``count``
better ones are kept, the best ``count`` in the folder are always the best ``count``
ever written (a property the tests check).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from bz._errors import ConfigError
from bz.plugins._names import find_value, monitor_problem, run_value_names

if TYPE_CHECKING:
    from bz.config import KeepBest
    from bz.plugins._context import PluginContext
    from bz.training.checkpoint.sidecars import Entry


def monitor_names(metrics: Iterable[str], *, validates: bool) -> list[str]:
    """The names ``keep_best.monitor`` may take in a run with these metrics (and
    validation data or not): those ``early_stopping``'s ``monitor`` takes
    (:func:`bz.plugins._names.run_value_names`), the console's ``val_loss`` included."""
    return run_value_names(metrics, validates=validates)


def check_monitor(keep_best: KeepBest | None, metrics: Iterable[str], *, validates: bool) -> None:
    """Refuse, before training, a ``keep_best.monitor`` the run will never produce."""
    if keep_best is None:
        return
    problem = monitor_problem(keep_best.monitor, monitor_names(metrics, validates=validates))
    if problem is not None:
        raise ConfigError([("keep_best.monitor", problem)])


def monitored_value(monitor: str, context: PluginContext) -> float | None:
    """The value of ``monitor`` at the end of an epoch, or None (not finite, not there)."""
    value = find_value(monitor, context)
    return value if value is not None and math.isfinite(value) else None


def ranked(entries: Iterable[Entry], keep_best: KeepBest) -> list[Entry]:
    """The epoch-end checkpoints that recorded ``keep_best.monitor``, best first (of two
    as good, the older first)."""
    sign = 1.0 if keep_best.mode == "min" else -1.0
    candidates = [
        entry
        for entry in entries
        if entry.batch == 0 and entry.monitor == keep_best.monitor and entry.value is not None
    ]
    return sorted(candidates, key=lambda e: (sign * (e.value or 0.0), e.position))


def retained(entries: Sequence[Entry], keep_last: int, keep_best: KeepBest | None) -> list[Entry]:
    """Of a run's verified checkpoints (newest first), those to keep: the ``keep_last``
    newest and the ``keep_best.count`` best."""
    kept = list(entries[:keep_last])
    if keep_best is not None:
        for entry in ranked(entries, keep_best)[: keep_best.count]:
            if entry not in kept:
                kept.append(entry)
    return kept
