"""The supervising ``bz train``: training runs in a child; a child that did not finish is
reported, or restarted without the plugin it died in.

No in-process boundary stops ``os._exit``, a segfault or a signal, so ``bz train`` (run
as a program) starts the same command again as its child and watches it. This process
never imports torch. The child writes into a shared block (see :mod:`bz._supervision`)
which plugin hook it is in, and, once its command has finished, the exit code it chose:

- finished: this process exits with that code (0, 1, 2, 130, 143, as always);
- ended without finishing inside a plugin's hook: training starts again, resuming from
  the last verified checkpoint, without that plugin (``restart`` event; at most
  ``--max-restarts`` times); the same while a plugin loads (its import, options,
  ``create``), before training: it starts again without that plugin;
- ended anywhere else: one ``bz: error:`` line (and the json ``exit`` event) saying how,
  exit 1; ``--restart-on-crash`` restarts it instead (no plugin left out).

Ctrl-C and SIGTERM sent to this process are passed on to the child, unless the child
received the same signal itself (a terminal's Ctrl-C reaches the whole process group):
it tells this process through its signal wake-up descriptor, so each stop request
reaches it once. The child dies with this process (Linux: ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import attrs
import click

from bz import _stdio, _supervision
from bz._supervision import (
    BEAT,
    HOOK,
    LOAD_STAGES,
    LOADING,
    NAMES_LENGTH,
    NAMES_OFFSET,
    OUTCOME,
    PLUGIN,
    RESUMABLE,
    TIMEOUT_MS,
    TORCH_HOOK,
)

__all__ = ["Supervision", "is_entry_point", "may_supervise", "options", "supervise"]

F = TypeVar("F", bound=Callable[..., Any])

_STOPS = (signal.SIGINT, signal.SIGTERM)
_OWN_SIGNAL_S = 0.5
"""A stop signal the child reports within this long of ours is the same request."""
_POLL_S = 0.05

_entry: list[str] | None = None
"""The command line of this process when ``bz`` runs as a program (see :func:`is_entry_point`)."""


def is_entry_point(argv: Sequence[str] | None) -> None:
    """Called by the ``bz`` program: this process may start itself again as a child.

    Only when the arguments are the process's own (``sys.orig_argv`` repeats them):
    ``bz``'s group called from Python (a test's ``CliRunner``) trains in its own process.
    """
    global _entry
    if argv is None or list(argv) == sys.argv[1:]:
        _entry = [sys.executable, *sys.orig_argv[1:]]


def may_supervise() -> bool:
    """Whether ``bz train`` here supervises a child: a program, not a child already, not
    a process of a distributed run (torchrun or ``--nproc-per-node``)."""
    return (
        _entry is not None
        and not os.environ.get(_supervision.SUPERVISOR_ENV)
        and "LOCAL_RANK" not in os.environ
        and "WORLD_SIZE" not in os.environ
    )


def options(command: F) -> F:
    """``bz train``'s ``--max-restarts N`` and ``--restart-on-crash``."""
    max_restarts = click.option(
        "--max-restarts",
        type=click.IntRange(min=0),
        default=3,
        show_default=True,
        help="Restart training at most N times when its process dies inside a plugin's hook "
        "or while a plugin loads (os._exit, a segfault, a signal): from the last checkpoint, "
        "without that plugin. 0: report the death instead.",
    )
    restart_on_crash = click.option(
        "--restart-on-crash",
        is_flag=True,
        help="Also restart (within --max-restarts) when the training process dies outside "
        "any plugin's hook.",
    )
    return max_restarts(restart_on_crash(command))


@attrs.frozen
class Supervision:
    """``bz train``'s options for its supervisor."""

    max_restarts: int = 3
    restart_on_crash: bool = False
    json_events: bool = False


@attrs.frozen
class _Ending:
    """How one child ended."""

    returncode: int
    outcome: int | None
    """The exit code its command chose (None: it did not finish)."""
    plugin: str | None
    hook: str | None
    stopped_by: int | None
    """The stop signal this process got while the child ran, if any."""
    hung: float | None = None
    """Seconds the child showed no sign of life in a plugin's hook before it was killed."""
    resumable: bool = False
    """Whether it wrote a checkpoint of this run (a run started over discards the old
    run's then): a restart resumes only after that."""

    def how(self) -> str:
        if self.hung is not None:
            return f"hung in native code for {self.hung:.0f} s (killed)"
        if self.returncode < 0:
            name = _signal_name(-self.returncode)
            return f"killed by {name}" + (" (a segfault)" if name == "SIGSEGV" else "")
        return f"exited with code {self.returncode} without finishing"

    @property
    def loading(self) -> bool:
        """Whether it ended while the plugin loaded (before training), not in a hook."""
        return self.plugin is not None and self.hook in LOAD_STAGES

    def where(self) -> str:
        if self.plugin is None:
            return "outside any plugin's hook"
        if self.loading:
            return f"in plugin {self.plugin!r} (while loading, in its {self.hook})"
        return f"in plugin {self.plugin!r} (hook {self.hook})"


def supervise(options: Supervision) -> int:
    """Run this command again as a child until it finishes; returns the exit code."""
    assert _entry is not None
    quarantined: list[dict[str, str]] = []
    restarts = 0
    resumable = False
    with _shared_block() as (block, fd), _stop_signals() as stops:
        while True:
            # Until the run has a checkpoint of its own, a restart runs the command as
            # given: `--no-resume` must not resume the old run it meant to start over.
            command = _entry + (["--resume"] if resumable else [])
            ending = _run_child(command, block, fd, quarantined, stops)
            resumable = resumable or ending.resumable
            if ending.outcome is not None:
                return ending.outcome
            # A stop request while the child ran, or as it ended: no restart.
            stopped_by = ending.stopped_by or (stops[-1][0] if stops else None)
            if stopped_by is not None:
                return _interrupted(ending, stopped_by, options)
            retry = ending.plugin is not None or options.restart_on_crash
            if retry and restarts < options.max_restarts:
                restarts += 1
                _restart(ending, restarts, options)
                if ending.plugin is not None:
                    quarantined.append(_quarantine_entry(ending))
                continue
            _give_up(ending, options, retry)
            return 1


def _restart(ending: _Ending, count: int, options: Supervision) -> None:
    without = " without it" if ending.plugin is not None else ""
    # Before training (a plugin loading) that process wrote no checkpoint to go back to.
    since = "" if ending.loading else " from the last checkpoint"
    line = (
        f"bz: training {ending.how()} {ending.where()}; restarting{since}{without} "
        f"(restart {count} of {options.max_restarts})"
    )
    click.echo(line, file=_stdio.stderr())
    if options.json_events:
        _event(
            "restart",
            plugin=ending.plugin,
            hook=ending.hook,
            ended=ending.how(),
            restart=count,
            max_restarts=options.max_restarts,
        )


def _give_up(ending: _Ending, options: Supervision, retried: bool) -> None:
    why = ""
    if retried:
        why = f"; no restart left (--max-restarts {options.max_restarts})"
    elif ending.plugin is None:
        why = " (--restart-on-crash restarts it)"
    message = (
        f"training {ending.how()} {ending.where()}{why}; `bz train` resumes from the last "
        "checkpoint"
    )
    click.echo(f"bz: error: {message}", file=_stdio.stderr())
    if options.json_events:
        _event("exit", exit_code=1, error=message, plugin=ending.plugin, hook=ending.hook)


def _interrupted(ending: _Ending, number: int, options: Supervision) -> int:
    """Ctrl-C or SIGTERM came, and the child ended without finishing: 130 / 143."""
    message = f"interrupted: training {ending.how()}"
    click.echo(f"bz: {message}", file=_stdio.stderr())
    if options.json_events:
        _event("exit", exit_code=128 + number, error=message)
    return 128 + number


def _quarantine_entry(ending: _Ending) -> dict[str, str]:
    """What the restarted child's report says of the plugin it leaves out."""
    how = ending.how()
    # "killed by SIGSEGV" and "hung in ..." read as a sentence with "was" / without it.
    was = "was " if how.startswith("killed") else ""
    return {
        "plugin": str(ending.plugin),
        "hook": str(ending.hook),
        "error": f"the training process {was}{how} (restarted without it)",
    }


def _event(name: str, **values: Any) -> None:
    """One json line on stdout, through bz's json log (as the child writes its own)."""
    from bz import _logging

    _logging.configure("json", "info")
    log = _logging.get_logger("bz")
    (log.error if name == "exit" else log.warning)(name, **values)


def _run_child(
    command: list[str],
    block: mmap.mmap,
    fd: int,
    quarantined: list[dict[str, str]],
    stops: list[tuple[int, float]],
) -> _Ending:
    block[:] = bytes(len(block))
    view = memoryview(block).cast("i")
    wake_read, wake_write = os.pipe()
    env = dict(os.environ)
    env[_supervision.SUPERVISOR_ENV] = f"{fd},{wake_write},{os.getpid()}"
    if quarantined:
        env[_supervision.QUARANTINE_ENV] = json.dumps(quarantined)
    try:
        child = subprocess.Popen(command, env=env, pass_fds=(fd, wake_write))
        os.close(wake_write)
        stopped_by, hung = _watch(child, wake_read, stops, view)
    finally:
        os.close(wake_read)
        with contextlib.suppress(OSError):
            os.close(wake_write)
    outcome = view[OUTCOME] - 1 if view[OUTCOME] else None
    plugin, hook = _names(block, view[PLUGIN], view[HOOK])
    resumable = bool(view[RESUMABLE])
    view.release()
    return _Ending(child.returncode, outcome, plugin, hook, stopped_by, hung, resumable)


def _watch(
    child: subprocess.Popen[bytes],
    wake: int,
    stops: list[tuple[int, float]],
    view: memoryview,
) -> tuple[int | None, float | None]:
    """Wait for the child, passing on the stop signals it did not get itself; kill it
    when it hangs in a plugin's hook holding the interpreter (see :class:`_Pulse`).
    Returns the stop signal received, if any, and how long a hung child hung."""
    received: dict[int, float] = {}  # signal -> when the child last reported it
    pending: list[tuple[int, float]] = []
    stopped_by: int | None = None
    pulse = _Pulse(view)
    open_ = True
    while child.poll() is None:
        hung = pulse.hung(time.monotonic())
        if hung is not None:
            child.kill()
            child.wait()
            return stopped_by, hung
        ready, _, _ = select.select([wake] if open_ else [], [], [], _POLL_S)
        now = time.monotonic()
        if ready:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                data = os.read(wake, 256)
                open_ = bool(data)  # end of file: the child is ending
                for number in data:
                    received[number] = now
        pending.extend(stops)
        stops.clear()
        for stop in list(pending):
            number, at = stop
            stopped_by = number
            if received.get(number, -1.0) >= at - _OWN_SIGNAL_S:
                pending.remove(stop)  # the child got this one itself
            elif now - at >= _OWN_SIGNAL_S:
                pending.remove(stop)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, number)
    if stops:
        stopped_by = stops[-1][0]
    return stopped_by, None


HUNG_AFTER_S = 15.0
"""How long past ``plugin_timeout`` the watchdog's heartbeat may stop while a plugin's
hook runs (its own escalation ends a hook 10 s after the interruption, when it can run)."""


class _Pulse:
    """The child's ``plugin_timeout`` watchdog heartbeat (see :func:`bz._supervision.heartbeat`).

    It stops only when the watchdog thread cannot run: native code holds the interpreter.
    Stopped for longer than the timeout plus :data:`HUNG_AFTER_S` while the same plugin's
    hook is running, the child is hung there, beyond what the watchdog can interrupt.
    """

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._seen: tuple[int, int, int] = (-1, 0, 0)
        self._since = 0.0

    def hung(self, now: float) -> float | None:
        view = self._view
        timeout_ms, seen = view[TIMEOUT_MS], (view[BEAT], view[PLUGIN], view[HOOK])
        if seen != self._seen or not timeout_ms or not seen[1]:
            self._seen, self._since = seen, now
            return None
        quiet = now - self._since
        return quiet if quiet > timeout_ms / 1000 + HUNG_AFTER_S else None


def _names(block: mmap.mmap, plugin: int, hook: int) -> tuple[str | None, str | None]:
    """The plugin and hook behind the numbers the child left in the block."""
    if not plugin:
        return None, None
    length = memoryview(block).cast("i")[NAMES_LENGTH]
    try:
        names = json.loads(bytes(block[NAMES_OFFSET : NAMES_OFFSET + length]))
        plugins, hooks = names["plugins"], names["hooks"]
        name = str(plugins[plugin - 1])
        if hook == TORCH_HOOK:
            hook_name: str | None = "a torch hook"
        elif LOADING <= hook < LOADING + len(LOAD_STAGES):
            hook_name = LOAD_STAGES[hook - LOADING]  # a stage of loading the plugin
        elif hook >= 1:
            hook_name = str(hooks[hook - 1])
        else:
            hook_name = None
    except (ValueError, KeyError, IndexError, TypeError):
        return f"number {plugin}", None
    return name, hook_name


@contextlib.contextmanager
def _shared_block() -> Iterator[tuple[mmap.mmap, int]]:
    """The block the child writes into: an unnamed file (memory on Linux), mapped."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("bz-supervisor")
    else:  # pragma: no cover - not Linux
        handle, path = tempfile.mkstemp(prefix="bz-supervisor-")
        os.unlink(path)
        fd = handle
    try:
        os.ftruncate(fd, _supervision.BLOCK_BYTES)
        with mmap.mmap(fd, _supervision.BLOCK_BYTES) as block:
            yield block, fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[tuple[int, float]]]:
    """Ctrl-C and SIGTERM recorded (signal, when) instead of ending this process."""
    received: list[tuple[int, float]] = []

    def record(number: int, _frame: object) -> None:
        received.append((number, time.monotonic()))

    previous = {number: signal.signal(number, record) for number in _STOPS}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
