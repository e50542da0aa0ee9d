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
stdout, through bz's own copies of them: :mod:`bz._stdio`); libraries embedding bz never
call it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TextIO, cast

import structlog

from bz import _stdio

if TYPE_CHECKING:
    from structlog.typing import EventDict, ExceptionRenderer, FilteringBoundLogger, WrappedLogger

__all__ = [
    "LogFormat",
    "configure",
    "get_logger",
    "host_plugin_output",
    "note_plugin_module",
    "plugin_logger",
    "writes_reentrantly",
]

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


def _short_expected_failures(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    # One line on the console, the traceback being noise there (JSON keeps it): a plugin
    # package that fails to import (the error names the distribution), and a plugin that
    # cannot use a file or folder (the error names it: a log_dir that is not writable).
    if event.get("event") != "plugin_failed":
        return event
    raised = event.get("exc_info")
    if isinstance(raised, tuple):
        raised = raised[1]
    if event.get("hook") == "import":
        if event.pop("exc_info", None) is not None:
            event["hint"] = "`bz check-config --traceback` shows the traceback"
    elif isinstance(raised, OSError) and raised.filename is not None:
        event.pop("exc_info", None)
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


# Tracebacks without the frames' local variables. structlog's defaults show them (rich's
# console tracebacks, and `dict_tracebacks` in JSON): a plugin's API key held in a local
# would reach the terminal and every log collector reading the JSON lines.
_JSON_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _console_tracebacks() -> ExceptionRenderer:
    """rich's traceback when rich is installed (as structlog would pick), else plain;
    locals never shown (``better-exceptions``, structlog's other choice, always shows
    them, so it is never used)."""
    try:
        import rich  # noqa: F401  # structlog's own test: is rich there?
    except ImportError:
        return structlog.dev.plain_traceback
    return structlog.dev.RichTracebackFormatter(show_locals=False)


def writes_reentrantly() -> bool:
    """Whether an event logged from a signal handler, in the middle of another line of
    the same thread, is written without waiting for that line.

    True for bz's own writer (:class:`_LineWriter`) and for the stdlib route (logging's
    handlers hold a reentrant lock). False when a host configured structlog itself:
    structlog's ``PrintLogger`` and ``WriteLogger`` hold a plain lock around each write,
    which the interrupted line still holds (see ``InterruptGuard``).
    """
    if not structlog.is_configured():
        return True
    factory = structlog.get_config().get("logger_factory")
    return isinstance(getattr(factory, "__self__", None), _LineWriter)


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
            _JSON_TRACEBACKS,
            structlog.processors.JSONRenderer(),
        ]
        output = stream or _stdio.stdout()
    else:
        output = stream or _stdio.stderr()
        colors = not os.environ.get("NO_COLOR") and output.isatty()
        processors = [
            *shared,
            _drop_rendered_by_cli,
            _short_expected_failures,
            structlog.dev.ConsoleRenderer(
                colors=colors, exception_formatter=_console_tracebacks()
            ),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_LineWriter(output).factory,
        cache_logger_on_first_use=False,
    )


# -- plugins' own output under `bz train` -------------------------------------------------
#
# Plugins written for the original bz-cli log through `logging.getLogger(__name__)` and
# `print()`. As a library bz leaves both alone (the host decides). Under `bz train` bz is
# the host: `host_plugin_output` shows plugins' stdlib records at bz's level as bz events
# (console on stderr, or JSON), and with `--log-format json` turns what anything prints
# into `printed` events, so stdout stays one JSON object per line. Nothing here runs per
# batch: a record or a print costs only when a plugin makes one.

_PLUGIN_LOGGERS: dict[str, str] = {}
"""Logger-name prefix (a plugin's top-level package) -> the plugin's name, or "" when
that package holds several plugins (its loggers are shown, attributed to none)."""

_PLUGIN_MODULES: dict[str, str] = {}
"""A plugin's own module -> the plugin's name: with several plugins in one package, the
module tells them apart."""


class _Hosting:
    """What :func:`host_plugin_output` set up, to undo it."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.leveled: list[logging.Logger] = []

    def let_through(self, prefix: str) -> None:
        logger = logging.getLogger(prefix)
        if logger.level == logging.NOTSET:  # a level the plugin set itself wins
            logger.setLevel(self.level)
            self.leveled.append(logger)


_hosting: _Hosting | None = None


def note_plugin_module(module: str, plugin: str) -> None:
    """Record that stdlib loggers under ``module``'s top-level package are ``plugin``'s.

    Called by the loader for every plugin it imports. It configures nothing by itself;
    under :func:`host_plugin_output` those loggers' records are shown at bz's level and
    what the package prints is attributed to ``plugin``.
    """
    prefix = module.split(".", 1)[0]
    if prefix == "bz" or not prefix:
        return  # bz's own modules log through bz's route
    _PLUGIN_MODULES.setdefault(module, plugin)
    if _PLUGIN_LOGGERS.setdefault(prefix, plugin) != plugin:
        _PLUGIN_LOGGERS[prefix] = ""
    if _hosting is not None:
        _hosting.let_through(prefix)


def _plugin_of(name: str) -> str | None:
    """The plugin a module or logger name belongs to: the plugin whose module it is or is
    under, else its package's only plugin; "" in a package of several plugins, None
    outside every plugin's package."""
    module = name
    while module:
        plugin = _PLUGIN_MODULES.get(module)
        if plugin is not None:
            return plugin
        module = module.rpartition(".")[0]
    return _PLUGIN_LOGGERS.get(name.split(".", 1)[0])


class _ForeignRecords(logging.Handler):
    """Stdlib records as bz events: plugins' at bz's level, anyone's warnings and errors.

    Installed on the root logger by :func:`host_plugin_output`, so it replaces Python's
    last-resort handler (which would print only the message, on stderr, even in JSON mode).
    """

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "bz" or record.name.startswith("bz."):
            return  # bz's own events are rendered by structlog already
        plugin = _plugin_of(record.name)
        if plugin is None and record.levelno < logging.WARNING:
            return  # other libraries' chatter stays as quiet as Python keeps it
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if plugin:
                fields["plugin"] = plugin
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            log = structlog.get_logger("bz")
            log.log(record.levelno, record.getMessage(), **fields)
        except Exception:
            self.handleError(record)


class _PrintedLines(io.TextIOBase):
    """``sys.stdout`` under ``--log-format json``: each printed line becomes an event.

    The event is ``printed`` with the line as ``text`` and, when a plugin's module
    printed it, ``plugin``. JSON events themselves go to the real stdout, which
    structlog was given before this replaced ``sys.stdout``.
    """

    def __init__(self, real: TextIO) -> None:
        super().__init__()
        self._real = real
        self._pending = ""

    @property
    def encoding(self) -> str:  # type: ignore[override]  # a plain attribute in TextIOBase's stub
        return self._real.encoding

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._real.fileno()

    def write(self, text: str) -> int:
        # The printing frame is the caller's (print is C code and adds no frame).
        plugin = _printing_plugin(sys._getframe(1))
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            _printed(line, plugin)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            line, self._pending = self._pending, ""
            _printed(line, _printing_plugin(sys._getframe(1)))


def _printing_plugin(frame: Any) -> str | None:
    """The plugin whose code is on the stack where something was printed, if any."""
    for _ in range(16):
        if frame is None:
            return None
        plugin = _plugin_of(str(frame.f_globals.get("__name__", "")))
        if plugin:
            return plugin
        frame = frame.f_back
    return None


def _printed(line: str, plugin: str | None) -> None:
    fields = {"text": line} if plugin is None else {"text": line, "plugin": plugin}
    structlog.get_logger("bz").info("printed", **fields)


@contextlib.contextmanager
def host_plugin_output(log_format: LogFormat, level: str) -> Iterator[None]:
    """Under a bz command: plugins' stdlib records and prints become bz events.

    Call after :func:`configure`. Records from the loggers of plugins' packages (see
    :func:`note_plugin_module`) show at ``level``; anyone's warnings and errors show as
    events too. With ``json``, ``sys.stdout`` turns printed lines into ``printed``
    events. Everything is put back on exit.
    """
    global _hosting
    hosting = _Hosting(logging.getLevelNamesMapping()[level.upper()])
    handler = _ForeignRecords()
    root = logging.getLogger()
    previous, _hosting = _hosting, hosting
    for prefix in _PLUGIN_LOGGERS:
        hosting.let_through(prefix)
    root.addHandler(handler)
    stdout = sys.stdout
    printed = _PrintedLines(stdout) if log_format == "json" else None
    if printed is not None:
        sys.stdout = printed
    try:
        yield
    finally:
        if printed is not None:
            printed.flush()
            if sys.stdout is printed:
                sys.stdout = stdout
        root.removeHandler(handler)
        for logger in hosting.leveled:
            logger.setLevel(logging.NOTSET)
        _hosting = previous
