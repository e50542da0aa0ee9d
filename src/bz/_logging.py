"""Where bz's events go: the host's logging, or, under ``bz train``, bz's own rendering.

Every bz module logs through :func:`get_logger`. Each call looks at the host:

- structlog configured (by the host, or by ``bz train`` through :func:`configure`): the
  event goes through structlog's configured processors, so the host renders it.
- structlog not configured: the event becomes a stdlib :class:`logging.LogRecord` on the
  ``bz`` logger hierarchy (``bz``, ``bz.plugin.<name>``), its fields set as attributes of
  the record (and all of them in ``record.bz``). With no handler anywhere, Python's
  last-resort handler shows warnings and errors on stderr; nothing reaches stdout.

Deciding per call, not at import, is what lets a host configure logging after importing
bz. ``configure`` renders for the command line (``console`` on stderr, ``json`` lines on
stdout); libraries embedding bz never call it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TextIO, cast

import structlog

if TYPE_CHECKING:
    from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

__all__ = ["LogFormat", "configure", "get_logger", "plugin_logger"]

LogFormat = Literal["console", "json"]

# LogRecord's own attributes: a field with one of these names stays only in `record.bz`
# (logging refuses to overwrite them through `extra`).
_RECORD_ATTRIBUTES = frozenset(
    {*vars(logging.LogRecord("", 0, "", 0, "", (), None)), "message", "asctime"}
)


def _to_record(logger: WrappedLogger, _method: str, event: EventDict) -> Any:
    """The last processor of the stdlib route: the arguments of ``Logger.<method>``."""
    fields = dict(event)
    name = str(fields.pop("event", ""))
    exc_info = fields.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    extra: dict[str, Any] = {k: v for k, v in fields.items() if k not in _RECORD_ATTRIBUTES}
    extra["bz"] = {"event": name, **fields}
    # The message alone is readable too (`logging.basicConfig()` prints only it).
    message = " ".join([name, *(f"{key}={value!r}" for key, value in fields.items())])
    return (message,), {"extra": extra, "exc_info": exc_info or None}


_STDLIB_PROCESSORS = [structlog.stdlib.filter_by_level, _to_record]


class _HostLogger:
    """A structlog-style logger that picks the host's route on every call (see module doc)."""

    __slots__ = ("_context", "_name", "_stdlib")

    def __init__(self, name: str, context: Mapping[str, Any]) -> None:
        self._name = name
        self._context = dict(context)
        self._stdlib: Any = None
        """The stdlib route, built once: it depends on nothing the host can change."""

    def _resolve(self) -> Any:
        if structlog.is_configured():
            logger = structlog.get_logger(self._name)
            return logger.bind(**self._context) if self._context else logger
        if self._stdlib is None:
            self._stdlib = structlog.wrap_logger(
                logging.getLogger(self._name),
                processors=_STDLIB_PROCESSORS,
                wrapper_class=structlog.stdlib.BoundLogger,
                context_class=dict,
                **self._context,
            )
        return self._stdlib

    def bind(self, **values: Any) -> _HostLogger:
        """A logger whose events also carry ``values``."""
        return _HostLogger(self._name, {**self._context, **values})

    def new(self, **values: Any) -> _HostLogger:
        """A logger whose events carry ``values`` and nothing bound before."""
        return _HostLogger(self._name, values)

    def unbind(self, *keys: str) -> _HostLogger:
        """A logger without ``keys`` (a missing key is an error, as in structlog)."""
        missing = [key for key in keys if key not in self._context]
        if missing:
            raise KeyError(missing[0])
        return self.try_unbind(*keys)

    def try_unbind(self, *keys: str) -> _HostLogger:
        """A logger without ``keys``, missing ones ignored."""
        return _HostLogger(self._name, {k: v for k, v in self._context.items() if k not in keys})

    def __getattr__(self, method: str) -> Any:
        # debug/info/warning/error/exception/critical/log/msg and the async variants.
        return getattr(self._resolve(), method)


def get_logger(name: str = "bz", **context: Any) -> FilteringBoundLogger:
    """bz's logger ``name`` (``bz``, ``bz.plugin.<plugin>``), following the host's set-up."""
    # The object answers every call FilteringBoundLogger promises (by delegation).
    return cast("FilteringBoundLogger", _HostLogger(name, context))


def plugin_logger(plugin: object) -> FilteringBoundLogger:
    """The logger a plugin should use: events carry ``plugin=<name>``.

    ``plugin`` is the plugin object or its name. :class:`bz.plugins.Plugin` subclasses
    have it as ``self.logger``; a plugin without a base class calls this::

        self.logger = plugin_logger("my_plugin")

    Under a host's stdlib logging the records arrive on ``bz.plugin.<name>``.
    """
    name = plugin if isinstance(plugin, str) else getattr(plugin, "name", type(plugin).__name__)
    return get_logger(f"bz.plugin.{name}", plugin=str(name))


# Events the command line renders itself in console mode (as a table, not a log line).
# (console_out shows epochs; the plugin summary is printed as a table; the last
# checkpoint is named once at the end instead of after every epoch; the run's start and
# end are `training_started` and the closing `bz: trained ...` / `bz: error: ...` line.)
_RENDERED_BY_CLI = frozenset(
    {"plugin_summary", "epoch_finished", "checkpoint_saved", "run_started", "run_finished"}
)


def _drop_rendered_by_cli(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    if event.get("event") in _RENDERED_BY_CLI:
        raise structlog.DropEvent
    return event


class _LineWriter:
    """Writes rendered events to a stream, one line per event, safe to call from a signal
    handler.

    Ctrl-C and SIGTERM log ``interrupt_requested`` from their handler, which runs in the
    main thread between two bytecodes, possibly in the middle of this thread's own write
    of another line. structlog's ``WriteLogger`` holds a plain lock around each write,
    so the handler would wait forever on the lock its own thread holds: the process
    hung, and a plugin whose line it was was blamed when ``plugin_timeout`` ran out (a
    run quarantining ``early_stopping`` ended without its best weights). Here the lock
    is reentrant and a line that arrives while this thread is writing is kept and
    written right after the line it interrupted.

    One write per line (message and newline together), so lines from several processes
    sharing a pipe (torchrun) do not interleave.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.RLock()
        self._writing = False
        self._pending: list[str] = []

    def factory(self, *_args: object) -> _LineWriter:
        """structlog's ``logger_factory``: every logger writes through this one object."""
        return self

    def msg(self, message: str) -> None:
        with self._lock:  # another thread waits; this thread, in a handler, gets in
            if self._writing:  # a signal handler interrupted this thread's own line
                self._pending.append(message)
                return
            self._writing = True
            try:
                self.stream.write(message + "\n")
                self.stream.flush()
                while self._pending:
                    self.stream.write(self._pending.pop(0) + "\n")
                    self.stream.flush()
            finally:
                self._writing = False

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure(
    log_format: LogFormat = "console", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog for ``bz`` commands (called by the CLI only)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if log_format == "json":
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
        output = stream or sys.stdout
    else:
        output = stream or sys.stderr
        colors = not os.environ.get("NO_COLOR") and output.isatty()
        processors = [
            *shared,
            _drop_rendered_by_cli,
            structlog.dev.ConsoleRenderer(colors=colors),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_LineWriter(output).factory,
        cache_logger_on_first_use=False,
    )
