"""A ``train.py`` setup per kind of training loader, for the resume tests.

``setup(config)`` builds the loader ``config.hyperparameters["loader"]`` names (one of
:data:`KINDS`); everything else is :func:`tests._fault_support.resume_setup`'s run, whose
steps draw from every random generator (dropout, and Python's and NumPy's generators
in the collate function, which runs in the workers when there are some). Datasets
draw a random jitter per sample too, in ``__getitem__``: a resume that left a worker's
or the main process's generator anywhere else would not be bit-identical.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from tests._fault_support import jitter
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
)

import bz

KINDS = (
    "shuffled",
    "sequential",
    "generator",
    "distributed_sampler",
    "drop_last",
    "workers",
    "batch_sampler",
    "stateful",
    "user_stateful",
    "iterable",
)
SAMPLES = 44
"""Six batches of 8 (the last one short, unless ``drop_last``)."""
BATCH = 8


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(SAMPLES, 6, generator=generator)
    return inputs, (inputs[:, 0] + inputs[:, 1] > 0).long()


class Jittered(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style dataset adding a random jitter to each sample it reads."""

    def __init__(self) -> None:
        self.inputs, self.targets = _data()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index] + 0.01 * torch.rand(6), self.targets[index]


class JitteredStream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """The same samples as a stream, in a shuffled order (an iterable dataset)."""

    def __init__(self) -> None:
        self.inputs, self.targets = _data()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in torch.randperm(SAMPLES).tolist():
            yield self.inputs[index] + 0.01 * torch.rand(6), self.targets[index]


class CountingLoader:
    """A user's loader that keeps its own position: batches of a fixed shuffled order
    per epoch, with ``state_dict()`` / ``load_state_dict()`` (no DataLoader at all)."""

    def __init__(self) -> None:
        self.inputs, self.targets = _data()
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return (SAMPLES + BATCH - 1) // BATCH

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(self.epoch))
        while self.position < len(self):
            chosen = order[self.position * BATCH : (self.position + 1) * BATCH]
            self.position += 1
            yield jitter([(self.inputs[i], self.targets[i]) for i in chosen.tolist()])
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def loader(kind: str) -> Any:
    """The training loader of ``kind``."""
    dataset = Jittered()
    plain: dict[str, Any] = {"batch_size": BATCH, "collate_fn": jitter}
    if kind == "shuffled":
        return DataLoader(dataset, shuffle=True, **plain)
    if kind == "sequential":
        return DataLoader(dataset, shuffle=False, **plain)
    if kind == "generator":
        sampler = RandomSampler(dataset, replacement=True, generator=torch.Generator())
        return DataLoader(dataset, sampler=sampler, **plain)
    if kind == "distributed_sampler":  # one process's share, as under torchrun
        shard: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=2, rank=1, seed=4
        )
        return DataLoader(dataset, sampler=shard, **plain)
    if kind == "drop_last":
        return DataLoader(dataset, shuffle=True, drop_last=True, **plain)
    if kind == "workers":
        return DataLoader(dataset, shuffle=True, num_workers=2, **plain)
    if kind == "batch_sampler":
        batches = BatchSampler(RandomSampler(dataset), batch_size=BATCH, drop_last=False)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=jitter)
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        # In this process: torchdata does not save its workers' random states.
        return StatefulDataLoader(dataset, shuffle=True, **plain)
    if kind == "user_stateful":
        return CountingLoader()
    if kind == "iterable":
        return DataLoader(JitteredStream(), **plain)
    raise ValueError(f"unknown loader kind {kind!r}")


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    """The resumable run of :func:`tests._fault_support.resume_setup` with the loader the
    hyperparameter ``loader`` names."""
    kind = str(config.hyperparameters.get("loader", "shuffled"))
    random.random()  # the run's own draws before training, as a real setup() makes
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9),
        train_loader=loader(kind),
    )


TRAIN_PY = "from tests._loader_kinds import setup\n"
"""A ``train.py`` for :func:`setup` (the repository root must be importable)."""
