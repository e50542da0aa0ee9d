"""Handwritten digits (scikit-learn's bundled 8x8 images): a small MLP classifier.

The data ships inside scikit-learn, so this trains offline, in seconds, on a CPU.
Run it from this folder with `bz train`.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """The 1,797 digits, standardised, split 80/20 with a seeded shuffle."""
    images, labels = load_digits(return_X_y=True)
    inputs = torch.as_tensor(images, dtype=torch.float32)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(inputs))
    train, val = order[:cut], order[cut:]
    # Statistics from the training split only, so validation stays unseen.
    mean, std = inputs[train].mean(dim=0), inputs[train].std(dim=0).clamp(min=1e-6)
    inputs = (inputs - mean) / std
    return TensorDataset(inputs[train], targets[train]), TensorDataset(inputs[val], targets[val])


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    """An MLP with one hidden layer and dropout, trained with AdamW."""
    hp = config.hyperparameters
    train, val = digits(config.seed or 0)
    hidden = int(hp.get("hidden", 128))
    model = nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Dropout(float(hp.get("dropout", 0.1))),
        nn.Linear(hidden, 10),
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(hp.get("lr", 3e-3)), weight_decay=1e-4
    )
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        train_loader=DataLoader(train, batch_size=int(hp.get("batch_size", 64)), shuffle=True),
        val_loader=DataLoader(val, batch_size=512),
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs),
    )
