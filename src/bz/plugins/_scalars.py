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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from bz.plugins._context import PluginContext

EXTRA_SCALARS_KEY = "scalars"
"""``context.extra`` key: ``dict[str, float]`` other plugins want logged each epoch."""


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
