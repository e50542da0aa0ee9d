"""Runs that would go wrong quietly are stopped with a message instead.

Neither check reads anything from the device that the loop does not read anyway: the
epoch's training loss is a device-side sum that the loop reads once per epoch for its
record, and a non-finite batch loss (``nan``, ``inf``) makes that sum non-finite.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bz._errors import TrainingError, UsageError

if TYPE_CHECKING:
    import torch

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
        raise UsageError(f"train_loader yielded no batches in epoch {record.epoch}")
    if not math.isfinite(record.training_loss):
        raise NonFiniteLoss(
            f"the training loss is {record.training_loss} in epoch {record.epoch}: "
            "a batch produced a non-finite loss (check the learning rate, the inputs "
            "and the loss function); the run was stopped before its checkpoint"
        )
