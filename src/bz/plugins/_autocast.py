"""Autocast is global (per thread): a plugin that enters ``torch.autocast`` and never leaves
would have the rest of the run compute in 16 bits.

The sandbox puts it back after every hook, as it does grad mode, without paying for it
on every call: while a run lasts, ``torch.autocast.__enter__`` and
``torch.set_autocast_enabled`` tell the sandbox (through :mod:`bz.plugins._torch_hooks`)
when a plugin's hook calls them; the sandbox then captures the state before the change
(:func:`capture`) and puts it back when the hook's round ends (:func:`restore`). Around
hooks above the batch level it also compares the state itself (:func:`any_enabled`),
which catches other ways in.
"""

from __future__ import annotations

from typing import Any

import torch

_DEVICES = tuple(
    device
    for device in ("cpu", "cuda", "mps", "xpu", "hpu", "xla", "ipu", "mtia", "maia")
    if torch.amp.is_autocast_available(device)
)

_set_enabled = torch._C.set_autocast_enabled
"""torch's own (``torch.set_autocast_enabled`` is wrapped while a run lasts)."""

AutocastState = tuple[tuple[tuple[str, bool, Any], ...], bool, int]
"""Per device (enabled, dtype), whether the cast cache is on, and the nesting depth."""


def any_enabled() -> bool:
    """Whether autocast is on for some device (about a microsecond: not per batch)."""
    return bool(torch._C._is_any_autocast_enabled())


def capture() -> AutocastState:
    """The autocast state of this thread."""
    devices = tuple(
        (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        for device in _DEVICES
    )
    nesting = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return devices, torch.is_autocast_cache_enabled(), nesting


def restore(state: AutocastState) -> None:
    """Put ``state`` back (contexts entered since are left for good)."""
    devices, cache, nesting = state
    for device, enabled, dtype in devices:
        _set_enabled(device, enabled)
        torch.set_autocast_dtype(device, dtype)
    torch.set_autocast_cache_enabled(cache)
    depth = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    while depth > nesting:
        depth = torch.autocast_decrement_nesting()
    if depth == 0:
        torch.clear_autocast_cache()


__all__ = ["AutocastState", "any_enabled", "capture", "restore"]
