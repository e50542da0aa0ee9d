"""The sandbox's boundary around torch hooks plugins registered, and what a round puts
back after its plugins: autocast, and a verdict a plugin's hook swallowed.

A torch hook of one plugin can run inside another plugin's hook (the other plugin runs
a forward): its fault's verdict (a rewind request, or the end of the run under
``raise``) then travels through the other plugin's code, which may catch it. So it is
also kept as pending and raised again once the round that called the other plugin is
over (``after_round``). The round learns of it through the one attribute it reads
after its plugins anyway (``_autocast``: autocast's state to put back, or
``PENDING_ONLY``), so the common path pays nothing for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bz import _supervision
from bz.plugins._context import PluginContext
from bz.plugins._faults import is_verdict
from bz.plugins._fence import RandomFence, set_grad_mode
from bz.plugins._watchdog import Straight, Watchdog

if TYPE_CHECKING:
    from bz.plugins._rounds import Slot

__all__ = ["PENDING_ONLY", "TorchBoundary"]

_perf_counter = time.perf_counter

PENDING_ONLY: Any = object()
"""``_autocast`` when nothing of autocast is to be put back, only a pending verdict."""


class TorchBoundary:
    """The part of :class:`~bz.plugins._sandbox.PluginSet` that runs plugins' torch hooks
    and puts autocast and swallowed verdicts right after a round."""

    _watchdog: Watchdog
    _fence: RandomFence | None
    _grad_mode: Callable[[], bool]
    _where: Any
    _shown: PluginContext | None
    _autocast: Any
    """Autocast as it was before a plugin's hook changed it (see ``_touched``), or
    ``PENDING_ONLY``; None: nothing to do after a round."""
    _pending: BaseException | None
    """A verdict raised inside another plugin's hook, until that round is over."""

    def _new_fence(self) -> RandomFence:
        raise NotImplementedError

    def _fail(self, slot: Slot, hook: str, exc: BaseException, context: PluginContext) -> None:
        raise NotImplementedError

    def _run_torch_hook(
        self,
        slot: Slot,
        kind: str,
        hook: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> object:
        # A torch hook a plugin registered, called by torch in the middle of a forward,
        # a backward or an optimizer step: the plugin's boundary, fence and clock.
        if slot.fault is not None:
            return None
        watchdog = self._watchdog
        outer = watchdog.running
        fence = self._fence or self._new_fence()
        # A whole snapshot, not a mark: this may run inside a round, whose mark stands.
        saved = fence.save()
        grad_mode = self._grad_mode
        grad = grad_mode()
        started = _perf_counter()
        if outer is None or type(outer) is Straight:
            watchdog.round = saved
        slot.calls += 1
        where = self._where
        outer_where = where[0], where[1]
        try:
            watchdog.running = slot
            where[0], where[1] = slot.number, _supervision.TORCH_HOOK
            return hook(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the plugin's, as in its own hooks
            watchdog.running = outer
            if is_verdict(exc):
                raise
            shown = self._shown if self._shown is not None else PluginContext()
            try:
                self._fail(slot, f"torch {kind}", exc, shown)
            except BaseException as decided:
                if outer is not None:
                    # Inside another plugin's hook, which may swallow it: kept until
                    # that plugin's round is over (``after_round``).
                    self._pending = decided
                    if self._autocast is None:
                        self._autocast = PENDING_ONLY
                raise
            return None  # isolate: as if the hook were not there
        finally:
            watchdog.running = outer
            where[0], where[1] = outer_where
            slot.seconds += _perf_counter() - started
            fence.load(saved)
            if grad_mode() is not grad:
                set_grad_mode(grad)
            state = self._autocast
            if state is not None and state is not PENDING_ONLY:
                self._autocast = PENDING_ONLY if self._pending is not None else None
                _restore_autocast(state)

    def _touched(self) -> None:
        # A plugin's hook is about to change autocast: keep the state it changes.
        if self._autocast is None or self._autocast is PENDING_ONLY:
            from bz.plugins import _autocast

            self._autocast = _autocast.capture()

    def _put_back_autocast(self) -> None:
        # After a round (its ``_autocast`` was set): autocast as it was, and a verdict a
        # plugin's hook swallowed raised again.
        state, self._autocast = self._autocast, None
        if state is not PENDING_ONLY:
            _restore_autocast(state)
        pending, self._pending = self._pending, None
        if pending is not None:
            raise pending


def _restore_autocast(state: Any) -> None:
    from bz.plugins import _autocast

    _autocast.restore(state)
