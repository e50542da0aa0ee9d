"""``train.py`` for the ``kill -9`` test of torchdata's ``StatefulDataLoader`` with
workers under gradient accumulation (tests/integration/test_resume_workers_accumulation.py).

Both loaders are shuffled ``StatefulDataLoader`` objects with two workers; the model
has dropout; ``accumulate_grad_batches`` is 3 over 8 batches an epoch (groups of 3, 3
and 2). The workers draw no random numbers (torchdata does not save their random
states: docs/checkpoints.md). ``BZ_TEST_KILL_AT_BATCH=N`` sends SIGKILL to the training
process at its ``N``-th training batch's forward pass (counted from 1), before that
batch's backward: in the middle of an accumulation group when ``N`` is not the group's
first batch.
"""

from __future__ import annotations

import os
import signal

import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import bz

TRAIN_PY = "from tests._workers_accumulation import setup\n"
"""A ``train.py`` for :func:`setup` (the repository root must be importable)."""
BATCHES = 8
"""Training batches per epoch: 30 samples in batches of 4, the last one of 2."""


class DiesAt(nn.Module):
    """The model, killing its process at its ``at``-th training forward pass."""

    def __init__(self, inner: nn.Module, at: int) -> None:
        super().__init__()
        self.inner = inner
        self.at = at
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(inputs)  # type: ignore[no-any-return]


def _data(seed: int, samples: int) -> TensorDataset:
    inputs = torch.randn(samples, 4, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(inputs, (inputs.sum(dim=1) > 0).long())


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    model = DiesAt(inner, int(os.environ.get("BZ_TEST_KILL_AT_BATCH", "0")))
    workers = {"num_workers": 2, "shuffle": True}
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        train_loader=StatefulDataLoader(_data(0, 30), batch_size=4, **workers),
        val_loader=StatefulDataLoader(_data(1, 23), batch_size=5, **workers),
    )
