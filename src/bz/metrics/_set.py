"""The metrics of one loop (training or validation): updated per batch, computed once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from bz._logging import get_logger
from bz.metrics._collection import compute_all, reduce_across_processes
from bz.metrics._fused import batch_update, fusable
from bz.metrics._protocol import MergeableMetric, Metric

if TYPE_CHECKING:
    import torch

_log = get_logger("bz")


class MetricSet:
    """The metrics of one loop (training or validation): update per batch, compute once."""

    def __init__(self, metrics: Mapping[str, Metric]) -> None:
        self._metrics = dict(metrics)
        self._items = tuple(self._metrics.values())
        self.active = bool(self._items)
        self.takes_attached = self.active and all(fusable(metric) for metric in self._items)
        """Whether ``update`` may be given outputs still attached to the graph: every
        metric is a built-in classification one, counted by one group that keeps
        nothing of them (the loop then saves a ``detach`` per batch)."""
        self._carried: dict[str, list[torch.Tensor]] = {}
        # The function itself, not a method calling it: one Python call less per batch.
        self.update: Callable[[torch.Tensor, torch.Tensor], None] = batch_update(self._items)
        """Fold one batch ``(outputs, targets)`` into every metric; the built-in
        classification metrics share one computation (:func:`bz.metrics.batch_update`)."""

    def compute(self) -> dict[str, float]:
        """One host read for all metrics together (merged over processes first)."""
        if not self._metrics:
            return {}
        self.reduce()
        return compute_all(self._metrics)

    def reset(self) -> None:
        self._carried = {}
        for metric in self._items:
            metric.reset()

    def reduce(self) -> None:
        """Merge every metric's state over the processes, in place."""
        self._merge_carried()
        for metric in self._items:
            reduce_across_processes(metric)

    def state(self, *, summed: bool = False) -> dict[str, list[torch.Tensor]]:
        """Copies (on the host) of the state of every mergeable metric, for a checkpoint;
        ``summed``: added up over the processes (the metrics themselves are unchanged,
        so the epoch can go on)."""
        import torch.distributed as dist

        self._merge_carried()  # an epoch resumed once and interrupted again
        states: dict[str, list[torch.Tensor]] = {}
        for name, metric in self._metrics.items():
            if not isinstance(metric, MergeableMetric):
                continue
            tensors = [tensor.detach().clone() for tensor in metric.state_tensors()]
            if summed:
                for tensor in tensors:
                    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            states[name] = [tensor.cpu() for tensor in tensors]
        return states

    def carry(self, saved: Mapping[str, Sequence[torch.Tensor]]) -> None:
        """Add ``saved`` (from :meth:`state`) into the state before the next ``compute``.

        Mergeable state merges by element-wise sum, so the batches of an interrupted
        epoch and those after its resume add up to what the whole epoch would have.
        """
        self._carried = {name: list(tensors) for name, tensors in saved.items() if tensors}

    def _merge_carried(self) -> None:
        carried, self._carried = self._carried, {}
        for name, saved in carried.items():
            metric = self._metrics.get(name)
            if not isinstance(metric, MergeableMetric):
                continue
            state = metric.state_tensors()
            if not state:  # no batch since the resume: the metric starts from nothing
                continue
            if [t.shape for t in state] != [t.shape for t in saved]:
                _log.warning(
                    "metric_state_not_resumed",
                    metric=name,
                    hint="its state changed shape; the epoch's value covers the batches "
                    "after the resume only",
                )
                continue
            for tensor, part in zip(state, saved, strict=True):
                tensor.add_(part.to(device=tensor.device, dtype=tensor.dtype))

    def to(self, device: torch.device) -> None:
        for metric in self._items:
            move = getattr(metric, "to", None)
            if callable(move):
                move(device)
