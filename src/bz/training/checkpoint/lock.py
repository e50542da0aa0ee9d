"""One writer per run: an operating-system lock on the run's checkpoint folder.

A second ``bz train`` of the same run is refused, naming the process that trains it
(:class:`RunLocked`); a killed process's lock ends with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
"""The run's lock file (held with an OS lock by the one process writing the run)."""
NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
"""``errno`` values of a filesystem that has no locks (the run then trains unlocked)."""

_held: set[int] = set()
"""The descriptors of the locks this process holds. A forked child (a ``DataLoader``
worker) closes its copies at once: ``flock`` belongs to the open file, which the fork
shares, so a worker that outlives ``fit`` (``persistent_workers``, a stateful loader's
iterator) or the killed training process would otherwise keep the run locked."""


def _close_held_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class RunLocked(Exception):
    """Another live process holds the run's lock; ``owner`` describes it."""

    def __init__(self, folder: Path, owner: Mapping[str, Any]) -> None:
        pid, host = owner.get("pid", "?"), owner.get("host", "?")
        since = f", since {owner['since']}" if owner.get("since") else ""
        super().__init__(
            f"another bz process (pid {pid} on {host}{since}) is training this run "
            f"({folder}); wait for it to finish or stop it"
        )
        self.owner = dict(owner)


class RunLock:
    """An exclusive lock on a run's folder: ``.lock``, holding the owner's PID and host.

    The lock is the operating system's (``flock``; ``msvcrt.locking`` on Windows), taken
    on the open file, so it ends with the process that holds it: the lock of a process
    that was killed is free at once and the next run takes it over, with no PID guessing.
    The file itself is never deleted (deleting it would let two processes lock two
    different files); it only says who holds the lock, for the error message.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLocked` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                raise RunLocked(self.path.parent, _read_owner(fd))
            owner = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(owner).encode("utf-8"))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _held.add(fd)

    def release(self) -> None:
        """Free the lock (closing the file frees it in any case)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held.discard(fd)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        _unlock(fd)  # closing alone leaves it held while a forked process has the file
        os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        return  # msvcrt's lock ends with the handle, which no child shares
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError, RecursionError):  # junk in the lock file names nobody
        return {}
    return data if isinstance(data, dict) else {}
