"""The channel to a process plugin's process: starting it, bounded sends, bounded waits.

:mod:`bz.plugins._isolated` (the proxy, starting plugins) talks to each child through one
:class:`Channel`; the child's side is :mod:`bz.plugins._isolated_child`.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import pickle
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

QUEUE_LIMIT = 64
"""Batch-level messages on their way to a process plugin at most (then: dropped)."""
BYTES_LIMIT = 64 * 1024
"""Bytes of messages on their way at most (below a socket's buffer: a send never blocks)."""
READ_AT = 8
"""Batch-level calls read the replies that arrived once this many messages are out."""
LONGEST_POLL_S = 3600.0
"""The longest single wait for a process plugin's reply (longer limits wait in pieces)."""


class IsolatedPluginError(Exception):
    """What a plugin in its own process did: raised in a hook, ended its process, or did
    not answer within ``plugin_timeout``."""


_CHILDREN: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _end_children() -> None:
    # A child left running (a run that failed before end_training_session) ends with
    # the training process.
    for process in list(_CHILDREN):
        with contextlib.suppress(Exception):
            process.kill()
            process.wait(timeout=5)


class Channel:
    """The socket to one child, with the messages on their way (bounded)."""

    def __init__(self, process: subprocess.Popen[bytes], connection: Connection) -> None:
        self.process = process
        self.connection = connection
        self.in_flight: collections.deque[int] = collections.deque()
        self.bytes = 0
        self.closed = False

    def post(self, message: object, limit: bool) -> bool:
        """Send ``message``; with ``limit``, only if the queue has room (else False)."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        size = len(data)
        if limit and (len(self.in_flight) >= QUEUE_LIMIT or self.bytes + size > BYTES_LIMIT):
            return False
        try:
            self.connection.send_bytes(data)
        except OSError as exc:
            raise IsolatedPluginError(self.ended()) from exc
        self.in_flight.append(size)
        self.bytes += size
        return True

    def ready(self) -> bool:
        """Whether a reply (or the child's end) can be read without waiting; asked only
        once :data:`READ_AT` messages are on their way (each question is a system call)."""
        return len(self.in_flight) >= READ_AT and self.connection.poll(0)

    def receive(self, deadline: float | None, waiting_for: str, limit: str = "") -> Any:
        """The next reply, waiting until ``deadline`` (``time.monotonic``) at most (what
        set it: ``limit``, by default ``plugin_timeout``)."""
        connection = self.connection
        if not self._answers_by(deadline):
            limit = limit or "plugin_timeout"
            raise IsolatedPluginError(f"{waiting_for} did not answer within {limit}")
        try:
            reply = pickle.loads(connection.recv_bytes())
        except (EOFError, OSError) as exc:
            raise IsolatedPluginError(self.ended()) from exc
        self.bytes -= self.in_flight.popleft()
        return reply

    def _answers_by(self, deadline: float | None) -> bool:
        """Whether a reply (or the child's end) can be read before ``deadline``.

        Waited for in pieces of :data:`LONGEST_POLL_S` at most: the operating system's
        wait takes milliseconds in a C int, and a limit of weeks (or an infinite one)
        is a limit still, not an ``OverflowError``."""
        connection = self.connection
        if deadline is None:
            return connection.poll(None)
        while True:
            remaining = deadline - time.monotonic()
            if connection.poll(max(0.0, min(remaining, LONGEST_POLL_S))):
                return True
            if remaining <= LONGEST_POLL_S:
                return False

    def ended(self) -> str:
        """How the child ended (it has, or is ending now)."""
        try:
            code = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "its process stopped answering"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"its process was killed by {signal.Signals(-code).name}"
        return f"its process exited with code {code}"

    def close(self, kill: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if kill:
            with contextlib.suppress(Exception):
                self.process.kill()
        with contextlib.suppress(Exception):
            self.process.wait(timeout=10)
        with contextlib.suppress(Exception):
            self.process.kill()
            self.process.wait(timeout=5)
        self.connection.close()
        _CHILDREN.discard(self.process)


def spawn() -> Channel:
    ours, theirs = socket.socketpair()
    command = [sys.executable, "-m", "bz.plugins._isolated_child", str(theirs.fileno())]
    # A session of its own: Ctrl-C at the terminal and signals to the training process's
    # group reach training, which decides; the child ends with it (see the child).
    process = subprocess.Popen(command, pass_fds=[theirs.fileno()], start_new_session=True)
    theirs.close()
    _CHILDREN.add(process)
    return Channel(process, Connection(ours.detach()))


__all__ = [
    "BYTES_LIMIT",
    "LONGEST_POLL_S",
    "QUEUE_LIMIT",
    "READ_AT",
    "Channel",
    "IsolatedPluginError",
    "spawn",
]
