"""Ctrl-C and SIGTERM: stop after the current step, write a checkpoint, exit 130 / 143.

Alone, a process honours the request after the step it is in. Several processes must
stop after the same step: they vote on it every few steps (:class:`InterruptVote`).
"""

from __future__ import annotations

import _thread
import contextlib
import contextvars
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bz._distributed import vote_across
from bz._logging import get_logger, writes_reentrantly

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

_log = get_logger("bz")


class InterruptVote:
    """How several processes agree, after the same step, on what one of them saw.

    Every few optimizer steps they take a vote, on a CPU group (see ``control_group``):
    was any of them interrupted, did a plugin ask to stop, did ``max_time`` run out, is
    a time-based checkpoint due, and how long do steps take. Every process gets the same
    answer, so all act after the same step and all count the same number of steps to
    the next vote: about ``INTERVAL_S`` seconds of training. A vote takes 0.5-0.7 ms between two
    CPU processes on a 2-core machine (``benchmarks/distributed.py``), so the loop spends
    under 1% on them
    and honours Ctrl-C within about a tenth of a second (plus a step), far inside the
    30 s torchrun gives processes before it kills them.
    """

    INTERVAL_S = 0.1

    def __init__(self, group: Any) -> None:
        self.group = group
        self.period = 1  # the first vote comes after one step and measures it
        self.countdown = 1
        self.since = 0.0

    def start_epoch(self) -> None:
        self.countdown = self.period
        self.since = time.perf_counter()

    def due(self) -> bool:
        self.countdown -= 1
        return self.countdown == 0

    def __call__(self, *flags: bool) -> list[bool]:
        """For each flag, whether any process raised it (call when :meth:`due`)."""
        now = time.perf_counter()
        anyone, step_seconds = vote_across(flags, (now - self.since) / self.period, self.group)
        self.period = max(1, min(1024, math.ceil(self.INTERVAL_S / max(step_seconds, 1e-6))))
        self.countdown, self.since = self.period, now
        return anyone


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped training cleanly: the step finished and a checkpoint
    was written.

    ``checkpoint`` is the file training resumes from (None when checkpoints are off or
    the write failed); ``signal`` is the signal that asked for the stop (on the other
    processes of a distributed run, the one the asking process got, else SIGINT). It is
    a ``KeyboardInterrupt``, so code that handles Ctrl-C handles it.
    """

    def __init__(self, checkpoint: Path | None, signal_number: int = signal.SIGINT.value) -> None:
        super().__init__("training interrupted")
        self.checkpoint = checkpoint
        self.signal = signal.Signals(signal_number)


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: training stops at once, without finishing the step.

    ``signal`` is the second signal, so ``bz train`` exits with 130 for Ctrl-C and 143
    for SIGTERM (the shell's 128 + signal), as after the first.
    """

    def __init__(self, signal_number: int) -> None:
        super().__init__("stopped at once by a second signal")
        self.signal = signal.Signals(signal_number)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignalWitness:
    """Which stop signal (SIGINT, SIGTERM) arrived while a block ran, known even when
    its Python handler could not run.

    A handler is Python code run on top of whatever frame the signal lands in. Landing
    near the recursion limit (deep in a library's imports, in a recursive model
    builder) makes the handler itself fail with ``RecursionError``, and ``train.py``'s
    setup then seemed to fail on its own (``setup failed: RecursionError``, exit 1)
    instead of being stopped (143). The interpreter's C handler writes each signal's
    number to the wakeup file descriptor before any Python runs; this reads them back.
    Main thread only (as signals); elsewhere, and where no pipe can be made, it
    witnesses nothing. The bytes are handed on to a wakeup descriptor set before
    (an event loop's), so its owner still hears of them.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        """The first stop signal seen (read by :meth:`raise_if_stopped`)."""
        self._pipe: tuple[int, int] | None = None
        self._previous = -1

    def __enter__(self) -> StopSignalWitness:
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            read, write = os.pipe()
        except OSError:
            return self
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        try:
            self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(read)
            os.close(write)
            return self
        self._pipe = (read, write)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pipe is None:
            return
        self._read()
        signal.set_wakeup_fd(self._previous)
        for fd in self._pipe:
            os.close(fd)
        self._pipe = None

    def _read(self) -> None:
        assert self._pipe is not None
        while True:
            try:
                numbers = os.read(self._pipe[0], 512)
            except (BlockingIOError, InterruptedError):
                return
            if not numbers:
                return
            if self._previous >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._previous, numbers)
            for number in numbers:
                if self.signal is None and number in _STOP_SIGNALS:
                    self.signal = number

    def raise_if_stopped(self, failure: BaseException) -> None:
        """Raise :class:`TrainingInterrupted` (from ``failure``) when a stop signal
        arrived: whatever the block raised then is what the signal's handler became."""
        if self._pipe is not None:
            self._read()
        if self.signal is not None:
            raise TrainingInterrupted(None, self.signal) from failure


class InterruptGuard:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request the loop honours after
    the step.

    SIGTERM is what job schedulers, ``kill`` and torchrun's launcher send before they
    resort to SIGKILL. Installed only while ``fit`` runs and only in the main thread
    (the one Python delivers signals to); the previous handlers are put back afterwards.
    A second signal while a plugin hook runs fails that plugin (it kept the run from
    stopping); otherwise it raises :class:`StoppedAtOnce` (a ``KeyboardInterrupt``) at once.
    While installed, the handlers are kept against plugins that would replace them
    (``keep``: see ``PluginSet.keep_handlers``).
    """

    def __init__(
        self,
        blame: Callable[[int], None] | None = None,
        keep: Callable[[dict[int, Any] | None], None] | None = None,
    ) -> None:
        self.requested = False
        self.signal: int = signal.SIGINT.value
        self.blame = blame
        """Called on a second signal before stopping at once: it raises inside a plugin
        hook that is still running (see ``PluginSet.interrupt_running``), so a hung
        plugin is blamed and the loop still stops after its step, with a checkpoint."""
        self.keep = keep
        self._previous: dict[int, Any] = {}
        self._handler = self._handle
        """The very object installed: what the keeper compares the handlers with."""
        self._reported: threading.Event | None = None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for number in _STOP_SIGNALS:
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._handler)
            if self.keep is not None:
                self.keep({number.value: self._handler for number in _STOP_SIGNALS})
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush_report(timeout=5)  # the line is out before fit returns
        if self.keep is not None and self._previous:
            self.keep(None)
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if self.blame is not None:
                self.blame(signum)  # raises inside a plugin hook that is still running
            raise StoppedAtOnce(signum)
        self.requested = True
        self.signal = signum
        fields = {
            "signal": signal.Signals(signum).name,
            "hint": "finishing the current step and writing a checkpoint; "
            "press Ctrl-C again to stop at once",
        }
        if writes_reentrantly():
            _log.warning("interrupt_requested", **fields)
            return
        # A host's own structlog logger may be in the middle of a line on this thread,
        # holding a lock that is not reentrant: logging here would wait for it forever.
        # Another thread waits for that line to end instead (with this one's context).
        # Started with _thread: threading.Thread.start takes a lock of threading's own,
        # which the interrupted thread may be holding too.
        done = threading.Event()
        context = contextvars.copy_context()

        def report() -> None:
            try:
                context.run(_log.warning, "interrupt_requested", **fields)
            finally:
                done.set()

        self._reported = done
        _thread.start_new_thread(report, ())

    def flush_report(self, timeout: float | None = None) -> None:
        """Wait (up to ``timeout`` seconds) until ``interrupt_requested`` is logged, when
        another thread logs it (see :meth:`_handle`)."""
        reported = self._reported
        if reported is not None:
            reported.wait(timeout)
