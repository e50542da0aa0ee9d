"""The per-epoch numbers every logging plugin records, named the same everywhere.

``tensorboard`` and ``wandb`` log these tags; ``run_log`` stores the same values.

========================  ==========================================================
``loss/training``         mean training batch loss of the epoch
``loss/validation``       mean validation batch loss (when there is validation data)
``<metric>/training``     each entry of ``context.training_metrics``
``<metric>/validation``   each entry of ``context.validation_metrics``
``lr`` / ``lr/group<i>``  learning rate at the start of the epoch (per param group)
``time/epoch_seconds``    wall time from ``start_epoch`` to ``end_epoch``
anything else             entries of ``context.extra["scalars"]`` (e.g. ``profiler``)
========================  ==========================================================

With a ``step_interval`` option a logger also records, every that many optimizer steps,
the scalars of the step that just ended, on an x-axis of global steps:

==============================  ====================================================
``step/loss``                   that batch's training loss
``step/grad_norm``              total gradient norm before clipping (after unscaling
                                under mixed precision)
``step/lr`` / ``step/lr/group<i>``  learning rate of that step (per param group)
==============================  ====================================================

Those are the only host reads a logger makes on a training step, and only on the steps
it logs. The loop computes the gradient norm on exactly those steps: a logger declares
``gradient_norm_every = N`` (see :func:`gradient_norm_intervals`); a step that clips by
norm has it anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from bz.plugins._context import PluginContext

EXTRA_SCALARS_KEY = "scalars"
"""``context.extra`` key: ``dict[str, float]`` other plugins want logged each epoch."""

GRADIENT_NORM_ATTRIBUTE = "gradient_norm_every"
"""A plugin attribute: ask the loop for the gradient norm every this many steps."""


def learning_rates(optimizer: torch.optim.Optimizer | None) -> list[float]:
    """The learning rate of each parameter group (empty without an optimizer)."""
    if optimizer is None:
        return []
    rates = []
    for group in optimizer.param_groups:
        lr = group.get("lr")
        # Some optimizers keep lr as a tensor (capturable Adam); float() reads it once.
        if lr is not None:
            rates.append(float(lr))
    return rates


def lr_tags(rates: list[float]) -> dict[str, float]:
    """``{"lr": x}`` for one parameter group, ``{"lr/group0": x, ...}`` for several."""
    if len(rates) == 1:
        return {"lr": rates[0]}
    return {f"lr/group{index}": rate for index, rate in enumerate(rates)}


def extra_scalars(context: PluginContext) -> dict[str, float]:
    """Finite numbers other plugins put in ``context.extra["scalars"]``."""
    table = context.extra.get(EXTRA_SCALARS_KEY)
    if not isinstance(table, Mapping):
        return {}
    return {
        str(key): float(value)
        for key, value in table.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def epoch_scalars(
    context: PluginContext, *, seconds: float, rates: list[float]
) -> dict[str, float]:
    """Every scalar of the epoch that just ended, by tag (see the module docstring)."""
    scalars: dict[str, float] = {}
    if context.training_batch_count:
        scalars["loss/training"] = context.training_loss
    if context.validation_batch_count:
        scalars["loss/validation"] = context.validation_loss
    scalars.update({f"{k}/training": float(v) for k, v in context.training_metrics.items()})
    scalars.update({f"{k}/validation": float(v) for k, v in context.validation_metrics.items()})
    scalars.update(lr_tags(rates))
    scalars["time/epoch_seconds"] = seconds
    scalars.update(extra_scalars(context))
    return scalars


# -- every N steps ------------------------------------------------------------------------


def gradient_norm_intervals(plugins: Iterable[object]) -> tuple[int, ...]:
    """The step intervals at which plugins asked for the gradient norm.

    A plugin asks by having an attribute ``gradient_norm_every`` (an ``int`` >= 1); the
    loop then computes the total norm of the gradients before clipping on every step
    whose number (counted from 1, as ``context.global_step`` after the step) is a
    multiple of one of them, and shows it as ``context.gradient_norm``. Anything else in
    that attribute is ignored.
    """
    intervals: set[int] = set()
    for plugin in plugins:
        every = getattr(plugin, GRADIENT_NORM_ATTRIBUTE, None)
        if isinstance(every, int) and not isinstance(every, bool) and every >= 1:
            intervals.add(every)
    return tuple(sorted(intervals))


class StepSchedule:
    """When a logger with ``step_interval`` records a step: once per optimizer step whose
    number is a multiple of the interval.

    ``end_training_batch`` runs for every batch; with gradient accumulation several
    batches share one ``global_step``, and after a resume the first batches may show the
    step the checkpoint was written at. :meth:`due` is true once, on the batch that took
    the step. Call :meth:`start` at ``start_epoch``.
    """

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._last = -1

    def start(self, context: PluginContext) -> None:
        """The step the epoch starts from (logged already, or before this session)."""
        self._last = context.global_step

    def due(self, context: PluginContext) -> bool:
        """Whether the batch that just ended took a step to record (no host read)."""
        step = context.global_step
        if step == self._last:
            return False
        self._last = step
        return step % self.interval == 0


def step_scalars(context: PluginContext) -> dict[str, float]:
    """The scalars of the step that just ended (see the module docstring): reads the
    batch loss and, when the loop computed it, the gradient norm back to the host."""
    scalars: dict[str, float] = {}
    loss = context.last_loss
    if loss is not None:
        scalars["step/loss"] = float(loss)
    norm = context.gradient_norm
    if norm is not None:
        scalars["step/grad_norm"] = norm
    for tag, rate in lr_tags(learning_rates(context.optimizer)).items():
        scalars[f"step/{tag}"] = rate
    return scalars


class _StepHooks(Protocol):
    """What a logger declares for :class:`LoggerClock` to fill in with ``step_interval``."""

    end_training_batch: Callable[[PluginContext], None]
    gradient_norm_every: int


class LoggerClock:
    """The bookkeeping every logging plugin shares: the epoch's clock and learning rates
    (noted at ``start_epoch``), and with ``step_interval`` the per-step wiring.

    With an interval it gives the plugin its ``end_training_batch`` hook (``log_step``)
    and its ``gradient_norm_every``; without one the plugin has neither, so that by
    default the loop makes no call into it per batch and computes no gradient norm.
    ``log_step`` asks :meth:`due` whether the batch that just ended is to be recorded.
    """

    def __init__(
        self, plugin: _StepHooks, interval: int | None, log_step: Callable[[PluginContext], None]
    ) -> None:
        self.rates: list[float] = []
        """The learning rate of each parameter group at the start of the epoch."""
        self._epoch_started = 0.0
        self._steps = StepSchedule(interval) if interval is not None else None
        if interval is not None:
            plugin.gradient_norm_every = interval
            plugin.end_training_batch = log_step

    def start_epoch(self, context: PluginContext) -> None:
        """Start the epoch's clock, note its learning rates and the step it starts from."""
        self._epoch_started = time.perf_counter()
        self.rates = learning_rates(context.optimizer)
        if self._steps is not None:
            self._steps.start(context)

    def due(self, context: PluginContext) -> bool:
        """Whether the batch that just ended took a step to record (see
        :meth:`StepSchedule.due`); never without ``step_interval``."""
        return self._steps is not None and self._steps.due(context)

    def epoch_seconds(self) -> float:
        """Wall time since :meth:`start_epoch`."""
        return time.perf_counter() - self._epoch_started

    def epoch_scalars(self, context: PluginContext) -> dict[str, float]:
        """:func:`epoch_scalars` of the epoch that just ended."""
        return epoch_scalars(context, seconds=self.epoch_seconds(), rates=self.rates)
