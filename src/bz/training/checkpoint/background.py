"""``checkpoint_async: true``: checkpoints written by a background thread, one at a time.

Training hands over a write once its state is copied (:func:`cpu_copy` for the
single-file format; ``dcp.async_save`` copies the shards itself) and goes on. The next
write first waits for the previous one, so at most one is in flight and they land in
order; the run waits for the last one before it reports anything. A write's failure is
kept and handed back by :meth:`BackgroundWriter.wait`, so the loop reports it exactly
like a failed synchronous write.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs
import torch

T = TypeVar("T")


@attrs.define
class Outcome(Generic[T]):
    """How a background write ended: its result, or the exception it raised."""

    value: T | None = None
    error: BaseException | None = None


def cpu_copy(value: Any) -> Any:
    """``value`` with every tensor copied to the CPU: the training step after the hand-over
    changes the live tensors (parameters, optimizer state) in place."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        # A plain dict back (an OrderedDict's order is kept): torch.load reads dicts.
        return {key: cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(item) for item in value)
    return value


class BackgroundWriter(Generic[T]):
    """Runs one write at a time on a daemon thread.

    A daemon, so that a process that is told to end is never held by a stuck disk; the
    loop calls :meth:`wait` on every path that ends a run, so no finished write is lost.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._outcome: Outcome[T] | None = None
        self._tag: Any = None

    @property
    def busy(self) -> bool:
        """Whether a write was handed over and not yet waited for."""
        return self._thread is not None

    def submit(self, write: Callable[[], T], tag: Any = None) -> None:
        """Start ``write`` in the background; call :meth:`wait` first (one in flight)."""
        if self._thread is not None:
            raise RuntimeError("a background checkpoint write is still in flight")
        outcome: Outcome[T] = Outcome()

        def run() -> None:
            try:
                outcome.value = write()
            except BaseException as exc:  # handed to the loop, which reports it
                outcome.error = exc

        self._outcome, self._tag = outcome, tag
        self._thread = threading.Thread(target=run, name="bz-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> tuple[Outcome[T], Any] | None:
        """Wait for the write in flight; its outcome and tag, or None if there was none."""
        thread, outcome, tag = self._thread, self._outcome, self._tag
        if thread is None or outcome is None:
            return None
        thread.join()
        self._thread = self._outcome = self._tag = None
        return outcome, tag
