"""Metrics never read a value back to the host while updating, nor while computing.

Every way a tensor's value reaches Python (``item``, ``tolist``, ``cpu``, ``bool(t)``,
formatting, ...) and every operation whose output shape depends on values (which the
host must wait for) is wrapped with a counter while the metrics run. The one read
allowed is the ``tolist`` in ``compute_all``, once per epoch. On a CUDA machine the
same is checked by torch itself with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from unittest.mock import patch

import pytest
import torch

from bz.metrics import (
    Accuracy,
    F1Score,
    MeanAbsoluteError,
    MeanSquaredError,
    Metric,
    Precision,
    Recall,
    TopKAccuracy,
    compute_all,
    reset_all,
)

Reads = Callable[..., bool]


def always(*_args: Any, **_kwargs: Any) -> bool:
    return True


def names_the_host(*args: Any, **kwargs: Any) -> bool:
    """``tensor.to(...)`` reads back when it names the CPU as the destination."""
    targets = [*args[1:], kwargs.get("device")]
    return any(
        (isinstance(target, str) and target.startswith("cpu"))
        or (isinstance(target, torch.device) and target.type == "cpu")
        for target in targets
    )


def indexes_with_a_mask(*args: Any, **_kwargs: Any) -> bool:
    """``tensor[mask]`` has as many elements as the mask has ``True`` values."""
    index = args[1]
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


TENSOR_METHODS: dict[str, Reads] = {
    "item": always,
    "tolist": always,
    "cpu": always,
    "numpy": always,
    "__array__": always,
    "__bool__": always,
    "__int__": always,
    "__float__": always,
    "__index__": always,
    "__format__": always,
    "__repr__": always,
    "to": names_the_host,
    "__getitem__": indexes_with_a_mask,
    "nonzero": always,
    "unique": always,
    "masked_select": always,
    "bincount": always,
}
"""Tensor methods that read values back to the host (or wait for them), when they do."""

TORCH_FUNCTIONS: dict[str, Reads] = {
    "unique": always,
    "nonzero": always,
    "masked_select": always,
    "bincount": always,
}
"""``torch.*`` functions whose output shape depends on the values of their input."""


class HostReads:
    """Counts host reads, by method name, while :meth:`watching` is active."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for owner, table in ((torch.Tensor, TENSOR_METHODS), (torch, TORCH_FUNCTIONS)):
                for name, reads in table.items():
                    counted = self._counting(name, getattr(owner, name), reads)
                    stack.enter_context(patch.object(owner, name, counted))
            yield

    def _counting(self, name: str, original: Callable[..., Any], reads: Reads) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if reads(*args, **kwargs):
                self.calls[name] += 1
            return original(*args, **kwargs)

        return counted


Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def every_metric(device: str = "cpu") -> dict[str, tuple[Metric, Batches]]:
    """Each built-in metric (in each input form) with a maker of batches of a given size."""

    def scores(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(size, 5, device=device), torch.randint(0, 5, (size,), device=device)

    def indices(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randint(0, 5, (size,), device=device),
            torch.randint(0, 5, (size,), device=device),
        )

    def values(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(size, 1, device=device), torch.randn(size, device=device)

    return {
        "accuracy": (Accuracy(), scores),
        "accuracy_of_indices": (Accuracy(), indices),
        "top_3_accuracy": (TopKAccuracy(k=3), scores),
        "precision": (Precision(), scores),
        "recall_weighted": (Recall(average="weighted"), scores),
        "f1_micro_of_indices": (F1Score(average="micro", num_classes=5), indices),
        "f1_score": (F1Score(), scores),
        "mean_squared_error": (MeanSquaredError(), values),
        "mean_absolute_error": (MeanAbsoluteError(), values),
    }


BATCH_SIZES = [8, 3, 0, 16, 1, 7] * 5


@pytest.mark.parametrize(
    ("use", "counted_as"),
    [
        pytest.param(lambda t: t.sum().item(), "item", id="item"),
        pytest.param(lambda t: t.tolist(), "tolist", id="tolist"),
        pytest.param(lambda t: t.cpu(), "cpu", id="cpu"),
        pytest.param(lambda t: t.numpy(), "numpy", id="numpy"),
        pytest.param(lambda t: bool(t.sum() > 0), "__bool__", id="bool"),
        pytest.param(lambda t: float(t.sum()), "__float__", id="float"),
        pytest.param(lambda t: f"{t.sum()}", "__format__", id="format"),
        pytest.param(lambda t: t.to("cpu"), "to", id="to_cpu"),
        pytest.param(lambda t: t[t > 0], "__getitem__", id="mask"),
        pytest.param(lambda t: torch.unique(t), "unique", id="unique"),
        pytest.param(lambda t: t.nonzero(), "nonzero", id="nonzero"),
    ],
)
def test_the_counter_sees_each_kind_of_host_read(
    use: Callable[[torch.Tensor], object], counted_as: str
) -> None:
    reads = HostReads()
    with reads.watching():
        use(torch.randn(4))
    assert reads.calls[counted_as] >= 1


def test_the_counter_ignores_what_stays_on_the_device() -> None:
    reads = HostReads()
    with reads.watching():
        scores = torch.randn(4, 3)
        scores.argmax(dim=1).to(torch.float64)[torch.tensor([0, 2])].sum()
    assert reads.calls == Counter()


def test_updates_and_computes_never_read_back_to_the_host() -> None:
    metrics = every_metric()
    reads = HostReads()
    with reads.watching():
        for metric, batch in metrics.values():
            for size in BATCH_SIZES:
                metric.update(*batch(size))
            metric.compute()
            metric.reset()
            metric.update(*batch(4))
            metric.compute()
    assert reads.calls == Counter()


def test_compute_all_reads_back_once_for_all_metrics() -> None:
    metrics = every_metric()
    for metric, batch in metrics.values():
        metric.update(*batch(6))
    reads = HostReads()
    with reads.watching():
        results = compute_all({name: metric for name, (metric, _) in metrics.items()})
        reset_all({name: metric for name, (metric, _) in metrics.items()})
    assert reads.calls == Counter({"tolist": 1})
    assert list(results) == list(metrics)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_updates_and_computes_on_cuda_never_synchronize() -> None:
    metrics = every_metric("cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    # torch raises on any call that makes the host wait for the device.
    torch.cuda.set_sync_debug_mode("error")
    try:
        for metric, batch in metrics.values():
            for size in BATCH_SIZES:
                metric.update(*batch(size))
            metric.compute()
            metric.reset()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    results = compute_all({name: metric for name, (metric, _) in metrics.items()})
    assert list(results) == list(metrics)
