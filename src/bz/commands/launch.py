"""``bz train --nproc-per-node N``: start the processes, and report the first failure once.

Each process started here finds :data:`~bz.commands.options.LAUNCH_ERRORS_ENV` and
writes its error there instead of printing it; the launcher prints the error of the
process that failed first (bad input: that line alone), so N processes failing alike
make one message, not N plus the launcher's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path

import click

from bz._errors import BzError, UsageError
from bz.commands.options import LAUNCH_ERRORS_ENV

__all__ = ["command_line", "launch"]


def command_line(ctx: click.Context, drop: set[str]) -> list[str]:
    """The command's own arguments again (``drop`` left out), to start it elsewhere."""
    assert ctx.info_name is not None
    args = [ctx.info_name]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in drop or param.name is None:
            continue
        value = ctx.params.get(param.name)
        if ctx.get_parameter_source(param.name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        if param.is_flag and param.secondary_opts:  # --x/--no-x
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            args.append(param.opts[0])
        elif param.multiple:
            for item in value or ():
                args += [param.opts[0], str(item)]
        else:
            args += [param.opts[0], str(value)]
    return args


def launch(nproc_per_node: int, args: list[str]) -> None:
    """Run ``bz <args>`` in several processes; a failed process fails the command, with
    the error it reported (see :data:`~bz.commands.options.LAUNCH_ERRORS_ENV`)."""
    with tempfile.TemporaryDirectory(prefix="bz-launch-") as errors:
        os.environ[LAUNCH_ERRORS_ENV] = errors  # the processes inherit it
        try:
            _launch_and_report(nproc_per_node, args, Path(errors))
        finally:
            del os.environ[LAUNCH_ERRORS_ENV]


def _launch_and_report(nproc_per_node: int, args: list[str], errors: Path) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from bz._distributed import launch as elastic_launch

    try:
        elastic_launch(nproc_per_node, args)
    except SignalException as exc:
        # Ctrl-C or SIGTERM reached the launcher, which passed it on to the processes;
        # they finished their step together and rank 0 said where the checkpoint is.
        raise click.exceptions.Exit(128 + int(exc.sigval)) from None
    except ChildFailedError as exc:
        # The first process to fail is the cause; the launcher stops the others.
        rank, first = exc.get_first_failure()
        message = f"process rank {rank} exited with code {first.exitcode}"
        if first.exitcode < 0:
            with contextlib.suppress(ValueError):
                message += f" (killed by {signal.Signals(-first.exitcode).name})"
        if len(exc.failures) > 1:
            message += "; the other processes were stopped"
        reported = errors / f"rank-{rank}.txt"
        said = reported.read_text(encoding="utf-8") if reported.is_file() else None
        if first.exitcode == UsageError.exit_code:
            # Bad input is the same for every process: its line, once, is the whole story.
            raise UsageError(said or message) from None
        raise BzError(f"{said}\n{message}" if said else message) from None
