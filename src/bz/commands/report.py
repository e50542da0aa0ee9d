"""``bz report RUN_DIR...``: the table and the curves of runs the ``run_log`` plugin wrote.

Prints one table per run (losses, metrics, learning rate, seconds per epoch) and, with
matplotlib installed (``pip install 'bz-cli[plots]'``), draws loss and metric curves
into one PNG: one panel for the loss and one per metric, training dashed, validation
solid, every run in its own colour. A folder that holds runs rather than being one
(``runs/``, or ``runs/<study>`` after ``bz tune``) stands for all the runs inside it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import click

from bz._errors import UsageError


def _run_log_file() -> str:
    # Imported late: `bz --help` registers this command without loading plugins.
    from bz.plugins.run_log import RUN_LOG_FILE

    return RUN_LOG_FILE


PLOTS_HINT = "plots need matplotlib: pip install 'bz-cli[plots]'"


@attrs.frozen
class RunHistory:
    """One run's ``run_log.jsonl``, read back."""

    path: Path
    """The run directory (or the file, when a file was named)."""
    start: dict[str, Any] | None
    epochs: tuple[dict[str, Any], ...]
    steps: tuple[dict[str, Any], ...]
    end: dict[str, Any] | None
    failed: dict[str, Any] | None
    unreadable_lines: int
    """Lines that were not JSON objects (a run killed mid-write leaves one)."""
    outcome: dict[str, Any] | None = None
    """The last ``start``, ``end``, ``failed`` or ``interrupted`` line: where the run
    stands (a resumed run appends a new ``start`` to the same log)."""

    @property
    def metric_names(self) -> list[str]:
        """Every metric that appears in any epoch, in order of first appearance."""
        names: dict[str, None] = {}
        for epoch in self.epochs:
            for table in ("training_metrics", "validation_metrics"):
                names.update(dict.fromkeys(epoch.get(table) or {}))
        return list(names)

    @property
    def status(self) -> str:
        """``finished``, ``stopped early``, ``failed: ...``, ``interrupted`` or
        ``incomplete``."""
        kind = (self.outcome or {}).get("event")
        if kind == "failed":
            return f"failed: {(self.outcome or {}).get('error')}"
        if kind == "interrupted":
            return "interrupted (`bz train` resumes it)"
        if kind != "end" or self.end is None:
            return "incomplete (still running, or killed)"
        return "stopped early" if self.end.get("stopped_early") else "finished"


def read_run_log(path: Path) -> RunHistory:
    """Parse ``path`` (a ``run_log.jsonl``), skipping lines that are not JSON objects."""
    records: dict[str, list[dict[str, Any]]] = {}
    unreadable = 0
    outcome: dict[str, Any] | None = None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a run log (not UTF-8 text)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not JSON (or a number longer than Python reads)
            unreadable += 1
            continue
        if not isinstance(record, dict):
            unreadable += 1
            continue
        records.setdefault(str(record.get("event")), []).append(record)
        if record.get("event") in ("start", "end", "failed", "interrupted"):
            outcome = record

    def last(kind: str) -> dict[str, Any] | None:
        found = records.get(kind)
        return found[-1] if found else None

    return RunHistory(
        path=path.parent if path.name == _run_log_file() else path,
        start=last("start"),
        epochs=tuple(records.get("epoch", [])),
        steps=tuple(records.get("step", [])),
        end=last("end"),
        failed=last("failed"),
        unreadable_lines=unreadable,
        outcome=outcome,
    )


def find_run_logs(path: Path) -> list[Path]:
    """The run logs ``path`` names: its own, or those of the runs inside it.

    A file that is not JSON Lines (``runs/report.png``, which ``bz report runs/*``
    names too) names no run log: an empty list.
    """
    if path.is_file():
        return [path] if path.suffix == ".jsonl" else []
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    own = path / _run_log_file()
    if own.is_file():
        return [own]
    inside = sorted(path.glob(f"**/{_run_log_file()}"))
    if not inside:
        raise UsageError(
            f"{path}: no {_run_log_file()} here or below; add the run_log plugin to "
            'bzconfig.json ("plugins": [..., "run_log"]) and train again'
        )
    return inside


# -- the table ----------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def render_table(run: RunHistory) -> str:
    """The run's epochs as a text table, under a one-line heading."""
    metrics = run.metric_names
    header = ["epoch", "loss", "val_loss"]
    header += [*metrics, *(f"val_{m}" for m in metrics), "lr", "seconds"]
    rows = [header]
    for epoch in run.epochs:
        training = epoch.get("training_metrics") or {}
        validation = epoch.get("validation_metrics") or {}
        rates = epoch.get("lr") or []
        rows.append(
            [
                str(int(epoch.get("epoch", 0)) + 1),
                _cell(epoch.get("training_loss")),
                _cell(epoch.get("validation_loss")),
                *(_cell(training.get(m)) for m in metrics),
                *(_cell(validation.get(m)) for m in metrics),
                "/".join(f"{r:.3g}" for r in rates) if rates else "-",
                f"{epoch.get('seconds', 0.0):.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    configured = run.start.get("epochs") if run.start else None
    of = f"/{configured}" if configured else ""
    heading = f"{run.path}: {len(run.epochs)}{of} epoch(s), {run.status}"
    if run.unreadable_lines:
        heading += f" ({run.unreadable_lines} unreadable line(s) skipped)"
    return "\n".join([heading, *lines]) if run.epochs else f"{heading}\n(no epoch finished)"


# -- the plot -----------------------------------------------------------------------------


def plots_available() -> bool:
    """Whether matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401  # only checking that the extra is installed
    except ImportError:
        return False
    return True


def _step_curve(run: RunHistory) -> tuple[list[float], list[float]]:
    """Per-step losses against fractional epochs (1.0 = the end of the first epoch)."""
    per_epoch = run.start.get("training_batches_per_epoch") if run.start else None
    xs, ys = [], []
    for step in run.steps:
        loss, batch = step.get("loss"), step.get("batch")
        if loss is None or batch is None or not per_epoch:
            continue
        xs.append(int(step.get("epoch", 0)) + (int(batch) + 1) / int(per_epoch))
        ys.append(float(loss))
    return xs, ys


def plot_runs(runs: Sequence[RunHistory], output: Path) -> Path:
    """Draw loss and metric curves of ``runs`` into the PNG ``output``."""
    # The object-oriented API without pyplot: no global figure state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics: dict[str, None] = {}
    for run in runs:
        metrics.update(dict.fromkeys(run.metric_names))
    panels = ["loss", *metrics]
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    label_runs = len(runs) > 1
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        prefix = f"{run.path.name} " if label_runs else ""
        xs = [int(e.get("epoch", 0)) + 1 for e in run.epochs]
        step_x, step_y = _step_curve(run)
        if step_x:
            axes[0].plot(step_x, step_y, color=color, alpha=0.25, linewidth=0.8)
        for panel, axis in zip(panels, axes, strict=False):
            if panel == "loss":
                training = [e.get("training_loss") for e in run.epochs]
                validation = [e.get("validation_loss") for e in run.epochs]
            else:
                training = [(e.get("training_metrics") or {}).get(panel) for e in run.epochs]
                validation = [(e.get("validation_metrics") or {}).get(panel) for e in run.epochs]
            _line(axis, xs, training, color, "--", f"{prefix}training")
            _line(axis, xs, validation, color, "-", f"{prefix}validation")
    for panel, axis in zip(panels, axes, strict=False):
        axis.set_title(panel)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    return output


def _line(axis: Any, xs: list[int], ys: list[Any], color: str, style: str, label: str) -> None:
    points = [(x, float(y)) for x, y in zip(xs, ys, strict=True) if y is not None]
    if points:
        axis.plot(
            *zip(*points, strict=True), color=color, linestyle=style, marker=".", label=label
        )


# -- the command --------------------------------------------------------------------------


def _default_output(runs: Sequence[RunHistory]) -> Path:
    if len(runs) == 1:
        return runs[0].path / "report.png"
    return Path(os.path.commonpath([str(run.path.resolve()) for run in runs])) / "report.png"


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PNG to write (default: RUN_DIR/report.png; for several runs, in their common folder).",
)
@click.option("--no-plot", is_flag=True, help="Print the tables only.")
def report_command(run_dirs: Sequence[str], output: Path | None, no_plot: bool) -> None:
    """Print the epochs of runs logged by the run_log plugin and plot their curves.

    RUN_DIR is a run directory (runs/<timestamp>), its run_log.jsonl, or a folder of
    runs (all of them are shown together).
    """
    logs = []
    for run_dir in run_dirs:
        found = find_run_logs(Path(run_dir))
        if not found:
            click.echo(f"bz: {run_dir}: not a run directory or run log, skipped", err=True)
        logs.extend(found)
    if not logs:
        raise UsageError(f"no run log in {', '.join(run_dirs)} (give runs/<timestamp> or runs/)")
    runs = [read_run_log(log) for log in logs]
    for index, run in enumerate(runs):
        if index:
            click.echo()
        click.echo(render_table(run))
    if no_plot:
        return
    if not any(run.epochs for run in runs):
        click.echo("bz: nothing to plot yet (no epoch finished)", err=True)
        return
    if not plots_available():
        click.echo(f"bz: {PLOTS_HINT}", err=True)
        return
    target = output or _default_output(runs)
    try:
        written = plot_runs(runs, target)
    except OSError as exc:  # a read-only run folder, a file where a folder should be
        raise UsageError(
            f"{exc.filename or target}: cannot write the plot: {exc.strerror} "
            "(-o PATH writes it elsewhere, --no-plot skips it)"
        ) from None
    click.echo(f"wrote {written}")
