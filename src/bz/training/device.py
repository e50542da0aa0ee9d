"""Devices, seeding and batches: the small helpers the loop and the commands share."""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from bz._errors import TrainingError, UsageError, training_context
from bz._logging import get_logger

_log = get_logger("bz")


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


CUBLAS_WORKSPACE = ":4096:8"
"""What ``CUBLAS_WORKSPACE_CONFIG`` is set to (when unset) by ``deterministic: true``:
cuBLAS's deterministic setting with eight 4 MiB workspaces per stream (NVIDIA's)."""

_NO_DETERMINISTIC_KERNEL = re.compile(r"^(\S+) does not have a deterministic implementation")


def request_cublas_determinism() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` (unless set) for ``deterministic: true``.

    cuBLAS reads it when CUDA first uses it: ``bz train`` calls this before ``setup()``
    builds the model. Called later, after CUDA is in use, it may come too late; a
    warning says so.
    """
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        return
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    if _cuda_initialized():
        _log.warning(
            "deterministic_cublas_late",
            hint="CUDA was initialised before deterministic mode set "
            f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE}; set it in the environment "
            "before starting the program",
        )


def _cuda_initialized() -> bool:
    # torch.cuda.is_initialized carries no annotations; it returns a bool.
    check: Callable[[], bool] = torch.cuda.is_initialized
    return check()


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Deterministic kernels only, inside the block (``RunConfig.deterministic``).

    ``torch.use_deterministic_algorithms(True)``, cuDNN's deterministic mode and no
    cuDNN benchmarking, and ``CUBLAS_WORKSPACE_CONFIG``; the previous settings come back
    afterwards (the environment variable stays). An op without a deterministic kernel
    raises a :class:`~bz.TrainingError` (exit 1), one line naming it; torch's error is
    its ``__cause__``.
    """
    if not enabled:
        yield
        return
    request_cublas_determinism()
    cudnn = torch.backends.cudnn
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    except RuntimeError as exc:
        found = _NO_DETERMINISTIC_KERNEL.match(str(exc))
        if found is None:
            raise
        where = training_context(exc)
        raise TrainingError(
            (f"{where}: " if where else "")
            + f'"deterministic": true, but {found.group(1)} has no deterministic '
            "implementation on this device; replace that op, or set deterministic to false"
        ) from exc
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


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
