"""Log rendering for the command line. Libraries embedding bz never call this.

``console``: human-readable lines on stderr. ``json``: one JSON object per line on
stdout (stderr keeps progress output), for programs that read bz's events.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Literal, TextIO

import structlog

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

LogFormat = Literal["console", "json"]

# Events the command line renders itself in console mode (as a table, not a log line).
# (console_out shows epochs; the plugin summary is printed as a table; the last
# checkpoint is named once at the end instead of after every epoch.)
_RENDERED_BY_CLI = frozenset({"plugin_summary", "epoch_finished", "checkpoint_saved"})


def _drop_rendered_by_cli(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    if event.get("event") in _RENDERED_BY_CLI:
        raise structlog.DropEvent
    return event


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
        # One write per line (message and newline together), so lines from several
        # processes sharing a pipe (torchrun) do not interleave.
        logger_factory=structlog.WriteLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
