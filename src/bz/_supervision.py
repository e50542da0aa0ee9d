"""The training process's side of a supervised ``bz train``: what it tells its supervisor.

``bz train`` runs training in a child process and watches it (see
:mod:`bz.commands.supervise`). The two share a small block of memory; the child writes
into it, the supervisor reads it once the child has ended:

- while a plugin's hook runs, which plugin and which hook (two integers the sandbox
  stores around each call: no message, no system call); while a plugin loads (its
  import, options, ``create``), which plugin and which stage of loading (the loader's
  boundary stores them alike);
- once the command has finished, the exit code it chose (a process that ends without
  writing it did not finish, whatever its own exit status says: ``os._exit(0)``);
- before plugins load, the names of those to load; once they are loaded, their names
  and the hooks' names, so the supervisor (which never imports torch or plugins) can
  name the plugin a death happened in.

The child also points Python's signal wake-up descriptor at the supervisor, so that a
Ctrl-C or SIGTERM the child received itself (a terminal's Ctrl-C reaches the whole
process group) is not forwarded to it a second time. Outside a supervised child,
:data:`where` is a scratch buffer and every function here does nothing.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BLOCK_BYTES",
    "LOADING",
    "LOAD_STAGES",
    "QUARANTINE_ENV",
    "STACKS_ENV",
    "STACKS_SIGNAL",
    "SUPERVISOR_ENV",
    "announce",
    "attach",
    "checkpoint_written",
    "heartbeat",
    "loading",
    "newest_checkpoint",
    "quarantined",
    "report_outcome",
    "restore",
    "resuming_from",
    "supervised",
    "training_starts",
    "where",
]

SUPERVISOR_ENV = "BZ_SUPERVISOR"
"""Set by the supervisor for its child: ``<block fd>,<wake-up fd>,<supervisor pid>``."""

STACKS_ENV = "BZ_SUPERVISOR_STACKS"
"""Set by a supervising ``bz check-config`` for its child: a file descriptor where the
child's faulthandler writes every thread's stack on :data:`STACKS_SIGNAL` (from its
signal handler, in C: it works while native code holds the interpreter), after a first
line ``main 0x...``, the main thread's id as faulthandler writes it."""
STACKS_SIGNAL = signal.SIGUSR1

QUARANTINE_ENV = "BZ_SUPERVISOR_QUARANTINE"
"""Set by the supervisor for a restarted child: a JSON list of the plugins to leave out,
each ``{"plugin", "hook", "error"}``: the hook it died in (or the stage of loading, one
of :data:`LOAD_STAGES`) and how."""

BLOCK_BYTES = 1 << 16
"""The shared block: 16 int32 slots, then the announced names (length-prefixed JSON)."""

PLUGIN, HOOK, OUTCOME, NAMES_LENGTH, BEAT, TIMEOUT_MS, RESUMABLE, START = 0, 1, 2, 3, 4, 5, 6, 7
"""Slots of the block's int32 view: the plugin number (1-based, 0: none) and hook
number (1-based) running now, the exit code + 1 once finished (0: not finished), the
length of the names' JSON, the ``plugin_timeout`` watchdog's heartbeat and its timeout
in milliseconds (0: not watching), 1 once this run has a checkpoint of its own (a
restart may then resume; before it, a run started over with ``--no-resume`` starts over
again instead of resuming the old run's checkpoints), and where training starts, once
decided (:func:`training_starts`; 0: not yet)."""
STARTS_FRESH, STARTS_FROM_CHECKPOINT = 1, 2
"""The values of ``START``: training starts from the beginning (no checkpoint to resume
from, or ``--no-resume``), or resumes from a checkpoint (which the same command finds
again)."""
TIMEOUT_CAP_S = 0x7FFFFFFF // 1000
"""The longest ``plugin_timeout`` the block holds (its int32 slot, in ms): about 24.8 days."""
NAMES_OFFSET = 64
"""Where the names' JSON starts (bytes)."""

TORCH_HOOK = 0xFFFF
"""The hook number of a torch hook a plugin registered (a forward, backward or
optimizer hook, run inside the plugin's boundary)."""

LOAD_STAGES = ("import", "config", "create", "load")
"""The stages of loading a plugin (no hook's name is one of them): its module's import,
its options, its ``create`` or constructor, bz's look at the created plugin."""
LOADING = 0xFF00
"""The hook number of the first stage of loading; the others follow (``LOADING + i``
for ``LOAD_STAGES[i]``). The plugin number counts the names announced before loading."""

where = memoryview(bytearray(NAMES_OFFSET)).cast("i")
"""The block's int32 view in a supervised child; elsewhere a scratch buffer (the sandbox
writes it only when :func:`supervised`, and on its slow paths)."""

_block: mmap.mmap | None = None
_newest: str | None = None
"""See :func:`newest_checkpoint`."""
_announced: dict[str, int] = {}
"""The plugin numbers of the names last announced (for :func:`loading`)."""


def attach() -> bool:
    """In the child of a supervised ``bz train``: map the shared block, die with the
    supervisor, report received signals to it. False when not supervised."""
    global where, _block
    given = os.environ.get(SUPERVISOR_ENV)
    if not given or _block is not None:
        return _block is not None
    block_fd, wake_fd, parent = (int(part) for part in given.split(","))
    _die_with_parent(parent)
    _block = mmap.mmap(block_fd, BLOCK_BYTES)
    where = memoryview(_block).cast("i")
    os.set_blocking(wake_fd, False)
    with contextlib.suppress(ValueError):  # only the main thread may set it
        signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
    stacks = os.environ.get(STACKS_ENV)
    if stacks:
        import faulthandler
        import threading

        fd = int(stacks)
        os.write(fd, f"main {threading.main_thread().ident:#018x}\n".encode())
        faulthandler.register(STACKS_SIGNAL, file=fd, all_threads=True)
    return True


def supervised() -> bool:
    """Whether this process is a supervised child (:data:`where` is read by anyone)."""
    return _block is not None


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the supervisor dies (Linux); gone already: exit now."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before the line above
        os._exit(1)


def announce(plugins: Sequence[str], hooks: Sequence[str]) -> None:
    """Tell the supervisor the names behind the plugin and hook numbers."""
    if _block is None:
        return
    _announced.clear()
    _announced.update((name, number) for number, name in enumerate(plugins, start=1))
    data = json.dumps({"plugins": list(plugins), "hooks": list(hooks)}).encode()
    data = data[: BLOCK_BYTES - NAMES_OFFSET]
    _block[NAMES_OFFSET : NAMES_OFFSET + len(data)] = data
    where[NAMES_LENGTH] = len(data)


def loading(plugin: str | None, stage: str = "") -> tuple[int, int]:
    """Which plugin loads now (``plugin`` among the names last announced), and at which
    of :data:`LOAD_STAGES`; None: none. Returns the plugin and hook numbers stored
    before, to put back with :func:`restore`."""
    previous = (where[PLUGIN], where[HOOK])
    if _block is None:
        return previous
    number = _announced.get(plugin, 0) if plugin is not None else 0
    where[HOOK] = LOADING + LOAD_STAGES.index(stage) if number and stage in LOAD_STAGES else 0
    where[PLUGIN] = number
    return previous


def restore(numbers: tuple[int, int]) -> None:
    """Put back what :func:`loading` returned."""
    if _block is not None:
        where[PLUGIN], where[HOOK] = numbers


def heartbeat(seconds: float | None) -> None:
    """From ``plugin_timeout``'s watchdog thread, about once a second while it watches
    (None: it stopped). A heartbeat that stops while a plugin's hook runs means native
    code holds the interpreter there: the supervisor ends the process after the timeout
    and the watchdog's own escalation have had their time."""
    if _block is None:
        return
    # An int32 slot: a timeout past about 24.8 days (or infinite) is stored as that.
    where[TIMEOUT_MS] = 0 if seconds is None else max(1, int(min(seconds, TIMEOUT_CAP_S) * 1000))
    where[BEAT] = (where[BEAT] + 1) & 0x3FFFFFFF


def checkpoint_written(path: str | os.PathLike[str]) -> None:
    """A checkpoint of this run is on disk at ``path`` (and a run started over has
    discarded the old run's): a restart after a death resumes from it."""
    resuming_from(path)
    if _block is not None:
        where[RESUMABLE] = 1


def training_starts(checkpoint: str | os.PathLike[str] | None) -> None:
    """Training is about to start: from ``checkpoint`` (resumed), or from the beginning
    (None). The supervisor then says where a restart starts (see ``START``)."""
    if checkpoint is not None:
        resuming_from(checkpoint)
    where[START] = STARTS_FRESH if checkpoint is None else STARTS_FROM_CHECKPOINT


def resuming_from(path: str | os.PathLike[str] | None) -> None:
    """The checkpoint this process's run resumes from, or wrote last (None: a run starts
    with none): what :func:`newest_checkpoint` names. Supervised or not."""
    global _newest
    _newest = None if path is None else os.fspath(path)


def newest_checkpoint() -> str | None:
    """The checkpoint a ``bz train`` after this process resumes from, as far as this
    process knows (None: it has resumed from none and written none)."""
    return _newest


def report_outcome(code: object) -> None:
    """The command finished (``sys.exit(code)``'s code): the supervisor exits with it."""
    if _block is None:
        return
    number = code if isinstance(code, int) else (0 if code is None else 1)
    where[PLUGIN] = 0
    where[OUTCOME] = number + 1


def quarantined() -> list[dict[str, Any]]:
    """The plugins the supervisor restarted this child without (see :data:`QUARANTINE_ENV`)."""
    given = os.environ.get(QUARANTINE_ENV)
    if not given or _block is None:
        return []
    try:
        entries = json.loads(given)
    except json.JSONDecodeError:
        return []
    return [entry for entry in entries if isinstance(entry, dict) and "plugin" in entry]
