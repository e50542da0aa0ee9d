"""Multi-class classification metrics, kept as sum-reducible counts on the device.

Each metric agrees with its scikit-learn namesake called with ``labels=range(C)`` and
``zero_division=0``. ``update`` looks at shapes only: counts are added with
``scatter_add_`` into tensors whose size is fixed by the class count, so a batch never
waits for the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import attrs
import torch

from bz._errors import MetricInputError
from bz.config import ConfigValueError, at_least
from bz.metrics._inputs import accumulator_dtype, class_scores, predicted_classes
from bz.metrics._state import SummedStateMetric, safe_divide

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "Accuracy",
    "AveragingConfig",
    "F1Score",
    "Precision",
    "Recall",
    "TopKAccuracy",
    "TopKConfig",
]

Average = Literal["macro", "micro", "weighted"]

_AVERAGES: tuple[str, ...] = ("macro", "micro", "weighted")


def _zero_count(device: torch.device, shape: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.int64, device=device)


def _within(classes: torch.Tensor, count: int) -> torch.Tensor:
    """Which class indices lie in ``[0, count)`` (a mask, computed on the device)."""
    return (classes >= 0) & (classes < count)


def _check_average(_instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    # JSON input is checked by the converter first; this guards Python callers.
    if value not in _AVERAGES:
        raise ConfigValueError(
            attribute.name, f"expected one of {', '.join(_AVERAGES)}, got {value!r}"
        )


class Accuracy(SummedStateMetric):
    """Fraction of samples whose predicted class is the target (``accuracy_score``).

    Predictions are scores ``(N, C)`` (the predicted class is the first highest column,
    as ``argmax`` picks it) or class indices ``(N,)``; targets are class indices
    ``(N,)``. The class count plays no part, so none needs to be given. No options.
    """

    display_name = "accuracy"

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Count the correct predictions of one batch."""
        predicted, targets, _ = predicted_classes(self.display_name, preds, targets)
        correct, total = self._state_on(predicted.device)
        correct.add_((predicted == targets).sum())
        total.add_(targets.shape[0])

    def _new_state(self, device: torch.device) -> list[torch.Tensor]:
        """``[correct, total]``."""
        return [_zero_count(device), _zero_count(device)]

    def _compute(self, state: Sequence[torch.Tensor]) -> torch.Tensor:
        correct, total = state
        return correct.to(accumulator_dtype(correct.device)) / total


@attrs.frozen
class AveragingConfig:
    """Options of ``precision``, ``recall`` and ``f1_score``."""

    average: Average = attrs.field(default="macro", validator=_check_average)
    """How per-class scores become one number: ``macro`` (plain mean over all C
    classes), ``micro`` (one score from the counts summed over classes; equals accuracy)
    or ``weighted`` (mean weighted by each class's number of targets)."""
    num_classes: int | None = attrs.field(default=None, validator=at_least(2))
    """Number of classes C. Optional when predictions are scores ``(N, C)``; required
    when they are class indices ``(N,)``, whose values cannot be read without a sync."""


class _PerClassMetric(SummedStateMetric):
    """A metric computed from per-class counts accumulated on the device.

    State: an int64 ``(3, C)`` tensor of true positives, predictions and targets per
    class, and an int64 count of samples whose target or predicted class lies outside
    ``[0, C)``. Such samples make the result NaN rather than stopping training or
    costing a host read to detect. Memory is O(C), not the O(C²) of a confusion matrix,
    so language-model vocabularies fit.
    """

    Config = AveragingConfig

    def __init__(self, average: Average = "macro", num_classes: int | None = None) -> None:
        super().__init__()
        self.config = AveragingConfig(average=average, num_classes=num_classes)
        self._num_classes: int | None = None

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch to the per-class counts.

        Updated alone; in a loop, :func:`bz.metrics.batch_update` counts a batch once for
        precision, recall and F1 together.
        """
        predicted, classes_of_targets, width = predicted_classes(self.display_name, preds, targets)
        classes = self._classes_for(width)
        inside = (_within(classes_of_targets, classes) & _within(predicted, classes)).to(
            torch.int64
        )
        # Clamping keeps scatter indices valid; the weight of such samples is zero.
        target_column = classes_of_targets.clamp(0, classes - 1)
        predicted_column = predicted.clamp(0, classes - 1)
        per_class, outside = self._state_on(predicted.device)
        per_class[0].scatter_add_(0, target_column, inside * (predicted == classes_of_targets))
        per_class[1].scatter_add_(0, predicted_column, inside)
        per_class[2].scatter_add_(0, target_column, inside)
        outside.add_(classes_of_targets.shape[0] - inside.sum())

    def _new_state(self, device: torch.device) -> list[torch.Tensor]:
        """``[per_class_counts (3, C), out_of_range]``."""
        assert self._num_classes is not None  # set by _classes_for before any state
        return [_zero_count(device, (3, self._num_classes)), _zero_count(device)]

    def _compute(self, state: Sequence[torch.Tensor]) -> torch.Tensor:
        per_class, outside = state
        counts = per_class.to(accumulator_dtype(per_class.device))
        true_positive, predicted, actual = counts.unbind(0)
        numerator, denominator = self._ratio(true_positive, predicted, actual)
        average = self.config.average
        if average == "micro":
            value = safe_divide(numerator.sum(), denominator.sum())
        elif average == "macro":
            value = safe_divide(numerator, denominator).mean()
        else:
            scores = safe_divide(numerator, denominator)
            value = safe_divide((scores * actual).sum(), actual.sum())
        undefined = (outside > 0) | (actual.sum() == 0)
        return torch.where(undefined, float("nan"), value)

    def _ratio(
        self, true_positive: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class numerator and denominator of the score."""
        raise NotImplementedError

    def _classes_for(self, width: int | None) -> int:
        """The class count C, from the scores' width or the options (never from values)."""
        configured = self.config.num_classes
        name = self.display_name
        if width is None:
            if configured is None:
                raise MetricInputError(
                    f"{name}: predictions of shape (N,) are class indices, so the number of "
                    "classes cannot be known without reading values back from the device; "
                    f'set it in the options: {{"{name}": {{"num_classes": C}}}}'
                )
            width = configured
        elif configured is not None and width != configured:
            raise MetricInputError(
                f"{name}: scores have {width} columns but num_classes is {configured}"
            )
        if self._num_classes is None:
            self._num_classes = width
        elif width != self._num_classes:
            raise MetricInputError(
                f"{name}: this batch has {width} classes, earlier batches had {self._num_classes}"
            )
        return width


class Precision(_PerClassMetric):
    """Of the samples predicted as a class, the fraction that belong to it: ``TP / (TP + FP)``.

    ``precision_score(labels=range(C), average=..., zero_division=0)``: a class never
    predicted has precision 0. Options: ``average`` (``macro``), ``num_classes``.
    """

    display_name = "precision"

    def _ratio(
        self, true_positive: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return true_positive, predicted


class Recall(_PerClassMetric):
    """Of the samples of a class, the fraction predicted as it: ``TP / (TP + FN)``.

    ``recall_score(labels=range(C), average=..., zero_division=0)``: a class absent
    from the targets has recall 0. Options: ``average`` (``macro``), ``num_classes``.
    """

    display_name = "recall"

    def _ratio(
        self, true_positive: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return true_positive, actual


class F1Score(_PerClassMetric):
    """Harmonic mean of precision and recall per class: ``2 TP / (2 TP + FP + FN)``.

    ``f1_score(labels=range(C), average=..., zero_division=0)``: a class neither
    predicted nor present scores 0. Options: ``average`` (``macro``), ``num_classes``.
    """

    display_name = "f1_score"

    def _ratio(
        self, true_positive: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return 2 * true_positive, predicted + actual


@attrs.frozen
class TopKConfig:
    """Options of ``top_k_accuracy``."""

    k: int = attrs.field(default=5, validator=at_least(1))
    """A sample counts as correct when its target is among the ``k`` highest scores."""


class TopKAccuracy(SummedStateMetric):
    """Fraction of samples whose target is among the ``k`` highest-scored classes.

    ``top_k_accuracy_score(labels=range(C))``: predictions are scores ``(N, C)``; a tie
    is broken towards the higher class index, as scikit-learn does, and ``k >= C``
    scores every sample as correct. A target outside ``[0, C)`` makes the result NaN.
    Reported as ``top_{k}_accuracy``. Option: ``k`` (5).
    """

    Config = TopKConfig

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        self.config = TopKConfig(k=k)
        self.display_name = f"top_{k}_accuracy"

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Count the samples of one batch whose target ranks within the top ``k``."""
        scores = class_scores(self.display_name, preds, targets)
        classes = scores.shape[1]
        targets = targets.detach().to(torch.int64)
        inside = _within(targets, classes)
        column = targets.clamp(0, classes - 1).unsqueeze(1)
        target_score = scores.gather(1, column)
        # The target's rank in a descending sort whose ties put the higher index first:
        # classes scoring strictly higher, plus equal ones with a higher index.
        higher = (scores > target_score).sum(dim=1)
        index = torch.arange(classes, device=scores.device)
        tied_above = ((scores == target_score) & (index > column)).sum(dim=1)
        hit = (higher + tied_above < self.config.k) & inside
        hits, total, outside = self._state_on(scores.device)
        hits.add_(hit.sum())
        total.add_(targets.shape[0])
        outside.add_((~inside).sum())

    def _new_state(self, device: torch.device) -> list[torch.Tensor]:
        """``[hits, total, out_of_range]``."""
        return [_zero_count(device), _zero_count(device), _zero_count(device)]

    def _compute(self, state: Sequence[torch.Tensor]) -> torch.Tensor:
        hits, total, outside = state
        value = hits.to(accumulator_dtype(hits.device)) / total
        return torch.where(outside > 0, float("nan"), value)
