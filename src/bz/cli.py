"""The ``bz`` command line. Commands parse options, call one library function, render.

Exit codes: 0 success, 1 training failed, 2 bad usage or configuration, 130
interrupted. Errors are one line on stderr, never a traceback (``--traceback`` on
``bz train`` shows one for failures inside training).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bz import __version__
from bz._assignments import parse_assignment
from bz._errors import BzError, ConfigError, UsageError

if TYPE_CHECKING:
    from bz._catalog import PluginDescription
    from bz._sandbox import PluginReport

EXIT_INTERRUPTED = 130


def _fail(message: str) -> None:
    click.echo(f"bz: error: {message}", err=True)


class _BzGroup(click.Group):
    """Turns bz's errors into one line on stderr and their exit code (for every command)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Click's own usage errors (an unknown option, a bad choice, ``--set`` without
        ``=``) as one line too, naming the command and where its help is."""
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `bz`: the help, as asked
                exc.show()
                sys.exit(exc.exit_code)
            command = exc.ctx.command_path if exc.ctx is not None else "bz"
            _fail(f"{command}: {exc.format_message()} (see '{command} --help')")
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
            for line in str(exc).splitlines() or [type(exc).__name__]:
                _fail(line)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            click.echo("bz: interrupted", err=True)
            # A second SIGTERM says which signal it was (143); plain Ctrl-C is 130.
            number = getattr(exc, "signal", None)
            ctx.exit(128 + int(number) if number is not None else EXIT_INTERRUPTED)


@click.group(
    cls=_BzGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="bz")
def cli() -> None:
    """bz: train PyTorch models with sandboxed plugins.

    Put a model and data in train.py, settings in bzconfig.json, and run `bz train`.
    """


# -- train -------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file (default: $BZ_CONFIG, then ./bzconfig.json).",
)
@click.option("--epochs", type=int, help="Override `epochs`.")
@click.option("--device", help="Override `device` (auto, cpu, cuda, cuda:N, mps).")
@click.option("--seed", type=int, help="Override `seed`.")
@click.option(
    "--compile/--no-compile",
    "compile_model",
    default=None,
    help="Override `compile` (torch.compile the model).",
)
@click.option(
    "--strict-plugins",
    is_flag=True,
    help="Make plugin faults fatal (plugin_errors: raise) instead of isolating them.",
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
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any key; VALUE is JSON or a bare string. "
    "Dotted keys reach into tables: --set hyperparameters.lr=0.01",
)
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    show_default=True,
    help="json: one JSON event per line on stdout.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--traceback",
    "show_traceback",
    is_flag=True,
    help="Print the full traceback when training fails.",
)
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
) -> None:
    """Train the model that train.py sets up, with the plugins bzconfig.json lists.

    Resumes from the newest checkpoint of the same run when there is one; Ctrl-C
    (or SIGTERM) finishes the current step, writes a checkpoint and exits with 130
    (143).
    """
    from bz import _logging

    named: dict[str, Any] = {
        "epochs": epochs,
        "device": device,
        "seed": seed,
        "compile": compile_model,
        "checkpoint_interval": checkpoint_interval,
        # A folder typed on the command line is relative to where the user is.
        "checkpoint_dir": str(Path(checkpoint_dir).resolve()) if checkpoint_dir else None,
        "resume": resume,
        "plugin_errors": "raise" if strict_plugins else None,
    }
    if nproc_per_node is not None and nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        # Checked once here, so a bad config is one line, not one per process.
        _check_before_launch(config_path, _overrides(assignments, named))
        _launch(nproc_per_node, _command_line(click.get_current_context(), {"nproc_per_node"}))
        return
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank:  # other ranks speak up only when something is wrong
        log_level = "warning" if log_level in ("debug", "info") else log_level
    _logging.configure("json" if log_format == "json" else "console", log_level)
    if "WORLD_SIZE" in os.environ:
        import structlog

        structlog.contextvars.bind_contextvars(rank=rank)
    with _outcome_line(log_format == "json"):
        _train(
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
    except click.ClickException as exc:  # a bad --set
        log.error("exit", exit_code=exc.exit_code, error=exc.format_message())
        raise
    except KeyboardInterrupt:
        log.warning("exit", exit_code=EXIT_INTERRUPTED, error="interrupted")
        raise
    log.info("exit", exit_code=0)


def _train(
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
    from bz._errors import TrainingError, training_context
    from bz._run import run
    from bz._setup import user_frame
    from bz.training.interrupts import TrainingInterrupted

    overrides = _overrides(assignments, named)
    try:
        result = run(config_path, overrides=overrides, smoke=smoke)
    except BzError as exc:
        if show_traceback and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        raise
    except TrainingInterrupted as exc:
        if rank == 0:  # the process that wrote the checkpoint speaks for all of them
            saved = f"; checkpoint {exc.checkpoint} written, `bz train` resumes from it"
            click.echo(f"bz: interrupted{saved if exc.checkpoint else ''}", err=True)
        # The shell's convention: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM).
        raise click.exceptions.Exit(128 + exc.signal.value) from None
    except Exception as exc:  # the user's own exception, which bz.run lets through as itself
        if show_traceback:
            traceback.print_exception(exc, file=sys.stderr)
        summary = training_context(exc) or "training failed"
        raise TrainingError(f"{summary}: {user_frame(exc)}") from exc
    if result.already_complete:
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
        _print_plugin_summary(result.plugins)
        final = result.final
        stopped = {
            None: "",
            "plugin": " (stopped early)",
            "max_steps": " (max_steps reached)",
            "max_time": " (max_time reached; `bz train` again continues)",
        }[result.stopped_by]
        if smoke:
            click.echo(
                f"bz: smoke run passed: {result.global_step} step(s), "
                f"{len(result.plugins)} plugin(s)",
                err=True,
            )
            return
        if final is not None:
            click.echo(
                f"bz: trained {result.epochs_completed} epoch(s), {result.global_step} steps "
                f"in {result.seconds:.1f}s{stopped}",
                err=True,
            )
        if result.resumed_from is not None:
            click.echo(f"bz: resumed from {result.resumed_from}", err=True)
        if result.checkpoint is not None:
            click.echo(f"bz: last checkpoint {result.checkpoint}", err=True)
        if result.model is not None:
            click.echo(f"bz: trained weights in {result.model}", err=True)
    if result.checkpoints_lost:
        # Training went on, but the run asked for files it does not have: a scheduler
        # or script must not take this for success.
        _fail(
            f"{result.checkpoints_lost} checkpoint(s) could not be written "
            "(see checkpoint_write_failed / model_write_failed above)"
        )
        raise click.exceptions.Exit(1)


def _overrides(assignments: Sequence[str], named: dict[str, Any]) -> dict[str, Any]:
    """``--set KEY=VALUE`` assignments, then the named options that were given."""
    overrides: dict[str, Any] = dict(parse_assignment(a) for a in assignments)
    overrides.update({key: value for key, value in named.items() if value is not None})
    return overrides


def _check_before_launch(config_path: str | None, overrides: dict[str, Any]) -> None:
    """What each process would check first: the config, its metrics, plugin options, the device."""
    from bz._loader import load_plugins
    from bz._run import config_and_base
    from bz.metrics import build_metrics
    from bz.training.device import resolve_device

    run_config, _ = config_and_base(config_path, overrides, None)
    build_metrics(run_config.metrics)
    load_plugins(run_config.plugins, run_config)
    resolve_device(run_config.device)


def _command_line(ctx: click.Context, drop: set[str]) -> list[str]:
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


def _launch(nproc_per_node: int, args: list[str]) -> None:
    """Run ``bz <args>`` in several processes; a failed process fails the command."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from bz._distributed import launch

    try:
        launch(nproc_per_node, args)
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
        if first.exitcode == UsageError.exit_code:
            raise UsageError(message) from None
        raise BzError(message) from None


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


# -- validate ----------------------------------------------------------------------------


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file (default: $BZ_CONFIG, then ./bzconfig.json).",
)
@click.option(
    "--checkpoint",
    "checkpoint_path",
    type=click.Path(exists=True),  # a sharded checkpoint is a folder
    help="Checkpoint (a file, or a sharded checkpoint's folder) or model.pt to evaluate "
    "(default: the run's model.pt when it finished, else its newest checkpoint).",
)
@click.option("--device", help="Override `device` (auto, cpu, cuda, cuda:N, mps).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(
    config_path: str | None, checkpoint_path: str | None, device: str | None, as_json: bool
) -> None:
    """Evaluate a trained run on the validation data: loss and configured metrics.

    A finished run is evaluated as it ended (its model.pt, with early stopping's best
    weights if they were restored); an unfinished one from its newest checkpoint.
    """
    from bz import _logging
    from bz._run import validate as run_validation

    # Warnings (a damaged checkpoint skipped) go to stderr; stdout holds the report.
    _logging.configure("console", "warning", stream=sys.stderr)
    overrides = {"device": device} if device is not None else None
    path, payload, result = run_validation(
        config_path, checkpoint=checkpoint_path, overrides=overrides
    )
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "epoch": payload["epoch"],
        "batch": payload.get("batch", 0),
        "step": payload["global_step"],
        "batches": result.batches,
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
    click.echo(f"validation_loss  {result.loss:.6g}")
    for name, value in result.metrics.items():
        click.echo(f"{name:<16} {value:.6g}")


# -- check-config ------------------------------------------------------------------------


@cli.command("check-config")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file (default: $BZ_CONFIG, then ./bzconfig.json).",
)
@click.option(
    "--traceback",
    "show_traceback",
    is_flag=True,
    help="Print the traceback of each plugin that cannot be imported or created.",
)
def check_config(config_path: str | None, show_traceback: bool) -> None:
    """Validate bzconfig.json, including every plugin's and metric's options.

    Exits 2 when a listed plugin cannot be imported, configured or created (one line
    each on stderr).
    """
    import structlog

    from bz._loader import load_plugins
    from bz.config import find_config_file, load_config
    from bz.metrics import build_metrics

    file = find_config_file(config_path)
    config = load_config(file)
    try:
        build_metrics(config.metrics)
        # The faults are reported here, once each, not as plugin_failed events too.
        with structlog.testing.capture_logs():
            plugins = load_plugins(config.plugins, config, policy="isolate")
    except ConfigError as exc:
        raise exc.with_source(str(file)) from None
    if plugins.faults:
        for fault in plugins.faults:
            if show_traceback and fault.cause is not None:
                traceback.print_exception(fault.cause, file=sys.stderr)
        raise UsageError("\n".join(f"{file}: {fault.describe()}" for fault in plugins.faults))
    click.echo(
        f"{file}: OK ({len(plugins.active_names)} plugin(s), {len(config.metrics)} metric(s))"
    )


# -- list-plugins ------------------------------------------------------------------------


@cli.command("list-plugins")
@click.argument("name", required=False)
@click.option(
    "-v", "--verbose", is_flag=True, help="Import each plugin: hooks, options, state, load errors."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (implies verbose).")
def list_plugins(name: str | None, verbose: bool, as_json: bool) -> None:
    """List installed plugins (entry-point group bz.plugins)."""
    from bz._catalog import describe_all
    from bz.config import nearest

    described = describe_all(load=verbose or as_json or name is not None)
    if name is not None:
        chosen = [d for d in described if d.name == name]
        if not chosen:
            hint = nearest(name, [d.name for d in described])
            suffix = f' (did you mean "{hint}"?)' if hint else ""
            raise UsageError(f"no plugin named {name!r}{suffix}")
        described = chosen
    if as_json:
        click.echo(json.dumps([d.to_json() for d in described], indent=2, default=str))
        return
    if not verbose and name is None:
        for d in described:
            origin = f"{d.distribution} {d.version}" if d.distribution else "unknown distribution"
            click.echo(f"{d.name:<20} {origin:<28} {d.entry_point}")
        return
    for index, d in enumerate(described):
        if index:
            click.echo()
        _print_plugin(d)


def _print_plugin(d: PluginDescription) -> None:
    click.secho(d.name, bold=True)
    if d.summary:
        click.echo(f"  {d.summary}")
    click.echo(f"  distribution: {d.distribution or '?'} {d.version or ''}".rstrip())
    click.echo(f"  entry point:  {d.entry_point}")
    if d.duplicate_of:
        click.echo(f"  NOT USED:     {d.duplicate_of}")
    if d.error:
        click.echo(f"  LOAD ERROR:   {d.error}")
        return
    click.echo(f"  hooks:        {', '.join(d.hooks) if d.hooks else '(none)'}")
    click.echo(f"  stateful:     {'yes (saved in checkpoints)' if d.stateful else 'no'}")
    if d.options is None:
        click.echo("  options:      free-form (the plugin reads them itself)")
    elif not d.options:
        click.echo("  options:      none")
    elif d.options_from == "load_config":
        click.echo("  options (defaults from load_config; bz does not check them):")
    else:
        click.echo("  options:")
        for field in d.options:
            default = "required" if field.required else f"default {json.dumps(field.default)}"
            allowed = f"; {field.constraints}" if field.constraints else ""
            click.echo(f"    {field.name}: {field.type} ({default}{allowed})")
            if field.doc:
                click.echo(f"        {field.doc}")


# -- list-metrics ------------------------------------------------------------------------


@cli.command("list-metrics")
@click.option("-v", "--verbose", is_flag=True, help="Show each metric's options.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_metrics(verbose: bool, as_json: bool) -> None:
    """List available metrics (built in, and entry-point group bz.metrics)."""
    from bz.metrics import available_metrics

    metrics = available_metrics()
    if as_json:
        listing = [
            {
                "name": info.name,
                "source": info.source,
                "distribution": info.distribution,
                "version": info.version,
                "summary": info.summary,
                "options": [
                    {
                        "name": o.name,
                        "type": o.type,
                        "default": o.default,
                        "doc": o.doc,
                        "constraints": o.constraints,
                    }
                    for o in info.options
                ],
                "error": info.error,
            }
            for info in metrics.values()
        ]
        click.echo(json.dumps(listing, indent=2))
        return
    for info in metrics.values():
        if info.error:
            click.echo(f"{info.name:<22} LOAD ERROR: {info.error}")
            continue
        click.echo(f"{info.name:<22} {info.summary}")
        if not verbose:
            continue
        origin = f"{info.distribution} {info.version or ''}".strip() if info.distribution else "?"
        click.echo(f"    from: {origin} ({info.source})")
        for option in info.options:
            default = "required" if option.required else f"default {option.default}"
            allowed = f"; {option.constraints}" if option.constraints else ""
            click.echo(f"    {option.name}: {option.type} ({default}{allowed})")
            if option.doc:
                click.echo(textwrap.indent(option.doc, " " * 8))


# -- init --------------------------------------------------------------------------------


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init(directory: str, force: bool) -> None:
    """Write a runnable project (train.py, bzconfig.json) into DIRECTORY."""
    from bz._project import write_project

    written = write_project(Path(directory), overwrite=force)
    for path in written:
        click.echo(f"wrote {path}")
    where = "" if Path(directory) == Path(".") else f"cd {directory} && "
    click.echo(f"next: {where}bz train")


# -- health ------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def health(as_json: bool) -> None:
    """Report versions and the devices torch can use."""
    import platform

    import torch

    report: dict[str, Any] = {
        "bz": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps_available": torch.backends.mps.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }
    from bz.training.device import resolve_device

    report["auto_device"] = str(resolve_device("auto"))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:<16} {value}")


def _register_commands() -> None:
    # Commands whose code lives beside the library function they call.
    from bz._report import report_command
    from bz._schema import config_schema
    from bz._tune import tune_command

    cli.add_command(config_schema)
    cli.add_command(report_command)
    cli.add_command(tune_command)


_register_commands()


# -- entry point -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """The ``bz`` console script (exits with the command's exit code)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="bz")


if __name__ == "__main__":  # python -m bz.cli
    main()
