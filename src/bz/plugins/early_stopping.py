"""``early_stopping``: ask the loop to stop when a monitored value stops improving.

The monitored value is read once per epoch, in ``end_epoch``: ``validation_loss``,
``training_loss``, any metric by name (validation first: ``accuracy`` means the
validation accuracy when there is validation data), ``training_<metric>`` /
``validation_<metric>`` explicitly, or the names the console prints (``loss``,
``val_loss``, ``val_<metric>``): the names ``keep_best.monitor`` accepts too
(:mod:`bz.plugins._names`). A ``monitor`` that names nothing the run produces, a
validation value in a run without a ``val_loader`` included, is refused before training
(exit 2), with the names it could be.

Strategies:

* ``patience``: stop after ``patience`` epochs in a row without an improvement of more
  than ``min_delta`` over the value of the last such improvement (the first value
  counts as one).
* ``plateau``: stop when the last ``patience`` + 1 values all lie within ``min_delta``
  of each other, whether or not they beat the best (the curve has gone flat).

``min_delta`` decides only when to stop. The best epoch (``best``, ``best_epoch``, the
weights restored) is the one with the best value seen, however small its lead: a run
whose loss keeps creeping down by less than ``min_delta`` an epoch stops when patience
runs out, and ends with the weights of its lowest loss, not of the last epoch that beat
the others by ``min_delta``. Of equal values the earliest epoch is the best. With a
``baseline``, only values that beat it (by more than ``min_delta``) take part; when none
does, no weights are restored.

With ``restore_best_weights`` the model's weights from the best epoch are copied back
at the end of the epoch that stops the run (before its checkpoint is written, so the
checkpoint holds the weights the run ends with), or, when the run used all its epochs,
at the end of the session (the last checkpoint then keeps the last epoch's weights, so
that raising ``epochs`` resumes exactly). The copy stays on the model's device. The
weights are restored, and ``early_stopping_restored`` logged, once per run.

Epochs are numbered from 1 in events and attributes (``best_epoch``, ``stopped_epoch``),
as the console, the checkpoint names and ``model.pt`` number them; ``context.epoch``
is the zero-based index.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs

from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, hook, plugin_logger
from bz.plugins._names import find_value, monitor_problem, run_value_names

if TYPE_CHECKING:
    import torch
    from structlog.typing import FilteringBoundLogger

    from bz.plugins._context import PluginContext


@attrs.frozen
class EarlyStoppingConfig:
    """Options of ``early_stopping``."""

    monitor: str = "validation_loss"
    """What to watch: ``validation_loss``, ``training_loss`` or a metric name, also as
    the console prints them (``val_loss``, ``val_accuracy``); a name the run does not
    produce is refused before training."""
    mode: Literal["min", "max"] = "min"
    """Whether smaller (``min``) or larger (``max``) is better."""
    patience: int = attrs.field(default=10, validator=at_least(1))
    """Epochs without improvement (or on a plateau) before stopping."""
    min_delta: float = attrs.field(default=0.001, validator=at_least(0.0))
    """The change needed to reset patience (more than this); the best epoch restored is
    the best value's, whatever its lead."""
    strategy: Literal["patience", "plateau"] = "patience"
    """``patience``: no new best for a while; ``plateau``: the curve went flat."""
    restore_best_weights: bool = True
    """Put the best epoch's weights back into the model when training ends."""
    baseline: float | None = None
    """A value the monitored quantity must beat before it counts as improving at all."""
    verbose: bool = True
    """Log improvements and the stop decision."""

    def monitor_problem(self, names: Collection[str]) -> tuple[str, str] | None:
        """``("monitor", why)`` when ``monitor`` is none of ``names`` (what the run
        produces), or None; the caller names the plugin's entry in the configuration."""
        problem = monitor_problem(self.monitor, names)
        return None if problem is None else ("monitor", problem)


class EarlyStopping:
    """Requests a stop when ``monitor`` stops improving; stateful across resumes."""

    Config = EarlyStoppingConfig
    every_rank = True
    """Runs in every process, so each restores the same best weights."""

    def __init__(self, config: EarlyStoppingConfig | None = None) -> None:
        self.name = "early_stopping"
        self.config = config or EarlyStoppingConfig()
        self.best: float | None = None
        """The best value so far (whatever its lead over the one before)."""
        self.best_epoch: int | None = None
        """The epoch (counted from 1) with the best value so far."""
        self.reference: float | None = None
        """The value of the last improvement of more than ``min_delta``: what patience
        measures the next values against."""
        self.wait = 0
        self.history: list[float] = []
        self.stopped_epoch: int | None = None
        """The epoch (counted from 1) after which a stop was requested."""
        self.restored = False
        """Whether the best weights have been put back (it happens once per run)."""
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._warned_missing = False

    @property
    def needs_training_process(self) -> str | None:
        """Why ``"isolation": "process"`` is refused with these options (None: it is not)."""
        return (
            "restore_best_weights copies the model's weights"
            if self.config.restore_best_weights
            else None
        )

    # -- reading the monitored value ---------------------------------------------------

    def monitored_value(self, context: PluginContext) -> float | None:
        """The current value of ``monitor``, or None when the run does not produce it.

        Names as :mod:`bz.plugins._names` describes them: the console's ``val_loss`` /
        ``val_accuracy`` mean what ``validation_loss`` / ``validation_accuracy`` do.
        """
        return find_value(self.config.monitor, context)

    def _improves(self, value: float, reference: float | None, delta: float) -> bool:
        """Whether ``value`` beats ``reference`` by more than ``delta``."""
        if reference is None:
            return True
        if self.config.mode == "min":
            return value < reference - delta
        return value > reference + delta

    # -- hooks --------------------------------------------------------------------------

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """Update the best value and counters; request a stop when it is time."""
        value = self.monitored_value(context)
        if value is not None and math.isnan(value):
            # A NaN is a value the run produced, and a bad one: no improvement (it never
            # becomes the best), so patience runs out on a run that keeps producing it.
            self.logger.warning(
                "early_stopping_monitor_nan", monitor=self.config.monitor, epoch=context.epoch
            )
            self.history.append(value)
            self.wait += 1
            self._stop_if_due(context)
            return
        if value is None:
            if not self._warned_missing:
                self._warned_missing = True
                self.logger.warning(
                    "early_stopping_monitor_missing",
                    monitor=self.config.monitor,
                    available=run_value_names(
                        dict.fromkeys([*context.training_metrics, *context.validation_metrics]),
                        validates=bool(context.validation_batch_count),
                    ),
                )
            return
        self.history.append(value)
        delta = self.config.min_delta
        beats_baseline = self.config.baseline is None or self._improves(
            value, self.config.baseline, delta
        )
        # Patience counts from the last improvement of more than min_delta; the best
        # epoch is the best value's, so a slow creep restores its lowest point.
        if beats_baseline and self._improves(value, self.reference, delta):
            self.reference, self.wait = value, 0
        else:
            self.wait += 1
        if beats_baseline and self._improves(value, self.best, 0.0):
            self.best, self.best_epoch = value, context.epoch + 1
            if self.config.restore_best_weights and context.model is not None:
                self._best_weights = {
                    key: tensor.detach().clone()
                    for key, tensor in context.model.state_dict().items()
                }
            if self.config.verbose:
                self.logger.debug(
                    "early_stopping_improved",
                    monitor=self.config.monitor,
                    value=value,
                    epoch=context.epoch + 1,
                )
        self._stop_if_due(context)

    def _stop_if_due(self, context: PluginContext) -> None:
        stopping = self._should_stop()
        if stopping:
            self.stopped_epoch = context.epoch + 1
            context.should_stop_training = True
            if self.config.verbose:
                self.logger.info(
                    "early_stopping_stop",
                    monitor=self.config.monitor,
                    best=self.best,
                    best_epoch=self.best_epoch,
                    epoch=context.epoch + 1,
                )
        if stopping:
            # Restored here rather than at the end of the session, so the checkpoint
            # written after this hook (the run's last) holds the weights it ends with.
            self._restore_best(context)

    def _should_stop(self) -> bool:
        patience = self.config.patience
        if self.config.strategy == "patience":
            return self.wait >= patience
        window = self.history[-(patience + 1) :]
        return len(window) == patience + 1 and max(window) - min(window) <= self.config.min_delta

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """A run that used all its epochs ends with the best weights too.

        Not written into the last checkpoint: that one keeps the last epoch's weights,
        so that raising ``epochs`` continues exactly where an uninterrupted run would.
        """
        if context.exception is None:
            self._restore_best(context)

    def _restore_best(self, context: PluginContext) -> None:
        """Put the best weights back, if asked to and if they are not the current ones."""
        if not self.config.restore_best_weights or self._best_weights is None or self.restored:
            return
        # Once restored (at the stopping epoch), the end of the session has nothing to
        # add; the flag is part of the state, so a resumed session knows it too.
        self.restored = True
        if context.model is None or self.best_epoch == context.epoch + 1:
            return  # the current weights are the best ones
        context.model.load_state_dict(self._best_weights)
        if self.config.verbose:
            self.logger.info("early_stopping_restored", epoch=self.best_epoch, best=self.best)

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters, best value and (when kept) the best weights."""
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "reference": self.reference,
            "wait": self.wait,
            "history": list(self.history),
            "stopped_epoch": self.stopped_epoch,
            "restored": self.restored,
            "best_weights": self._best_weights,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume exactly where :meth:`state_dict` left off."""
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        # A state saved before the two were apart: its best was patience's reference.
        self.reference = state.get("reference", self.best)
        self.wait = int(state["wait"])
        self.history = [float(v) for v in state["history"]]
        self.stopped_epoch = state["stopped_epoch"]
        self.restored = bool(state.get("restored", False))
        self._best_weights = state["best_weights"]

    @property
    def logger(self) -> FilteringBoundLogger:
        """Events carry ``plugin=<name>`` and follow the host's logging set-up."""
        return plugin_logger(self)


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as EarlyStopping(EarlyStoppingConfig(**options)).
_: ConfiguredPluginClass[EarlyStoppingConfig] = EarlyStopping
