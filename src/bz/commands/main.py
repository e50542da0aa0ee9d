"""The ``bz`` group: every command registered, bz's errors turned into one line and a code.

Exit codes: 0 success, 1 training failed, 2 bad usage or configuration, 130
interrupted. Errors are one line on stderr, never a traceback (``--traceback`` on
``bz train`` shows one for failures inside training).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from bz import __version__, _stdio, _supervision
from bz._errors import BzError
from bz.commands import supervise
from bz.commands.catalog import list_metrics, list_plugins
from bz.commands.health import health
from bz.commands.init import init
from bz.commands.options import (
    EXIT_EVENT_WRITTEN,
    EXIT_INTERRUPTED,
    LAUNCH_ERRORS_ENV,
    fail,
    report_to_launcher,
    usage_message,
)
from bz.commands.report import report_command
from bz.commands.schema import config_schema
from bz.commands.train import train
from bz.commands.tune import tune_command
from bz.commands.verify import check_config, validate

__all__ = ["cli", "main"]


class _BzGroup(click.Group):
    """Turns bz's errors into one line on stderr and their exit code (for every command)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Click's own usage errors (an unknown option, a bad choice, ``--set`` without
        ``=``) as one line too, naming the command and where its help is."""
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        # bz's reports go through copies of descriptors 1 and 2 (a plugin may close the
        # originals), and whatever was closed is reopened before the process exits, so
        # the interpreter's last flush cannot change the exit code.
        _stdio.own()
        try:
            return self._main(*args, **kwargs)
        except SystemExit as exc:  # the code chosen: a supervisor's child has finished
            _supervision.report_outcome(exc.code)
            raise
        finally:
            _stdio.repair()

    def _main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `bz`: the help, as asked
                exc.show()
                sys.exit(exc.exit_code)
            message = usage_message(exc)
            fail(message)
            written = exc.ctx is not None and exc.ctx.meta.get(EXIT_EVENT_WRITTEN, False)
            if not written and _asks_for_json(exc.ctx, _arguments(args, kwargs)):
                _exit_event(exc.exit_code, message)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("bz: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BzError as exc:
            lines = str(exc).splitlines() or [type(exc).__name__]
            if not report_to_launcher("\n".join(lines)):
                for line in lines:
                    fail(line)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            # A process bz's launcher started is stopped by it when another one failed:
            # the launcher reports why (and a real Ctrl-C reaches it too).
            if not os.environ.get(LAUNCH_ERRORS_ENV):
                click.echo("bz: interrupted", err=True)
            # A second SIGTERM says which signal it was (143); plain Ctrl-C is 130.
            number = getattr(exc, "signal", None)
            ctx.exit(128 + int(number) if number is not None else EXIT_INTERRUPTED)


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """The command line click parsed (``main(args=...)``, else the process's own)."""
    given = kwargs.get("args", args[0] if args else None)
    return [str(a) for a in given] if given is not None else sys.argv[1:]


def _asks_for_json(ctx: click.Context | None, arguments: Sequence[str]) -> bool:
    """Whether the failed command is ``bz train`` (whose json stream always ends with an
    ``exit`` event) and the command line says ``--log-format json``.

    Read from the raw arguments, since click stopped before it parsed them all: the last
    ``--log-format`` wins, as it would have. A bad value (``--log-format xml``) is not
    json, and the format then is unknown: stderr's line is the only one.
    """
    # An option missing its value (`bz train --set`) fails before click has made train's
    # context, so the error carries none: the command is then the first argument.
    if ctx is None or isinstance(ctx.command, click.Group):
        if arguments[:1] != ["train"]:
            return False
    elif ctx.command.name != "train":
        return False
    chosen = None
    tokens = iter(arguments)
    for token in tokens:
        if token == "--":
            break
        if token == "--log-format":
            chosen = next(tokens, None)
        elif token.startswith("--log-format="):
            chosen = token.partition("=")[2]
    return chosen == "json"


def _exit_event(exit_code: int, error: str) -> None:
    """The ``exit`` event ``--log-format json`` ends stdout with, for a run that never began."""
    from bz import _logging

    _logging.configure("json", "info")
    _logging.get_logger("bz").error("exit", exit_code=exit_code, error=error)


@click.group(
    cls=_BzGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="bz")
def cli() -> None:
    """bz: train PyTorch models with sandboxed plugins.

    Put a model and data in train.py, settings in bzconfig.json, and run `bz train`.
    """


for _command in (
    train,
    validate,
    check_config,
    list_plugins,
    list_metrics,
    init,
    health,
    config_schema,
    report_command,
    tune_command,
):
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``bz`` console script (exits with the command's exit code)."""
    supervise.is_entry_point(argv)
    cli.main(args=list(argv) if argv is not None else None, prog_name="bz")
