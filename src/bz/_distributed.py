"""Multi-process training on torch.distributed: process group, DDP, sampling, reductions.

bz never builds its own process group machinery: processes are started by ``torchrun``
(or by ``bz train --nproc-per-node N``, which calls the same elastic launcher), and this
module reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``...), joins the group, and provides the few collective operations the
loop needs. A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) uses none of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import inspect
import os
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import attrs
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from bz._errors import UsageError
from bz._logging import get_logger

Backend = Literal["auto", "gloo", "nccl"]

_log = get_logger("bz")

LONGEST_COLLECTIVE_WAIT_S = 10 * 365 * 86400.0
"""The longest ``distributed.timeout`` bz passes on (ten years): torch holds the timeout
as 64-bit milli/nanoseconds, and ``timedelta.max`` (or anything over ~292 years) wraps
to a negative wait that fails the first connection at once."""

_PR_SET_PDEATHSIG = 1
"""prctl(2): the signal this process gets when its parent dies."""


@attrs.frozen
class Topology:
    """Where this process sits: rank, world size and local rank (0 / 1 / 0 alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not an integer") from None


def topology_from_env() -> Topology:
    """The topology torchrun describes in the environment (a single process if none)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"invalid RANK={rank} / WORLD_SIZE={world_size} in the environment")
    return Topology(rank=rank, world_size=world_size, local_rank=_env_int("LOCAL_RANK", 0))


def choose_backend(requested: Backend, device: torch.device) -> str:
    """``nccl`` for CUDA devices and ``gloo`` otherwise, unless a backend was requested."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: torch.device, topology: Topology) -> torch.device:
    """Each process on a node takes its own GPU (``cuda:LOCAL_RANK``)."""
    index: int | None = device.index  # None for a bare "cuda"
    if device.type == "cuda" and topology.distributed and index is None:
        return torch.device("cuda", topology.local_rank)
    return device


def join(topology: Topology, backend: str, timeout_s: float) -> bool:
    """Join the process group torchrun prepared; False when there is nothing to join.

    Returns True when this call created the group (and so must destroy it).
    """
    if not topology.distributed or dist.is_initialized():
        return False
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed support")
    _stop_with_launcher()
    dist.init_process_group(
        backend=backend,
        rank=topology.rank,
        world_size=topology.world_size,
        timeout=collective_timeout(timeout_s),
    )
    _log.info(
        "process_group_joined",
        rank=topology.rank,
        world_size=topology.world_size,
        backend=backend,
    )
    return True


def collective_timeout(seconds: float) -> datetime.timedelta:
    """``distributed.timeout`` as torch takes it: a larger value (``1e15``, Infinity)
    waits ten years, which is as good as no limit, instead of overflowing."""
    return datetime.timedelta(seconds=min(seconds, LONGEST_COLLECTIVE_WAIT_S))


def _stop_with_launcher() -> None:
    """Have this process get one SIGTERM when its launcher dies (Linux).

    torchrun stops its processes when it is interrupted, but a launcher killed with
    SIGKILL (``kill -9``, a scheduler, the OOM killer) cannot: they would train on as
    orphans, holding the run's lock. The kernel's parent-death signal comes once per
    thread of the launcher that dies (a child is handed to the next thread), so it is
    SIGUSR2 here, turned into a single SIGTERM: the processes stop after the same step
    and write a checkpoint, as when the launcher passes a signal on (a second SIGTERM
    would stop them at once, without one).
    """
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    told: list[bool] = []

    def launcher_died(signum: int, frame: object) -> None:
        if not told:
            told.append(True)
            signal.raise_signal(signal.SIGTERM)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        signal.signal(signal.SIGUSR2, launcher_died)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGUSR2)
    except (OSError, AttributeError, ValueError):  # no libc, or not the main thread
        return
    if os.getppid() != launcher:  # it died before the request took effect
        signal.raise_signal(signal.SIGTERM)


def leave(created: bool, *, wait_for_all: bool = False) -> bool:
    """Destroy the process group if :func:`join` created it; True when it did.

    ``wait_for_all`` (a run that finished): first meet the other processes, so that none
    tears its group down while another still works with it (rank 0 writes the final
    weights last). After a failure the others may be gone: no meeting then. Groups that
    something else still holds (FSDP's mesh) outlive this call; the loop lets go of them
    (``fsdp.release_groups``), else gloo's threads would be joined at interpreter exit.
    """
    if not (created and dist.is_initialized()):
        return False
    if wait_for_all:
        with contextlib.suppress(RuntimeError):  # a peer gone: nothing left to wait for
            dist.barrier()
    dist.destroy_process_group()
    return True


# -- data ------------------------------------------------------------------------------


class _Shard:
    """Every ``world_size``-th batch of a plain iterable, the same count on every rank."""

    def __init__(self, batches: Sequence[Any], topology: Topology) -> None:
        usable = len(batches) - len(batches) % topology.world_size
        self._batches = batches[topology.rank : usable : topology.world_size]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def shard_loader(
    loader: Iterable[Any], topology: Topology, seed: int, *, training: bool
) -> Iterable[Any]:
    """This rank's share of ``loader``.

    A ``DataLoader`` is rebuilt around a :class:`DistributedSampler` (shuffled when the
    original shuffled, with the run's seed; ``set_epoch`` is called every epoch), as an
    instance of the loader's own class keeping every other setting it was built with
    (:func:`loader_settings`): torchdata's ``StatefulDataLoader`` stays one, with its
    ``state_dict()`` resume. A plain sequence of batches (a list) is dealt out
    round-robin, truncated so that every rank has as many batches (the first process
    logs ``batches_left_out`` when that leaves some out).
    """
    if not topology.distributed:
        return loader
    if isinstance(loader, DataLoader):
        if loader.batch_size is None:
            raise UsageError(
                "a DataLoader with a batch_sampler cannot be sharded automatically; "
                "give it a DistributedSampler yourself"
            )
        if isinstance(loader.sampler, DistributedSampler):
            return loader
        settings = loader_settings(loader)
        sampler: DistributedSampler[Any] = DistributedSampler(
            loader.dataset,
            num_replicas=topology.world_size,
            rank=topology.rank,
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=seed,
            drop_last=loader.drop_last if training else False,
        )
        return type(loader)(loader.dataset, sampler=sampler, **settings)
    if isinstance(loader, Sequence):
        left_out = len(loader) % topology.world_size
        if left_out and topology.rank == 0:
            _log.warning(
                "batches_left_out",
                loader="train_loader" if training else "val_loader",
                left_out=left_out,
                batches=len(loader),
                processes=topology.world_size,
                hint="every process takes as many batches of a list, so the last ones are "
                "used by none; give a DataLoader (its DistributedSampler uses every sample) "
                "or a multiple of the process count",
            )
        return _Shard(loader, topology)
    raise UsageError(
        f"cannot split a {type(loader).__name__} between processes; return a DataLoader "
        "or a list of batches from setup(), or shard the data yourself"
    )


_SAMPLING = frozenset({"self", "dataset", "shuffle", "sampler", "batch_sampler"})
"""``DataLoader`` arguments :func:`shard_loader` replaces (the sampler) or that went into
the loader's batch sampler (``batch_size`` and ``drop_last`` are kept as attributes)."""


def loader_settings(loader: DataLoader[Any]) -> dict[str, Any]:
    """Every argument ``loader`` was built with, besides its data and sampling, as its
    class takes them: this torch's ``DataLoader`` (``generator``, ``prefetch_factor``,
    ``multiprocessing_context``, ``in_order``, ... whatever the release has), or a
    subclass's own (torchdata's ``StatefulDataLoader``: ``snapshot_every_n_steps``).

    A subclass argument the loader does not keep as an attribute of the same name cannot
    be read back: a :class:`UsageError` naming it (bz would silently drop it).
    """
    cls = type(loader)
    settings: dict[str, Any] = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in _SAMPLING or parameter.kind in _SPREAD:
            continue
        if hasattr(loader, name):
            settings[name] = getattr(loader, name)
        elif name not in _DATALOADER_PARAMETERS:
            raise UsageError(
                f"cannot shard a {cls.__name__} between processes: its argument {name!r} "
                "is not kept as an attribute of that name; give it a DistributedSampler "
                "yourself"
            )
    return settings


_SPREAD = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
"""``*args`` and ``**kwargs``: no setting of their own."""
_DATALOADER_PARAMETERS = frozenset(inspect.signature(DataLoader.__init__).parameters)
"""``DataLoader``'s own arguments (one it does not keep is left to its default, as
before the loader was sharded)."""


def set_epoch(loader: Iterable[Any] | None, epoch: int) -> None:
    """Reshuffle a distributed sampler for ``epoch`` (same order on resume)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


# -- collectives -----------------------------------------------------------------------


def sum_across(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (one collective, one host read)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    result: list[float] = tensor.tolist()
    return result


def control_group(backend: str) -> Any:
    """The group for the loop's own small agreements: the default group when it is gloo,
    else a gloo group beside it, so that agreeing never waits on a device."""
    if backend == "gloo":
        return None  # torch.distributed's name for the default group
    return dist.new_group(backend="gloo")


def vote_across(flags: Sequence[bool], seconds: float, group: Any) -> tuple[list[bool], float]:
    """For each flag, whether it is true on any rank, and the mean of ``seconds`` over
    the ranks: the same answer on every rank, from one small collective on the CPU."""
    tensor = torch.tensor([*map(float, flags), seconds], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    *raised, total = tensor.tolist()  # a CPU tensor: reading it does not wait on a device
    return [value > 0 for value in raised], total / dist.get_world_size(group)


# -- launching -------------------------------------------------------------------------


def launch(nproc_per_node: int, bz_args: Sequence[str]) -> None:
    """Start ``python -m bz <bz_args>`` in ``nproc_per_node`` processes with torchrun's
    elastic launcher (single node; use ``torchrun`` itself for several nodes)."""
    from torch.distributed.run import main as torchrun

    torchrun(
        [
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={nproc_per_node}",
            "--max-restarts=0",
            "--module",
            "bz",
            *bz_args,
        ]
    )
