"""``bz tune``: run :func:`bz.tune` (a search with Optuna) and print its table of trials.

The search itself, and what it writes, is library code in :mod:`bz._tune`; this module
parses the options and renders the result.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from typing import Any

import click

from bz._errors import BzError
from bz._tune import TuneResult, tune
from bz.commands.options import (
    config_option,
    log_options,
    parse_assignments,
    set_option,
    strict_plugins_option,
    traceback_option,
)

__all__ = ["render_results", "tune_command"]


# -- rendering ---------------------------------------------------------------------------


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_results(result: TuneResult) -> str:
    """The study as a table, best trial marked with ``*``, then the best values."""
    names = sorted({name for row in result.trials for name in row.params})
    header = ["trial", "state", result.monitor, "epochs", "seconds", *names]
    lines = [header]
    best_number = result.best.number if result.best is not None else None
    for row in result.trials:
        mark = "*" if row.number == best_number else " "
        lines.append(
            [
                f"{mark}{row.number}",
                row.state,
                _format(row.value) if row.value is not None else "-",
                str(len(row.intermediate_values)),
                f"{row.seconds:.1f}" if row.seconds is not None else "-",
                *(_format(row.params[n]) if n in row.params else "-" for n in names),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    if result.best is not None:
        params = ", ".join(f"{k}={_format(v)}" for k, v in result.best.params.items())
        text.append("")
        text.append(
            f"best: trial {result.best.number}, {result.monitor} "
            f"{_format(result.best.value)} ({result.direction}) with {params}"
        )
    return "\n".join(text)


# -- the command -------------------------------------------------------------------------


@click.command("tune")
@config_option
@click.option("--trials", "n_trials", type=click.IntRange(min=1), help="Override optuna.n_trials.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Override optuna.timeout (s).")
@click.option("--study-name", help="Override optuna.study_name.")
@click.option("--storage", help="Override optuna.storage (sqlite:///tune.db resumes).")
@click.option("--epochs", type=click.IntRange(min=1), help="Override `epochs` for every trial.")
@set_option("Override any config key for every trial (as for bz train).")
@strict_plugins_option("Make plugin faults fatal instead of isolating them.")
@log_options()
@traceback_option("Show tracebacks of failures.")
def tune_command(
    config_path: str | None,
    n_trials: int | None,
    timeout: float | None,
    study_name: str | None,
    storage: str | None,
    epochs: int | None,
    assignments: Sequence[str],
    strict_plugins: bool,
    log_format: str,
    log_level: str,
    show_traceback: bool,
) -> None:
    """Search hyperparameters with Optuna: each trial is a full training run.

    The search space and study settings are the optuna entry of the plugins list in
    bzconfig.json. Prints a table of trials and writes the best values.
    """
    from bz import _logging

    _logging.configure("json" if log_format == "json" else "console", log_level)
    _quiet_optuna()
    overrides = parse_assignments(assignments)
    if epochs is not None:
        overrides["epochs"] = epochs
    try:
        result = tune(
            config_path,
            overrides=overrides,
            n_trials=n_trials,
            timeout=timeout,
            study_name=study_name,
            storage=storage,
            plugin_errors="raise" if strict_plugins else None,
        )
    except BzError as exc:
        if show_traceback and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        raise
    click.echo(render_results(result))
    for path in result.written:
        click.echo(f"wrote {path}")


def _quiet_optuna() -> None:
    # bz prints its own table; Optuna's per-trial INFO lines would repeat it.
    try:
        import optuna
    except ImportError:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
