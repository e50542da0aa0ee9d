"""Devices, seeding and batches: the small helpers the loop and the commands share."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from bz._errors import UsageError


def resolve_device(name: str) -> torch.device:
    """The device ``RunConfig.device`` names; ``auto`` prefers CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UsageError(
                f"device {name!r} requested but this machine has {count} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r} requested but MPS is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (in lists, tuples and dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def unpack(batch: Any, loader: str) -> tuple[Any, Any]:
    """A batch's ``(inputs, targets)``; anything else is the user's mistake."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise UsageError(
        f"{loader} yielded {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "; bz expects (inputs, targets) pairs"
    )


def batch_size(inputs: Any) -> int:
    """Samples in a batch's inputs: the first dimension (shape metadata, no sync)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.ndim else 1
    if isinstance(inputs, Mapping):
        return next((batch_size(v) for v in inputs.values()), 0)
    if isinstance(inputs, (list, tuple)) and inputs:
        return batch_size(inputs[0])
    return 0


def sample_count(inputs: Any, targets: Any) -> int:
    """A batch's sample count, from shapes (no device read): the inputs' first dimension,
    else the targets', else 1 (a batch bz cannot measure counts as one sample)."""
    if isinstance(inputs, torch.Tensor) and inputs.ndim:
        return int(inputs.shape[0])
    return batch_size(inputs) or batch_size(targets) or 1


def loader_length(loader: Iterable[Any] | None) -> int | None:
    """``len(loader)``, or None for a loader without a length (or no loader)."""
    try:
        return len(loader)  # type: ignore[arg-type]  # loaders may or may not have a length
    except TypeError:
        return None
