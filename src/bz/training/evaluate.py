"""``bz validate``: one pass of a model over the validation data, as the loop validates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import torch

from bz._errors import UsageError
from bz.metrics._set import MetricSet
from bz.plugins._context import DeviceSum
from bz.training.device import resolve_device, to_device
from bz.training.forward import forward_for

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
    forward = forward_for(setup, "val_loader", metrics=tracked.active)
    total, batches, samples = DeviceSum(), 0, 0
    model.eval()
    with torch.no_grad():
        for batch in setup.val_loader:
            prepared = forward.prepare(to_device(batch, device))
            loss, _, predictions, targets, count = forward.compute(model, prepared)
            total.add(loss.detach(), count)
            if tracked.active:
                tracked.update(predictions, targets)
            batches += 1
            samples += count
    return Evaluation(mean(total, samples), tracked.compute(), batches)


def mean(total: DeviceSum, count: int) -> float:
    """``total / count`` read once; ``nan`` when nothing was counted."""
    return total.value() / count if count else float("nan")
