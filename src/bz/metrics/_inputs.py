"""Checking what a batch hands a metric, using shapes and dtypes only (never values)."""

from __future__ import annotations

import torch

from bz._errors import MetricInputError


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """The float type sums are kept in: float64, except where the device lacks it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex())


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)} ({tensor.dtype})"


def check_tensors(metric: str, preds: object, targets: object) -> None:
    """Refuse predictions or targets that are not tensors (a model's dict or tuple output,
    a list of labels), naming their type, before anything reads a shape."""
    for what, value in (("predictions", preds), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise MetricInputError(
                f"{metric}: {what} must be a tensor, got {type(value).__name__} (metrics read "
                "the model's output and the batch's targets as they are: for a model that "
                "returns several values, give TrainingSetup a step that returns "
                "bz.StepResult(loss, predictions=..., targets=...))"
            )


def predicted_classes(
    metric: str, preds: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Predicted class indices, targets as int64, and the class count the shapes reveal.

    ``preds`` is either scores of shape ``(N, C)`` (logits or probabilities; the
    prediction is the first highest column, like ``argmax``) or class indices of shape
    ``(N,)`` and an integer dtype, for which the class count is unknown (``None``).
    ``targets`` are class indices of shape ``(N,)``.
    """
    check_tensors(metric, preds, targets)
    if targets.ndim != 1 or not _is_integer(targets):
        raise MetricInputError(
            f"{metric}: targets must be class indices of shape (N,) with an integer dtype, "
            f"got {_describe(targets)}"
        )
    if preds.shape[0:1] != targets.shape:
        raise MetricInputError(
            f"{metric}: predictions and targets disagree on the number of samples: "
            f"{_describe(preds)} vs {_describe(targets)}"
        )
    targets = targets.detach().to(torch.int64)
    if preds.ndim == 2:
        width = preds.shape[1]
        if width < 2:
            raise MetricInputError(
                f"{metric}: scores need one column per class (N, C) with C >= 2, got "
                f"{_describe(preds)}; for a single binary logit, pass class indices "
                "instead, e.g. (logits.squeeze(1) > 0).long()"
            )
        return preds.detach().argmax(dim=1), targets, width
    if preds.ndim == 1 and _is_integer(preds):
        return preds.detach().to(torch.int64), targets, None
    raise MetricInputError(
        f"{metric}: predictions must be scores of shape (N, C) or class indices of shape (N,) "
        f"with an integer dtype, got {_describe(preds)}"
    )


def class_scores(metric: str, preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Check that ``preds`` are per-class scores ``(N, C)`` matching targets ``(N,)``."""
    check_tensors(metric, preds, targets)
    if preds.ndim != 2 or preds.shape[1] < 2 or not preds.is_floating_point():
        raise MetricInputError(
            f"{metric}: predictions must be floating-point scores of shape (N, C) with C >= 2, "
            f"got {_describe(preds)}"
        )
    if targets.ndim != 1 or not _is_integer(targets):
        raise MetricInputError(
            f"{metric}: targets must be class indices of shape (N,) with an integer dtype, "
            f"got {_describe(targets)}"
        )
    if preds.shape[0] != targets.shape[0]:
        raise MetricInputError(
            f"{metric}: predictions and targets disagree on the number of samples: "
            f"{_describe(preds)} vs {_describe(targets)}"
        )
    return preds.detach()


def matching_values(
    metric: str, preds: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and targets of one shape (``(N, 1)`` against ``(N,)`` is accepted).

    Broadcasting is refused on purpose: ``(N, 1) - (N,)`` would silently compare every
    prediction with every target.
    """
    check_tensors(metric, preds, targets)
    preds, targets = preds.detach(), targets.detach()
    if preds.shape == targets.shape:
        return preds, targets
    if preds.ndim == targets.ndim + 1 and preds.shape[-1] == 1:
        preds = preds.squeeze(-1)
    elif targets.ndim == preds.ndim + 1 and targets.shape[-1] == 1:
        targets = targets.squeeze(-1)
    if preds.shape != targets.shape:
        raise MetricInputError(
            f"{metric}: predictions and targets must have the same shape, got "
            f"{_describe(preds)} vs {_describe(targets)}"
        )
    return preds, targets
