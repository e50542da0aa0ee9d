"""The workloads: a classifier MLP, its data made beforehand, and how long to train it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
Run = Callable[[], None]

# The built-in metrics that apply to a classifier's (N, C) scores and (N,) targets.
# mean_squared_error and mean_absolute_error need predictions shaped like the
# targets, so a classifier cannot use them.
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1_score", "top_k_accuracy")


@dataclass(frozen=True)
class Workload:
    """A classifier MLP, its data, and how long to train it."""

    name: str
    features: int
    hidden: tuple[int, ...]
    classes: int
    batch_size: int
    batches: int
    epochs: int
    loader: str = "list"
    """``list``: pre-made tensors; ``dataloader``: a ``DataLoader`` over a ``TensorDataset``."""

    @property
    def steps(self) -> int:
        """Optimizer steps in one run."""
        return self.batches * self.epochs

    def describe(self) -> str:
        """One line for the report."""
        widths = " → ".join(str(w) for w in (self.features, *self.hidden, self.classes))
        data = "DataLoader(TensorDataset)" if self.loader == "dataloader" else "in-memory list"
        return (
            f"MLP {widths}, batch {self.batch_size}, {self.batches} batches × "
            f"{self.epochs} epochs = {self.steps} steps, SGD(momentum=0.9), "
            f"cross-entropy, {data}"
        )

    def resized(self, batches: int, epochs: int) -> Workload:
        """The same model and batches, trained for ``batches`` × ``epochs`` steps."""
        return dataclasses.replace(self, batches=batches, epochs=epochs)

    def model(self, seed: int) -> nn.Module:
        """The same initial weights for every variant."""
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = self.features
        for hidden in self.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, self.classes))
        return nn.Sequential(*layers)

    def data(self, seed: int, device: torch.device, batches: int | None = None) -> list[Batch]:
        """``batches`` (default: all) pre-made ``(inputs, targets)`` pairs on ``device``."""
        count = self.batches if batches is None else batches
        generator = torch.Generator().manual_seed(seed)
        size = count * self.batch_size
        inputs = torch.randn(size, self.features, generator=generator)
        targets = torch.randint(0, self.classes, (size,), generator=generator)
        inputs, targets = inputs.to(device), targets.to(device)
        return [
            (inputs[i : i + self.batch_size], targets[i : i + self.batch_size])
            for i in range(0, size, self.batch_size)
        ]


def workloads(quick: bool, dataloader: bool) -> list[Workload]:
    """The tiny (overhead-bound) and medium (compute-bound) MLPs of issue #16.

    Runs are short (about a second) so that many alternating repetitions fit: on a
    shared machine, noise comes in bursts, and pairing each run with the hand-written
    run of the same round cancels most of it.
    """
    scale = 4 if quick else 1
    chosen = [
        Workload("tiny", 64, (64,), 10, 64, 1000 // scale, 2),
        Workload("medium", 784, (512,), 10, 128, 150 // scale, 2),
    ]
    if dataloader:
        chosen.append(
            Workload("tiny-dataloader", 64, (64,), 10, 64, 1000 // scale, 2, "dataloader")
        )
    return chosen


def make_loader(workload: Workload, batches: list[Batch]) -> Any:
    """What the loop iterates: the list itself, or a ``DataLoader`` over the same tensors."""
    if workload.loader == "list":
        return batches
    from torch.utils.data import DataLoader, TensorDataset

    inputs = torch.cat([inputs for inputs, _ in batches])
    targets = torch.cat([targets for _, targets in batches])
    return DataLoader(TensorDataset(inputs, targets), batch_size=workload.batch_size)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer every variant uses."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
