"""Precision, recall and F1 share one count of each batch; sharing must never be seen."""

from __future__ import annotations

import gc
import weakref
from typing import Literal

import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from bz.metrics import F1Score, Precision, Recall


def batches(seed: int, count: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=generator), torch.randint(0, 4, (16,), generator=generator))
        for _ in range(count)
    ]


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_metrics_fed_the_same_tensors_each_agree_with_scikit_learn(
    average: Literal["macro", "micro", "weighted"],
) -> None:
    metrics = [Precision(average), Recall(average), F1Score(average)]
    data = batches(0)
    for preds, targets in data:
        for metric in metrics:
            metric.update(preds, targets)
    predicted = torch.cat([p.argmax(dim=1) for p, _ in data]).numpy()
    actual = torch.cat([t for _, t in data]).numpy()
    labels = list(range(4))
    expected = [
        precision_score(actual, predicted, labels=labels, average=average, zero_division=0),
        recall_score(actual, predicted, labels=labels, average=average, zero_division=0),
        f1_score(actual, predicted, labels=labels, average=average, zero_division=0),
    ]
    assert [float(m.compute()) for m in metrics] == pytest.approx(expected)


def test_a_batch_changed_in_place_is_counted_anew() -> None:
    first, second = Precision(), Precision()
    preds, targets = batches(1, 1)[0]
    first.update(preds, targets)
    preds.neg_()  # same tensor object, different values
    second.update(preds, targets)
    fresh = Precision()
    fresh.update(preds.clone(), targets)
    assert float(second.compute()) == pytest.approx(float(fresh.compute()))
    assert float(first.compute()) != pytest.approx(float(second.compute()))


def test_the_shared_count_keeps_no_batch_alive() -> None:
    preds, targets = batches(2, 1)[0]
    Recall().update(preds, targets)
    alive = weakref.ref(preds)
    del preds
    gc.collect()
    assert alive() is None
