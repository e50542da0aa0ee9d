"""bz's own output: descriptors it owns, whatever the code it runs does to stdout and stderr.

``bz`` commands call :func:`own` first: it duplicates descriptors 1 and 2, and bz's
reporting (log events, fault reports, the final line, the exit event) writes through
:func:`stdout` and :func:`stderr`, which use those copies. A plugin that closes
``sys.stdout``, ``sys.stderr`` or descriptor 1 or 2 loses its own output, not bz's.
:func:`repair` puts back what was closed (descriptors from bz's copies, ``sys.stdout`` /
``sys.stderr`` as new streams on them), so that the next writer, and the interpreter's
last flush at exit, find them open.

A library that embeds bz never calls :func:`own`: :func:`stdout` and :func:`stderr` are
then simply ``sys.stdout`` and ``sys.stderr``, and :func:`repair` does nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TextIO

__all__ = ["own", "repair", "stderr", "stdout"]


class _OwnedStream:
    """A text stream on a copy of descriptor 1 or 2.

    Before each write it flushes the stream it stands beside (``sys.stdout`` for the
    copy of 1), so bz's lines and the text others printed before them keep their order.
    """

    __slots__ = ("__weakref__", "_beside", "_file")

    def __init__(self, fd: int, beside: str) -> None:
        self._beside = beside
        self._file = open(  # noqa: SIM115  # lives as long as the process
            os.dup(fd), "w", buffering=1, encoding="utf-8", errors="backslashreplace"
        )

    def write(self, text: str) -> int:
        """Write ``text`` after what was printed beside it; never raises for a closed peer."""
        with contextlib.suppress(Exception):  # a peer closed or broken by someone else
            getattr(sys, self._beside).flush()
        written = self._file.write(text)
        self._file.flush()
        return written

    def flush(self) -> None:
        """Flush (each write is flushed already)."""
        self._file.flush()

    def isatty(self) -> bool:
        """Whether the descriptor is a terminal."""
        return self._file.isatty()

    def fileno(self) -> int:
        """bz's own copy of the descriptor."""
        return self._file.fileno()

    @property
    def closed(self) -> bool:
        """Never: nothing outside bz holds this stream."""
        return False


_owned: dict[int, _OwnedStream] = {}


def own() -> None:
    """Duplicate descriptors 1 and 2 for bz's reporting (the command line calls this).

    Streams without a descriptor (a test runner's buffers) are left as they are.
    """
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if fd in _owned:
            continue
        stream = getattr(sys, name)
        try:
            if stream is None or stream.fileno() != fd:
                continue
            _owned[fd] = _OwnedStream(fd, name)
        except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation included
            continue


def stdout() -> TextIO:
    """Where bz writes its machine-readable output (``sys.stdout`` unless owned)."""
    owned = _owned.get(1)
    return owned if owned is not None else sys.stdout  # type: ignore[return-value]  # duck-typed TextIO: write/flush/isatty/fileno


def stderr() -> TextIO:
    """Where bz writes its reports and final line (``sys.stderr`` unless owned)."""
    owned = _owned.get(2)
    return owned if owned is not None else sys.stderr  # type: ignore[return-value]  # duck-typed TextIO: write/flush/isatty/fileno


def repair() -> bool:
    """Reopen descriptors 1 and 2 and ``sys.stdout``/``sys.stderr`` where they were closed.

    Returns whether anything was put back. Costs two ``fstat`` calls when nothing was.
    """
    repaired = False
    for fd, owned in _owned.items():
        name = "stdout" if fd == 1 else "stderr"
        try:
            os.fstat(fd)
        except OSError:  # closed: point it at what it was, from bz's copy
            os.dup2(owned.fileno(), fd)
            repaired = True
        stream = getattr(sys, name)
        if stream is None or getattr(stream, "closed", False) or not _writable(stream):
            setattr(sys, name, open(fd, "w", buffering=1, closefd=False, encoding="utf-8"))  # noqa: SIM115  # replaces the process's stream
            repaired = True
    return repaired


def _writable(stream: TextIO) -> bool:
    try:
        stream.flush()
    except (OSError, ValueError):
        return False
    return True
