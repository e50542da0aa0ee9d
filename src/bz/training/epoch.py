"""One epoch of a run: the training loop, the step, validation.

:class:`EpochLoop` is the part of :class:`~bz.training.loop.Run` that runs per epoch,
per step and per batch; ``Run`` adds the session around it (set-up, resume, the epochs,
checkpoints at their ends, faults). The attributes declared here are set by
``Run.__init__``.

One training step, top to bottom (``_step``): move the batch, ``start_training_batch``,
zero the gradients at the start of an accumulation group, forward and loss under
autocast, backward (scaled by the group size, DDP's ``no_sync`` inside a group),
``after_backward``; at the group's end unscale, clip, ``before_optimizer_step`` and
step; then the loss sum and metrics (on the device) and ``end_training_batch``.
Between optimizer steps :class:`~bz.training.control.StepControl` decides whether to
stop, validate or write a checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from bz._distributed import Topology, set_epoch, sum_across
from bz._logging import get_logger
from bz._rng import capture_rng, restore_rng
from bz.plugins._context import DeviceSum, PluginContext
from bz.training.checkpoint.policy import CheckpointPolicy, ResumePoint
from bz.training.device import batch_size, to_device, unpack
from bz.training.evaluate import mean
from bz.training.result import EpochRecord

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.nn.parallel import DistributedDataParallel

    from bz._setup import TrainingSetup
    from bz.config import GradientClip, RunConfig
    from bz.metrics._set import MetricSet
    from bz.plugins._sandbox import PluginSet
    from bz.training.control import EndReason, StepControl
    from bz.training.interrupts import InterruptVote
    from bz.training.precision import Precision

_log = get_logger("bz")


class EpochLoop:
    """The per-epoch half of a run (see the module docstring)."""

    # Set by Run.__init__ / Run._prepare.
    setup: TrainingSetup
    config: RunConfig
    plugins: PluginSet
    topology: Topology
    device: torch.device
    precision: Precision
    context: PluginContext
    checkpoints: CheckpointPolicy
    control: StepControl
    vote: InterruptVote | None
    model: torch.nn.Module
    forward: torch.nn.Module
    ddp: DistributedDataParallel | None
    train_loader: Iterable[Any]
    val_loader: Iterable[Any] | None
    train_metrics: MetricSet
    val_metrics: MetricSet
    generators: list[torch.Generator]
    limit: int | None
    accumulate: int
    clip: GradientClip | None
    move_batches: bool
    # The loop's state (the context only ever shows copies of these).
    epoch: int
    global_step: int
    batch_index: int
    micro: int
    """Batches of the current accumulation group done so far."""
    train_batches: int
    train_samples: int
    val_batches: int
    val_samples: int
    train_loss: DeviceSum
    val_loss: DeviceSum
    resume_point: ResumePoint | None
    epoch_rng: dict[str, Any] | None
    stopped_by: EndReason | None

    # -- context ---------------------------------------------------------------------

    def refresh_context(self) -> PluginContext:
        """Copy the loop's state into the context (undoing any plugin's scribbles)."""
        ctx = self.context
        ctx.epoch = self.epoch
        ctx.global_step = self.global_step
        ctx.batch_index = self.batch_index
        ctx.training_batch_count = self.train_batches
        ctx.training_sample_count = self.train_samples
        ctx.validation_batch_count = self.val_batches
        ctx.validation_sample_count = self.val_samples
        ctx._training_loss = self.train_loss
        ctx._validation_loss = self.val_loss
        return ctx

    def _hook(self, hook: str) -> None:
        # The context is refreshed only when someone will look at it.
        if self.plugins.implements(hook):
            self.plugins.call(hook, self.refresh_context())

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
        self.train_batches = self.val_batches = self.batch_index = 0
        self.train_samples = self.val_samples = 0
        self.train_loss = DeviceSum()
        self.val_loss = DeviceSum()
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
        self.resume_point = ResumePoint(now, now)
        return EpochRecord(
            epoch=self.epoch,
            training_loss=mean(self.train_loss, self.train_samples),
            validation_loss=mean(self.val_loss, self.val_samples) if validated else None,
            training_metrics=dict(ctx.training_metrics),
            validation_metrics=dict(ctx.validation_metrics),
            seconds=time.perf_counter() - started,
            partial=partial,
        )

    def _train_loop(self) -> Literal["completed", "ended", "interrupted"]:
        """The training batches of one epoch: all of them, or up to a stop (``ended``:
        the epoch ends early; ``interrupted``: Ctrl-C or SIGTERM)."""
        metrics, step, control = self.train_metrics, self._step, self.control
        batches = self.context.training_batches_per_epoch
        self.model.train()
        metrics.reset()
        self.micro = 0
        self._hook("start_training_loop")
        iterator, skipped = self._batches()
        if self.vote is not None:
            self.vote.start_epoch()
        stopped: EndReason | None = None
        interrupted = False
        for index, batch in enumerate(iterator, start=skipped):
            self.batch_index = index
            step(batch, index)
            if self.micro:  # in the middle of an accumulation group: nothing can happen
                continue
            decision = control.after_step(self.global_step, index + 1 == batches)
            if decision.interrupt:
                interrupted = True
                break
            if decision.stop is not None:
                stopped = decision.stop
                break
            if decision.validate:
                self._validation_loop()
                self.model.train()
            if decision.checkpoint:
                self.checkpoints.save(self.epoch, self.train_batches)
                control.checkpoint_written()
        if self.micro:  # a loader without a length ended inside a group: it still steps
            # After the group's last end_training_batch (the loader could not say it was
            # the last), so batch, outputs and loss are None in before_optimizer_step.
            self._optimizer_step()
            self.micro = 0
            self.context._gradient_norm = None
        if interrupted:
            return "interrupted"
        if stopped is not None:
            # The checkpoint resumes from right after this step: what follows (the
            # epoch's early end, validation, plugins) does not change where it stands.
            self.checkpoints.save(self.epoch, self.train_batches, stopped=stopped == "plugin")
            self._stop(stopped)
        if self.vote is not None:
            loss, counted = self.train_loss, float(self.train_batches)
            total, batch_total, batch_count, samples = sum_across(
                [loss.value(), loss.batch_sum(), counted, float(self.train_samples)], self.device
            )
            self.train_loss = DeviceSum(total, batch_total)
            self.train_batches, self.train_samples = int(batch_count), int(samples)
        self.context.training_metrics = metrics.compute()
        self._hook("end_training_loop")
        return "completed" if stopped is None else "ended"

    def _batches(self) -> tuple[Iterator[Any], int]:
        """The training iterator, positioned where a resumed epoch left off."""
        point, self.resume_point = self.resume_point, None
        if point is not None:
            restore_rng(point.epoch_start, self.generators)
        # Needed only to write a checkpoint in the middle of this epoch.
        self.epoch_rng = capture_rng(self.generators) if self.checkpoints.saving else None
        set_epoch(self.train_loader, self.epoch)
        iterator = _limited(iter(self.train_loader), self.limit)
        if point is None or point.batch == 0:
            return iterator, 0
        # Creating the iterator and drawing the batches already trained on consumes
        # the loader's random state exactly as the interrupted run did; the step's
        # own random state (dropout, augmentation) is then put back as it was.
        for _ in range(point.batch):
            next(iterator, None)
        restore_rng(point.now, self.generators)
        self.train_batches = point.batch
        self.train_samples = point.samples
        self.train_loss = DeviceSum(point.loss_total, point.batch_loss_total)
        self.train_metrics.carry(point.metrics)
        return iterator, point.batch

    # -- one step --------------------------------------------------------------------

    def _step(self, batch: Any, index: int) -> None:
        # A method of its own so that the batch, outputs and graph die when it returns
        # instead of living in the loop's frame until the next batch replaces them.
        setup, hook, ctx = self.setup, self._hook, self.context
        if self.move_batches:
            batch = to_device(batch, self.device)
        inputs, targets = unpack(batch, "train_loader")
        samples = _samples(inputs, targets)
        self.train_samples += samples
        ctx.batch = (inputs, targets)
        hook("start_training_batch")
        group = 1 if self.accumulate == 1 else self._group_size(index)
        if self.micro == 0:
            setup.optimizer.zero_grad(set_to_none=True)
        steps = self.micro + 1 == group
        # Batches that do not step add their gradients locally; the one that steps
        # makes DDP average the group's sum over the processes.
        with self.ddp.no_sync() if self.ddp is not None and not steps else _NO_CONTEXT:
            with self.precision.autocast():
                outputs = self.forward(inputs)
                loss = setup.loss_fn(outputs, targets)
            scaled = loss if group == 1 else loss / group
            scaler = self.precision.scaler
            # torch.autograd.backward is what Tensor.backward calls (and it is typed).
            torch.autograd.backward(scaled if scaler is None else scaler.scale(scaled))
        ctx.outputs, ctx.loss = outputs, loss
        hook("after_backward")
        if steps:
            self._optimizer_step()
            self.micro = 0
        else:
            self.micro += 1
        detached = loss.detach()
        self.train_loss.add(detached, samples)
        if self.train_metrics.active:
            self.train_metrics.update(self._for_metrics(outputs), targets)
        self.train_batches += 1
        ctx.last_loss = detached
        hook("end_training_batch")
        ctx.batch = ctx.outputs = ctx.loss = ctx._gradient_norm = None

    def _group_size(self, index: int) -> int:
        """Batches in the accumulation group of batch ``index``; an epoch's last group may
        be shorter (when the loader has a length), and its loss is scaled by its size."""
        accumulate = self.accumulate
        if accumulate == 1:
            return 1
        batches = self.context.training_batches_per_epoch
        if batches is None:
            return accumulate
        return min(accumulate, batches - index + self.micro)

    def _optimizer_step(self) -> None:
        """Unscale, clip, ``before_optimizer_step``, step: once per accumulation group."""
        optimizer, scaler, clip = self.setup.optimizer, self.precision.scaler, self.clip
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip is not None:
            parameters = [p for p in self.model.parameters() if p.grad is not None]
            if clip.max_norm is not None:
                self.context._gradient_norm = torch.nn.utils.clip_grad_norm_(
                    parameters, clip.max_norm, clip.norm_type
                )
            elif clip.value is not None:
                torch.nn.utils.clip_grad_value_(parameters, clip.value)
        self._hook("before_optimizer_step")
        if scaler is not None:
            scaler.step(optimizer)  # reads one flag back: GradScaler skips steps on overflow
            scaler.update()
        else:
            optimizer.step()
        self.global_step += 1

    def _for_metrics(self, outputs: Any) -> Any:
        """Outputs as metrics take them: detached, and float32 under mixed precision."""
        if isinstance(outputs, torch.Tensor):
            outputs = outputs.detach()
            if self.precision.mixed and outputs.is_floating_point():
                outputs = outputs.float()
        return outputs

    # -- validation ------------------------------------------------------------------

    def _validation_loop(self) -> None:
        assert self.val_loader is not None
        metrics, step = self.val_metrics, self._validation_step
        self.model.eval()
        metrics.reset()
        self.batch_index = self.val_batches = self.val_samples = 0
        self.val_loss = DeviceSum()
        self._hook("start_validation_loop")
        with torch.no_grad():
            for index, batch in enumerate(_limited(iter(self.val_loader), self.limit)):
                self.batch_index = index
                step(batch)
        if self.topology.distributed:
            loss = self.val_loss
            total, batch_total, batches, samples = sum_across(
                [loss.value(), loss.batch_sum(), float(self.val_batches), float(self.val_samples)],
                self.device,
            )
            self.val_loss = DeviceSum(total, batch_total)
            self.val_batches, self.val_samples = int(batches), int(samples)
        self.context.validation_metrics = metrics.compute()
        self._hook("end_validation_loop")

    def _validation_step(self, batch: Any) -> None:
        # Its own frame, like _step: outputs die before the next batch is fetched.
        ctx, hook = self.context, self._hook
        if self.move_batches:
            batch = to_device(batch, self.device)
        inputs, targets = unpack(batch, "val_loader")
        ctx.batch = (inputs, targets)
        hook("start_validation_batch")
        with self.precision.autocast():
            outputs = self.forward(inputs)
            loss = self.setup.loss_fn(outputs, targets)
        samples = _samples(inputs, targets)
        self.val_loss.add(loss.detach(), samples)
        self.val_metrics.update(self._for_metrics(outputs), targets)
        self.val_batches += 1
        self.val_samples += samples
        ctx.outputs, ctx.loss = outputs, loss
        hook("end_validation_batch")
        ctx.batch = ctx.outputs = ctx.loss = None

    def _step_scheduler(self, validated: bool) -> None:
        scheduler = self.setup.scheduler
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            loss = self.val_loss if validated else self.train_loss
            scheduler.step(mean(loss, self.val_samples if validated else self.train_samples))
        else:
            scheduler.step()

    def _stop(self, reason: EndReason) -> None:
        self.stopped_by = reason
        # Numbered from 1, as the console and the checkpoint names do.
        _log.info("stop_requested", reason=reason, epoch=self.epoch + 1, step=self.global_step)


_NO_CONTEXT = contextlib.nullcontext()


def _samples(inputs: Any, targets: Any) -> int:
    """A batch's sample count, from shapes (no device read): the inputs' first dimension,
    else the targets', else 1 (a batch bz cannot measure counts as one sample)."""
    if isinstance(inputs, torch.Tensor) and inputs.ndim:
        return int(inputs.shape[0])
    return batch_size(inputs) or batch_size(targets) or 1


def capped(length: int | None, limit: int | None) -> int | None:
    """A loader's batch count under ``limit`` (``--smoke``); None when unknown."""
    if limit is None:
        return length
    return limit if length is None else min(length, limit)


def _limited(iterator: Iterator[Any], limit: int | None) -> Iterator[Any]:
    return iterator if limit is None else itertools.islice(iterator, limit)
