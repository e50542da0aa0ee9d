"""Operations on the set of metrics the loop holds: compute once, reset, merge across ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from bz.metrics._inputs import accumulator_dtype
from bz.metrics._protocol import MergeableMetric

if TYPE_CHECKING:
    from collections.abc import Mapping

    from bz.metrics._protocol import Metric

__all__ = ["compute_all", "reduce_across_processes", "reset_all"]


def compute_all(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """Every metric's result as a float, in the order given, with one host read per device.

    All results on one device are stacked into one tensor and read back with a single
    ``tolist()``: this is the one sync a metric costs per epoch. A metric may return a
    one-element tensor or a plain Python number; anything else is a ``TypeError``.
    """
    results = {name: _as_scalar(name, metric.compute()) for name, metric in metrics.items()}
    by_device: dict[torch.device, list[str]] = {}
    for name, result in results.items():
        by_device.setdefault(result.device, []).append(name)
    values: dict[str, float] = {}
    for device, names in by_device.items():
        dtype = accumulator_dtype(device)
        stacked = torch.stack([results[name].to(dtype) for name in names])
        values.update(zip(names, stacked.tolist(), strict=True))
    return {name: values[name] for name in metrics}


def reset_all(metrics: Mapping[str, Metric]) -> None:
    """Reset every metric (at the start of an epoch)."""
    for metric in metrics.values():
        metric.reset()


def reduce_across_processes(metric: Metric) -> None:
    """Sum a mergeable metric's state over all processes, in place, before ``compute``.

    A no-op when ``torch.distributed`` is not initialised (one process) and for metrics
    that are not :class:`MergeableMetric` (torchmetrics objects synchronise themselves in
    ``compute``). Call it once per epoch, on every rank: a second call would count the
    other ranks' data again.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not isinstance(metric, MergeableMetric):
        return
    for tensor in metric.state_tensors():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _as_scalar(name: str, result: object) -> torch.Tensor:
    """``result`` as a 0-dim tensor, left on its device."""
    if isinstance(result, torch.Tensor):
        if result.numel() != 1:
            raise TypeError(
                f"metric {name!r}: compute() must return one value, got a tensor of shape "
                f"{tuple(result.shape)}"
            )
        return result.detach().reshape(())
    if isinstance(result, (int, float)):
        return torch.tensor(float(result), dtype=torch.float64)
    raise TypeError(
        f"metric {name!r}: compute() must return a tensor or a number, got {type(result).__name__}"
    )
