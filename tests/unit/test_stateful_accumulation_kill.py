"""A run with torchdata's ``StatefulDataLoader`` under gradient accumulation, killed at
any batch, resumes to the uninterrupted run's weights and validation losses.

What ``kill -9`` leaves is the newest checkpoint written before it: here the model's
forward raises at a random training batch (the process's death, without the checkpoint
Ctrl-C would write: a failing run writes none), and a new ``fit`` with everything built
again, as ``bz train`` in a new process does, resumes from the folder. Drawn: the batch
it dies at (before the first checkpoint too, in the middle of an accumulation group,
in the last, shorter group of an epoch), how many batches a group accumulates, and how
often a checkpoint is written. The training and validation loaders are both shuffled
``StatefulDataLoader`` objects (the training one resumes from its ``state_dict()``, the
validation one from its sampler's generator). ``tests/integration/test_resume_loaders.py``
kills real processes, one per loader kind, without accumulation; this is the
accumulation half, in one process.
"""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples
from tests._support import assert_same_weights, weights
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import bz

EPOCHS = 3
BATCHES = 8
"""Training batches per epoch: 30 samples in batches of 4, the last one of 2."""


class Dies(nn.Module):
    """The model, raising at its ``at``-th training forward (counted from 1)."""

    def __init__(self, inner: nn.Module, at: int | None) -> None:
        super().__init__()
        self.inner = inner
        self.at = at
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise RuntimeError("killed")
        return self.inner(inputs)  # type: ignore[no-any-return]


def _data(seed: int, samples: int) -> TensorDataset:
    inputs = torch.randn(samples, 4, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(inputs, (inputs.sum(dim=1) > 0).long())


def _setup(dies_at: int | None = None) -> bz.TrainingSetup:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    model = Dies(inner, dies_at)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        train_loader=StatefulDataLoader(_data(0, 30), batch_size=4, shuffle=True),
        val_loader=StatefulDataLoader(_data(1, 23), batch_size=5, shuffle=True),
    )


def _config(accumulate: int, every: int) -> bz.RunConfig:
    return bz.RunConfig(
        epochs=EPOCHS,
        device="cpu",
        seed=0,
        plugins=[],
        accumulate_grad_batches=accumulate,
        checkpoint_every_steps=every,
    )


_CLEAN: dict[tuple[int, int], tuple[dict[str, torch.Tensor], list[float | None]]] = {}


def _clean(accumulate: int, every: int) -> tuple[dict[str, torch.Tensor], list[float | None]]:
    key = (accumulate, every)
    if key not in _CLEAN:
        setup = _setup()
        with TemporaryDirectory() as folder:  # it writes its checkpoints as the killed one
            result = bz.Trainer().fit(setup, _config(*key), [], checkpoint_dir=Path(folder))
        _CLEAN[key] = weights(setup.model), [r.validation_loss for r in result.history]
    return _CLEAN[key]


@settings(max_examples=examples(15), deadline=None)  # each example trains twice
@given(
    accumulate=st.integers(2, 3),
    every=st.integers(1, 2),
    dies_at=st.integers(1, EPOCHS * BATCHES),
)
def test_killed_anywhere_under_accumulation_resumes_bit_identical(
    accumulate: int, every: int, dies_at: int
) -> None:
    expected_weights, expected_losses = _clean(accumulate, every)
    config = _config(accumulate, every)
    with TemporaryDirectory() as folder:
        with pytest.raises(RuntimeError, match=r"^killed"):
            bz.Trainer().fit(_setup(dies_at), config, [], checkpoint_dir=Path(folder))
        setup = _setup()
        resumed = bz.Trainer().fit(setup, config, [], checkpoint_dir=Path(folder))
    assert_same_weights(weights(setup.model), expected_weights)
    losses = [record.validation_loss for record in resumed.history]
    assert losses == expected_losses[len(expected_losses) - len(losses) :]
