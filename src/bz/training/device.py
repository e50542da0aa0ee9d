"""Devices, seeding and batches: the small helpers the loop and the commands share."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
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
    """``batch`` with every tensor in it moved to ``device``, each container keeping its type.

    Tensors are moved (``non_blocking``); tuples, lists, namedtuples, mappings (``dict``,
    ``OrderedDict``, ``UserDict`` and so Hugging Face's ``BatchEncoding``) and dataclasses
    are rebuilt as the same type around their moved contents; any other object with a
    ``to`` method is moved by ``obj.to(device)``; anything else (strings, numbers,
    None) is left as it is.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        moved = [to_device(item, device) for item in batch]
        # A namedtuple is built from its fields, a plain tuple (or subclass) from one iterable.
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, list):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, Mapping):
        return _mapping_to(batch, device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return _dataclass_to(batch, device)
    move = getattr(batch, "to", None)
    if callable(move) and not isinstance(batch, type):
        return move(device)
    return batch


def _mapping_to(batch: Mapping[Any, Any], device: torch.device) -> Any:
    moved = {key: to_device(value, device) for key, value in batch.items()}
    if type(batch) is dict:
        return moved
    if isinstance(batch, MutableMapping):
        # A shallow copy keeps the mapping's type and attributes (a BatchEncoding's
        # encodings, a defaultdict's factory); only the values are replaced.
        copied = copy.copy(batch)
        copied.update(moved)
        return copied
    return moved  # a read-only mapping (MappingProxyType): a dict of the moved values


def _dataclass_to(batch: Any, device: torch.device) -> Any:
    changes = {
        field.name: to_device(getattr(batch, field.name), device)
        for field in dataclasses.fields(batch)
        if field.init
    }
    return dataclasses.replace(batch, **changes)


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor of ``batch`` in order (depth first through tuples, lists, mappings
    and dataclasses), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        items: Iterable[Any] = batch
    elif isinstance(batch, Mapping):
        items = batch.values()
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = (getattr(batch, field.name) for field in dataclasses.fields(batch))
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def count_samples(batch: Any) -> int | None:
    """A batch's sample count by the one rule: the first dimension of its first tensor
    (a 0-d tensor is one sample); None when it holds no tensor. Shape metadata only,
    never a device read."""
    tensor = first_tensor(batch)
    if tensor is None:
        return None
    return int(tensor.shape[0]) if tensor.ndim else 1


def uncountable(batch: Any, loader: str) -> UsageError:
    """The error for a batch with no tensor to count its samples by."""
    return UsageError(
        f"{loader} yielded a {type(batch).__name__} batch with no tensor to count its "
        "samples by (the first dimension of its first tensor): put tensors in it, or "
        "give TrainingSetup a step that returns bz.StepResult(loss, samples=N)"
    )


def unpack(batch: Any, loader: str) -> tuple[Any, Any]:
    """A batch's ``(inputs, targets)``; anything else is the user's mistake."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    kind = type(batch).__name__ + (
        f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    )
    hint = (
        "leave loss_fn out to train model(**batch).loss (the Hugging Face convention), "
        "or give TrainingSetup a step"
        if isinstance(batch, Mapping)
        else "give TrainingSetup a step(model, batch) for batches of another shape"
    )
    raise UsageError(
        f"{loader} yielded {kind}; with a loss_fn bz expects (inputs, targets) pairs: {hint}"
    )


def samples_of_pair(inputs: Any, targets: Any, loader: str) -> int:
    """A pair's sample count by the rule of :func:`count_samples` (no device read): the
    inputs' first tensor, else the targets'."""
    if isinstance(inputs, torch.Tensor) and inputs.ndim:
        return int(inputs.shape[0])
    count = count_samples(inputs)
    if count is None:
        count = count_samples(targets)
    if count is None:
        raise uncountable((inputs, targets), loader)
    return count


def loader_length(loader: Iterable[Any] | None) -> int | None:
    """``len(loader)``, or None for a loader without a length (or no loader)."""
    try:
        return len(loader)  # type: ignore[arg-type]  # loaders may or may not have a length
    except TypeError:
        return None
