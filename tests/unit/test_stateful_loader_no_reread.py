"""Resuming with torchdata's ``StatefulDataLoader`` reads no sample already trained.

README ("Resuming in the middle of an epoch does not read the batches already trained
... a stateful loader restores its state") and docs/checkpoints.md ("to resume a
streaming (iterable) dataset quickly, give it state: torchdata's ``StatefulDataLoader``
saves an iterable dataset's ``state_dict()``"): a run stopped mid-epoch (``max_steps``
writes the mid-epoch checkpoint) and resumed by a new ``fit`` with everything built
again, as a new process does, reads only the samples after the position, logs no
replay, and ends with the weights of the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import torch
from tests._support import assert_same_weights, weights
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import bz

SAMPLES, BATCH, EPOCHS = 48, 4, 2  # 12 batches an epoch
STOP_AT = 12 + 5  # five batches into the second epoch

_read: list[int] = []
"""Every sample index a dataset read, in order (cleared before each fit)."""


def _sample(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    _read.append(index)
    generator = torch.Generator().manual_seed(index)
    inputs = torch.randn(3, generator=generator)
    return inputs, (inputs.sum() > 0).long()


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """A streaming dataset with state: its position, which StatefulDataLoader saves."""

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.position < SAMPLES:
            index = self.position
            self.position += 1
            yield _sample(index)
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class Table(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _sample(index)


def _setup(kind: str) -> bz.TrainingSetup:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    loader: StatefulDataLoader[tuple[torch.Tensor, torch.Tensor]]
    if kind == "iterable":
        loader = StatefulDataLoader(Stream(), batch_size=BATCH)
    else:
        loader = StatefulDataLoader(Table(), batch_size=BATCH, shuffle=True)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=loader,
    )


CONFIG = bz.RunConfig(epochs=EPOCHS, device="cpu", seed=0, plugins=[])


@pytest.mark.parametrize("kind", ["iterable", "map"])
def test_a_resumed_stateful_loader_reads_nothing_before_its_position(
    kind: str, tmp_path: Path
) -> None:
    _read.clear()
    setup = _setup(kind)
    bz.Trainer().fit(setup, CONFIG, [])
    expected = weights(setup.model)
    uninterrupted_reads = list(_read)

    stopped = bz.Trainer().fit(
        _setup(kind), attrs.evolve(CONFIG, max_steps=STOP_AT), [], checkpoint_dir=tmp_path
    )
    assert stopped.global_step == STOP_AT

    _read.clear()
    resumed_setup = _setup(kind)  # built again, as `bz train` in a new process does
    with structlog.testing.capture_logs() as events:
        resumed = bz.Trainer().fit(resumed_setup, CONFIG, [], checkpoint_dir=tmp_path)
    assert resumed.resumed_from is not None
    assert not [e for e in events if str(e["event"]).startswith("resume_replay")]
    # Exactly the samples the uninterrupted run read after the position, nothing before.
    done = STOP_AT * BATCH
    assert _read == uninterrupted_reads[done:]
    assert_same_weights(weights(resumed_setup.model), expected)
