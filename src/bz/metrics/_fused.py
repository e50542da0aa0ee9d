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

__all__ = ["ClassificationGroup", "batch_update", "fusable"]

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
        metric for metric in items if fusable(metric)
    ]
    if not fused:
        return _each([metric.update for metric in items])
    group_update = ClassificationGroup(fused).update
    # The group takes the place of its first member, so that updates (and the error a
    # malformed batch raises) come in the order the metrics were given.
    updates = [
        group_update if metric is fused[0] else metric.update
        for metric in items
        if metric is fused[0] or not fusable(metric)
    ]
    return _each(updates)


def fusable(metric: Metric) -> TypeGuard[Accuracy | _PerClassMetric | TopKAccuracy]:
    """Whether ``metric`` is counted in a :class:`ClassificationGroup` (a built-in
    classification metric whose ``update`` is its class's own)."""
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


CONFUSION_LIMIT = 2**20
"""Most counters a confusion table may take; beyond it (C above 1,022) per-class counts
are kept in O(C) histograms instead (language-model vocabularies)."""

# How a group counts what accuracy and the per-class metrics need (decided once).
_NOTHING, _CORRECT, _HISTOGRAMS, _CONFUSION = range(4)


class ClassificationGroup:
    """Built-in classification metrics fed the same batches, counted once per batch.

    The fast path takes floating-point scores ``(N, C)`` and int64 targets ``(N,)`` on
    the device and with the class count of the first batch. Any other batch (class
    indices, another dtype, device or width, malformed shapes) goes to each member's
    own ``update``, which counts it the same way or raises the same error, so the group
    never changes what a metric computes, only what it costs.

    Counts per batch, into one int64 buffer (C classes), chosen once from the members
    and C:

    - with a per-class member and ``(C + 2) * C`` at most :data:`CONFUSION_LIMIT`: a
      confusion table, bin ``argmax + C * (clamp(target + 1, 0, C + 1))``, whose first
      and last rows hold out-of-range targets (they make the result NaN); true
      positives, predictions, targets and accuracy all come from it. The same
      operations as a hand-written ``bincount`` of ``target * C + argmax``;
    - with a per-class member and a larger C, two O(C) histograms: bin
      ``2 * argmax + correct`` (predictions and true positives per class) and bin
      ``clamped target + C * outside`` (targets per class, out-of-range ones apart);
    - with accuracy alone: the number of correct predictions (``argmax``, ``==``, a
      count), as by hand;
    - with a top-k member: a histogram of the rank of the target's score, ties ranked
      towards the higher class as scikit-learn does, so every ``k`` reads
      ``sum(ranks[:k])`` (C bins, or 2C when only top-k needs out-of-range targets told
      apart).

    The sample count needs no tensor: it is the shapes' sum, kept as a Python int.
    Scores still attached to the graph are taken as they are (the counts come from
    ``argmax`` and comparisons, which autograd does not record; top-k's ``gather``
    detaches them first), so the loop need not detach them for the group alone.
    """

    def __init__(self, members: Iterable[Accuracy | _PerClassMetric | TopKAccuracy]) -> None:
        chosen = list(members)
        self._members = chosen
        self._per_class = any(isinstance(metric, _PerClassMetric) for metric in chosen)
        self._top_k = any(isinstance(metric, TopKAccuracy) for metric in chosen)
        self._accuracy = any(isinstance(metric, Accuracy) for metric in chosen)
        for metric in chosen:
            metric._fold_pending()  # a metric joins one group at a time
            metric._pending = self
        self._classes: int | None = None
        self._device: torch.device | None = None
        self._samples = 0
        self._dirty = False
        self._counting = _NOTHING
        self._clamps = self._tells_outside = False
        empty = torch.zeros(0, dtype=torch.int64)
        self._buffer = self._confusion = self._predicted = self._targets = empty
        self._ranks = self._correct = self._index = empty
        self._one = torch.ones(1, dtype=torch.int64)
        self._ones = self._one
        self._ones_for = -1

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one batch for every member."""
        # Each tensor attribute read builds a Python object: every shape is read once.
        try:
            shape, target_shape = preds.shape, targets.shape
        except AttributeError:  # not tensors: each member refuses them with its message
            self._update_each(preds, targets)
            return
        if not (
            len(shape) == 2
            and len(target_shape) == 1
            and shape[1] == self._classes
            and shape[0] == target_shape[0]
            and targets.dtype == torch.int64
            and preds.dtype in _SCORE_DTYPES
            and preds.device == self._device
        ):
            self._update_each(preds, targets)
            return
        if self._top_k and preds.requires_grad:  # gather would add to the graph
            preds = preds.detach()
        count = target_shape[0]
        if count != self._ones_for:
            self._ones, self._ones_for = self._one.expand(count), count
        ones, classes, counting = self._ones, self._classes, self._counting
        if counting == _CONFUSION:
            rows = (targets + 1).clamp_(0, classes + 1)
            cells = torch.add(preds.argmax(dim=1), rows, alpha=classes)
            self._confusion.index_add_(0, cells, ones)
        elif counting == _HISTOGRAMS:
            predicted = preds.argmax(dim=1)
            correct = predicted == targets
            self._predicted.index_add_(0, torch.add(correct, predicted, alpha=2), ones)
        elif counting == _CORRECT:
            self._correct.add_(torch.count_nonzero(preds.argmax(dim=1) == targets))
        if self._clamps:
            clamped = targets.clamp(0, classes - 1)
            if self._tells_outside:
                outside = targets != clamped
            if counting == _HISTOGRAMS:
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
        if self._counting == _CONFUSION:
            table = self._confusion.view(classes + 2, classes)
            inside = table[1 : classes + 1]  # rows: targets in [0, C); columns: predictions
            true_positive, predicted, actual = inside.diagonal(), inside.sum(0), inside.sum(1)
            outside = table[0].sum() + table[classes + 1].sum()
        elif self._counting == _HISTOGRAMS:
            pairs = self._predicted.view(classes, 2)  # (wrong, right) per predicted class
            true_positive, predicted = pairs[:, 1], pairs.sum(dim=1)
            actual, outside = self._targets[:classes], self._targets[classes:].sum()
        else:
            outside = self._ranks[classes:].sum()
        for metric in self._members:
            state = metric._state_on(self._buffer.device)
            if isinstance(metric, Accuracy):
                correct = true_positive.sum() if self._per_class else self._correct[0]
                state[0].add_(correct)
                state[1].add_(samples)
            elif isinstance(metric, _PerClassMetric):
                state[0].add_(torch.stack([true_positive, predicted, actual]))
                state[1].add_(outside)
            else:
                state[0].add_(self._ranks[: min(metric.config.k, classes)].sum())
                state[1].add_(samples)
                state[2].add_(outside)
        self._buffer.zero_()

    def _update_each(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """A batch off the fast path: each member counts it alone (or refuses it)."""
        if isinstance(preds, torch.Tensor) and preds.requires_grad:
            preds = preds.detach()
        for metric in self._members:
            metric.update(preds, targets)
        if self._classes is None and _fast_path_shapes(preds, targets):
            # Every member accepted scores of this width: later batches like it are
            # counted together.
            self._start(preds.shape[1], preds.device)

    def _start(self, classes: int, device: torch.device) -> None:
        if self._per_class:
            confusion = (classes + 2) * classes <= CONFUSION_LIMIT
            self._counting = _CONFUSION if confusion else _HISTOGRAMS
        else:
            self._counting = _CORRECT if self._accuracy else _NOTHING
        self._clamps = self._top_k or self._counting == _HISTOGRAMS
        self._tells_outside = self._counting == _HISTOGRAMS or (
            self._top_k and not self._per_class
        )
        sizes = {
            "confusion": (classes + 2) * classes if self._counting == _CONFUSION else 0,
            "predicted": 2 * classes if self._counting == _HISTOGRAMS else 0,
            "targets": 2 * classes if self._counting == _HISTOGRAMS else 0,
            "ranks": (classes if self._per_class else 2 * classes) if self._top_k else 0,
            "correct": 1 if self._counting == _CORRECT else 0,
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
        self._confusion, self._predicted, self._targets, self._ranks, self._correct = views
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
