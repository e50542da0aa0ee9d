"""A model with two inputs and a step of its own.

Each sample is a noisy signal (12 readings) and the kind of sensor that took it (one of
4); the class depends on both. Batches are a dataclass, ``Readings``, which bz moves to
the device as a ``Readings``. ``step`` says how a batch becomes a loss and what the
metrics see; bz does everything around it (devices, autocast, accumulation, backward,
clipping, the optimizer step, loss sums, metrics, plugins, checkpoints), and validates
with the same step. ``mypy --strict`` checks ``step`` against what
``TrainingSetup(step=...)`` expects. Run it from this folder with ``bz train``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz

READINGS = 12
SENSORS = 4
CLASSES = 3


@dataclass
class Readings:
    """One batch: the signals, the sensor of each, and the classes to learn."""

    signal: torch.Tensor
    sensor: torch.Tensor
    label: torch.Tensor


class SignalAndSensor(nn.Module):
    """A signal encoder and a sensor embedding, joined before the classifier."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.signal = nn.Sequential(nn.Linear(READINGS, hidden), nn.ReLU())
        self.sensor = nn.Embedding(SENSORS, hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, signal: torch.Tensor, sensor: torch.Tensor) -> torch.Tensor:
        joined: torch.Tensor = self.signal(signal) * torch.sigmoid(self.sensor(sensor))
        return self.head(joined)  # type: ignore[no-any-return]  # nn.Module.__call__ is untyped


def step(model: nn.Module, batch: Readings) -> bz.StepResult:
    """The loss of one batch, with the logits and labels for the metrics."""
    logits = model(batch.signal, batch.sensor)
    loss = nn.functional.cross_entropy(logits, batch.label)
    return bz.StepResult(loss, predictions=logits, targets=batch.label)


def readings(count: int, seed: int) -> TensorDataset:
    """Signals whose class is their mean's sign, flipped for sensors 2 and 3, with a
    third class for the quiet ones."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(count, READINGS, generator=generator)
    sensor = torch.randint(0, SENSORS, (count,), generator=generator)
    level = signal.mean(dim=1) * torch.where(sensor >= 2, -1.0, 1.0)
    label = torch.where(level.abs() < 0.1, 2, (level > 0).long())
    return TensorDataset(signal, sensor, label)


def collate(rows: list[tuple[torch.Tensor, ...]]) -> Readings:
    signal, sensor, label = (torch.stack(column) for column in zip(*rows, strict=True))
    return Readings(signal, sensor, label)


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    """The two-input model, Adam, batches of 64 ``Readings``."""
    hp = config.hyperparameters
    seed = config.seed or 0
    model = SignalAndSensor(int(hp.get("hidden", 32)))
    return bz.TrainingSetup(
        model=model,
        step=step,
        optimizer=torch.optim.Adam(model.parameters(), lr=float(hp.get("lr", 1e-2))),
        train_loader=DataLoader(
            readings(2048, seed), batch_size=64, shuffle=True, collate_fn=collate
        ),
        val_loader=DataLoader(readings(512, seed + 1), batch_size=256, collate_fn=collate),
    )
