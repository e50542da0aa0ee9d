"""The supervising ``bz train``: training runs in a child; a child that did not finish is
reported, or restarted without the plugin it died in. ``bz check-config`` runs its checks
in a child the same way (:func:`supervise_check`): a plugin hung in native code while it
is imported or checked is named, not waited for.

No in-process boundary stops ``os._exit``, a segfault or a signal, so ``bz train`` (run
as a program) starts the same command again as its child and watches it. This process
never imports torch. The child writes into a shared block (see :mod:`bz._supervision`)
which plugin hook it is in, and, once its command has finished, the exit code it chose:

- finished: this process exits with that code (0, 1, 2, 130, 143, as always);
- ended without finishing inside a plugin's hook: training starts again without that
  plugin, resuming from the last verified checkpoint, or from the start when the run has
  none (``restart`` event; at most ``--max-restarts`` times); the same while a plugin
  loads (its import, options, ``create``), before training: it starts again without that
  plugin, where the command starts (the child had not looked for a checkpoint yet). The
  line says which, as far as the children told (:class:`_Again`);
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
    START,
    STARTS_FRESH,
    STARTS_FROM_CHECKPOINT,
    TIMEOUT_MS,
    TORCH_HOOK,
)

__all__ = [
    "Supervision",
    "is_entry_point",
    "may_supervise",
    "options",
    "supervise",
    "supervise_check",
]

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
        "or while a plugin loads (os._exit, a segfault, a signal): from the last checkpoint "
        "(from the start before the first), without that plugin. 0: report the death instead.",
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
    start: int = 0
    """Where its training started, once decided (``bz._supervision.START``; 0: it ended
    before that, loading plugins or running ``setup``)."""

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
    start = 0  # where the command as given starts training, once a child found out
    with _shared_block() as (block, fd), _stop_signals() as stops:
        while True:
            # Until the run has a checkpoint of its own, a restart runs the command as
            # given: `--no-resume` must not resume the old run it meant to start over.
            command = _entry + (["--resume"] if resumable else [])
            ending = _run_child(command, block, fd, quarantined, stops)
            resumable = resumable or ending.resumable
            start = max(start, ending.start)
            again = _Again(resumable, start)
            if ending.outcome is not None:
                return ending.outcome
            # A stop request while the child ran, or as it ended: no restart.
            stopped_by = ending.stopped_by or (stops[-1][0] if stops else None)
            if stopped_by is not None:
                return _interrupted(ending, stopped_by, options)
            retry = ending.plugin is not None or options.restart_on_crash
            if retry and restarts < options.max_restarts:
                restarts += 1
                _restart(ending, restarts, options, again)
                if ending.plugin is not None:
                    quarantined.append(_quarantine_entry(ending))
                continue
            _give_up(ending, options, retry, again)
            return 1


@attrs.frozen
class _Again:
    """Where training starts when the command runs again, as far as its children told."""

    resumable: bool
    """A child wrote a checkpoint of this run: a restart resumes (``--resume``) from the
    newest."""
    start: int
    """The furthest a child got in deciding where training starts (``START``)."""

    def starts_from(self) -> str:
        """The ``restart`` event's ``starts_from``: ``checkpoint``, ``start`` or
        ``newest checkpoint if any`` (no child got as far as looking: it ended loading
        plugins or in ``setup``, and the command decides)."""
        if self.resumable or self.start == STARTS_FROM_CHECKPOINT:
            return "checkpoint"
        return "start" if self.start == STARTS_FRESH else "newest checkpoint if any"

    def restart(self) -> str:
        """Where a restart starts training (after "restarting")."""
        return _RESTARTS[self.starts_from()]

    def later(self) -> str:
        """What running ``bz train`` again does (the end of the give-up line)."""
        return _LATER[self.starts_from()]


_RESTARTS = {
    "checkpoint": "from the last checkpoint",
    "start": "from the start",
    "newest checkpoint if any": "from the run's newest checkpoint (from the start if it has none)",
}
_LATER = {
    "checkpoint": "`bz train` resumes from the last checkpoint",
    "start": "no checkpoint was written: `bz train` starts it over",
    "newest checkpoint if any": (
        "`bz train` resumes from the run's newest checkpoint if it has one, else starts it over"
    ),
}


def _restart(ending: _Ending, count: int, options: Supervision, again: _Again) -> None:
    without = " without it" if ending.plugin is not None else ""
    line = (
        f"bz: training {ending.how()} {ending.where()}; restarting {again.restart()}{without} "
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
            starts_from=again.starts_from(),
        )


def _give_up(ending: _Ending, options: Supervision, retried: bool, again: _Again) -> None:
    why = ""
    if retried:
        why = f"; no restart left (--max-restarts {options.max_restarts})"
    elif ending.plugin is None:
        why = " (--restart-on-crash restarts it)"
    message = f"training {ending.how()} {ending.where()}{why}; {again.later()}"
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
    stacks: int | None = None,
) -> _Ending:
    block[:] = bytes(len(block))
    view = memoryview(block).cast("i")
    wake_read, wake_write = os.pipe()
    env = dict(os.environ)
    env[_supervision.SUPERVISOR_ENV] = f"{fd},{wake_write},{os.getpid()}"
    if quarantined:
        env[_supervision.QUARANTINE_ENV] = json.dumps(quarantined)
    passed: tuple[int, ...] = (fd, wake_write)
    if stacks is not None:
        env[_supervision.STACKS_ENV] = str(stacks)
        passed += (stacks,)
    try:
        child = subprocess.Popen(command, env=env, pass_fds=passed)
        os.close(wake_write)
        stopped_by, hung = _watch(child, wake_read, stops, view, stacks is not None)
    finally:
        os.close(wake_read)
        with contextlib.suppress(OSError):
            os.close(wake_write)
    outcome = view[OUTCOME] - 1 if view[OUTCOME] else None
    plugin, hook = _names(block, view[PLUGIN], view[HOOK])
    resumable, start = bool(view[RESUMABLE]), view[START]
    view.release()
    return _Ending(child.returncode, outcome, plugin, hook, stopped_by, hung, resumable, start)


def _watch(
    child: subprocess.Popen[bytes],
    wake: int,
    stops: list[tuple[int, float]],
    view: memoryview,
    stacks: bool = False,
) -> tuple[int | None, float | None]:
    """Wait for the child, passing on the stop signals it did not get itself; kill it
    when it hangs in a plugin's hook holding the interpreter (see :class:`_Pulse`),
    first asking it for its threads' stacks when ``stacks`` (see
    :data:`bz._supervision.STACKS_ENV`). Returns the stop signal received, if any, and
    how long a hung child hung."""
    received: dict[int, float] = {}  # signal -> when the child last reported it
    pending: list[tuple[int, float]] = []
    stopped_by: int | None = None
    pulse = _Pulse(view)
    open_ = True
    while child.poll() is None:
        hung = pulse.hung(time.monotonic())
        if hung is not None:
            if stacks:
                _ask_for_stacks(child)
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


def _ask_for_stacks(child: subprocess.Popen[bytes]) -> None:
    # Its faulthandler writes them from its signal handler, in C: the interpreter it
    # holds is not needed. Given a moment, not waited for (it may be past answering).
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, _supervision.STACKS_SIGNAL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(_STACKS_S)


_STACKS_S = 1.0
"""How long a hung child may take to write its stacks before it is killed."""


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


# -- bz check-config ------------------------------------------------------------------


def supervise_check(config_file: str) -> int:
    """``bz check-config`` as a program: the checks run in a child, watched as training
    is; returns the exit code.

    Importing a plugin and checking its options may hang in native code that holds the
    interpreter, where nothing in that process runs again (the in-process limit,
    ``plugin_start_timeout``, and its escalation included). Hung past the limit plus
    :data:`HUNG_AFTER_S`, the child is asked for its stacks and killed, and this process
    reports it as check-config reports every plugin it cannot check: one line naming the
    plugin, its stage and its own line where it hung; exit 2. A child that ends without
    finishing while a plugin loads (``os._exit``, a segfault) is that plugin's too.
    """
    assert _entry is not None
    with (
        _shared_block() as (block, fd),
        _stop_signals() as stops,
        tempfile.TemporaryFile() as stacks,
    ):
        ending = _run_child(_entry, block, fd, [], stops, stacks.fileno())
        if ending.outcome is not None:
            return ending.outcome
        stopped_by = ending.stopped_by or (stops[-1][0] if stops else None)
        if stopped_by is not None:
            click.echo(f"bz: interrupted: {ending.how()}", file=_stdio.stderr())
            return 128 + stopped_by
        stacks.seek(0)
        dump = stacks.read().decode("utf-8", "replace")
    if ending.plugin is None or not ending.loading:
        click.echo(f"bz: error: check-config {ending.how()}", file=_stdio.stderr())
        return 1
    stage = str(ending.hook)
    place = _hung_place(dump, ending.plugin)
    if ending.hung is not None:
        what = f"PluginStartTimeout: plugin {ending.plugin!r} hung in native code in its {stage}"
        error = f"{what} for {ending.hung:.0f} s (killed)"
    else:
        error = f"the process {ending.how()}"
    message = f"plugin {ending.plugin!r} failed in {stage}: {place}{error}"
    click.echo(f"bz: error: {config_file}: {message}", file=_stdio.stderr())
    return 2


def _hung_place(dump: str, plugin: str) -> str:
    """``file:line: ``: the plugin's own innermost line in the main thread's stack as the
    child's faulthandler wrote it (see :data:`bz._supervision.STACKS_ENV`), or ""."""
    import traceback

    from bz._entry_points import discover
    from bz._errors import package_line

    first, _, rest = dump.partition("\n")
    if not first.startswith("main "):
        return ""
    main = first.split()[1]
    frames: list[traceback.FrameSummary] = []
    in_main = False
    for line in rest.splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            in_main = main in line
            continue
        stripped = line.strip()
        if in_main and stripped.startswith('File "'):
            name, _, tail = stripped[len('File "') :].partition('", line ')
            number = tail.split(" ", 1)[0]
            if number.isdigit():
                frames.append(traceback.FrameSummary(name, int(number), "", line=""))
    source = discover("bz.plugins").sources.get(plugin)
    if source is None or not frames:
        return ""
    # faulthandler lists the innermost frame first.
    return package_line(reversed(frames), source.module)
