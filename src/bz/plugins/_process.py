"""The process bz shares with its plugins: signal handlers and the standard streams.

While bz trains, its SIGINT and SIGTERM handlers (:mod:`bz.training.interrupts`) turn
Ctrl-C and a scheduler's SIGTERM into a checkpoint and exit 130 / 143. A plugin (or a
library it uses: some logging clients install a SIGTERM handler that calls
``sys.exit(0)``) must not take them over:

- ``signal.signal`` for one of those signals, called from inside a plugin's hook, raises
  :class:`SignalHandlerReplaced` there and installs nothing (the wrapper is in place only
  while bz trains, and passes every other call through);
- around every call of a hook above the batch level (``start_epoch``, ``end_epoch``, ...;
  not the per-batch ones, which must stay cheap), bz looks at the handlers: one replaced
  by other means during the call is put back, and the call fails with
  :class:`SignalHandlerReplaced` (the plugin's fault). One found replaced before the call
  is put back with a warning (nobody to blame). The same check reopens standard streams
  a plugin closed (:func:`bz._stdio.repair`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from bz import _stdio
from bz._logging import get_logger

_log = get_logger("bz")


class SignalHandlerReplaced(Exception):
    """A plugin replaced one of bz's signal handlers while bz trained."""


class ProcessKeeper:
    """bz's signal handlers, kept while it trains (see the module docstring)."""

    __slots__ = ("_handlers", "_original", "_thread", "_watchdog", "_wrapper")

    def __init__(self, watchdog: Any) -> None:
        self._watchdog = watchdog
        """Its ``running`` says whether a plugin's hook runs now."""
        self._handlers: dict[int, Any] = {}
        self._original: Callable[..., Any] | None = None
        self._wrapper: Callable[..., Any] | None = None
        self._thread = 0

    def keep(self, handlers: Mapping[int, Any]) -> None:
        """Keep ``handlers`` (signal number to handler) installed until :meth:`release`."""
        self._handlers = {int(number): handler for number, handler in handlers.items()}
        self._thread = threading.get_ident()
        if self._original is None:
            self._original = signal.signal
            self._wrapper = self._signal
            signal.signal = self._wrapper  # type: ignore[assignment]  # same call, narrower check

    def release(self) -> None:
        """Stop keeping them; ``signal.signal`` is Python's own again."""
        self._handlers = {}
        original, self._original = self._original, None
        if original is not None and signal.signal is self._wrapper:
            signal.signal = original
        self._wrapper = None

    def _signal(self, number: Any, handler: Any) -> Any:
        assert self._original is not None
        if (
            int(number) in self._handlers
            and threading.get_ident() == self._thread
            and self._watchdog.current() is not None
        ):
            raise SignalHandlerReplaced(
                f"a plugin may not replace bz's {signal.Signals(number).name} handler "
                "while it trains (Ctrl-C and SIGTERM stop training with a checkpoint)"
            )
        return self._original(number, handler)

    def kept(self, method: Callable[[Any], object]) -> Callable[[Any], object]:
        """``method`` (a hook above the batch level), with the handlers checked around it."""

        def call(view: Any) -> object:
            if self._handlers:
                self.settle()
            try:
                return method(view)
            finally:
                if self._handlers:
                    self.check()

        return call

    def settle(self) -> None:
        """Put back handlers replaced outside any plugin's call (nobody to blame)."""
        replaced = self._put_back()
        if replaced:
            _log.warning("signal_handlers_restored", signals=replaced)
        _stdio.repair()

    def check(self) -> None:
        """After a plugin's call: put back what it replaced, and fail the call if it did."""
        replaced = self._put_back()
        _stdio.repair()
        if replaced:
            names = " and ".join(replaced)
            raise SignalHandlerReplaced(
                f"the plugin replaced bz's {names} handler while it trained (put back)"
            )

    def _put_back(self) -> list[str]:
        original = self._original or signal.signal
        replaced = []
        for number, handler in self._handlers.items():
            if signal.getsignal(number) is not handler:
                original(number, handler)
                replaced.append(signal.Signals(number).name)
        return replaced


__all__ = ["ProcessKeeper", "SignalHandlerReplaced"]
