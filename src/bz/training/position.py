"""Putting the training loader where an interrupted epoch left it, without re-reading.

Resuming in the middle of an epoch needs the loader's next batch to be the one the
interrupted run would have trained next, drawn from the same random state. How depends
on the loader, from cheapest to dearest:

* **Its own state** (torchdata's ``StatefulDataLoader``, or any loader with
  ``state_dict()`` / ``load_state_dict()``): the state is saved in every checkpoint and
  handed back before the epoch's ``iter()``; the loader positions itself.
* **A map-style** ``DataLoader`` (any sampler: shuffled, sequential,
  ``DistributedSampler``, a batch sampler; any ``num_workers``; ``drop_last``): the
  iterator over the batch sampler is advanced past the batches already trained before
  the first index reaches a worker. Only indices are drawn, exactly as the interrupted
  run drew them (the sampler's random draws happen where they happened, after the
  iterator's base seed), so nothing is fetched, collated or moved.
* **Anything else** (an iterable dataset without state, a generator): the batches
  already trained are drawn and dropped, with a progress line and the expected time.

Workers (``num_workers > 0``): a worker's random state would depend on which batches it
fetched before, which a repositioned loader never fetches. So bz seeds the workers'
generators (torch, Python's, NumPy's) before every batch from the worker seed torch
gives the epoch, the epoch and the batch's number: a batch's random augmentations are
the same whichever worker fetches it and whatever it fetched before, in the
uninterrupted run and the resumed one alike. (Not for a stateful loader, which keeps
its workers as it likes, and not across a resume with ``persistent_workers``, whose
seed comes from the epoch the workers started in.)

``persistent_workers``: torch draws the workers' base seed from the loader's random
state when it starts them, which an uninterrupted run does once and a resumed one again
in the epoch it resumes in: one draw more, and every later draw (the shuffle, dropout,
the next epochs) would differ. So that draw is taken from a copy of that random state
(:func:`started`), and the run's own stream never sees it, for the training and the
validation loader alike; torchdata's ``StatefulDataLoader`` draws its permutation
twice when it starts its workers and once when it resets them, so the workers are
started with every draw put back, then reset, as a later epoch's are.
"""

from __future__ import annotations

import collections
import itertools
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, get_worker_info

from bz._errors import describe_exception
from bz._logging import get_logger
from bz.training.checkpoint.files import loadable_problem

_log = get_logger("bz")
_END = object()
_REPLAY_REPORT_SECONDS = 10.0
"""How often a replay that takes long says how far it is."""


@runtime_checkable
class StatefulLoader(Protocol):
    """A loader that saves and restores its own position (torchdata's
    ``StatefulDataLoader`` is one)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> None: ...


def loader_state(loader: Iterable[Any]) -> dict[str, Any] | None:
    """What a checkpoint keeps of ``loader``: its ``state_dict()`` when it has one."""
    if isinstance(loader, StatefulLoader):
        return loader.state_dict()
    return None


def checkpointable_loader_state(loader: Iterable[Any]) -> dict[str, Any] | None:
    """:func:`loader_state`, when a checkpoint can hold it (``weights_only``); a loader
    whose ``state_dict()`` fails or holds anything else is reported and resumed by the
    other means."""
    return _checkpointable(lambda: loader_state(loader), "loader state_dict()")


def _checkpointable(
    read: Callable[[], dict[str, Any] | None], what: str, **where: str
) -> dict[str, Any] | None:
    """``read()``'s state, when a checkpoint can hold it (``weights_only``); one that
    cannot be read or holds anything else is reported (``loader_state_skipped``, with
    ``where``) and left out: the user's loader, never fatal."""
    try:
        state = read()
        problem = None if state is None else loadable_problem(state, what)
    except Exception as exc:
        state, problem = None, describe_exception(exc)
    if problem is not None:
        _log.warning("loader_state_skipped", **where, error=problem)
        return None
    return state


def loader_states_by_rank(loader: Iterable[Any]) -> list[dict[str, Any] | None] | None:
    """Every process's :func:`checkpointable_loader_state`, by rank (None for a loader
    without state): each loader of a sharded run is at its own position in its own share
    of the data, and resumes from its own state. One collective, which every process
    with a stateful loader calls."""
    if not isinstance(loader, StatefulLoader):
        return None
    return _by_rank(checkpointable_loader_state(loader))


def _by_rank(state: dict[str, Any] | None) -> list[dict[str, Any] | None]:
    """``state`` of every process, by rank (one collective when there are several)."""
    if not torch.distributed.is_initialized():
        return [state]
    states: list[dict[str, Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


# -- the validation loader -------------------------------------------------------------
#
# Validation passes are whole (a checkpoint is never written inside one), and each pass
# of a DataLoader starts afresh from the loader's random state, which checkpoints hold.
# A validation loader of another kind with ``state_dict()`` / ``load_state_dict()`` may
# carry anything from one pass to the next (a pass count it chooses by, a stream's
# position): its state is saved with every checkpoint and handed back before the
# resumed run's first validation pass, as a training loader of that kind gets its
# state at an epoch's start.
#
# Not a DataLoader's (torchdata's ``StatefulDataLoader``), nor its sampler's or
# dataset's: their ``state_dict()`` says where a pass stands, and one saved at a pass's
# end, handed back, makes a dataset that keeps a loaded position for every later pass
# (``datasets``' ``IterableDataset``) start each pass at its end: empty passes, where
# the uninterrupted run starts each pass from the beginning.


def _keeps_state(loader: object) -> bool:
    """Whether a validation loader's own state is saved: a stateful loader that is not a
    DataLoader."""
    if loader is None or isinstance(loader, DataLoader):
        return False  # first: a runtime protocol's isinstance costs microseconds
    return isinstance(loader, StatefulLoader)


def validation_state(loader: object) -> dict[str, Any] | None:
    """What a checkpoint keeps of a validation loader between its passes: ``{"loader":
    its state_dict()}`` for a stateful loader that is not a DataLoader, else None."""
    if isinstance(loader, StatefulLoader) and _keeps_state(loader):
        return {"loader": loader.state_dict()}
    return None


def validation_states_by_rank(
    loader: object, pending: dict[str, Any] | None
) -> list[dict[str, Any] | None] | None:
    """Every process's validation loader state (:func:`validation_state`; ``pending``:
    one resumed from and not yet handed back), by rank, when a checkpoint can hold it;
    None for a loader that keeps none. One collective, which every process calls."""
    if not _keeps_state(loader):
        return None
    state = pending
    if state is None:
        state = _checkpointable(
            lambda: validation_state(loader), "val_loader state", loader="val_loader"
        )
    return _by_rank(state)


def restore_validation_state(loader: Iterable[Any], state: dict[str, Any]) -> None:
    """Hand a validation loader the state :func:`validation_state` saved, before its
    next pass. Once per resume, never per pass."""
    own = state.get("loader")
    if own is not None and isinstance(loader, StatefulLoader):
        loader.load_state_dict(own)


def epoch_batches(
    loader: Iterable[Any],
    *,
    epoch: int,
    skip: int = 0,
    state: dict[str, Any] | None = None,
    limit: int | None = None,
) -> Iterator[Any]:
    """The epoch's training batches, from batch ``skip`` on (``skip`` already trained).

    ``state`` is the loader's saved ``state_dict()`` (a stateful loader), ``limit`` the
    epoch's batch cap (``--smoke``), counted from the epoch's first batch. Every random
    state the loader draws from must be the epoch's starting one when this is called.
    """
    if isinstance(loader, StatefulLoader):
        # Left to itself: it saves and restores its own sampler's and workers' positions.
        # A DataLoader's epoch starts where its sampler and random state say, so its own
        # state matters only in the middle of an epoch (loaded at an epoch's end,
        # torchdata's StatefulDataLoader would draw its base seed twice); a loader of
        # another kind may carry anything across epochs (a stream's position, an epoch).
        if state is not None and (skip or not isinstance(loader, DataLoader)):
            loader.load_state_dict(state)
            return _capped(started(loader, loaded=True), limit, skip)
    elif isinstance(loader, DataLoader) and _map_style(loader):
        return _capped(_positioned(loader, skip, epoch), limit, skip)
    iterator = started(loader)
    if skip:
        _replay(iterator, skip, free=isinstance(loader, Sequence))
    return _capped(iterator, limit, skip)


def _capped(iterator: Iterator[Any], limit: int | None, skip: int) -> Iterator[Any]:
    return iterator if limit is None else itertools.islice(iterator, max(limit - skip, 0))


def _map_style(loader: DataLoader[Any]) -> bool:
    # Batches by index (not an IterableDataset); with workers, bz must see each batch's
    # indices to seed it (a batch sampler, the usual case with a batch_size).
    if isinstance(loader.dataset, IterableDataset):
        return False
    return loader.num_workers == 0 or loader.batch_sampler is not None


def started(loader: Iterable[Any], *, loaded: bool = False) -> Iterator[Any]:
    """``iter(loader)``; a ``persistent_workers`` DataLoader that starts its workers now
    begins its epoch as one whose workers started in an earlier epoch does: with a
    reset of its iterator, drawing only what a reset draws.

    Starting the workers draws their base seed from the loader's random state, and
    torchdata's ``StatefulDataLoader`` draws its sampler's permutation twice (a reset
    draws it once): the iterator is made with every random state it draws from put
    back afterwards (the workers' seed drawn from a copy of the loader's), then reset;
    ``loaded``: the loader was just given a saved state,
    which its new iterator resumes from (a reset would start the epoch over), so it is
    not reset. Once per epoch at most, never per batch.
    """
    if not (
        isinstance(loader, DataLoader)
        and loader.persistent_workers
        and getattr(loader, "_iterator", None) is None
    ):
        return iter(loader)
    generators = _owned_generators(loader)
    torch_state = torch.get_rng_state()
    states = [generator.get_state() for generator in generators]
    own = loader.generator
    copy = torch.Generator()
    copy.set_state(torch_state if own is None else own.get_state())
    # The copy's first number is the one a shuffling sampler draws next from the real
    # state: the workers get the second, not the permutation's seed.
    torch.empty((), dtype=torch.int64).random_(generator=copy)
    loader.generator = copy
    try:
        iterator = iter(loader)  # starts the workers
    finally:
        loader.generator = own
        torch.set_rng_state(torch_state)
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)
    return iterator if loaded else iter(loader)  # the reset every later epoch makes


def _owned_generators(loader: DataLoader[Any]) -> list[torch.Generator]:
    """The generators a loader's ``iter()`` may draw from besides torch's global one:
    its own, its samplers' (looking inside a sampler that wraps another)."""
    found: list[torch.Generator] = []
    owners: list[object] = [loader, loader.sampler, loader.batch_sampler]
    while owners:
        owner = owners.pop()
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
        inner = getattr(owner, "sampler", None)
        if inner is not None and owner is not loader:
            owners.append(inner)
    return found


# -- map-style DataLoaders -------------------------------------------------------------


class _Batch(list[Any]):
    """One batch's indices, with the seed its worker draws its random numbers from."""

    __slots__ = ("seed",)

    def __init__(self, indices: Iterable[Any], seed: int) -> None:
        super().__init__(indices)
        self.seed = seed

    def __reduce__(self) -> tuple[Any, ...]:  # sent to the workers through a queue
        return _Batch, (list(self), self.seed)


class _PositionedSampler:
    """The loader's index sampler, started ``skip`` batches in; with workers, each
    batch's indices carry the epoch and the batch's number (for :class:`_Seeded`)."""

    def __init__(self, sampler: Iterable[Any], skip: int, epoch: int | None) -> None:
        self.sampler = sampler
        self.skip = skip
        self.epoch = epoch
        self._indices: Iterator[Any] = iter(())
        self._source: Iterator[Any] | None = None
        """The index sampler's iterator under :attr:`_indices`, until primed."""
        self._skipped = 0
        """What :meth:`prime` skips: batches, or their indices (:attr:`_source`)."""
        self._primed = True  # until iter() starts an epoch

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]  # the loader asks only when it has one

    def __iter__(self) -> Iterator[Any]:
        # iter() now, as the loader's iterator does before it draws its base seed; the
        # batches already trained are drawn by prime(), right after that seed, which is
        # where the interrupted run's first batch drew them (a RandomSampler draws its
        # permutation's seed then).
        batching = _plain_batch_sampler(self.sampler)
        if batching is None:
            self._indices = iter(self.sampler)
            self._skipped = self.skip
        else:
            # torch's own BatchSampler: the batches already trained are skipped as
            # indices of its sampler, without building each batch's list in Python
            # (the cost of a resume then barely grows with how far into the epoch).
            sampler, size, drop_last = batching
            indices = iter(sampler)
            self._indices = _batched(indices, size, drop_last)
            self._skipped = self.skip * size
            self._source = indices
        self._primed = False
        return self._batches()

    def prime(self) -> None:
        """Draw the indices of the batches already trained (once)."""
        if self._primed:
            return
        self._primed = True
        # Consumed at C speed (islice into a zero-length deque), stopping at the end.
        collections.deque(itertools.islice(self._source_or_batches(), self._skipped), maxlen=0)

    def _source_or_batches(self) -> Iterator[Any]:
        source = self._source
        self._source = None
        return source if source is not None else self._indices

    def _batches(self) -> Iterator[Any]:
        self.prime()
        indices = self._indices
        if self.epoch is None:
            yield from indices
            return
        for number, batch in enumerate(indices, start=self.skip):
            yield _Batch(batch, self.epoch * 1_000_003 + number)


def _plain_batch_sampler(sampler: object) -> tuple[Iterable[Any], int, bool] | None:
    """``(sampler, batch_size, drop_last)`` of torch's own ``BatchSampler`` (not a
    subclass, whose batches may be made otherwise), else None."""
    if type(sampler) is not BatchSampler:
        return None
    assert isinstance(sampler, BatchSampler)
    return sampler.sampler, sampler.batch_size, sampler.drop_last


def _batched(indices: Iterator[Any], size: int, drop_last: bool) -> Iterator[list[Any]]:
    """The batches ``BatchSampler`` makes of ``indices``: lists of ``size``, the last
    one shorter unless ``drop_last``."""
    while batch := list(itertools.islice(indices, size)):
        if len(batch) < size and drop_last:
            return
        yield batch


class _Seeded(torch.utils.data.Dataset[Any]):
    """The loader's dataset, seeding a worker's generators before each batch it fetches."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[Any]) -> Any:
        worker = get_worker_info()
        seed = getattr(indices, "seed", None)
        if worker is not None and seed is not None:
            _seed_worker(worker.seed - worker.id, seed)
        plain = list(indices)
        fetch: Callable[[list[Any]], Any] | None = getattr(self.dataset, "__getitems__", None)
        return fetch(plain) if fetch is not None else [self.dataset[i] for i in plain]


def _seed_worker(base: int, batch: int) -> None:
    seed = (base * 6_364_136_223_846_793_005 + batch) % 2**64
    torch.manual_seed(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def _positioned(loader: DataLoader[Any], skip: int, epoch: int) -> Iterator[Any]:
    """``iter(loader)`` with its index sampler started ``skip`` batches in.

    A ``DataLoader`` forbids replacing its sampler or dataset once built, so they are
    swapped for the one ``iter()`` (which is when its iterator copies them) and put
    back; a persistent-workers iterator keeps its own copy, which is swapped likewise.
    """
    workers = loader.num_workers > 0
    if skip == 0 and not workers:
        return iter(loader)  # no workers: nothing persists
    name = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    original = getattr(loader, name)
    sampler = _PositionedSampler(original, skip, epoch if workers else None)
    dataset = loader.dataset
    existing = getattr(loader, "_iterator", None)
    reused = existing is not None and loader.persistent_workers  # workers of an earlier epoch
    object.__setattr__(loader, name, sampler)
    if workers and not reused:  # new workers: they get the dataset that seeds them
        object.__setattr__(loader, "dataset", _Seeded(dataset))
    if reused and existing is not None:
        existing._index_sampler = sampler
    try:
        iterator = started(loader)
    finally:
        object.__setattr__(loader, name, original)
        object.__setattr__(loader, "dataset", dataset)
    own: Any = iterator  # torch's iterator class, which holds the index sampler
    if getattr(own, "_index_sampler", None) is sampler:
        own._index_sampler = original  # the next epoch starts at 0
    sampler.prime()  # a single-process iterator has drawn no index yet
    return iterator


# -- everything else: replay ---------------------------------------------------------


def _replay(iterator: Iterator[Any], count: int, *, free: bool) -> None:
    """Draw and drop ``count`` batches, saying how long it takes (unless ``free``: a list
    of batches in memory)."""
    if free:
        for _ in range(count):
            if next(iterator, _END) is _END:
                return
        return
    started = time.perf_counter()
    reported = started
    _log.info(
        "resume_replaying",
        batches=count,
        hint="this loader cannot be repositioned (no state_dict(), not a map-style "
        "DataLoader): the batches already trained are read again and dropped",
    )
    for done in range(1, count + 1):
        if next(iterator, _END) is _END:
            break
        now = time.perf_counter()
        per_batch = (now - started) / done
        if done == 1:
            _log.info(
                "resume_replay_estimate",
                batches=count,
                expected_seconds=round(per_batch * count, 1),
            )
            reported = now
        elif now - reported >= _REPLAY_REPORT_SECONDS:
            _log.info(
                "resume_replay_progress",
                done=done,
                batches=count,
                remaining_seconds=round(per_batch * (count - done), 1),
            )
            reported = now
    _log.info("resume_replayed", batches=count, seconds=round(time.perf_counter() - started, 3))
