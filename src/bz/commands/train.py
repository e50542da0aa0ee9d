"""``bz train``: a run's life from the config file.

``train`` hands the config to :func:`bz._run.run` (or, with ``--nproc-per-node``, to the
elastic launcher; run as a program, under :mod:`bz.commands.supervise`) and renders the
outcome. Exit codes are the group's (see :mod:`bz.commands.main`). ``bz validate`` and
``bz check-config`` live in :mod:`bz.commands.verify`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bz import _stdio, _supervision
from bz._errors import BzError
from bz.commands import supervise
from bz.commands.launch import command_line, launch
from bz.commands.options import (
    EXIT_EVENT_WRITTEN,
    EXIT_INTERRUPTED,
    LAUNCH_ERRORS_ENV,
    config_option,
    fail,
    log_options,
    parse_assignments,
    set_option,
    strict_plugins_option,
    traceback_option,
    usage_message,
)

if TYPE_CHECKING:
    from bz.plugins._sandbox import PluginReport
    from bz.training.result import FitResult

__all__ = ["train"]


# -- train -------------------------------------------------------------------------------


@click.command()
@config_option
@click.option("--epochs", type=int, help="Override `epochs`.")
@click.option("--device", help="Override `device` (auto, cpu, cuda, cuda:N, mps).")
@click.option("--seed", type=int, help="Override `seed`.")
@click.option(
    "--compile/--no-compile",
    "compile_model",
    default=None,
    help="Override `compile` (torch.compile the model).",
)
@strict_plugins_option(
    "Make plugin faults fatal (plugin_errors: raise) instead of isolating them."
)
@click.option(
    "--checkpoint-interval",
    type=click.IntRange(min=0),
    help="Override `checkpoint_interval` (epochs between checkpoints; 0: none).",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    help="Override `checkpoint_dir` (relative to the current folder).",
)
@click.option(
    "--resume/--no-resume",
    default=None,
    help="Override `resume`: --no-resume starts the run over (its old checkpoints are "
    "replaced once it writes its first one).",
)
@set_option(
    "Override any key; VALUE is JSON or a bare string. "
    "Dotted keys reach into tables: --set hyperparameters.lr=0.01"
)
@log_options("json: one JSON event per line on stdout.")
@traceback_option("Print the full traceback when training fails.")
@click.option(
    "--smoke",
    is_flag=True,
    help="Check that the run starts: one training and one validation batch through every "
    "plugin and metric, no checkpoints written or read.",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    help="Train in N processes on this machine (torch.distributed's elastic launcher; "
    "for several machines run `torchrun ... -m bz train`).",
)
@supervise.options
def train(
    config_path: str | None,
    epochs: int | None,
    device: str | None,
    seed: int | None,
    compile_model: bool | None,
    strict_plugins: bool,
    checkpoint_interval: int | None,
    checkpoint_dir: str | None,
    resume: bool | None,
    assignments: Sequence[str],
    log_format: str,
    log_level: str,
    show_traceback: bool,
    smoke: bool,
    nproc_per_node: int | None,
    max_restarts: int,
    restart_on_crash: bool,
) -> None:
    """Train the model that train.py sets up, with the plugins bzconfig.json lists.

    Resumes from the newest checkpoint of the same run when there is one; Ctrl-C
    (or SIGTERM) finishes the current step, writes a checkpoint and exits with 130
    (143). Training runs in a child process: one that ends without finishing is
    reported (exit 1), or restarted without the plugin it died in.
    """
    if (nproc_per_node or 1) == 1 and supervise.may_supervise():
        options = supervise.Supervision(max_restarts, restart_on_crash, log_format == "json")
        raise click.exceptions.Exit(supervise.supervise(options))
    _supervision.attach()  # the child of a supervising `bz train`: tell it how far it got
    with _sigterm_stops():
        _log_then_launch_or_train(
            config_path,
            assignments,
            {
                "epochs": epochs,
                "device": device,
                "seed": seed,
                "compile": compile_model,
                "checkpoint_interval": checkpoint_interval,
                # A folder typed on the command line is relative to where the user is.
                "checkpoint_dir": str(Path(checkpoint_dir).resolve()) if checkpoint_dir else None,
                "resume": resume,
                "plugin_errors": "raise" if strict_plugins else None,
            },
            log_format,
            log_level,
            show_traceback,
            smoke=smoke,
            nproc_per_node=nproc_per_node,
        )


class Terminated(KeyboardInterrupt):
    """SIGTERM before training's own handlers are in place (while train.py's setup runs).

    A ``KeyboardInterrupt`` with ``signal``, as a second signal during training is, so
    the command exits 143 (128 + SIGTERM) and ``--log-format json`` ends with its
    ``exit`` event instead of the process dying silently with -15.
    """

    def __init__(self, signal_number: int) -> None:
        super().__init__("terminated")
        self.signal = signal.Signals(signal_number)


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while ``bz train`` runs (``fit`` installs its own
    handler on top, which finishes the step first, and puts this one back)."""

    def terminate(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log_then_launch_or_train(
    config_path: str | None,
    assignments: Sequence[str],
    named: dict[str, Any],
    log_format: str,
    log_level: str,
    show_traceback: bool,
    *,
    smoke: bool,
    nproc_per_node: int | None,
) -> None:
    """``bz train``'s body: configure logging, then launch several processes or train."""
    from bz import _logging

    processes = nproc_per_node or 1
    launching = processes > 1 and "LOCAL_RANK" not in os.environ
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank:  # other ranks speak up only when something is wrong
        log_level = "warning" if log_level in ("debug", "info") else log_level
    rendering: _logging.LogFormat = "json" if log_format == "json" else "console"
    _logging.configure(rendering, log_level)
    if "WORLD_SIZE" in os.environ:
        import structlog

        structlog.contextvars.bind_contextvars(rank=rank)
    # The processes bz's launcher starts leave the exit event to it: one for the run.
    exit_event = log_format == "json" and not os.environ.get(LAUNCH_ERRORS_ENV)
    with _outcome_line(exit_event), _logging.host_plugin_output(rendering, log_level):
        if launching:
            # Checked once here, so bad input is one line, not one per process.
            from bz._run import check_before_launch

            check_before_launch(config_path, _overrides(assignments, named), smoke=smoke)
            launch(
                nproc_per_node or 1, command_line(click.get_current_context(), {"nproc_per_node"})
            )
            return
        _train_and_report(
            config_path,
            assignments,
            named,
            log_format,
            show_traceback,
            rank,
            smoke=smoke,
        )


@contextlib.contextmanager
def _outcome_line(enabled: bool) -> Iterator[None]:
    """With ``--log-format json``, end stdout with one ``exit`` event whatever happens.

    The event carries ``exit_code`` and, for a failure, ``error`` (the same text as the
    one-line message on stderr), so a program reading the stream never has to guess
    from a missing line or the process status alone.
    """
    if not enabled:
        yield
        return
    from bz._logging import get_logger

    log = get_logger("bz")
    try:
        yield
    except BzError as exc:
        log.error("exit", exit_code=exc.exit_code, error=str(exc) or type(exc).__name__)
        raise
    except click.exceptions.Exit as exc:  # interrupted: 130 / 143
        log.warning("exit", exit_code=exc.exit_code, error="interrupted")
        raise
    except click.UsageError as exc:  # a bad --set
        if exc.ctx is None:  # click names the command later, as it leaves train
            exc.ctx = click.get_current_context()
        log.error("exit", exit_code=exc.exit_code, error=usage_message(exc))
        # The group writes the event for usage errors click finds before train runs.
        click.get_current_context().meta[EXIT_EVENT_WRITTEN] = True
        raise
    except KeyboardInterrupt as exc:
        # The code the group exits with: 128 + the signal when one is named (SIGTERM
        # during setup, a second SIGTERM during training), else Ctrl-C's 130.
        number = getattr(exc, "signal", None)
        code = 128 + int(number) if number is not None else EXIT_INTERRUPTED
        log.warning("exit", exit_code=code, error="interrupted")
        raise
    log.info("exit", exit_code=0)


def _train_and_report(
    config_path: str | None,
    assignments: Sequence[str],
    named: dict[str, Any],
    log_format: str,
    show_traceback: bool,
    rank: int,
    *,
    smoke: bool = False,
) -> None:
    """``bz train`` once logging is set up: run, then render the outcome."""
    overrides = _overrides(assignments, named)
    result = _run_reporting_failures(config_path, overrides, show_traceback, rank, smoke)
    _stdio.repair()  # what a plugin closed is open again for the closing lines
    if result.already_complete:
        if rank != 0:  # every process finds it; one line is enough
            return
        longer = "--set max_steps=N" if result.stopped_by == "max_steps" else "--epochs"
        click.echo(
            f"bz: nothing to train: this run already finished {result.epochs_completed} "
            f"epoch(s), {result.global_step} steps ({result.checkpoint}); raise {longer} "
            "to train longer or pass --no-resume to start over",
            err=True,
        )
        return
    if result.model_rebuilt and rank == 0:
        click.echo(
            f"bz: nothing to train: this run had finished; its final weights were rebuilt "
            f"from {result.checkpoint}",
            err=True,
        )
    if log_format == "console" and rank == 0:
        _print_outcome(result, smoke=smoke)
    if result.checkpoints_lost:
        # Training went on, but the run asked for files it does not have: a scheduler
        # or script must not take this for success.
        fail(
            f"{result.checkpoints_lost} checkpoint(s) could not be written "
            "(see checkpoint_write_failed / model_write_failed above)"
        )
        raise click.exceptions.Exit(1)


def _run_reporting_failures(
    config_path: str | None,
    overrides: dict[str, Any],
    show_traceback: bool,
    rank: int,
    smoke: bool,
) -> FitResult:
    """:func:`bz._run.run`, its failures turned into what the command line reports."""
    from bz._errors import TrainingError, training_context, training_position, user_frame
    from bz._run import run
    from bz.training.interrupts import TrainingInterrupted

    try:
        return run(config_path, overrides=overrides, smoke=smoke)
    except BzError as exc:
        _stdio.repair()
        if show_traceback and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        raise
    except TrainingInterrupted as exc:
        _stdio.repair()
        if rank == 0:  # the process that wrote the checkpoint speaks for all of them
            saved = f"; checkpoint {exc.checkpoint} written, `bz train` resumes from it"
            click.echo(f"bz: interrupted{saved if exc.checkpoint else ''}", err=True)
        # The shell's convention: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM).
        raise click.exceptions.Exit(128 + exc.signal.value) from None
    except KeyboardInterrupt as exc:
        position = training_position(exc)
        if position is None:  # a signal's (the group reports it: 130 / 143)
            raise
        # Raised by the code in training, not by a signal: Ctrl-C's code, and where.
        _stdio.repair()
        if show_traceback:
            traceback.print_exception(exc, file=sys.stderr)
        click.echo(
            f"bz: interrupted at {position}: {user_frame(exc)} "
            "(raised in your code, not by a signal)",
            err=True,
        )
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    except BaseException as exc:  # the user's own exception, which bz.run lets through
        _stdio.repair()
        if show_traceback:
            traceback.print_exception(exc, file=sys.stderr)
        summary = training_context(exc) or "training failed"
        raise TrainingError(f"{summary}: {user_frame(exc)}{_not_an_error(exc)}") from exc


def _not_an_error(exc: BaseException) -> str:
    """What the line adds for an exception that is not an ``Exception``: ``sys.exit()``
    (whatever code it names, even 0) and the rest of ``BaseException``'s family end
    training as surely as an error, so ``bz train`` must not pass their code on."""
    if isinstance(exc, SystemExit):
        return " (sys.exit() in your code; training did not finish)"
    if not isinstance(exc, Exception):
        return " (a BaseException, not an Exception; training did not finish)"
    return ""


_LOADING = frozenset({"import", "config", "create", "load"})
"""Fault stages before training: a plugin faulted there never ran."""

_STOPPED = {
    None: "",
    "plugin": " (stopped early)",
    "max_steps": " (max_steps reached)",
    "max_time": " (max_time reached; `bz train` again continues)",
}


def _print_outcome(result: FitResult, *, smoke: bool) -> None:
    """The console's closing lines: plugin times, then what was trained and written."""
    _print_plugin_summary(result.plugins)
    for report in result.plugins:
        if report.fault is not None and report.fault.stage in _LOADING:
            click.echo(
                f"bz: plugin {report.name!r} did not run: it failed in {report.fault.stage} "
                "(`bz train --strict-plugins` stops instead of training without it)",
                err=True,
            )
    if smoke:
        click.echo(
            f"bz: smoke run passed: {result.global_step} step(s), {len(result.plugins)} plugin(s)",
            err=True,
        )
        return
    if result.final is not None:
        click.echo(
            f"bz: trained {result.epochs_completed} epoch(s), {result.global_step} steps "
            f"in {result.seconds:.1f}s{_STOPPED[result.stopped_by]}",
            err=True,
        )
    if result.resumed_from is not None:
        click.echo(f"bz: resumed from {result.resumed_from}", err=True)
    if result.checkpoint is not None:
        click.echo(f"bz: last checkpoint {result.checkpoint}", err=True)
    if result.model is not None:
        click.echo(f"bz: trained weights in {result.model}", err=True)


def _overrides(assignments: Sequence[str], named: dict[str, Any]) -> dict[str, Any]:
    """``--set KEY=VALUE`` assignments, then the named options that were given."""
    overrides = parse_assignments(assignments)
    overrides.update({key: value for key, value in named.items() if value is not None})
    return overrides


def _print_plugin_summary(reports: Sequence[PluginReport]) -> None:
    if not reports:
        return
    click.echo("bz: plugin time in hooks:", err=True)
    for report in reports:
        status = f"  QUARANTINED: {report.fault.describe()}" if report.fault else ""
        click.echo(
            f"  {report.name:<20} {report.seconds * 1000:9.1f} ms"
            f"  {report.calls:>8} calls{status}",
            err=True,
        )
