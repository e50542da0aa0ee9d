"""``plugin_timeout``: a hook that runs too long is interrupted inside the plugin.

The sandbox writes, before each plugin call, which plugin runs and since when (two
attribute writes: the whole per-call cost). A daemon thread looks a few times per
timeout; when one call has run past it, the thread sends SIGALRM to the main thread,
whose handler raises :class:`PluginTimeout` in the plugin's own frame. A hook blocked in
``time.sleep``, a socket or a lock wakes up (the signal interrupts the wait); Python code
stops at its next bytecode. The exception's traceback is the plugin's stack, which the
fault report logs, and the plugin is quarantined like any other faulty plugin.

Limits: signals reach only the main thread, so the timeout is enforced only when
training runs there (as ``bz train`` does); C code that never returns to Python (a
native call holding the GIL) cannot be interrupted this way.
"""

from __future__ import annotations

import signal
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType


class PluginTimeout(Exception):
    """A plugin's hook ran longer than ``plugin_timeout`` seconds."""


class PluginInterrupted(Exception):
    """A second Ctrl-C or SIGTERM arrived while a plugin's hook was running."""


class Watchdog:
    """Which plugin call is running, and the thread that interrupts one that hangs."""

    __slots__ = (
        "__weakref__",
        "_expired",
        "_previous",
        "_stop",
        "running",
        "seconds",
        "since",
    )

    def __init__(self) -> None:
        self.running: object | None = None
        """The slot of the plugin being called (None between calls)."""
        self.since = 0.0
        """``time.perf_counter()`` when that call began."""
        self.seconds: float | None = None
        self._expired: object | None = None
        self._previous: Any = None
        self._stop: threading.Event | None = None

    def arm(self, seconds: float | None) -> None:
        """Start watching with this timeout (None: off). Main thread only, else a no-op."""
        self.disarm()
        if seconds is None or threading.current_thread() is not threading.main_thread():
            return
        self.seconds = seconds
        self._previous = signal.signal(signal.SIGALRM, self._interrupt)
        self._stop = threading.Event()
        thread = threading.Thread(
            target=_watch,
            args=(weakref.ref(self), self._stop, seconds, threading.main_thread().ident),
            name="bz-plugin-timeout",
            daemon=True,
        )
        thread.start()

    def disarm(self) -> None:
        """Stop the thread and put the previous SIGALRM handler back."""
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, self._previous)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        expired, self._expired = self._expired, None
        if expired is not None and expired is self.running:
            name = getattr(expired, "name", "?")
            raise PluginTimeout(
                f"plugin {name!r} ran longer than plugin_timeout ({self.seconds:g} s)"
            )
        previous = self._previous
        if callable(previous):  # someone else's SIGALRM
            previous(signum, frame)

    def expire(self, running: object) -> None:
        """Called by the thread: mark ``running`` as overdue (the signal follows)."""
        self._expired = running


def _watch(
    owner: weakref.ref[Watchdog], stop: threading.Event, seconds: float, main: int | None
) -> None:
    # Looks about ten times per timeout (at most once a second, at least every 10 ms):
    # a hung call is stopped within ~10% of the timeout, and an idle run pays nothing.
    interval = min(1.0, max(0.01, seconds / 10))
    deadline_of: tuple[object, float] | None = None  # the call signalled, and when
    while not stop.wait(interval):
        watchdog = owner()
        if watchdog is None or main is None:
            return
        running, since = watchdog.running, watchdog.since
        now = time.perf_counter()
        overdue = running is not None and now - since > seconds
        # A plugin that swallows the first interruption gets another every timeout.
        repeat = deadline_of is None or deadline_of[0] is not running or now > deadline_of[1]
        if overdue and repeat:
            watchdog.expire(running)
            deadline_of = (running, now + seconds)
            signal.pthread_kill(main, signal.SIGALRM)
        del watchdog, running


__all__ = ["PluginInterrupted", "PluginTimeout", "Watchdog"]
