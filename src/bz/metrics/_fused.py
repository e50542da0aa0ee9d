"""One update per batch for every metric of a loop, with shared classification counts.

The loop calls :func:`batch_update` once, when it builds its metric set, and the
function it returns on every batch. The built-in classification metrics (accuracy,
precision, recall, F1, top-k accuracy) then cost one shared computation per batch
instead of one each: a single ``argmax`` and comparison, one histogram of
``(predicted class, correct)`` and one of target classes for the per-class metrics, one
histogram of the target's rank for every top-k metric whatever its ``k``. That is as
many tensor operations as the same counts written by hand (``argmax``, ``bincount``,
``topk``), without a sync: every count is an ``index_add_`` into a buffer whose size
the class count fixes.

The histograms are folded into each metric's own state when someone looks at it
(``compute``, ``state_tensors``, ``reset``, a copy), so each metric stays an ordinary
:class:`~bz.metrics.MergeableMetric`: merged across processes, checkpointed and
resumed one by one, exactly as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeGuard

import torch

from bz.metrics._classification import Accuracy, TopKAccuracy, _PerClassMetric

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from bz.metrics._protocol import Metric

__all__ = ["ClassificationGroup", "batch_update"]

_SCORE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
"""Scores the fast path takes (a set lookup, cheaper per batch than a method call)."""

_FUSED_UPDATES = (Accuracy.update, _PerClassMetric.update, TopKAccuracy.update)
"""The ``update`` methods whose arithmetic the group reproduces; a subclass that
overrides ``update`` computes something else and is updated on its own."""


def batch_update(metrics: Iterable[Metric]) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One function that updates every metric in ``metrics`` with a batch.

    Built-in classification metrics are joined into one :class:`ClassificationGroup`
    (a metric belongs to at most one group: joining a new one folds the old one's
    counts first); every other metric's ``update`` is called as it is, in order. Call
    it once per set of metrics (not per batch) and the result on every batch.
    """
    items = tuple(metrics)
    fused: list[Accuracy | _PerClassMetric | TopKAccuracy] = [
        metric for metric in items if _fusable(metric)
    ]
    if not fused:
        return _each([metric.update for metric in items])
    group_update = ClassificationGroup(fused).update
    # The group takes the place of its first member, so that updates (and the error a
    # malformed batch raises) come in the order the metrics were given.
    updates = [
        group_update if metric is fused[0] else metric.update
        for metric in items
        if metric is fused[0] or not _fusable(metric)
    ]
    return _each(updates)


def _fusable(metric: Metric) -> TypeGuard[Accuracy | _PerClassMetric | TopKAccuracy]:
    return (
        isinstance(metric, (Accuracy, _PerClassMetric, TopKAccuracy))
        and type(metric).update in _FUSED_UPDATES
    )


def _each(
    updates: Sequence[Callable[[torch.Tensor, torch.Tensor], None]],
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    if len(updates) == 1:
        return updates[0]

    def update(preds: torch.Tensor, targets: torch.Tensor) -> None:
        for one in updates:
            one(preds, targets)

    return update


class ClassificationGroup:
    """Built-in classification metrics fed the same batches, counted once per batch.

    The fast path takes floating-point scores ``(N, C)`` and int64 targets ``(N,)`` on
    the device and with the class count of the first batch. Any other batch (class
    indices, another dtype, device or width, malformed shapes) goes to each member's
    own ``update``, which counts it the same way or raises the same error, so the group
    never changes what a metric computes, only what it costs.

    Counts per batch, into one int64 buffer (C classes):

    - ``predicted`` (2C, with a per-class member): bin ``2 * argmax + correct``, so
      true positives and predictions per class come from one histogram;
    - ``targets`` (2C, with a per-class member): bin ``target`` for targets in
      ``[0, C)``, ``C + clamped target`` for the others (they make the result NaN);
    - ``ranks`` (C, or 2C without a per-class member, to tell out-of-range targets
      apart): bin ``rank of the target's score``, ties ranked towards the higher class
      as scikit-learn does, so every ``k`` reads ``sum(ranks[:k])``;
    - ``correct`` (1, with accuracy but no per-class member).

    The sample count needs no tensor: it is the shapes' sum, kept as a Python int.
    """

    def __init__(self, members: Iterable[Accuracy | _PerClassMetric | TopKAccuracy]) -> None:
        chosen = list(members)
        self._members = chosen
        self._per_class = any(isinstance(metric, _PerClassMetric) for metric in chosen)
        self._top_k = any(isinstance(metric, TopKAccuracy) for metric in chosen)
        self._argmax = self._per_class or any(isinstance(m, Accuracy) for m in chosen)
        for metric in chosen:
            metric._fold_pending()  # a metric joins one group at a time
            metric._pending = self
        self._classes: int | None = None
        self._device: torch.device | None = None
        self._samples = 0
        self._dirty = False
        self._buffer = torch.zeros(0, dtype=torch.int64)
        self._predicted = self._targets = self._ranks = self._correct = self._buffer
        self._index = self._buffer
        self._one = torch.ones(1, dtype=torch.int64)
        self._ones = self._one
        self._ones_for = -1

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one batch for every member."""
        if not (
            preds.ndim == 2
            and targets.ndim == 1
            and preds.shape[1] == self._classes
            and preds.shape[0] == targets.shape[0]
            and targets.dtype == torch.int64
            and preds.dtype in _SCORE_DTYPES
            and preds.device == self._device
        ):
            self._update_each(preds, targets)
            return
        if preds.requires_grad:
            preds = preds.detach()
        count = targets.shape[0]
        if count != self._ones_for:
            self._ones, self._ones_for = self._one.expand(count), count
        ones, classes = self._ones, self._classes
        if self._argmax:
            predicted = preds.argmax(dim=1)
            correct = predicted == targets
            if self._per_class:
                self._predicted.index_add_(0, torch.add(correct, predicted, alpha=2), ones)
            else:
                self._correct.add_(torch.count_nonzero(correct))
        if self._per_class or self._top_k:
            clamped = targets.clamp(0, classes - 1)
            outside = targets != clamped
            if self._per_class:
                self._targets.index_add_(0, torch.add(clamped, outside, alpha=classes), ones)
            if self._top_k:
                column = clamped.unsqueeze(1)
                target_score = preds.gather(1, column)
                # The target's rank in a descending order whose ties put the higher class
                # first: classes above it count when they score at least as much, the
                # others only when they score more.
                above = torch.where(
                    self._index > column, preds >= target_score, preds > target_score
                )
                rank = above.sum(dim=1)
                if not self._per_class:
                    rank = torch.add(rank, outside, alpha=classes)
                self._ranks.index_add_(0, rank, ones)
        self._samples += count
        self._dirty = True

    def flush(self) -> None:
        """Add the counts since the last flush into every member's state, then zero them."""
        if not self._dirty:
            return
        self._dirty = False
        classes = self._classes
        assert classes is not None  # counts exist only after the first batch set it
        samples, self._samples = self._samples, 0
        if self._per_class:
            pairs = self._predicted.view(classes, 2)  # (wrong, right) per predicted class
            true_positive = pairs[:, 1]
            outside = self._targets[classes:].sum()
        else:
            outside = self._ranks[classes:].sum()
        for metric in self._members:
            state = metric._state_on(self._buffer.device)
            if isinstance(metric, Accuracy):
                correct = true_positive.sum() if self._per_class else self._correct[0]
                state[0].add_(correct)
                state[1].add_(samples)
            elif isinstance(metric, _PerClassMetric):
                counts = torch.stack([true_positive, pairs.sum(dim=1), self._targets[:classes]])
                state[0].add_(counts)
                state[1].add_(outside)
            else:
                state[0].add_(self._ranks[: min(metric.config.k, classes)].sum())
                state[1].add_(samples)
                state[2].add_(outside)
        self._buffer.zero_()

    def _update_each(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """A batch off the fast path: each member counts it alone (or refuses it)."""
        for metric in self._members:
            metric.update(preds, targets)
        if self._classes is None and _fast_path_shapes(preds, targets):
            # Every member accepted scores of this width: later batches like it are
            # counted together.
            self._start(preds.shape[1], preds.device)

    def _start(self, classes: int, device: torch.device) -> None:
        sizes = {
            "predicted": 2 * classes if self._per_class else 0,
            "targets": 2 * classes if self._per_class else 0,
            "ranks": (classes if self._per_class else 2 * classes) if self._top_k else 0,
            "correct": 1 if self._argmax and not self._per_class else 0,
        }
        # Counts made under inference_mode could not be updated outside it later.
        with torch.inference_mode(False):
            self._buffer = torch.zeros(sum(sizes.values()), dtype=torch.int64, device=device)
            self._index = torch.arange(classes, device=device)
            self._one = torch.ones(1, dtype=torch.int64, device=device)
        views, start = [], 0
        for size in sizes.values():
            views.append(self._buffer[start : start + size])
            start += size
        self._predicted, self._targets, self._ranks, self._correct = views
        self._ones_for = -1
        self._classes, self._device = classes, device


def _fast_path_shapes(preds: torch.Tensor, targets: torch.Tensor) -> bool:
    return (
        preds.ndim == 2
        and targets.ndim == 1
        and preds.shape[0] == targets.shape[0]
        and targets.dtype == torch.int64
        and preds.dtype in _SCORE_DTYPES
    )
