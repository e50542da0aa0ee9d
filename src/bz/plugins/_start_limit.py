"""``plugin_start_timeout`` for plugins loaded in this process.

A plugin's start-up is not a hook, so ``plugin_timeout`` does not bound it; a process
plugin's start-up is bounded by ``plugin_start_timeout`` (:mod:`bz.plugins._isolated`),
and so is an in-process plugin's: each step of loading it (importing it, checking its
options, creating it) may take that long. While :func:`start_limit` is on, the loader's
boundary (:class:`LoadBoundary`) tells the hooks' watchdog (:mod:`bz.plugins._watchdog`)
which plugin is loading; one that runs past the limit is interrupted inside its own
frame (SIGALRM on the main thread: a ``time.sleep``, a socket or a lock wakes up), and
the boundary records it as that plugin's fault, like any exception it raises while
loading: it is reported by name with the limit, and training goes on without it (or
stops, under ``plugin_errors: "raise"``). One that swallows the interruption is forced
out, or the process ends, as a hook would be (:meth:`Watchdog.escalate`); ``bz
check-config``, which has no supervisor to restart anything, reports it as one line
naming the plugin's line where it hung (``on_hung``).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from bz import _errors
from bz.plugins import _faults, _watchdog
from bz.plugins._faults import PluginFault
from bz.plugins._watchdog import EXIT_AFTER_S, PluginTimeout, Watchdog

if TYPE_CHECKING:
    from types import TracebackType


class PluginStartTimeout(Exception):
    """A plugin took longer than ``plugin_start_timeout`` to load."""


class _Loading:
    """What the watchdog sees running while a plugin loads (it reads ``name``); the stage
    and the plugin's module name where it hung (see :func:`_report_hung`)."""

    __slots__ = ("module", "name", "stage")

    def __init__(self, name: str, stage: str, module: str | None) -> None:
        self.name, self.stage, self.module = name, stage, module


OnHung = Callable[[PluginFault, int], None]
"""Reports a plugin whose loading never returned from its interruption, as a fault
(its line where it hung, when found), and ends the process (the second argument is the
watchdog's exit code: 1, or 130 / 143 after a second stop signal)."""


_limits: list[tuple[Watchdog, float]] = []
"""The limit on now (innermost last): its watchdog and seconds."""


@contextlib.contextmanager
def start_limit(seconds: float | None, on_hung: OnHung | None = None) -> Iterator[None]:
    """Bound every :class:`LoadBoundary` entered inside by ``seconds`` (None: no limit).

    Enforced on the main thread only (signals reach no other); elsewhere a no-op. A
    plugin that does not return from its interruption ends the process: with the
    training run's words, or through ``on_hung``.
    """
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    watchdog = Watchdog()
    watchdog.give_up = (
        _give_up if on_hung is None else functools.partial(_report_hung, on_hung, seconds)
    )
    watchdog.arm(seconds)
    _limits.append((watchdog, seconds))
    try:
        yield
    finally:
        _limits.pop()
        watchdog.disarm()


def _give_up(slot: object, exit_code: int, reason: str) -> None:
    # The watchdog words its reason for hooks; this limit is the start-up's.
    reason = reason.replace("plugin_timeout", "plugin_start_timeout")
    _faults.give_up(slot, exit_code, reason, loading=True)


def _report_hung(
    on_hung: OnHung, seconds: float, slot: object, exit_code: int, reason: str
) -> None:
    # The escalation thread, while the main thread is still stuck where the plugin hung.
    name, stage = getattr(slot, "name", "?"), getattr(slot, "stage", "load")
    module: str | None = getattr(slot, "module", None)
    place = ""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is not None and module is not None:
        with contextlib.suppress(Exception):  # a report without the line, never none
            place = _errors.package_line(traceback.extract_stack(frame), module)
    error = (
        f"{place}PluginStartTimeout: plugin {name!r} took longer than plugin_start_timeout "
        f"({seconds:g} s) in its {stage}, and did not return {EXIT_AFTER_S:g} s after it "
        "was interrupted (native code that ignores signals?)"
    )
    on_hung(PluginFault(name, stage, error), exit_code)
    _give_up(slot, exit_code, reason)  # on_hung ends the process; this if it did not


class LoadBoundary(_faults.LoadBoundary):
    """The loader's boundary (:class:`bz.plugins._faults.LoadBoundary`), and, inside
    :func:`start_limit`, bounded by it: what runs inside is the plugin's loading."""

    __slots__ = ("_previous", "_watched")

    def __enter__(self) -> None:
        super().__enter__()
        self._watched: tuple[Watchdog, float] | None = _limits[-1] if _limits else None
        if self._watched is not None:
            watchdog = self._watched[0]
            # Forcing a plugin out (see Watchdog._force) stops at the loader's frame.
            watchdog.boundaries = frozenset({sys._getframe(1).f_code})
            self._previous = watchdog.running
            watchdog.round = object()  # timed afresh from here
            watchdog.running = _Loading(self._plugin, self._stage, self._module)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._watched is not None:
            watchdog, seconds = self._watched
            watchdog.running = self._previous  # first: the plugin has left
            watchdog.settle()
            timeout = _timeout_in(exc)
            if timeout is not None:
                # Its stack is the plugin's (where it hung); the limit is named.
                exc = PluginStartTimeout(
                    f"plugin {self._plugin!r} took longer than plugin_start_timeout "
                    f"({seconds:g} s) in its {self._stage}"
                ).with_traceback(_plugins_part(timeout.__traceback__))
        return super().__exit__(kind, exc, tb)

    def _located(self, exc: BaseException) -> str:
        # Where it hung, at its import too (whose failures name their line themselves).
        if isinstance(exc, PluginStartTimeout) and self._module is not None:
            return _errors.package_frame(exc, self._module)
        return super()._located(exc)


def _timeout_in(exc: BaseException | None) -> PluginTimeout | None:
    # The interruption, also when the loader wrapped it (an import's PluginImportError).
    while exc is not None and not isinstance(exc, PluginTimeout):
        exc = exc.__cause__
    return exc


def _plugins_part(traceback: TracebackType | None) -> TracebackType | None:
    # The stack down to where the plugin was interrupted, without the watchdog's own
    # frames (its signal handler, its trace function) at the end.
    head = traceback
    while traceback is not None and traceback.tb_next is not None:
        if traceback.tb_next.tb_frame.f_code.co_filename == _watchdog.__file__:
            traceback.tb_next = None
        else:
            traceback = traceback.tb_next
    return head


__all__ = ["LoadBoundary", "PluginStartTimeout", "start_limit"]
