"""Repositioning a training loader: the batches and random states of a replay, without
reading what is skipped.

For each kind of loader, starting an epoch ``skip`` batches in must give exactly the
batches that reading the epoch from its start and dropping ``skip`` of them gives, and
leave every random generator (torch's, Python's, NumPy's, the loader's own) where that
replay leaves it; and for map-style datasets, no sample before the position is read.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples
from tests._loader_kinds import KINDS, loader
from tests._support import Events
from torch.utils.data import DataLoader, Dataset

import bz
from bz._rng import capture_rng, loader_generators, restore_rng
from bz.training.position import epoch_batches, loader_state

SKIP = 3


def _batches(iterator: Iterator[Any]) -> list[Any]:
    return [tuple(part.clone() for part in batch) for batch in iterator]


def _same(left: list[Any], right: list[Any]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def _tail(kind: str, skip: int | None) -> tuple[list[Any], dict[str, Any]]:
    """Epoch 1's batches after ``SKIP`` and the random states at its end: read from the
    epoch's start (``skip`` None, the interrupted run), or positioned ``skip`` batches in
    as the loop does when resuming (the step's random state put back afterwards)."""
    bz.seed_everything(7)
    made = loader(kind)
    generators = loader_generators(made)
    list(epoch_batches(made, epoch=0))  # a first epoch, so that epoch 1 starts mid-life
    start = capture_rng(generators)
    iterator = epoch_batches(made, epoch=1)
    for _ in range(SKIP):
        next(iterator)
    now = capture_rng(generators)
    if skip is not None:  # a new loader in a new process, random states restored
        bz.seed_everything(7)
        made = loader(kind)
        generators = loader_generators(made)
        restore_rng(start, generators)
        iterator = epoch_batches(made, epoch=1, skip=skip)
        restore_rng(now, generators)
    batches = _batches(iterator)
    return batches, capture_rng(generators)


def _same_rng(left: dict[str, Any], right: dict[str, Any]) -> None:
    assert torch.equal(left["torch"], right["torch"])
    assert left["python"] == right["python"]
    assert left["numpy"] == right["numpy"]
    for a, b in zip(left["generators"], right["generators"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("stateful", "user_stateful")])
def test_skipping_gives_the_batches_and_random_states_of_the_interrupted_run(kind: str) -> None:
    expected, expected_rng = _tail(kind, None)
    got, got_rng = _tail(kind, SKIP)
    _same(got, expected)
    _same_rng(got_rng, expected_rng)


@pytest.mark.parametrize("kind", ["stateful", "user_stateful"])
def test_a_stateful_loader_resumes_from_its_saved_state(kind: str) -> None:
    bz.seed_everything(7)
    made = loader(kind)
    start = capture_rng()
    iterator = epoch_batches(made, epoch=0)
    for _ in range(SKIP):
        next(iterator)
    state = loader_state(made)
    assert state is not None
    now = capture_rng()
    expected = _batches(iterator)

    bz.seed_everything(7)
    fresh = loader(kind)  # a new process: the same loader, built again
    restore_rng(start)
    resumed = epoch_batches(fresh, epoch=0, skip=SKIP, state=state)
    restore_rng(now)
    _same(_batches(resumed), expected)


class Counting(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Counts the samples read (and draws from every generator, as augmentation does)."""

    def __init__(self) -> None:
        self.read: list[int] = []

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.read.append(index)
        noise = torch.rand(1) + random.random() + float(numpy.random.rand())
        return torch.full((2,), float(index)) + noise, torch.tensor(index)


class _Indices(Dataset[int]):
    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


@settings(max_examples=examples(60), deadline=None)
@given(
    length=st.integers(1, 60),  # torch refuses to shuffle an empty dataset
    batch_size=st.integers(1, 7),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    skip=st.integers(0, 70),
)
def test_a_positioned_loader_continues_exactly_where_the_epoch_would(
    length: int, batch_size: int, drop_last: bool, shuffle: bool, skip: int
) -> None:
    # The batches already trained are skipped as indices of the batch sampler's sampler:
    # the rest must be the batches BatchSampler itself makes, last one and drop_last
    # included, from the same permutation, and the generator left where it would be.
    def made() -> DataLoader[int]:
        return DataLoader(
            _Indices(length), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last
        )

    torch.manual_seed(3)
    expected = [batch.tolist() for batch in made()][skip:]
    after = torch.get_rng_state()
    torch.manual_seed(3)
    got = [batch.tolist() for batch in epoch_batches(made(), epoch=0, skip=skip)]
    assert got == expected
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("shuffle", [True, False])
def test_nothing_before_the_position_is_read(shuffle: bool) -> None:
    dataset = Counting()
    made = DataLoader(dataset, batch_size=4, shuffle=shuffle)
    batches = list(epoch_batches(made, epoch=0, skip=7))
    assert len(batches) == 3
    assert sorted(dataset.read) == sorted(int(i) for _, t in batches for i in t)


def test_the_smoke_limit_counts_from_the_epoch_start() -> None:
    made = DataLoader(Counting(), batch_size=4)
    assert len(list(epoch_batches(made, epoch=0, skip=3, limit=5))) == 2


def test_workers_draw_the_same_numbers_whichever_batches_they_skipped() -> None:
    # Two workers: batch 3 goes to another worker when the epoch starts at batch 3 than
    # when it starts at 0, and that worker has read nothing before it.
    made = DataLoader(Counting(), batch_size=4, shuffle=True, num_workers=2)
    torch.manual_seed(1)
    replay = _batches(epoch_batches(made, epoch=0))[3:]
    torch.manual_seed(1)
    got = _batches(epoch_batches(made, epoch=0, skip=3))
    _same(got, replay)


def test_a_replay_says_how_many_batches_and_how_long(events: Events) -> None:
    made = loader("iterable")
    batches = list(epoch_batches(made, epoch=0, skip=4))
    assert len(batches) == 2
    names = [event["event"] for event in events]
    assert names == ["resume_replaying", "resume_replay_estimate", "resume_replayed"]
    assert events[0]["batches"] == 4
    assert events[1]["expected_seconds"] >= 0


def test_map_style_loaders_are_never_replayed(events: Events) -> None:
    for kind in ("shuffled", "workers", "distributed_sampler"):
        list(epoch_batches(loader(kind), epoch=0, skip=4))
    assert events == []
