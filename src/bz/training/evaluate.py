"""``bz validate``: one pass of a model over the validation data, as the loop validates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import torch

from bz._errors import UsageError
from bz.metrics._set import MetricSet
from bz.plugins._context import DeviceSum
from bz.training.device import resolve_device, to_device, unpack

if TYPE_CHECKING:
    from bz._setup import TrainingSetup
    from bz.config import RunConfig
    from bz.metrics import Metric


@attrs.frozen
class Evaluation:
    """What ``bz validate`` reports: the validation loss and metrics of a model."""

    loss: float
    metrics: dict[str, float]
    batches: int


def evaluate(setup: TrainingSetup, config: RunConfig, metrics: Mapping[str, Metric]) -> Evaluation:
    """Run ``setup.model`` over ``setup.val_loader`` once, as the loop's validation does."""
    if setup.val_loader is None:
        raise UsageError("setup() returned no val_loader; there is nothing to validate on")
    device = resolve_device(config.device)
    model = setup.model.to(device)
    tracked = MetricSet({**metrics, **setup.metrics})
    tracked.to(device)
    tracked.reset()
    total, batches = DeviceSum(), 0
    model.eval()
    with torch.no_grad():
        for batch in setup.val_loader:
            inputs, targets = unpack(to_device(batch, device), "val_loader")
            outputs = model(inputs)
            total.add(setup.loss_fn(outputs, targets).detach())
            tracked.update(outputs, targets)
            batches += 1
    return Evaluation(mean(total, batches), tracked.compute(), batches)


def mean(total: DeviceSum, count: int) -> float:
    """``total / count`` read once; ``nan`` when nothing was counted."""
    return total.value() / count if count else float("nan")
