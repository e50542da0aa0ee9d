"""Metrics updated together through ``batch_update`` give what each gives alone.

``batch_update`` counts the built-in classification metrics of a loop once per batch
and folds the counts into each metric when it is read. None of that may be visible:
every result, every state tensor, reset, copies, merging and errors must be exactly
those of the metrics updated one by one (which tests/test_metrics_reference.py checks
against scikit-learn).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score
from tests._examples import examples
from tests.unit.test_metrics_host_reads import HostReads

import bz.metrics._fused
from bz.metrics import (
    Accuracy,
    F1Score,
    MeanSquaredError,
    MergeableMetric,
    Metric,
    Precision,
    Recall,
    TopKAccuracy,
    reduce_across_processes,
)
from bz.metrics._fused import batch_update
from bz.metrics._set import MetricSet

Batch = tuple[torch.Tensor, torch.Tensor]

SETTINGS = settings(max_examples=examples(40), deadline=None)


def classification_set(classes: int, choice: list[int]) -> list[MergeableMetric]:
    """Some of the built-in classification metrics (by position), in a given order."""
    every: list[MergeableMetric] = [
        Accuracy(),
        Precision(),
        Recall(average="weighted"),
        F1Score(average="micro"),
        TopKAccuracy(k=1),
        TopKAccuracy(k=min(3, classes + 1)),
        F1Score(average="weighted"),
    ]
    return [every[index] for index in choice]


@st.composite
def batches(draw: st.DrawFn) -> tuple[int, list[Batch]]:
    """Batches of scores with frequent ties, sometimes with a target outside the classes,
    sometimes with a batch of another dtype (which leaves the fast path)."""
    classes = draw(st.integers(2, 6))
    outside = draw(st.booleans()) and draw(st.booleans())
    made: list[Batch] = []
    for _ in range(draw(st.integers(1, 5))):
        size = draw(st.integers(0, 12))
        low, high = (-1, classes) if outside else (0, classes - 1)
        targets = draw(st.lists(st.integers(low, high), min_size=size, max_size=size))
        row = st.lists(st.integers(-2, 2), min_size=classes, max_size=classes)
        rows = draw(st.lists(row, min_size=size, max_size=size))
        scores = torch.tensor(rows, dtype=torch.float32)
        target_tensor = torch.tensor(targets, dtype=torch.int64).reshape(size)
        if draw(st.integers(0, 5)) == 0:
            target_tensor = target_tensor.to(torch.int32)  # off the fast path
        made.append((scores.reshape(size, classes), target_tensor))
    return classes, made


def results(metrics: list[MergeableMetric]) -> list[float]:
    return [float(metric.compute()) for metric in metrics]


def same(first: list[float], second: list[float]) -> bool:
    """Equal, NaN included: integer counts give identical results, not close ones."""
    return all(
        (math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(first, second, strict=True)
    )


def counting(histograms: bool) -> contextlib.AbstractContextManager[object]:
    """Per-class counts in a confusion table (small C, the default) or in O(C) histograms
    (what a large C gets), whichever the test asks for."""
    if histograms:
        return patch.object(bz.metrics._fused, "CONFUSION_LIMIT", 0)
    return contextlib.nullcontext()


@SETTINGS
@given(
    data=batches(),
    choice=st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True),
    histograms=st.booleans(),
)
def test_updated_together_each_metric_computes_what_it_computes_alone(
    data: tuple[int, list[Batch]], choice: list[int], histograms: bool
) -> None:
    classes, made = data
    alone = classification_set(classes, choice)
    together = classification_set(classes, choice)
    update = batch_update(together)
    with counting(histograms):
        for preds, targets in made:
            for metric in alone:
                metric.update(preds, targets)
            update(preds, targets)
    assert same(results(together), results(alone))
    for mine, theirs in zip(together, alone, strict=True):
        for tensor, expected in zip(mine.state_tensors(), theirs.state_tensors(), strict=True):
            if not math.isnan(float(theirs.compute())):
                assert torch.equal(tensor, expected)


@SETTINGS
@given(data=batches(), histograms=st.booleans())
def test_together_they_agree_with_scikit_learn(
    data: tuple[int, list[Batch]], histograms: bool
) -> None:
    classes, made = data
    made = [(preds, targets.to(torch.int64)) for preds, targets in made]
    scores = torch.cat([preds for preds, _ in made])
    targets = torch.cat([targets for _, targets in made])
    if targets.numel() == 0 or bool(((targets < 0) | (targets >= classes)).any()):
        return  # NaN cases are covered by the comparison with the metrics alone
    metrics: list[MergeableMetric] = [Accuracy(), F1Score(average="macro"), TopKAccuracy(k=2)]
    update = batch_update(metrics)
    with counting(histograms):
        for batch in made:
            update(*batch)
    padded = torch.cat([scores, torch.full((scores.shape[0], 1), -9.0)], dim=1).double()
    expected = [
        accuracy_score(targets.numpy(), scores.argmax(dim=1).numpy()),
        f1_score(
            targets.numpy(),
            scores.argmax(dim=1).numpy(),
            labels=list(range(classes)),
            average="macro",
            zero_division=0,
        ),
        # A column scoring below all others keeps scikit-learn's multi-class tie rule
        # for two classes too, and changes no rank within the top 2 of C >= 2.
        top_k_accuracy_score(
            targets.numpy(), padded.numpy(), k=2, labels=list(range(classes + 1))
        ),
    ]
    assert results(metrics) == pytest.approx(expected, rel=1e-12)


def scores_batch(size: int = 8, classes: int = 4, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(size, classes, generator=generator),
        torch.randint(0, classes, (size,), generator=generator),
    )


def test_resetting_one_metric_keeps_what_the_others_saw() -> None:
    accuracy, precision = Accuracy(), Precision()
    update = batch_update([accuracy, precision])
    update(*scores_batch(seed=1))
    update(*scores_batch(seed=1))  # the first batch counted alone, the second together
    accuracy.reset()
    update(*scores_batch(seed=2))
    expected_precision, expected_accuracy = Precision(), Accuracy()
    for seed in (1, 1, 2):
        expected_precision.update(*scores_batch(seed=seed))
    expected_accuracy.update(*scores_batch(seed=2))
    assert same(results([accuracy, precision]), results([expected_accuracy, expected_precision]))


def test_a_copy_keeps_the_counts_so_far_and_is_not_fed_afterwards() -> None:
    metric = Recall()
    update = batch_update([metric])
    for seed in range(3):
        update(*scores_batch(seed=seed))
    snapshot = copy.deepcopy(metric)
    update(*scores_batch(seed=9))
    expected = Recall()
    for seed in range(3):
        expected.update(*scores_batch(seed=seed))
    assert same(results([snapshot]), results([expected]))
    expected.update(*scores_batch(seed=9))
    assert same(results([metric]), results([expected]))


def test_a_metric_joining_a_new_set_keeps_what_the_old_one_counted() -> None:
    metric = TopKAccuracy(k=2)
    first = batch_update([metric])
    for seed in range(3):
        first(*scores_batch(seed=seed))
    second = batch_update([metric, Accuracy()])
    second(*scores_batch(seed=3))
    expected = TopKAccuracy(k=2)
    for seed in range(4):
        expected.update(*scores_batch(seed=seed))
    assert same(results([metric]), results([expected]))


def test_other_metrics_are_updated_as_they_are_in_order() -> None:
    calls: list[str] = []

    class Recording:
        def __init__(self, name: str) -> None:
            self.name = name

        def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
            calls.append(self.name)

        def compute(self) -> torch.Tensor:
            return torch.tensor(0.0)

        def reset(self) -> None:
            pass

    class MyAccuracy(Accuracy):
        """A subclass with its own update is not counted by the group."""

        def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
            calls.append("mine")
            super().update(preds, targets)

    metrics: list[Metric] = [Recording("a"), Accuracy(), MyAccuracy(), Recording("b")]
    update = batch_update(metrics)
    update(*scores_batch())
    assert calls == ["a", "mine", "b"]


def test_a_regression_metric_beside_classification_ones_is_updated_alone() -> None:
    squared = MeanSquaredError()
    update = batch_update([squared, Accuracy()])
    preds, targets = torch.randn(5, 1), torch.randn(5)
    with pytest.raises(ValueError, match="targets must be class indices"):
        update(preds, targets)  # the regression metric counted it; accuracy refuses it
    expected = float((preds[:, 0] - targets).square().mean())
    assert float(squared.compute()) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (scores_batch(classes=5), "earlier batches had 4"),
        ((torch.randn(3, 4), torch.tensor([0, 1])), "number of samples"),
        ((torch.tensor([0, 1]), torch.tensor([0, 1])), "num_classes"),
    ],
)
def test_a_batch_the_metrics_refuse_raises_their_error(second: Batch, message: str) -> None:
    update = batch_update([Accuracy(), F1Score()])
    update(*scores_batch())
    update(*scores_batch(seed=1))
    with pytest.raises(ValueError, match=message):
        update(*second)


@pytest.mark.parametrize("histograms", [False, True], ids=["confusion", "histograms"])
@pytest.mark.parametrize(
    "make",
    [lambda: [TopKAccuracy(k=2)], lambda: [Accuracy(), Recall()], lambda: [F1Score()]],
    ids=["top_k_alone", "accuracy_and_recall", "f1_alone"],
)
def test_a_target_outside_the_classes_after_the_first_batch_makes_the_result_nan(
    make: Callable[[], list[MergeableMetric]], histograms: bool
) -> None:
    metrics = make()
    update = batch_update(metrics)
    with counting(histograms):
        update(*scores_batch(seed=0))  # the first batch is counted by each metric alone
        update(torch.randn(3, 4), torch.tensor([0, 4, 1]))
    per_class_or_top_k = [m for m in metrics if not isinstance(m, Accuracy)]
    assert all(math.isnan(value) for value in results(per_class_or_top_k))


def test_class_indices_with_num_classes_are_counted_alone_and_agree() -> None:
    together: list[MergeableMetric] = [Accuracy(), F1Score(num_classes=4)]
    alone: list[MergeableMetric] = [Accuracy(), F1Score(num_classes=4)]
    update = batch_update(together)
    for seed in range(3):
        preds, targets = scores_batch(seed=seed)
        indices = preds.argmax(dim=1)
        update(indices, targets)
        for metric in alone:
            metric.update(indices, targets)
    assert same(results(together), results(alone))


def test_counts_made_under_inference_mode_can_be_reset_and_updated_outside_it() -> None:
    metrics: list[MergeableMetric] = [Accuracy(), Precision(), TopKAccuracy(k=2)]
    update = batch_update(metrics)
    with torch.inference_mode():
        update(*scores_batch(seed=0))
        update(*scores_batch(seed=1))
    for metric in metrics:
        metric.reset()
    update(*scores_batch(seed=2))
    update(*scores_batch(seed=3))
    assert not any(math.isnan(value) for value in results(metrics))


def test_outputs_that_require_grad_are_detached() -> None:
    metrics: list[MergeableMetric] = [Precision(), TopKAccuracy(k=2)]
    update = batch_update(metrics)
    preds, targets = scores_batch()
    for _ in range(2):
        update(preds.requires_grad_(), targets)
    assert not any(t.requires_grad for m in metrics for t in m.state_tensors())


def test_reduce_across_processes_sums_the_folded_counts() -> None:
    metric = Accuracy()
    update = batch_update([metric])
    for seed in range(3):
        update(*scores_batch(seed=seed))
    doubled: list[torch.Tensor] = []

    def all_reduce(tensor: torch.Tensor, op: Any) -> None:
        tensor.mul_(2)  # what two identical processes would sum to
        doubled.append(tensor)

    expected = float(metric.compute())
    with (
        patch.object(dist, "is_initialized", return_value=True),
        patch.object(dist, "all_reduce", all_reduce),
    ):
        reduce_across_processes(metric)
    assert len(doubled) == 2
    assert float(metric.compute()) == expected
    assert int(metric.state_tensors()[1]) == 2 * 3 * 8


def every_classification_metric() -> list[MergeableMetric]:
    return [Accuracy(), Precision(), Recall(), F1Score(), TopKAccuracy(k=3)]


def feed(update: Callable[[torch.Tensor, torch.Tensor], None], device: str = "cpu") -> None:
    for size in [8, 3, 0, 16, 1, 7] * 3:
        update(torch.randn(size, 5, device=device), torch.randint(0, 5, (size,), device=device))


def test_updating_together_never_reads_back_to_the_host() -> None:
    metrics = every_classification_metric()
    update = batch_update(metrics)
    reads = HostReads()
    with reads.watching():
        feed(update)
        for metric in metrics:
            metric.compute()
            metric.reset()
        feed(update)
    assert reads.calls == Counter()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_updating_together_on_cuda_never_synchronizes() -> None:
    metrics = every_classification_metric()
    update = batch_update(metrics)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # torch raises on anything that waits
    try:
        feed(update, "cuda")
        for metric in metrics:
            metric.compute()
            metric.reset()
        feed(update, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert not any(math.isnan(value) for value in results(metrics))


def test_the_group_keeps_no_batch_alive() -> None:
    update = batch_update(every_classification_metric())
    preds, targets = scores_batch()
    for _ in range(2):
        update(preds, targets)
    alive = weakref.ref(preds), weakref.ref(targets)
    del preds, targets
    gc.collect()
    assert alive[0]() is None
    assert alive[1]() is None


@SETTINGS
@given(
    data=batches(),
    choice=st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True),
    histograms=st.booleans(),
)
def test_scores_still_attached_to_a_graph_count_as_detached_ones_and_stay_out_of_it(
    data: tuple[int, list[Batch]], choice: list[int], histograms: bool
) -> None:
    # What the training loop gives a set of built-in classification metrics alone
    # (MetricSet.takes_attached): the model's outputs, not detached.
    classes, made = data
    attached = classification_set(classes, choice)
    detached = classification_set(classes, choice)
    fresh = classification_set(classes, choice)
    assert MetricSet({str(index): metric for index, metric in enumerate(fresh)}).takes_attached
    with counting(histograms):
        update, reference = batch_update(attached), batch_update(detached)
        for preds, targets in made:
            leaf = preds.clone().requires_grad_(True)
            outputs = leaf * 1.0  # a graph behind the scores, as a model's outputs have
            update(outputs, targets)
            reference(outputs.detach(), targets)
    assert same(results(attached), results(detached))
    for metric in attached:
        for tensor in metric.state_tensors():
            assert not tensor.requires_grad
            assert tensor.grad_fn is None


def test_a_set_with_any_other_metric_is_given_detached_outputs() -> None:
    assert not MetricSet({}).takes_attached
    assert not MetricSet({"accuracy": Accuracy(), "mse": MeanSquaredError()}).takes_attached
