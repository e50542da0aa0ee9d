"""The loop's own state: the loss sums and counts of a loop over batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from bz._distributed import sum_across
from bz.plugins._context import DeviceSum

if TYPE_CHECKING:
    import torch


@attrs.define(eq=False)
class Totals:
    """The loss sum (weighted by samples), batches and samples of one loop so far."""

    loss: DeviceSum = attrs.Factory(DeviceSum)
    batches: int = 0
    samples: int = 0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        """Count one batch whose mean loss is ``loss`` (a detached device scalar)."""
        self.loss.add(loss, samples)
        self.batches += 1
        self.samples += samples

    def mean(self) -> float:
        """The loss per sample, read once; ``nan`` when nothing was counted."""
        return mean(self.loss, self.samples)

    def summed(self, device: torch.device) -> Totals:
        """These totals summed over every process (one collective; itself alone)."""
        loss, batches, samples = sum_across(
            [self.loss.value(), float(self.batches), float(self.samples)], device
        )
        return Totals(DeviceSum(loss), int(batches), int(samples))


def mean(total: DeviceSum, count: int) -> float:
    """``total / count`` read once; ``nan`` when nothing was counted."""
    return total.value() / count if count else float("nan")
