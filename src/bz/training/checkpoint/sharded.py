"""Sharded checkpoints (``distributed.strategy: "fsdp"``): a folder per checkpoint.

``epoch-0003.dcp/`` holds what ``torch.distributed.checkpoint`` (DCP) writes for the
model and the optimizer (each process its own shards, ``__<rank>_0.distcp``, and one
``.metadata``), plus :data:`STATE_FILE`, rank 0's ``torch.save`` of everything else a
checkpoint holds (counters, scheduler, loss module, plugin states, random states,
gradient scaler). Its sidecar, ``epoch-0003.dcp.json``, is the one of a single-file
checkpoint, with the size and hash of the folder's files taken together
(:func:`bz.training.checkpoint.files.hash_path`), so listing, verifying, ``keep_last`` and resuming
treat both kinds alike.

A write is atomic from a reader's side: every process writes into
``.epoch-0003.dcp.tmp/``; once all are done, rank 0 adds the rest, hashes the folder,
renames the sidecar into place, then the folder. A kill at any instant leaves the
previous checkpoints as they were (a stray temporary folder is removed by the next run
that takes the run's lock).

DCP loads by parameter name into whatever layout the loading model has, so a
checkpoint written by N processes resumes on M (one process, without FSDP, included).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import async_save, save

from bz.training.checkpoint.files import STATE_FILE, Entry, checkpoint_name, hash_path, sidecar
from bz.training.checkpoint.store import (
    describe,
    fsync_folder,
    sidecar_text,
    torch_save,
    write_bytes,
    write_tmp,
)

SUFFIX = ".dcp"


def sharded_name(epoch: int, batch: int = 0) -> str:
    """``epoch-0003.dcp`` or ``epoch-0002-batch-00017.dcp``."""
    return checkpoint_name(epoch, batch).removesuffix(".pt") + SUFFIX


def tmp_folder(path: Path) -> Path:
    """Where the processes write ``path`` before it is complete (the same on every rank)."""
    return path.with_name(f".{path.name}.tmp")


def shard_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This process's shards of the model and the optimizer, by parameter name."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def begin(path: Path, *, main: bool) -> Path:
    """Make an empty temporary folder for ``path`` (rank 0) that every process then sees."""
    tmp = tmp_folder(path)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a write that was killed
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    return tmp


def write_shards(state: dict[str, Any], tmp: Path) -> None:
    """Every process writes its shards into ``tmp`` (returns once all have)."""
    with warnings.catch_warnings():
        # One process (a test, a tool) writes the whole state as its one shard.
        warnings.filterwarnings("ignore", "torch.distributed is", UserWarning)
        save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())


def write_shards_async(state: dict[str, Any], tmp: Path, group: Any) -> Future[Any]:
    """Like :func:`write_shards` in the background; the state is copied before it returns.

    ``group`` must be a process group of its own: the write's collectives then never
    interleave with training's on the default group.
    """
    future = async_save(state, checkpoint_id=tmp, process_group=group)
    if not isinstance(future, Future):  # only a staging option would return another kind
        raise TypeError(f"dcp.async_save returned a {type(future).__name__}")
    return future


def finish(rest: Mapping[str, Any], path: Path) -> Entry:
    """Rank 0, once every shard is written: add the rest, then publish the folder."""
    tmp = tmp_folder(path)
    state_tmp, _, _ = write_tmp(tmp / STATE_FILE, functools.partial(torch_save, rest))
    os.replace(state_tmp, tmp / STATE_FILE)
    fsync_folder(tmp)
    size, digest = hash_path(tmp)
    entry = describe(rest, path, size, digest)
    side, _, _ = write_tmp(sidecar(path), functools.partial(write_bytes, sidecar_text(entry)))
    try:
        # From here the old folder of that name (if any) no longer matches the sidecar.
        os.replace(side, sidecar(path))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            side.unlink()
        raise
    fsync_folder(path.parent)
    return entry


def _load(state: dict[str, Any], path: Path) -> None:
    alone = not dist.is_initialized()
    with warnings.catch_warnings():
        # DCP warns whenever it loads in one process; resharding to one is intended here.
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load(state, checkpoint_id=path, no_dist=alone)


def load_shards(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the model's and the optimizer's state from ``path`` into this process's layout."""
    state = shard_state(model, optimizer)
    _load(state, path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def load_model_shards(path: Path, model: torch.nn.Module) -> None:
    """Load only the weights (``bz validate`` of an unfinished sharded run, one process)."""
    state = {"model": model.state_dict()}
    _load(state, path)
    model.load_state_dict(state["model"])


def save_sharded(
    shards: dict[str, Any],
    rest: Mapping[str, Any] | None,
    path: Path,
    *,
    main: bool,
    group: Any = None,
) -> Callable[[], Entry | None]:
    """Start writing a sharded checkpoint on every process; returns what completes it.

    Without ``group`` the shards are written before this returns; with one, in the
    background (:func:`write_shards_async`). Completing waits for them, then rank 0
    (``rest`` given) publishes the checkpoint; elsewhere it returns None.
    """
    tmp = begin(path, main=main)
    future = None
    if group is None:
        write_shards(shards, tmp)
    else:
        future = write_shards_async(shards, tmp, group)

    def complete() -> Entry | None:
        if future is not None:
            future.result()
        return None if rest is None else finish(rest, path)

    return complete
