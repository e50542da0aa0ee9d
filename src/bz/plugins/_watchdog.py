"""``plugin_timeout``: a hook that runs too long is interrupted inside the plugin.

Nothing is stored per plugin call on the common path. The sandbox runs most rounds of
calls as one generated function, a :class:`Straight` round, one line per plugin: before
such a round it stores the round (one attribute write per round), and which plugin runs
is read, only when someone asks, from the line the round's frame is at (the observer
looks, the observed does not report). The other rounds (timed, supervised, a round
going on after a fault) and the torch hooks plugins register write, before each call,
which plugin runs, and before each round a new round object (which tells one call from
the next call of the same plugin). A daemon thread looks a few times per timeout and
times a call from the first look that sees it (a :class:`Straight` round's call is told
apart by its frame); when one has run past the timeout, the thread sends SIGALRM to the
main thread,
whose handler raises :class:`PluginTimeout` in the plugin's own frame. A hook blocked in
``time.sleep``, a socket or a lock wakes up (the signal interrupts the wait); Python code
stops at its next bytecode. The exception's traceback is the plugin's stack, which the
fault report logs, and the plugin is quarantined like any other faulty plugin.

A hook that swallows its interruption (``except BaseException: pass`` in a loop) is
escalated (:meth:`Watchdog.escalate`): ``GRACE_S`` after the interruption, if the same
call still runs, every line of Python the hook executes raises (a trace function on its
frames), which no ``try`` in Python code survives; ``EXIT_AFTER_S`` after it, if the call
still has not returned (blocked in native code that ignores signals), the run reports
the plugin and ends the process with the interruption's exit code (143 for SIGTERM, 130
for Ctrl-C, 1 for a timeout): the newest checkpoint on disk is where it resumes.

Limits: signals reach only the main thread, so the timeout is enforced only when
training runs there (as ``bz train`` does); C code that never returns to Python and
holds the GIL cannot be interrupted, and keeps the escalation's thread from running.
"""

from __future__ import annotations

import operator
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bz._supervision import heartbeat

if TYPE_CHECKING:
    from types import CodeType, FrameType, TracebackType

_MAIN_THREAD = threading.main_thread().ident

ROUND_FILE = "<bz plugin round>"
"""The file name of the sandbox's generated rounds (:func:`bz.plugins._rounds.straight`):
the frames a plugin's call starts from, like ``Watchdog.boundaries``."""

GRACE_S = 1.0
"""How long a hook has to return after its interruption before every line of it raises."""
EXIT_AFTER_S = 10.0
"""How long after its interruption a hook that still has not returned ends the process."""


class _Interruption(Exception):
    """The watchdog's exceptions. One raised to force a call out re-arms the force when
    the plugin lets go of it (its ``except`` block ended): see ``Watchdog._line``."""

    rearm: Callable[[FrameType | None], None] | None = None

    def __del__(self) -> None:
        rearm, self.rearm = self.rearm, None
        if rearm is not None:
            rearm(sys._getframe(1))


class PluginTimeout(_Interruption):
    """A plugin's hook ran longer than ``plugin_timeout`` seconds."""


class PluginInterrupted(_Interruption):
    """A second Ctrl-C or SIGTERM arrived while a plugin's hook was running."""


class Straight:
    """A round of calls run as one generated function, one call per line (see
    :func:`bz.plugins._rounds.straight`): the line its frame is at names the plugin.
    The function writes the calls out twice (untimed and timed), each block a line per
    plugin in the same order."""

    __slots__ = ("code", "firsts", "slots")

    def __init__(self, code: CodeType, slots: tuple[object, ...], firsts: tuple[int, ...]) -> None:
        self.code = code
        self.firsts = firsts
        """The line of the first plugin's call in each block (the others follow, one
        per line)."""
        self.slots = slots

    def position(self, line: int | None) -> int:
        """Which plugin's call ``line`` holds (its position; -1: no call's line)."""
        if line is not None:
            count = len(self.slots)
            for first in self.firsts:
                if 0 <= line - first < count:
                    return line - first
        return -1

    def at(self, line: int | None) -> object | None:
        """The slot called on ``line`` of the round (None: no call's line)."""
        index = self.position(line)
        return self.slots[index] if index >= 0 else None

    def index(self, traceback: TracebackType | None) -> int:
        """Which plugin's call an exception that passed through the round came from
        (its position; -1 when the round had not called one)."""
        while traceback is not None:
            if traceback.tb_frame.f_code is self.code:
                return self.position(traceback.tb_lineno)
            traceback = traceback.tb_next
        return -1


class Watchdog:
    """Which plugin call is running, and the thread that interrupts one that hangs."""

    __slots__ = (
        "__weakref__",
        "_alarm",
        "_escalating",
        "_expired",
        "_forced",
        "_previous",
        "_stop",
        "_trace",
        "boundaries",
        "give_up",
        "round",
        "running",
        "seconds",
    )

    def __init__(self) -> None:
        self.running: object | None = None
        """The slot of the plugin being called (None between rounds; in a round, the
        plugin called last until the next one starts), or the :class:`Straight` round
        running now: :meth:`current` tells which plugin that round is calling."""
        self.round: object = None
        """A new object for each round of calls: with ``running``, it tells one call
        apart from the next call of the same plugin (no clock is read per call)."""
        self.seconds: float | None = None
        self.boundaries: frozenset[CodeType] = frozenset()
        """The sandbox's frames a plugin's call starts from (tracing stops there)."""
        self.give_up: Callable[[object, int, str], None] | None = None
        """Called from the escalation thread when a hook never returns: reports and exits."""
        self._expired: object | None = None
        self._previous: Any = None
        self._alarm = False
        """Whether our SIGALRM handler is installed (``_previous`` is what it replaced)."""
        self._stop: threading.Event | None = None
        self._escalating: tuple[object, object] | None = None
        """The call being escalated: (slot, round)."""
        self._forced: _Interruption | None = None
        """What every line of the escalated call raises (a new one each time), once forced."""
        self._trace: Any = None

    def arm(self, seconds: float | None) -> None:
        """Start watching with this timeout (None: off). Main thread only, else a no-op."""
        self.disarm()
        if seconds is None or threading.current_thread() is not threading.main_thread():
            return
        self.seconds = seconds
        self._install_alarm()
        self._stop = threading.Event()
        thread = threading.Thread(
            target=_watch,
            args=(weakref.ref(self), self._stop, seconds, threading.main_thread().ident),
            name="bz-plugin-timeout",
            daemon=True,
        )
        thread.start()

    def _install_alarm(self) -> None:
        if not self._alarm:
            self._previous = signal.signal(signal.SIGALRM, self._interrupt)
            self._alarm = True

    def disarm(self) -> None:
        """Stop the thread and put the previous SIGALRM handler back."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            heartbeat(None)
        if self._alarm and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, self._previous)
            self._alarm = False

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        forced = self._forced
        if forced is not None and self._forcing():
            self._force(frame)
            raise self._fresh(forced)
        expired, self._expired = self._expired, None
        call = self.current(frame) if expired is not None else None
        if call is not None and expired is call[0]:
            name = getattr(expired, "name", "?")
            error = PluginTimeout(
                f"plugin {name!r} ran longer than plugin_timeout ({self.seconds:g} s)"
            )
            self.escalate(call, 1, error)
            raise error
        previous = self._previous
        if callable(previous):  # someone else's SIGALRM
            previous(signum, frame)

    def current(
        self, frame: FrameType | None = None, thread: int | None = None
    ) -> tuple[object, object] | None:
        """The call running now, as (slot, what tells it from the plugin's other calls),
        or None. In a :class:`Straight` round the stack is read: from ``frame``, else
        from ``thread``'s innermost frame, else from the caller's."""
        running = self.running
        if type(running) is not Straight:
            return None if running is None else (running, self.round)
        if frame is None:
            frame = sys._getframe(1) if thread is None else sys._current_frames().get(thread)
        code = running.code
        while frame is not None:
            if frame.f_code is code:
                slot = running.at(frame.f_lineno)
                # The round's frame tells this call from the plugin's next one.
                return None if slot is None else (slot, frame)
            frame = frame.f_back
        return None

    def expire(self, running: object) -> None:
        """Called by the thread: mark ``running`` as overdue (the signal follows)."""
        self._expired = running

    def interrupt_running(self, signum: int) -> None:
        """From a signal handler: fail the plugin whose hook is running now, if any.

        A second Ctrl-C or SIGTERM while a hook runs means that hook kept the run from
        stopping after its step: it becomes that plugin's fault (logged with its stack,
        quarantined, rewound) and the loop goes on to stop cleanly, with a checkpoint.
        Returns when no plugin is running.
        """
        call = self.current()
        if call is not None:
            name = getattr(call[0], "name", "?")
            error = PluginInterrupted(
                f"plugin {name!r} was still running when a second "
                f"{signal.Signals(signum).name} arrived"
            )
            # Should the hook swallow it: forced out, or the process ends (143 / 130).
            self.escalate(call, 128 + signum, error)
            raise error

    # -- escalation ----------------------------------------------------------------------

    def escalate(self, call: tuple[object, object], exit_code: int, error: _Interruption) -> None:
        """The running ``call`` (see :meth:`current`) was just interrupted with ``error``:
        make sure it ends.

        Starts (once per call) the thread that forces the call out after ``GRACE_S``
        and ends the process with ``exit_code`` after ``EXIT_AFTER_S``.
        """
        if self._escalating is not None and all(map(operator.is_, self._escalating, call)):
            return
        self._escalating = call
        self._forced = None
        if threading.current_thread() is threading.main_thread():
            self._install_alarm()  # the force arrives as SIGALRM, also without a timeout
        main = threading.main_thread().ident
        thread = threading.Thread(
            target=_escalate,
            args=(weakref.ref(self), call, exit_code, error, main),
            name="bz-plugin-escalation",
            daemon=True,
        )
        thread.start()

    def _force(self, frame: FrameType | None) -> None:
        # In the main thread (a signal handler): every frame of the plugin's call, and
        # every frame it starts, raises at its next line until the call is left.
        boundaries = self.boundaries
        while (
            frame is not None
            and frame.f_code not in boundaries
            and frame.f_code.co_filename != ROUND_FILE  # a generated round (_rounds)
        ):
            frame.f_trace = self._line
            frame = frame.f_back
        if self._trace is None:
            self._trace = (sys.gettrace(),)
        sys.settrace(self._call)  # again: a raise from a trace function turned it off

    def _call(self, frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code in _OWN_CODES or not self._forcing():
            return None
        return self._line

    def _line(self, frame: FrameType, event: str, arg: object) -> Any:
        # A line event in a frame of the forced call: the hook caught the exception and
        # goes on (its ``except`` body): raise again, from there. An exception from a
        # trace function turns tracing off, so this climbs one ``try`` per force; the
        # escalation thread forces again every half second (see ``_escalate``).
        forced = self._forced
        if event == "line" and forced is not None and self._forcing():
            raise self._fresh(forced)
        return self._line

    def _fresh(self, forced: _Interruption) -> _Interruption:
        # A new exception each time: when the hook drops one, it turns tracing on again.
        error = type(forced)(*forced.args)
        error.rearm = self._rearm
        return error

    def _rearm(self, frame: FrameType | None) -> None:
        # Only builtins before ``_force``: any Python frame here would be traced too.
        if threading.get_ident() == _MAIN_THREAD and self._forcing():
            self._force(frame)

    def _forcing(self) -> bool:
        escalating = self._escalating
        if escalating is None:
            return False
        call = self.current()
        return call is not None and escalating[0] is call[0]

    def settle(self) -> None:
        """The escalated call has ended (its exception reached the sandbox): stop tracing."""
        self._escalating = None
        self._forced = None
        if self._trace is not None:
            (previous,) = self._trace
            self._trace = None
            sys.settrace(previous)


_OWN_CODES = frozenset(
    method.__code__
    for method in (
        Watchdog._interrupt,
        Watchdog._force,
        Watchdog._line,
        Watchdog._forcing,
        Watchdog._fresh,
        Watchdog._rearm,
        Watchdog.current,
        Straight.at,
        Straight.position,
        _Interruption.__del__,
    )
)


def _escalate(
    owner: weakref.ref[Watchdog],
    call: tuple[object, object],
    exit_code: int,
    error: _Interruption,
    main: int | None,
) -> None:
    started = time.perf_counter()

    def still_running() -> Watchdog | None:
        watchdog = owner()
        escalating = watchdog._escalating if watchdog is not None else None
        if (
            watchdog is None
            or escalating is None
            or escalating[0] is not call[0]
            or escalating[1] is not call[1]
        ):
            return None
        current = watchdog.current(thread=main)
        if current is None or current[0] is not call[0]:
            return None
        return watchdog

    time.sleep(GRACE_S)
    watchdog = still_running()
    if watchdog is None or main is None:
        return
    watchdog._forced = type(error)(f"{error} (did not return when interrupted: forced out)")
    del watchdog
    deadline = started + EXIT_AFTER_S
    # Again every half second, should a signal be lost (two arriving as one).
    while time.perf_counter() < deadline:
        watchdog = still_running()
        if watchdog is None:
            return
        signal.pthread_kill(main, signal.SIGALRM)
        del watchdog
        time.sleep(min(0.5, max(0.0, deadline - time.perf_counter())))
    watchdog = still_running()
    if watchdog is not None and watchdog.give_up is not None:
        watchdog.give_up(call[0], exit_code, str(error))


def _watch(
    owner: weakref.ref[Watchdog], stop: threading.Event, seconds: float, main: int | None
) -> None:
    # Looks about ten times per timeout (at most once a second, at least every 10 ms):
    # a call is timed from the first look that sees it (the sandbox reads no clock), so
    # a hung call is stopped between the timeout and the timeout plus a tenth, and an
    # idle run pays nothing.
    interval = min(1.0, max(0.01, seconds / 10))
    deadline_of: tuple[object, float] | None = None  # the call signalled, and when
    seen: tuple[object, object, float] | None = None  # the call seen running, and since
    heartbeat(seconds)
    while not stop.wait(interval):
        watchdog = owner()
        if watchdog is None or main is None:
            heartbeat(None)
            return
        heartbeat(seconds)  # a supervising `bz train` sees that this thread can run
        call = watchdog.current(thread=main)
        running, round_ = call if call is not None else (None, None)
        now = time.perf_counter()
        if running is None:
            seen = None
        elif seen is None or seen[0] is not running or seen[1] is not round_:
            seen = (running, round_, now)
        overdue = seen is not None and now - seen[2] >= seconds
        # A plugin that swallows the first interruption gets another every timeout.
        repeat = deadline_of is None or deadline_of[0] is not running or now > deadline_of[1]
        if overdue and repeat:
            watchdog.expire(running)
            deadline_of = (running, now + seconds)
            # From here too, not only from the handler: the signal may never land.
            name = getattr(running, "name", "?")
            watchdog.escalate(
                (running, round_),
                1,
                PluginTimeout(f"plugin {name!r} ran longer than plugin_timeout ({seconds:g} s)"),
            )
            signal.pthread_kill(main, signal.SIGALRM)
        del watchdog, call, running, round_
    heartbeat(None)


__all__ = ["PluginInterrupted", "PluginTimeout", "Straight", "Watchdog"]
