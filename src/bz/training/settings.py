"""Process-wide settings a training step depends on, which a plugin's hook can change.

A rewind snapshot reads them all (:func:`read_settings`) and, after a plugin's fault,
puts back those that moved (:func:`put_back_settings`), with the model and the random
states: the replay computes as the first attempt did, and nothing the failed plugin
set outlives it. Set by a hook that *returns*, they stay set, as a change to the model
does (only grad mode and autocast are put back after every hook: the sandbox's rounds).

Each is a :class:`Setting`: the name the docs list, how to read it, how to set it. Those
the installed torch lacks are left out. Reading them all takes microseconds, once per
part of a run (:mod:`bz.training.rewind`), never per batch; putting back compares each
and sets only those that differ, parents before children (setting torch's
``fp32_precision`` of a backend changes what its operations read).

Not here, on purpose: what changes no number a step computes (warnings filters, print
options, ``torch.set_warn_always``, the switch interval), grad mode and autocast (put
back after every hook), and what torch fixes at start-up (inter-op threads).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.utils.deterministic  # not imported by torch itself: read below


@attrs.frozen
class Setting:
    """One process-wide setting: how to read it and how to make it ``value`` again."""

    name: str
    read: Callable[[], Any]
    write: Callable[[Any], object]


def _attribute(path: str) -> Setting | None:
    """A setting that is an attribute (``torch.backends.cudnn.benchmark``), when this
    torch has it."""
    owner_path, _, name = path.rpartition(".")
    owner: Any = sys.modules["torch"]
    for part in owner_path.split(".")[1:]:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    if not hasattr(owner, name):
        return None

    def read() -> Any:
        return getattr(owner, name)

    def write(value: Any) -> None:
        setattr(owner, name, value)

    return Setting(path, read, write)


def _deterministic() -> tuple[bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )


def _set_deterministic(value: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(value[0], warn_only=value[1])


def _anomaly() -> tuple[bool, bool]:
    return torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()


def _set_anomaly(value: tuple[bool, bool]) -> None:
    torch.autograd.set_detect_anomaly(value[0], check_nan=value[1])


_DENORMAL = 5e-324
"""The smallest float64 above zero (a denormal): flushed to zero once a plugin called
``torch.set_flush_denormal(True)``, which has no getter."""


def _flushing_denormals() -> bool:
    probe = torch.tensor([_DENORMAL], dtype=torch.float64, device="cpu")
    return bool(probe.mul_(1.0).item() == 0.0)


def _set_default_device(device: torch.device) -> None:
    # The default (CPU) is no device set at all: a device set costs every torch call.
    torch.set_default_device(None if device == torch.device("cpu") else device)


def _fp32_precisions() -> list[Setting | None]:
    """torch's float32 precision per backend and operation (TF32, bf16): the newer
    ``fp32_precision`` tree where torch has it (reading the older getters raises once a
    plugin used the tree), else the older flags."""
    if hasattr(torch.backends, "fp32_precision"):
        leaves = ["", ".cuda.matmul", ".cudnn", ".cudnn.conv", ".cudnn.rnn"]
        leaves += [".mkldnn", ".mkldnn.matmul", ".mkldnn.conv", ".mkldnn.rnn"]
        return [_attribute(f"torch.backends{leaf}.fp32_precision") for leaf in leaves]
    return [
        Setting(
            "torch.get_float32_matmul_precision()",
            torch.get_float32_matmul_precision,
            torch.set_float32_matmul_precision,
        ),
        _attribute("torch.backends.cuda.matmul.allow_tf32"),
        _attribute("torch.backends.cudnn.allow_tf32"),
    ]


def _sdp() -> list[Setting | None]:
    """Which scaled-dot-product-attention kernels may run (each computes its own way)."""
    cuda: Any = torch.backends.cuda
    found: list[Setting | None] = []
    for kernel in ("flash", "mem_efficient", "math", "cudnn"):
        read = getattr(cuda, f"{kernel}_sdp_enabled", None)
        write = getattr(cuda, f"enable_{kernel}_sdp", None)
        if read is not None and write is not None:
            found.append(Setting(f"torch.backends.cuda.{kernel}_sdp_enabled()", read, write))
    read = getattr(cuda, "fp16_bf16_reduction_math_sdp_allowed", None)
    write = getattr(cuda, "allow_fp16_bf16_reduction_math_sdp", None)
    if read is not None and write is not None:
        name = "torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()"
        found.append(Setting(name, read, write))
    return found


def _all() -> tuple[Setting, ...]:
    settings: list[Setting | None] = [
        Setting("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
        Setting("torch.get_default_device()", torch.get_default_device, _set_default_device),
        Setting("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
        Setting(
            "torch.are_deterministic_algorithms_enabled() (and warn_only)",
            _deterministic,
            _set_deterministic,
        ),
        _attribute("torch.utils.deterministic.fill_uninitialized_memory"),
        Setting("torch.is_anomaly_enabled() (and check_nan)", _anomaly, _set_anomaly),
        Setting("torch.set_flush_denormal()", _flushing_denormals, torch.set_flush_denormal),
        *_fp32_precisions(),
        _attribute("torch.backends.cudnn.enabled"),
        _attribute("torch.backends.cudnn.benchmark"),
        _attribute("torch.backends.cudnn.deterministic"),
        _attribute("torch.backends.mkldnn.enabled"),
        _attribute("torch.backends.mkldnn.deterministic"),
        _attribute("torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction"),
        _attribute("torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction"),
        _attribute("torch.backends.cuda.matmul.allow_fp16_accumulation"),
        *_sdp(),
        _attribute("torch.backends.opt_einsum.enabled"),
        Setting("sys.getrecursionlimit()", sys.getrecursionlimit, sys.setrecursionlimit),
    ]
    return tuple(setting for setting in settings if setting is not None)


SETTINGS = _all()
"""Every setting a rewind puts back, in the order it puts them back."""


def read_settings() -> tuple[Any, ...]:
    """The value of every one of :data:`SETTINGS`, in order."""
    return tuple(setting.read() for setting in SETTINGS)


def put_back_settings(saved: tuple[Any, ...]) -> None:
    """Make every setting what :func:`read_settings` read (only those that moved)."""
    for setting, value in zip(SETTINGS, saved, strict=True):
        if setting.read() != value:
            setting.write(value)
