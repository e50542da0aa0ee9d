"""A bz project: `bz train` calls setup() and trains what it returns.

The data is generated (three noisy spirals), so this trains offline as is. Replace it
with your own model and loaders; keep the shape of setup().
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz


def spirals(samples_per_class: int, classes: int, generator: torch.Generator) -> TensorDataset:
    """Points on `classes` interleaved spirals, labelled by spiral."""
    radius = torch.linspace(0.1, 1.0, samples_per_class).repeat(classes)
    labels = torch.arange(classes).repeat_interleave(samples_per_class)
    angle = labels * (2 * math.pi / classes) + radius * 4.0
    angle = angle + 0.2 * torch.randn(angle.shape, generator=generator)
    points = torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], dim=1)
    return TensorDataset(points, labels)


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    """Model, loss, optimizer and data for one run."""
    hp = config.hyperparameters
    generator = torch.Generator().manual_seed(config.seed or 0)
    train = spirals(300, 3, generator)
    val = spirals(100, 3, generator)
    hidden = int(hp.get("hidden", 64))
    model = nn.Sequential(
        nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 3)
    )
    batch_size = int(hp.get("batch_size", 32))
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=float(hp.get("lr", 0.01))),
        train_loader=DataLoader(train, batch_size=batch_size, shuffle=True),
        val_loader=DataLoader(val, batch_size=256),
    )
