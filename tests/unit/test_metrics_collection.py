"""What the loop does with its metrics once per epoch: reduce, compute all, reset all."""

from __future__ import annotations

import math
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.distributed as dist

from bz.metrics import (
    Accuracy,
    MeanSquaredError,
    Metric,
    TopKAccuracy,
    compute_all,
    reduce_across_processes,
    reset_all,
)


class Fixed:
    """A metric whose result is given (a tensor of any shape, or a plain number)."""

    def __init__(self, result: object) -> None:
        self.result = result
        self.resets = 0

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        pass

    def compute(self) -> torch.Tensor:
        return self.result  # type: ignore[return-value]  # deliberately not always a tensor

    def reset(self) -> None:
        self.resets += 1


def fed_accuracy() -> Accuracy:
    metric = Accuracy()
    metric.update(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 1, 1]))
    return metric


def test_compute_all_gives_floats_in_the_order_given() -> None:
    metrics: dict[str, Metric] = {
        "z_first": Fixed(torch.tensor(2.5)),
        "accuracy": fed_accuracy(),
        "one_element": Fixed(torch.tensor([0.25], dtype=torch.float16)),
        "plain_number": Fixed(3),
        "integer_tensor": Fixed(torch.tensor(7)),
    }
    results = compute_all(metrics)
    assert results == {
        "z_first": 2.5,
        "accuracy": pytest.approx(2 / 3),
        "one_element": 0.25,
        "plain_number": 3.0,
        "integer_tensor": 7.0,
    }
    assert list(results) == list(metrics)
    assert all(type(value) is float for value in results.values())


def test_compute_all_reports_a_metric_without_samples_as_nan() -> None:
    results = compute_all({"accuracy": Accuracy(), "mse": MeanSquaredError()})
    assert all(math.isnan(value) for value in results.values())


def test_compute_all_of_nothing_is_empty() -> None:
    assert compute_all({}) == {}


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (torch.zeros(3), r"one value, got a tensor of shape \(3,\)"),
        ({"a": 1.0}, "a tensor or a number, got dict"),
    ],
)
def test_compute_all_refuses_results_that_are_not_one_value(result: object, message: str) -> None:
    with pytest.raises(TypeError, match=f"metric 'odd': compute\\(\\) must return {message}"):
        compute_all({"odd": Fixed(result)})


def test_reset_all_resets_each_metric() -> None:
    first, second = Fixed(1.0), Fixed(2.0)
    reset_all({"first": first, "second": second})
    assert (first.resets, second.resets) == (1, 1)


def test_reduce_is_a_no_op_in_a_single_process() -> None:
    metric = fed_accuracy()
    before = [tensor.clone() for tensor in metric.state_tensors()]
    reduce_across_processes(metric)
    after = metric.state_tensors()
    assert all(torch.equal(old, new) for old, new in zip(before, after, strict=True))


def test_reduce_sums_every_state_tensor_in_place() -> None:
    metric = TopKAccuracy(k=1)
    metric.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with (
        patch.object(dist, "is_initialized", return_value=True),
        patch.object(dist, "all_reduce") as all_reduce,
    ):
        reduce_across_processes(metric)
        reduce_across_processes(Fixed(1.0))  # not mergeable: left alone
    reduced = [call.args[0] for call in all_reduce.call_args_list]
    assert len(reduced) == len(metric.state_tensors()) == 3
    assert all(
        tensor is mine for tensor, mine in zip(reduced, metric.state_tensors(), strict=True)
    )
    assert all(call.kwargs == {"op": dist.ReduceOp.SUM} for call in all_reduce.call_args_list)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_reduce_runs_in_a_real_process_group(tmp_path: Path) -> None:
    metric = fed_accuracy()
    expected = float(metric.compute())
    dist.init_process_group(
        "gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1
    )
    try:
        reduce_across_processes(metric)
    finally:
        dist.destroy_process_group()
    assert float(metric.compute()) == expected
