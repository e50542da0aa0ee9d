"""A tiny classifier on random data, to train with the example plugins: ``bz train``."""

from __future__ import annotations

import torch
from torch import nn

import bz


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    """Two-layer classifier, 128 random points, batches of ``batch_size``."""
    batch_size = int(config.hyperparameters.get("batch_size", 32))
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(128, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    batches = [
        (inputs[start : start + batch_size], targets[start : start + batch_size])
        for start in range(0, len(inputs), batch_size)
    ]
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=float(config.hyperparameters["lr"])),
        train_loader=batches[:3],
        val_loader=batches[3:],
    )
