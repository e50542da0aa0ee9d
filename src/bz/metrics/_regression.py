"""Regression metrics: a running sum of errors and a count, both on the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bz.metrics._inputs import accumulator_dtype, matching_values
from bz.metrics._state import SummedStateMetric

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["MeanAbsoluteError", "MeanSquaredError"]


class _MeanError(SummedStateMetric):
    """The mean of an element-wise error over every element seen.

    Predictions and targets have one shape (``(N, 1)`` against ``(N,)`` is accepted);
    with several outputs per sample the mean runs over all of them, which is
    scikit-learn's ``multioutput="uniform_average"``. Sums are kept in float64 (float32
    on MPS, which has no float64); the count is an exact int64.
    """

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the errors of one batch."""
        preds, targets = matching_values(self.display_name, preds, targets)
        total, count = self._state_on(preds.device)
        difference = preds.to(total.dtype) - targets.to(total.dtype)
        total.add_(self._error(difference).sum())
        count.add_(difference.numel())

    def _new_state(self, device: torch.device) -> list[torch.Tensor]:
        """``[sum_of_errors, element_count]``."""
        return [
            torch.zeros((), dtype=accumulator_dtype(device), device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        ]

    def _compute(self, state: Sequence[torch.Tensor]) -> torch.Tensor:
        total, count = state
        return total / count

    def _error(self, difference: torch.Tensor) -> torch.Tensor:
        """The element-wise error of ``prediction - target``."""
        raise NotImplementedError


class MeanSquaredError(_MeanError):
    """Mean of ``(prediction - target) ** 2`` (``mean_squared_error``). No options."""

    display_name = "mean_squared_error"

    def _error(self, difference: torch.Tensor) -> torch.Tensor:
        return difference.square()


class MeanAbsoluteError(_MeanError):
    """Mean of ``|prediction - target|`` (``mean_absolute_error``). No options."""

    display_name = "mean_absolute_error"

    def _error(self, difference: torch.Tensor) -> torch.Tensor:
        return difference.abs()
