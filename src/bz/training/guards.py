"""Runs that would go wrong quietly are stopped with a message instead.

The epoch check reads nothing from the device that the loop does not read anyway: the
epoch's training loss is a device-side sum that the loop reads once per epoch for its
record, and a non-finite batch loss (``nan``, ``inf``) makes that sum non-finite. The
step check (``check_finite: "step"``) is the one documented host read per batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from bz._errors import TrainingError, UsageError

if TYPE_CHECKING:
    from bz.training.result import EpochRecord


class NonFiniteLoss(TrainingError):
    """The training loss became ``nan`` or infinite (exit 1)."""


def check_model(model: torch.nn.Module) -> None:
    """Refuse a model whose weights have no data (built on the meta device)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise UsageError(
                f"the model from setup() is on the meta device ({name} has no data); "
                "materialise it (model.to_empty(device=...) and initialise it) before "
                "returning it"
            )


def check_batches(batches_per_epoch: int | None) -> None:
    """Refuse, before the first epoch, a training loader whose length is 0."""
    if batches_per_epoch == 0:
        raise UsageError("train_loader has no batches (len(train_loader) == 0); nothing to train")


def check_epoch_loss(record: EpochRecord, batches: int) -> None:
    """Stop the run after an epoch without batches or with a non-finite training loss."""
    if batches == 0:
        # Numbered from 1, as below; an iterator (a generator) is used up after one epoch.
        raise UsageError(
            f"train_loader yielded no batches in epoch {record.epoch + 1}"
            + (
                " (an iterator is used up after one epoch: pass a DataLoader or a list)"
                if record.epoch
                else ""
            )
        )
    if not math.isfinite(record.training_loss):
        raise NonFiniteLoss(
            # Epochs numbered from 1, as the console, the step check and checkpoints do.
            f"the training loss is {record.training_loss} in epoch {record.epoch + 1}: "
            "a batch produced a non-finite loss (check the learning rate, the inputs "
            "and the loss function); the run was stopped before its checkpoint"
        )


def check_step(
    loss: torch.Tensor | None,
    gradient_norm: torch.Tensor | None,
    *,
    step: int,
    epoch: int,
    batch_index: int,
    across_processes: bool = False,
) -> None:
    """Stop at a batch whose loss or gradient norm is not finite (``check_finite: "step"``).

    One host read however many values are checked. ``step`` is the optimizer step the
    batch belongs to and ``epoch`` the epoch, both numbered from 1 as the console and the
    checkpoints number them; ``batch_index`` is the batch's index in its epoch (from 0).

    ``across_processes``: the values are summed over the processes first (one small
    all-reduce), so a non-finite value in any process stops every process at the same
    batch with the same message, instead of one failing while the others wait for it.
    """
    candidates = (("training loss", loss), ("gradient norm", gradient_norm))
    named = [(what, value) for what, value in candidates if value is not None]
    if not named:
        return
    values = torch.stack([value.detach().float().reshape(()) for _, value in named])
    if across_processes:  # a sum stays non-finite when any part of it is
        torch.distributed.all_reduce(values)
    where = " in one of the processes" if across_processes else ""
    for (what, _), number in zip(named, values.tolist(), strict=True):
        if not math.isfinite(number):
            raise NonFiniteLoss(
                f"the {what} is {number}{where} at step {step} (epoch {epoch}, batch index "
                f"{batch_index}): stopped before the optimizer update, and no checkpoint "
                "of this state was written (check the learning rate, the inputs and the loss)"
            )
