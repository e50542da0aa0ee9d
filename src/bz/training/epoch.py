"""One epoch of a run: the training loop, the step, validation.

:class:`EpochLoop` is the part of :class:`~bz.training.loop.Run` that runs per epoch,
per step and per batch; ``Run`` adds the session around it (set-up, resume, the epochs,
checkpoints at their ends, faults). The parts declared here are set by
``Run.__init__``; where the run stands (counters, loss sums, the stop reason) is one
:class:`~bz.training.state.LoopState`, ``self.state``, which only the loop writes.

One training step, top to bottom (``_grouped_step``; a plain step runs inline in
:func:`~bz.training.plain.plain_batches`, doing the same in the same order): move the
batch, ``start_training_batch``, zero the gradients at the start of an accumulation
group, the loss under autocast (the setup's way, a
:class:`~bz.training.forward.Forward`: ``loss_fn`` over pairs, ``model(**batch).loss``,
or the user's step), backward (scaled by the group size, DDP's ``no_sync`` inside a
group), ``after_backward``; at the group's end unscale, clip, ``before_optimizer_step``
and step; then the loss sum and metrics (on the device), ``end_training_batch`` and,
under ``scheduler_interval="step"``, the scheduler's step (after the hook, so that it
sees the learning rate the step used).
Between optimizer steps :class:`~bz.training.control.StepControl` decides whether to
stop, validate or write a checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from bz._distributed import set_epoch
from bz._logging import get_logger
from bz._rng import capture_rng, restore_rng
from bz.plugins._context import DeviceSum, PluginContext
from bz.training.device import to_device
from bz.training.evaluate import ValidationPass, for_metrics
from bz.training.forward import explain_backward
from bz.training.gradients import clip_norm, gradient_accumulators, group_size, total_norm, whole
from bz.training.guards import check_step
from bz.training.plain import plain_batches
from bz.training.position import epoch_batches, restore_validation_state
from bz.training.result import EpochRecord
from bz.training.state import ResumePoint, RunParts, Totals

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.nn.parallel import DistributedDataParallel

    from bz.config import GradientClip
    from bz.metrics._set import MetricSet
    from bz.training.checkpoint.policy import CheckpointPolicy
    from bz.training.control import EndReason, StepControl
    from bz.training.forward import Computed, Forward
    from bz.training.interrupts import InterruptVote

_log = get_logger("bz")

_backward = torch.autograd.backward
"""What ``Tensor.backward`` calls (and it is typed); one name, looked up once."""


class EpochLoop(RunParts):
    """The per-epoch half of a run (see the module docstring)."""

    # Set by Run.__init__ / Run._prepare, beside the parts RunParts declares (``state``,
    # where the run stands, among them).
    checkpoints: CheckpointPolicy
    control: StepControl
    vote: InterruptVote | None
    forward: torch.nn.Module
    ddp: DistributedDataParallel | None
    train_loader: Iterable[Any]
    val_loader: Iterable[Any] | None
    val_metrics: MetricSet
    limit: int | None
    accumulate: int
    clip: GradientClip | None
    norm_every: tuple[int, ...]
    """Step intervals at which plugins asked for the gradient norm."""
    move_batches: bool
    train_forward: Forward
    val_forward: Forward
    step_scheduler: Any
    """The scheduler when it steps after every optimizer step, else None."""
    plain: bool = False
    """Whether this epoch's steps are plain (see ``bz.training.plain``); set by
    ``_train_loop``."""
    metrics_take_outputs: bool = False
    """Whether the training metrics are given outputs undetached (``_train_loop``)."""

    # -- context ---------------------------------------------------------------------

    def refresh_context(self) -> PluginContext:
        """Copy the loop's state into the context (undoing any plugin's scribbles)."""
        return self.state.show(self.context)

    def _hook(self, hook: str) -> None:
        # The context is refreshed only when someone will look at it.
        if self.plugins.implemented[hook]:
            self._call(hook)

    def _call(self, hook: str) -> None:
        """``hook``, which the caller saw implemented (``plugins.implemented``)."""
        # ``plugins.call``'s work without its call: the round's own function.
        self.plugins.callers[hook](self.state.show(self.context))

    def checkpoint_hook(self, hook: str, path: Path) -> None:
        """Call ``save_checkpoint`` / ``load_checkpoint`` with ``checkpoint_path`` set."""
        self.context.checkpoint_path = path
        try:
            self._hook(hook)
        finally:
            self.context.checkpoint_path = None

    # -- one epoch -------------------------------------------------------------------

    def _epoch(self) -> EpochRecord | None:
        """One epoch; None when Ctrl-C stopped it after a training step."""
        started = time.perf_counter()
        ctx = self.context
        ctx.extra["active_plugins"] = self.plugins.active_names
        ctx.training_metrics = {}
        ctx.validation_metrics = {}
        state = self.state
        state.batch_index = 0
        state.train = Totals()
        state.val = Totals()
        self._hook("start_epoch")
        outcome = self._train_loop()
        if outcome == "interrupted":
            return None
        partial = outcome == "ended"
        validated = self.val_loader is not None
        if validated:
            self._validation_loop()
        if not partial:  # the scheduler steps once per whole epoch, also across a resume
            self._step_scheduler(validated)
        self._hook("end_epoch")
        # The next epoch starts from the random state of this moment, whether or not a
        # checkpoint records it, so what plugins draw between epochs, and whether the
        # run was resumed here, never changes the batches or dropout masks that follow.
        now = capture_rng(self.generators)
        state.resume_point = ResumePoint(now, now)
        return EpochRecord(
            epoch=state.epoch,
            training_loss=state.train.mean(),
            validation_loss=state.val.mean() if validated else None,
            training_metrics=dict(ctx.training_metrics),
            validation_metrics=dict(ctx.validation_metrics),
            seconds=time.perf_counter() - started,
            partial=partial,
        )

    def _train_loop(self) -> Literal["completed", "ended", "interrupted"]:
        """The training batches of one epoch: all of them, or up to a stop (``ended``:
        the epoch ends early; ``interrupted``: Ctrl-C or SIGTERM)."""
        metrics, state = self.train_metrics, self.state
        self.model.train()
        metrics.reset()
        state.micro = 0
        self._hook("start_training_loop")
        # Held for the loop (a local: gone when it returns), so that each step's graph
        # reuses the parameters' gradient accumulators instead of making them again.
        accumulators = gradient_accumulators(self.model, self.config)  # noqa: F841
        self.plain = (
            self.accumulate == 1
            and self.precision.scaler is None
            and self.clip is None
            and not self.norm_every
            and self.config.check_finite != "step"
        )
        # Built-in classification metrics count attached float32 outputs as they are.
        self.metrics_take_outputs = metrics.takes_attached and not self.precision.mixed
        iterator, skipped = self._batches()
        if self.vote is not None:
            self.vote.start_epoch()
        if self.plain:
            interrupted, stopped = plain_batches(self, iterator, skipped)
        else:
            interrupted, stopped = self._grouped_batches(iterator, skipped)
        if state.micro:  # a loader without a length ended inside a group: it still steps
            # After the group's last end_training_batch (the loader could not say it was
            # the last), so batch, outputs and loss are None in before_optimizer_step.
            self._optimizer_step()
            if self.step_scheduler is not None:
                self.step_scheduler.step()
            state.micro = 0
            self.context._gradient_norm = None
        if interrupted:
            return "interrupted"
        if stopped is not None:
            # The checkpoint resumes from right after this step: what follows (the
            # epoch's early end, validation, plugins) does not change where it stands.
            self.checkpoints.save(state.epoch, state.train.batches, stopped=stopped == "plugin")
            self._stop(stopped)
        if self.vote is not None:
            state.train = state.train.summed(self.device)
        self.context.training_metrics = metrics.compute()
        self._hook("end_training_loop")
        return "completed" if stopped is None else "ended"

    def _grouped_batches(
        self, iterator: Iterator[Any], skipped: int
    ) -> tuple[bool, EndReason | None]:
        """``plain_batches`` for steps that are not plain: ``(interrupted, stop reason)``."""
        step, state, ctx, control = self._grouped_step, self.state, self.context, self.control
        quiet, guard = control.idle, control.interrupt  # as in plain_batches
        for index, batch in enumerate(iterator, start=skipped):
            state.batch_index = index
            step(batch, index)
            if state.micro:  # in the middle of an accumulation group: nothing can happen
                continue
            if quiet and not (guard.requested or ctx.should_stop_training):
                continue
            ended = self.after_step(index)
            if ended is not None:
                return ended
        return False, None

    def after_step(self, index: int) -> tuple[bool, EndReason | None] | None:
        """What follows the optimizer step of batch ``index`` (``StepControl``): None to go
        on, else ``(interrupted, stop reason)`` to end the epoch's batches."""
        state, control = self.state, self.control
        last = index + 1 == self.context.training_batches_per_epoch
        decision = control.after_step(state.global_step, last)
        if decision.interrupt:
            return True, None
        if decision.stop is not None:
            return False, decision.stop
        if decision.validate:
            self._validation_loop()
            self.model.train()
        if decision.checkpoint:
            self.checkpoints.save(state.epoch, state.train.batches)
            control.checkpoint_written()
        return None

    def _batches(self) -> tuple[Iterator[Any], int]:
        """The training iterator, positioned where a resumed epoch left off."""
        state = self.state
        point, state.resume_point = state.resume_point, None
        if point is not None:
            restore_rng(point.epoch_start, self.generators)
        # Needed only to write a checkpoint in the middle of this epoch.
        state.epoch_rng = capture_rng(self.generators) if self.checkpoints.saving else None
        set_epoch(self.train_loader, state.epoch)
        skip = 0 if point is None else point.batch
        # The loader draws from its random state exactly as the interrupted run did
        # (see bz.training.position), without reading the batches already trained; the
        # step's own random state (dropout, augmentation) is then put back as it was.
        iterator = epoch_batches(
            self.train_loader,
            epoch=state.epoch,
            skip=skip,
            state=None if point is None else point.loader,
            limit=self.limit,
        )
        if point is None or point.batch == 0:
            return iterator, 0
        restore_rng(point.now, self.generators)
        loss = DeviceSum(point.loss_total, point.batch_loss_total)
        state.train = Totals(loss, point.batch, point.samples)
        self.train_metrics.carry(point.metrics)
        return iterator, point.batch

    # -- one step --------------------------------------------------------------------

    def _count(
        self, ctx: PluginContext, train: Totals, loss: Any, predictions: Any, targets: Any, n: int
    ) -> None:
        """Add a finished batch to the loss sum, the counts and the metrics; show its
        loss as ``last_loss`` (what the sum read or detached: see ``LastLoss``)."""
        train.samples += n
        last = ctx._last_loss
        last.value = train.loss.add(loss, n)
        last.dtype = loss.dtype
        metrics = self.train_metrics
        if metrics.active:
            metrics.update(for_metrics(predictions, self.precision), targets)
        train.batches += 1

    def _grouped_step(self, batch: Any, index: int) -> None:
        """One step in general: accumulation groups (DDP's ``no_sync`` inside one), a
        gradient scaler, clipping, an asked-for norm, ``check_finite: "step"``."""
        ctx, state, implemented = self.context, self.state, self.plugins.implemented
        if self.move_batches:
            batch = to_device(batch, self.device)
        forward = self.train_forward
        ctx.batch = batch = forward.prepare(batch)
        if implemented["start_training_batch"]:
            self._call("start_training_batch")
        micro = state.micro
        if micro == 0:
            self.setup.optimizer.zero_grad(set_to_none=True)
        batches = self.context.training_batches_per_epoch
        group = group_size(self.accumulate, batches, index, self.state.micro)
        steps = micro + 1 == group
        # Batches that do not step add their gradients locally; the one that steps
        # makes DDP average the group's sum over the processes.
        if steps or self.ddp is None:
            computed = self._forward_backward(forward, batch, group)
        else:
            with self.ddp.no_sync():
                computed = self._forward_backward(forward, batch, group)
        loss, outputs, predictions, targets, samples = computed
        ctx.outputs, ctx.loss = outputs, loss
        if implemented["after_backward"]:
            self._call("after_backward")
        if steps:
            self._optimizer_step(loss)
            state.micro = 0
        else:
            if self.config.check_finite == "step":
                self._check_finite(loss, None)
            state.micro = micro + 1
        self._count(ctx, state.train, loss, predictions, targets, samples)
        if implemented["end_training_batch"]:
            self._call("end_training_batch")
        if steps and self.step_scheduler is not None:
            self.step_scheduler.step()
        ctx.batch = ctx.outputs = ctx.loss = ctx._gradient_norm = None

    def _forward_backward(self, forward: Forward, batch: Any, group: int) -> Computed:
        """The loss under autocast (when the precision has one), and its backward pass
        (scaled by the group size, and by the gradient scaler of ``16-mixed``)."""
        autocast = self.precision.autocast
        if autocast is None:
            computed = forward.compute(self.forward, batch)
        else:
            with autocast():
                computed = forward.compute(self.forward, batch)
        loss = computed[0]
        scaled = loss if group == 1 else loss / group
        scaler = self.precision.scaler
        # torch.autograd.backward is what Tensor.backward calls (and it is typed).
        try:
            _backward(scaled if scaler is None else scaler.scale(scaled))
        except RuntimeError:
            explain_backward(forward, loss)
            raise
        return computed

    def _check_finite(self, loss: torch.Tensor | None, norm: torch.Tensor | None) -> None:
        check_step(
            loss,
            norm,
            step=self.state.global_step + 1,
            epoch=self.state.epoch + 1,
            batch_index=self.state.batch_index,
            across_processes=self.topology.distributed,
        )

    def _optimizer_step(self, loss: torch.Tensor | None = None) -> None:
        """Unscale, clip, (``check_finite: "step"``), ``before_optimizer_step``, step: once
        per accumulation group. ``loss``: the group's last batch's (None after a loader
        without a length ended inside a group: its batches were checked one by one)."""
        optimizer, scaler, clip = self.setup.optimizer, self.precision.scaler, self.clip
        if scaler is not None:
            scaler.unscale_(optimizer)
        asked = self._asked_norm() if self.norm_every else None  # before clipping
        if clip is not None:
            parameters = [p for p in self.model.parameters() if p.grad is not None]
            if clip.max_norm is not None:
                self.context._gradient_norm = clip_norm(parameters, clip, asked)
            elif clip.value is not None:
                torch.nn.utils.clip_grad_value_(parameters, clip.value)
        if asked is not None:
            self.context._gradient_norm = asked
        if self.config.check_finite == "step":
            # Under a gradient scaler an infinite norm is an overflow the scaler skips.
            self._check_finite(loss, self.context._gradient_norm if scaler is None else None)
        if self.plugins.implemented["before_optimizer_step"]:
            self._call("before_optimizer_step")
        if scaler is not None:
            scaler.step(optimizer)  # reads one flag back: GradScaler skips steps on overflow
            scaler.update()
        else:
            optimizer.step()
        self.state.global_step += 1

    def _asked_norm(self) -> torch.Tensor | None:
        """The total gradient norm, on the device, when a plugin asked for this step's
        (``gradient_norm_every``: every process computes it on the same steps)."""
        step = self.state.global_step + 1
        if not any(step % every == 0 for every in self.norm_every):
            return None
        clip = self.clip
        norm_type = clip.norm_type if clip is not None and clip.max_norm is not None else 2.0
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return whole(total_norm(grads, norm_type))

    # -- validation ------------------------------------------------------------------

    def _validation_loop(self) -> None:
        assert self.val_loader is not None
        metrics = self.val_metrics
        self.model.eval()
        metrics.reset()
        state = self.state
        state.batch_index = 0
        state.val = totals = Totals()
        saved, state.val_loader_state = state.val_loader_state, None
        if saved is not None:  # resumed: the loader's own state, before its first pass
            restore_validation_state(self.val_loader, saved)
        self._hook("start_validation_loop")
        device = self.device if self.move_batches else None
        validation = ValidationPass(
            self.forward, self.val_forward, self.precision, device, self.limit, self
        )
        validation.run(self.val_loader, metrics, totals)
        if self.topology.distributed:
            state.val = totals.summed(self.device)
        self.context.validation_metrics = metrics.compute()
        self._hook("end_validation_loop")

    def validation_batch_started(self, index: int, batch: Any) -> None:
        """``start_validation_batch`` (the :class:`ValidationPass`'s watcher)."""
        self.state.batch_index = index
        self.context.batch = batch
        self._hook("start_validation_batch")

    def validation_batch_ended(self, outputs: Any, loss: torch.Tensor) -> None:
        """``end_validation_batch``; the batch's tensors leave the context after it."""
        ctx = self.context
        ctx.outputs, ctx.loss = outputs, loss
        self._hook("end_validation_batch")
        ctx.batch = ctx.outputs = ctx.loss = None

    def _step_scheduler(self, validated: bool) -> None:
        scheduler = self.setup.scheduler
        if scheduler is None or self.step_scheduler is not None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            state = self.state
            scheduler.step(state.val.mean() if validated else state.train.mean())
        else:
            scheduler.step()

    def _stop(self, reason: EndReason) -> None:
        state = self.state
        state.stopped_by = reason
        # Numbered from 1, as the console and the checkpoint names do.
        _log.info("stop_requested", reason=reason, epoch=state.epoch + 1, step=state.global_step)


def capped(length: int | None, limit: int | None) -> int | None:
    """A loader's batch count under ``limit`` (``--smoke``); None when unknown."""
    if limit is None:
        return length
    return limit if length is None else min(length, limit)
