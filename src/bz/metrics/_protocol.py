"""What a metric is: the protocol the training loop relies on, and its mergeable variant."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Metric(Protocol):
    """Anything that accumulates predictions batch by batch and summarises them.

    The loop calls ``update`` once per batch, ``compute`` once at the end of an epoch
    and ``reset`` before the next one. ``update`` is on the hot path: a well-behaved
    metric keeps its state on the device of its inputs and never reads a value back to
    the host there. torchmetrics-style objects (``update``/``compute``/``reset``)
    satisfy this protocol as they are.

    A metric may also carry a ``display_name: str`` attribute: the key its result is
    reported under (``top_5_accuracy`` for ``{"top_k_accuracy": {"k": 5}}``). Without
    one, the entry-point name is used.
    """

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Fold one batch of predictions and targets into the state."""
        ...

    def compute(self) -> torch.Tensor:
        """The metric over everything seen since the last reset (a 0-dim tensor)."""
        ...

    def reset(self) -> None:
        """Forget everything seen."""
        ...


@runtime_checkable
class MergeableMetric(Metric, Protocol):
    """A metric whose state is a list of tensors that merge across processes by summing.

    Every built-in metric is one. In a distributed run, each process updates its own
    copy; before ``compute``, every tensor of ``state_tensors()`` is summed over the
    processes in place (``all_reduce`` with ``SUM``), after which ``compute`` gives the
    metric over the data of all processes (see :func:`bz.metrics.reduce_across_processes`).

    State is created on the first ``update``, so a process that has seen no batch has
    no state to reduce; distributed samplers give every process the same number of
    batches, which keeps the lists aligned.
    """

    def state_tensors(self) -> list[torch.Tensor]:
        """The state, as tensors that are merged by element-wise sum (in place)."""
        ...
