"""The loop's own state, one object: where the run stands, its loss sums and counts.

:class:`LoopState` is held by the run (``run.state``) and written only by the loop; the
checkpoint policy and rewind put it back through its methods. Plugins see copies in
their context. :class:`RunParts` is what checkpoints and rewind need of a run (so they
do not import the loop that imports them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from bz._distributed import sum_across
from bz.plugins._context import DeviceSum

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from bz._distributed import Topology
    from bz._setup import TrainingSetup
    from bz.config import RunConfig
    from bz.metrics._set import MetricSet
    from bz.plugins._context import PluginContext
    from bz.plugins._sandbox import PluginSet
    from bz.training.control import EndReason
    from bz.training.precision import Precision


@attrs.define(eq=False)
class Totals:
    """The loss sum (weighted by samples), batches and samples of one loop so far."""

    loss: DeviceSum = attrs.Factory(DeviceSum)
    batches: int = 0
    samples: int = 0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        """Count one batch whose mean loss is ``loss`` (a detached device scalar)."""
        self.loss.add(loss, samples)
        self.batches += 1
        self.samples += samples

    def mean(self) -> float:
        """The loss per sample, read once; ``nan`` when nothing was counted."""
        return mean(self.loss, self.samples)

    def summed(self, device: torch.device) -> Totals:
        """These totals summed over every process (one collective; itself alone)."""
        values = [self.loss.value(), self.loss.batch_sum(), float(self.batches)]
        loss, batch_sum, batches, samples = sum_across([*values, float(self.samples)], device)
        return Totals(DeviceSum(loss, batch_sum), int(batches), int(samples))


def mean(total: DeviceSum, count: int) -> float:
    """``total / count`` read once; ``nan`` when nothing was counted."""
    return total.value() / count if count else float("nan")


@attrs.define
class ResumePoint:
    """Where the next training loop starts: random states and batches already done."""

    epoch_start: dict[str, Any]
    """Random states right before the loop's ``iter(train_loader)``."""
    now: dict[str, Any]
    """Random states after the last finished step (differs only mid-epoch)."""
    batch: int = 0
    loss_total: float = 0.0
    samples: int = 0
    metrics: Mapping[str, Sequence[torch.Tensor]] = attrs.Factory(dict)
    """Training-metric state of the batches already done (see ``MetricSet.carry``)."""
    loader: dict[str, Any] | None = None
    """The training loader's own saved state, for a loader that has one
    (:mod:`bz.training.position`)."""
    batch_loss_total: float = 0.0
    """The sum of the batches' mean losses (``PluginContext.training_loss_total``)."""


@attrs.define(eq=False)
class LoopState:
    """Where a run stands; the loop is its only writer (see the module docstring)."""

    start_epoch: int = 0
    """The epoch this call of ``fit`` started at (after a resume, the checkpoint's)."""
    epoch: int = 0
    global_step: int = 0
    batch_index: int = 0
    """The batch being trained or validated, in its loop."""
    micro: int = 0
    """Batches of the current accumulation group done so far."""
    train: Totals = attrs.Factory(Totals)
    """The training loop's loss sum and counts (this epoch's)."""
    val: Totals = attrs.Factory(Totals)
    """The validation loop's (the last one's, between loops)."""
    resume_point: ResumePoint | None = None
    """Where the next training loop starts, when not at its first batch afresh."""
    epoch_rng: dict[str, Any] | None = None
    """Random states at the start of this epoch (kept only when checkpoints are written)."""
    stopped_by: EndReason | None = None
    """Why the run stopped before its last epoch (None: it did not)."""
    val_loader_state: dict[str, Any] | None = None
    """The validation loader's state a checkpoint held, until it is handed back before
    the next validation pass (:func:`~bz.training.position.restore_validation_state`)."""

    def copy(self) -> LoopState:
        """A copy to :meth:`put_back` later (totals are replaced, never changed, once
        their loop is over, so they are shared, not copied)."""
        return attrs.evolve(self)

    def put_back(self, saved: LoopState) -> None:
        """Make this state what ``saved`` was (in place: the run's parts hold this one)."""
        for field in attrs.fields(LoopState):
            setattr(self, field.name, getattr(saved, field.name))

    def resume_at(self, epoch: int, global_step: int, point: ResumePoint) -> None:
        """Stand where a checkpoint left off: ``epoch``, ``global_step``, ``point``."""
        self.start_epoch = self.epoch = epoch
        self.global_step = global_step
        self.resume_point = point

    def show(self, context: PluginContext) -> PluginContext:
        """Copy this state into ``context`` (undoing any plugin's scribbles there)."""
        context.epoch = self.epoch
        context.global_step = self.global_step
        context.batch_index = self.batch_index
        train, val = self.train, self.val
        context.training_batch_count = train.batches
        context.training_sample_count = train.samples
        context.validation_batch_count = val.batches
        context.validation_sample_count = val.samples
        context._training_loss = train.loss
        context._validation_loss = val.loss
        return context


class RunParts(Protocol):
    """What checkpoints and rewind read of a run (:class:`~bz.training.loop.Run` has it)."""

    setup: TrainingSetup
    config: RunConfig
    plugins: PluginSet
    topology: Topology
    device: torch.device
    precision: Precision
    context: PluginContext
    model: torch.nn.Module
    train_metrics: MetricSet
    train_loader: Iterable[Any]
    val_loader: Iterable[Any] | None
    generators: list[torch.Generator]
    state: LoopState

    def refresh_context(self) -> PluginContext:
        """The context, showing the loop's state."""
        ...

    def checkpoint_hook(self, hook: str, path: Path) -> None:
        """``save_checkpoint`` / ``load_checkpoint`` with ``checkpoint_path`` set."""
        ...
