"""``bz validate`` and ``bz check-config``: a run or a config looked at without training.

``validate`` calls :func:`bz._validate.validate` (the loop's own validation pass) and prints its
report; ``check-config`` runs the loader's checks without creating any plugin. Exit codes
are the group's (see :mod:`bz.commands.main`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any

import click

from bz._errors import (
    BzError,
    ConfigError,
    TrainingError,
    UsageError,
    user_frame,
    validation_batch,
)
from bz.commands import supervise
from bz.commands.options import config_option, traceback_option

if TYPE_CHECKING:
    from bz.plugins._faults import PluginFault

__all__ = ["check_config", "validate"]


# -- validate ----------------------------------------------------------------------------


@click.command()
@config_option
@click.option(
    "--checkpoint",
    "checkpoint_path",
    type=click.Path(exists=True),  # a sharded checkpoint is a folder
    help="Checkpoint (a file, or a sharded checkpoint's folder) or model.pt to evaluate "
    "(default: the run's model.pt when it finished, else its newest checkpoint).",
)
@click.option(
    "--best",
    is_flag=True,
    help="Evaluate the checkpoint `keep_best` ranks first (by its monitored value).",
)
@click.option("--device", help="Override `device` (auto, cpu, cuda, cuda:N, mps).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@traceback_option("Print the traceback of an exception raised by train.py's code.")
def validate(
    config_path: str | None,
    checkpoint_path: str | None,
    best: bool,
    device: str | None,
    as_json: bool,
    show_traceback: bool,
) -> None:
    """Evaluate a trained run on the validation data: loss and configured metrics.

    A finished run is evaluated as it ended (its model.pt, with early stopping's best
    weights if they were restored); an unfinished one from its newest checkpoint. Under
    ema's validate_with_ema, on the average the run's validation used. A damaged
    model.pt is refused (exit 2), never replaced by a checkpoint.
    """
    from bz import _logging
    from bz._validate import validate as run_validation

    # Warnings (a damaged checkpoint skipped) go to stderr; stdout holds the report.
    _logging.configure("console", "warning", stream=sys.stderr)
    overrides = {"device": device} if device is not None else None
    if best and checkpoint_path is not None:
        raise UsageError("--best and --checkpoint name two checkpoints: give one of them")
    try:
        path, payload, result = run_validation(
            config_path, checkpoint=checkpoint_path, overrides=overrides, best=best
        )
    except BzError as exc:
        if show_traceback and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the user's model, loss or data (sys.exit() too): one line
        if show_traceback:
            traceback.print_exception(exc, file=sys.stderr)
        batch = validation_batch(exc)
        where = f" at batch index {batch} of val_loader" if batch is not None else ""
        raise TrainingError(f"validation failed{where}: {user_frame(exc)}") from exc
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "epoch": payload["epoch"],
        "batch": payload.get("batch", 0),
        "step": payload["global_step"],
        "batches": result.batches,
        "weights": result.weights,
        "validation_loss": result.loss,
        "metrics": result.metrics,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    batch = payload.get("batch", 0)
    batches = f" + {batch} batches" if batch else ""
    where = f"epoch {payload['epoch']}{batches}, step {payload['global_step']}"
    click.echo(f"checkpoint       {path} ({where})")
    if result.weights == "ema":
        click.echo("weights          ema's average (validate_with_ema), as the run validated")
    click.echo(f"validation_loss  {result.loss:.6g}")
    for name, value in result.metrics.items():
        click.echo(f"{name:<16} {value:.6g}")


# -- check-config ------------------------------------------------------------------------


@click.command("check-config")
@config_option
@traceback_option("Print the traceback of each plugin that cannot be imported or configured.")
def check_config(config_path: str | None, show_traceback: bool) -> None:
    """Validate bzconfig.json, including every plugin's and metric's options.

    Plugins are imported and their options checked, but none is created (creating one
    may open files or connections). Exits 2 when train_script is missing or a listed
    plugin cannot be imported or configured (one line each on stderr).
    """
    from bz.config import find_config_file

    file = find_config_file(config_path)
    if supervise.may_supervise():
        # Run as a program: the checks run in a child, so that a plugin hung in native
        # code (which stops every thread of its process) is still named, within a bound.
        # This process imports nothing more (torch, plugins): it only watches.
        raise click.exceptions.Exit(supervise.supervise_check(str(file)))

    import structlog

    from bz import _supervision
    from bz._setup import missing_script_hint
    from bz.config import load_config
    from bz.metrics import build_metrics
    from bz.plugins._entries import entry_paths
    from bz.plugins._loader import check_plugin_options, discover
    from bz.plugins._names import ConfiguredOptions, check_monitors
    from bz.plugins._start_limit import start_limit
    from bz.training.checkpoint.best import check_monitor

    _supervision.attach()  # that child: tell the supervisor which plugin loads
    config = load_config(file)
    script = file.resolve().parent / config.train_script
    try:
        metrics = build_metrics(config.metrics)
        # The faults are reported here, once each, not as plugin_failed events too.
        discovery = discover()
        # Importing a plugin and checking its options is bounded as in `bz train`; one
        # that cannot be interrupted is named here as any other (no supervisor restarts).
        limit = start_limit(config.plugin_start_timeout, functools.partial(_hung, file))
        with structlog.testing.capture_logs(), limit:
            options, faults = check_plugin_options(config.plugins, config, discovery=discovery)
    except ConfigError as exc:
        raise exc.with_source(str(file)) from None
    if faults:
        for fault in faults:
            if show_traceback and fault.cause is not None:
                traceback.print_exception(fault.cause, file=sys.stderr)
        raise UsageError("\n".join(f"{file}: {fault.describe()}" for fault in faults))
    if not script.is_file():
        raise UsageError(
            f"{file}: train_script: {script} "
            f"{'is a folder, not a file' if script.is_dir() else 'does not exist'} "
            f"({missing_script_hint(config.train_script)})"
        )
    # train.py's setup may add metrics of its own, and decides whether there is
    # validation data, which only `bz train` knows: a watched name that none of the
    # config's metrics gives is reported, as `bz train` would refuse it, but not fatal.
    # A plugin that is not bz's own may add the name too (`bz train` then refuses
    # nothing, and the watcher finds out at the end of the first epoch): it is named.
    others = [name for name in options if not discovery.sources[name].builtin]
    adders = " or ".join(["train.py's setup", *(f"plugin {name!r}" for name in others)])
    for check, unless in (
        (
            functools.partial(
                check_monitors,
                [ConfiguredOptions(name, checked) for name, checked in options.items()],
                metrics,
                paths=entry_paths(config.plugins),
            ),
            adders,
        ),
        # keep_best reads the run's own values only: no plugin adds one there.
        (
            functools.partial(check_monitor, config.keep_best, metrics, validates=True),
            "train.py's setup",
        ),
    ):
        try:
            check()
        except ConfigError as exc:
            for line in exc.with_source(str(file)).render().splitlines():
                click.echo(f"{line} (unless {unless} adds it)", err=True)
    click.echo(f"{file}: OK ({len(options)} plugin(s), {len(config.metrics)} metric(s))")


def _hung(file: object, fault: PluginFault, exit_code: int) -> None:
    """A plugin hung while check-config imported or checked it, beyond interrupting (see
    ``start_limit``): its line, as the faults' above, and exit 2 (130 / 143 when a
    second Ctrl-C or SIGTERM ended it). The main thread is stuck in the plugin: this
    thread writes and ends the process."""
    from bz import _stdio, _supervision

    with contextlib.suppress(Exception):
        stream = _stdio.stderr()
        stream.write(f"bz: error: {file}: {fault.describe()}\n")
        stream.flush()
    code = UsageError.exit_code if exit_code == 1 else exit_code
    _supervision.report_outcome(code)  # the command finished: a supervisor exits with it
    os._exit(code)
