"""What several commands share: click options (each declared once), ``--set``, the error line.

``bz train``, ``bz validate``, ``bz check-config`` and ``bz tune`` take the same
``--config``; ``train`` and ``tune`` share ``--set``, ``--log-format``/``--log-level``
and ``--strict-plugins``; ``train``, ``check-config`` and ``tune`` have ``--traceback``
(worded for what each shows). A command lists the decorators it wants.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from bz import _stdio
from bz._converter import too_deep_message, too_long_number_message

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "EXIT_EVENT_WRITTEN",
    "EXIT_INTERRUPTED",
    "LAUNCH_ERRORS_ENV",
    "config_option",
    "fail",
    "log_options",
    "parse_assignment",
    "parse_assignments",
    "report_to_launcher",
    "set_option",
    "strict_plugins_option",
    "traceback_option",
    "usage_message",
]


EXIT_INTERRUPTED = 130
"""The shell's code for Ctrl-C (128 + SIGINT)."""


EXIT_EVENT_WRITTEN = "bz.exit_event_written"
"""Key in click's context ``meta``: ``bz train`` has ended its json stream with the
``exit`` event already, so the group does not write a second one."""


LAUNCH_ERRORS_ENV = "BZ_LAUNCH_ERROR_DIR"
"""Set by ``bz train --nproc-per-node N`` for its processes: the folder where each one
writes its error (``rank-R.txt``) instead of printing it, so that the launcher prints
the first failure's once rather than every process printing the same line."""


def report_to_launcher(message: str) -> bool:
    """Hand ``message`` to the launcher of this process (see :data:`LAUNCH_ERRORS_ENV`);
    False when not launched by bz or the file cannot be written (print it then)."""
    folder = os.environ.get(LAUNCH_ERRORS_ENV)
    if not folder:
        return False
    try:
        path = Path(folder) / f"rank-{int(os.environ.get('RANK', '0') or 0)}.txt"
        path.write_text(message, encoding="utf-8")
    except (OSError, ValueError):
        return False
    return True


def fail(message: str) -> None:
    """One ``bz: error: ...`` line on stderr."""
    click.echo(f"bz: error: {message}", file=_stdio.stderr())


def usage_message(exc: click.UsageError) -> str:
    """A usage error as ``bz: error:`` shows it: the command, the problem, where help is."""
    command = exc.ctx.command_path if exc.ctx is not None else "bz"
    return f"{command}: {exc.format_message()} (see '{command} --help')"


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as ``(key, value)``; VALUE is JSON, or a bare string (``device=cpu``).
    A VALUE that opens a list or table (``[``, ``{``) must be JSON."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--set")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        if raw.lstrip()[:1] in ("[", "{"):  # meant as a list or table, not as a string
            raise click.BadParameter(
                f"{key}: invalid JSON at column {exc.colno}: {exc.msg}", param_hint="--set"
            ) from None
        value = raw  # a bare word is a string: --set device=cpu
    except RecursionError:  # the parser recurses per level: far past MAX_DEPTH
        raise click.BadParameter(f"{key}: {too_deep_message()}", param_hint="--set") from None
    except ValueError:  # an integer longer than Python converts
        raise click.BadParameter(
            f"{key}: {too_long_number_message()}", param_hint="--set"
        ) from None
    return key, value


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """Every ``--set`` of a command, later ones winning."""
    return dict(parse_assignment(a) for a in assignments)


config_option: Callable[[F], F] = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file (default: $BZ_CONFIG, then ./bzconfig.json).",
)
"""``--config PATH`` (parameter ``config_path``)."""


def set_option(help: str) -> Callable[[F], F]:
    """``--set KEY=VALUE``, repeatable (parameter ``assignments``)."""
    return click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help=help)


def strict_plugins_option(help: str) -> Callable[[F], F]:
    """``--strict-plugins`` (parameter ``strict_plugins``)."""
    return click.option("--strict-plugins", is_flag=True, help=help)


def traceback_option(help: str) -> Callable[[F], F]:
    """``--traceback`` (parameter ``show_traceback``), worded for what the command shows."""
    return click.option("--traceback", "show_traceback", is_flag=True, help=help)


def log_options(format_help: str | None = None) -> Callable[[F], F]:
    """``--log-format console|json`` and ``--log-level`` (``log_format``, ``log_level``)."""
    log_format = click.option(
        "--log-format",
        type=click.Choice(["console", "json"]),
        default="console",
        show_default=True,
        help=format_help,
    )
    log_level = click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
    )

    def decorate(command: F) -> F:
        return log_format(log_level(command))

    return decorate
