"""The training batches of an epoch whose steps are plain, in one function.

A plain step (one batch per optimizer step, no gradient scaler, no clipping, no norm
asked for, no per-step finite check: ``EpochLoop._train_loop`` decides it once per
epoch) is the common case, and on a small model the Python around it is a measurable
share of the step. So this loop runs it inline, with everything that cannot change
within an epoch (the context, the state, the optimizer, the model, the way the loss is
computed, the hooks' table, the metrics) looked up once per epoch instead of once per
batch. It does what ``EpochLoop._grouped_step`` does for a group of one, in the same
order, and keeps no batch, output or loss past its step (see ``_release``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from bz.training.device import samples_of_pair, to_device
from bz.training.evaluate import for_metrics
from bz.training.forward import explain_backward

if TYPE_CHECKING:
    from collections.abc import Iterator

    from bz._setup import TrainingSetup
    from bz.metrics._set import MetricSet
    from bz.plugins._context import PluginContext
    from bz.plugins._sandbox import PluginSet
    from bz.training.control import EndReason, StepControl
    from bz.training.forward import Forward
    from bz.training.precision import Precision
    from bz.training.state import LoopState

_backward = torch.autograd.backward
_Tensor = torch.Tensor


class PlainLoop(Protocol):
    """What the plain loop reads of ``EpochLoop`` (which imports this module)."""

    context: PluginContext
    state: LoopState
    plugins: PluginSet
    control: StepControl
    setup: TrainingSetup
    precision: Precision
    device: torch.device
    forward: torch.nn.Module
    train_forward: Forward
    train_metrics: MetricSet
    move_batches: bool
    metrics_take_outputs: bool
    step_scheduler: Any

    def after_step(self, index: int) -> tuple[bool, EndReason | None] | None: ...


def plain_batches(
    loop: PlainLoop, iterator: Iterator[Any], skipped: int
) -> tuple[bool, EndReason | None]:
    """Train ``iterator``'s batches (numbered from ``skipped``) with plain steps, up to a
    stop: ``(interrupted, stop reason)``, ``(False, None)`` when they ran out."""
    ctx, state, implemented = loop.context, loop.state, loop.plugins.implemented
    # Within an epoch a hook can only lose its plugins (a fault quarantines one; a
    # rewind starts the epoch again): a hook read as implemented here that lost them
    # costs a call that finds nobody, never a missed one.
    starts, backward_hook, stepping, ends = (
        implemented[hook]
        for hook in (
            "start_training_batch",
            "after_backward",
            "before_optimizer_step",
            "end_training_batch",
        )
    )
    control = loop.control
    # StepControl.after_step's common case, inline: with no step or time rule to apply,
    # only a Ctrl-C or a plugin's stop request can make a step count.
    quiet, guard = control.idle, control.interrupt
    move, device = loop.move_batches, loop.device
    forward = loop.train_forward
    model, loss_fn, autocast = loop.forward, forward.loss_fn, loop.precision.autocast
    pairs = loss_fn is not None and autocast is None
    optimizer = loop.setup.optimizer
    scheduler = loop.step_scheduler
    train = state.train  # replaced only between loops (``_batches``, ``_epoch``)
    loss_sum, last = train.loss, ctx._last_loss
    metrics = loop.train_metrics
    update = metrics.update if metrics.active else None
    attached = loop.metrics_take_outputs
    precision = loop.precision
    # The hooks' rounds are called as ``EpochLoop._call`` would, without its frame and
    # without ``LoopState.show`` per round: the context is shown once here, and of what
    # it shows only the batch's index, the step and the counts change within the loop,
    # so the loop writes those to it too as they change (and shows it whole again after
    # anything else ran hooks: ``after_step``). ``callers`` is kept current by the
    # plugin set (read per call: a quarantine replaces a round).
    callers = loop.plugins.callers
    shows = starts or backward_hook or stepping or ends
    if shows:
        state.show(ctx)
    for index, batch in enumerate(iterator, start=skipped):
        state.batch_index = index
        if shows:
            ctx.batch_index = index
        if move:
            batch = to_device(batch, device)
        # Every way's ``prepare`` returns a pair as it is: a call saved per batch.
        if type(batch) is not tuple or len(batch) != 2:
            batch = forward.prepare(batch)
        ctx.batch = batch
        if starts:
            callers["start_training_batch"](ctx)
        optimizer.zero_grad(set_to_none=True)
        if pairs:
            # Pairs' ``compute`` inline (same sample rule: the inputs' first dimension).
            inputs, targets = batch
            outputs = predictions = model(inputs)
            if isinstance(inputs, _Tensor) and (shape := inputs.shape):
                samples = shape[0]
            else:
                samples = samples_of_pair(inputs, targets, "train_loader")
            loss = loss_fn(outputs, targets)  # type: ignore[misc]  # not None: pairs
        elif autocast is None:
            loss, outputs, predictions, targets, samples = forward.compute(model, batch)
        else:
            with autocast():
                loss, outputs, predictions, targets, samples = forward.compute(model, batch)
        try:
            _backward(loss)
        except RuntimeError:
            explain_backward(forward, loss)
            raise
        ctx.outputs, ctx.loss = outputs, loss
        if backward_hook:
            callers["after_backward"](ctx)
        if stepping:
            callers["before_optimizer_step"](ctx)
        optimizer.step()
        state.global_step += 1
        # ``EpochLoop._count`` inline, and ``DeviceSum.add``'s CPU case in it (a run of
        # equal weights going on: read the value, add it to the run's float).
        train.samples += samples
        run = loss_sum._run
        if samples == loss_sum._weight and type(run) is float:
            read: float = loss.item()
            loss_sum._run = run + read
            last.value = read
        else:
            last.value = loss_sum.add(loss, samples)
        last.dtype = loss.dtype
        if update is not None:
            update(predictions if attached else for_metrics(predictions, precision), targets)
        train.batches += 1
        if shows:
            ctx.global_step = state.global_step
            ctx.training_sample_count = train.samples
            ctx.training_batch_count = train.batches
        if ends:
            callers["end_training_batch"](ctx)
        if scheduler is not None:
            # After end_training_batch, which shows the rate this step used (step/lr).
            scheduler.step()
        ctx.batch = ctx.outputs = ctx.loss = None
        # Nothing of this step outlives it (the loader's next batch comes first).
        batch = outputs = predictions = targets = loss = inputs = None
        if quiet and not (guard.requested or ctx.should_stop_training):
            continue
        ended = loop.after_step(index)
        if ended is not None:
            return ended
        if shows:
            state.show(ctx)
    return False, None
