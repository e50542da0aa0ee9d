"""``precision``: autocast for the forward pass, and the gradient scaler of ``16-mixed``.

``32`` changes nothing. ``bf16-mixed`` runs the model's forward pass and the loss under
``torch.autocast(device_type, dtype=torch.bfloat16)``; bfloat16 has float32's range, so
gradients need no scaling. ``16-mixed`` uses float16 and a ``torch.amp.GradScaler``
(its state is saved in checkpoints); it needs CUDA. Backward passes, optimizer steps,
loss sums and metric state stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal

import attrs
import torch

from bz._errors import UsageError

Mode = Literal["32", "bf16-mixed", "16-mixed"]


@attrs.frozen
class Precision:
    """What the loop needs to train in one precision mode on one device."""

    mode: Mode
    autocast: Callable[[], contextlib.AbstractContextManager[object]] | None
    """A fresh autocast context for one forward pass; None for ``32``, where the loop
    enters nothing (a ``nullcontext`` per batch is measurable on a small model)."""
    scaler: torch.amp.GradScaler | None
    """The gradient scaler (``16-mixed`` only)."""
    mixed: bool = attrs.field(init=False)
    """Whether outputs may come out in a 16-bit type (a field, not a property: it is
    read for every batch that metrics count)."""

    @mixed.default
    def _mixed(self) -> bool:
        return self.mode != "32"


def check_precision(mode: Mode, device: torch.device) -> None:
    """Raise :class:`~bz.UsageError` when ``device`` cannot train in ``mode``."""
    if mode == "32":
        return
    if not torch.amp.is_autocast_available(device.type):
        raise UsageError(f"precision {mode!r} is not available on {device.type} devices")
    if mode == "16-mixed" and device.type not in ("cuda", "mps"):
        raise UsageError(
            f"precision '16-mixed' needs a CUDA device (float16 with a gradient scaler); "
            f"this run uses {device.type}: use 'bf16-mixed' or '32'"
        )
    if mode == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            f"precision 'bf16-mixed' needs a GPU with bfloat16 support; {device} has none: "
            "use '16-mixed' or '32'"
        )


def precision_for(mode: Mode, device: torch.device) -> Precision:
    """The autocast factory and scaler for ``mode`` on ``device`` (checked first)."""
    check_precision(mode, device)
    if mode == "32":
        return Precision(mode, None, None)
    dtype = torch.bfloat16 if mode == "bf16-mixed" else torch.float16

    def autocast() -> contextlib.AbstractContextManager[object]:
        return torch.autocast(device_type=device.type, dtype=dtype)

    scaler = torch.amp.GradScaler(device.type) if mode == "16-mixed" else None
    return Precision(mode, autocast, scaler)
