"""What a user's ``setup()`` gets wrong, found by using bz as shipped."""

from __future__ import annotations

import pytest
from tests._support import tiny_setup

import bz
from bz.config import RunConfig


def test_a_generator_train_loader_is_named_used_up_in_the_epoch_the_console_shows() -> None:
    # The console and the checkpoints number epochs from 1: the second epoch, the one
    # the generator had nothing left for, is epoch 2 (this said "epoch 1").
    setup = tiny_setup()
    one_pass = (batch for batch in list(setup.train_loader))
    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=setup.loss_fn,
        optimizer=setup.optimizer,
        train_loader=one_pass,
    )
    with pytest.raises(bz.UsageError, match=r"no batches in epoch 2 \(an iterator is used up"):
        bz.Trainer().fit(setup, RunConfig(epochs=2, device="cpu", plugins=()), [])


def test_a_loader_empty_from_the_start_is_refused_without_the_iterator_hint() -> None:
    setup = tiny_setup()
    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=setup.loss_fn,
        optimizer=setup.optimizer,
        train_loader=(batch for batch in []),
    )
    with pytest.raises(bz.UsageError, match=r"no batches in epoch 1$"):
        bz.Trainer().fit(setup, RunConfig(epochs=2, device="cpu", plugins=()), [])
