"""The run_log plugin and ``bz report``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tests._integration_support import fails_in_second_epoch, read_jsonl, run_config, tiny_setup

import bz
from bz.commands.report import read_run_log, report_command
from bz.plugins._inspection import implemented_hooks
from bz.plugins.run_log import RunLog, RunLogConfig
from bz.training.guards import NonFiniteLoss

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(log_dir: Path, epochs: int = 3, **options: Any) -> bz.FitResult:
    plugin = RunLog(RunLogConfig(log_dir=str(log_dir), **options))
    config = run_config(epochs=epochs, hyperparameters={"lr": 0.1, "batch_size": 16})
    return bz.Trainer().fit(tiny_setup(), config, [plugin])


def test_one_line_per_epoch_with_what_the_loop_computed(tmp_path: Path) -> None:
    result = _train(tmp_path)

    lines = read_jsonl(tmp_path / "run_log.jsonl")
    assert [line["event"] for line in lines] == ["start", "epoch", "epoch", "epoch", "end"]
    start, *epochs, end = lines
    assert start["epochs"] == 3
    assert start["hyperparameters"] == {"lr": 0.1, "batch_size": 16}
    assert start["training_batches_per_epoch"] == 4
    for line, record in zip(epochs, result.history, strict=True):
        assert line["epoch"] == record.epoch
        assert line["training_loss"] == record.training_loss  # JSON keeps float64 exactly
        assert line["validation_loss"] == record.validation_loss
        assert line["training_metrics"] == record.training_metrics
        assert line["validation_metrics"] == record.validation_metrics
        assert line["lr"] == [0.1]
        assert line["seconds"] > 0
    assert [line["step"] for line in epochs] == [4, 8, 12]
    assert end["epochs_completed"] == 3
    assert end["stopped_early"] is False


def test_step_lines_every_n_steps_only_when_asked(tmp_path: Path) -> None:
    # Without step_interval there is no per-batch hook at all (no call per batch).
    assert "end_training_batch" not in implemented_hooks(RunLog())
    assert "end_training_batch" in implemented_hooks(RunLog(RunLogConfig(step_interval=3)))

    _train(tmp_path, epochs=2, step_interval=3)
    steps = [line for line in read_jsonl(tmp_path / "run_log.jsonl") if line["event"] == "step"]
    assert [s["step"] for s in steps] == [3, 6]  # 8 steps in all
    assert all(isinstance(s["loss"], float) for s in steps)


def test_failed_run_ends_with_a_failed_line(tmp_path: Path) -> None:
    setup = fails_in_second_epoch()
    plugin = RunLog(RunLogConfig(log_dir=str(tmp_path)))
    with pytest.raises(RuntimeError, match="boom"):  # the user's error, as itself
        bz.Trainer().fit(setup, run_config(epochs=3), [plugin])

    lines = read_jsonl(tmp_path / "run_log.jsonl")
    assert [line["event"] for line in lines] == ["start", "epoch", "failed"]
    assert "RuntimeError: boom" in lines[-1]["error"]
    assert "failed: RuntimeError: boom" in read_run_log(tmp_path / "run_log.jsonl").status


def test_a_diverged_loss_is_written_as_null_so_the_file_stays_json(tmp_path: Path) -> None:
    setup = tiny_setup(lr=1e30)  # overflows to inf, then nan
    plugin = RunLog(RunLogConfig(log_dir=str(tmp_path)))
    # bz stops a run whose loss is not finite, after the epoch's hooks: run_log has
    # written that epoch's line by then.
    with pytest.raises(NonFiniteLoss):
        bz.Trainer().fit(setup, run_config(epochs=2), [plugin])

    epochs = [line for line in read_jsonl(tmp_path / "run_log.jsonl") if line["event"] == "epoch"]
    assert None in [line["training_loss"] for line in epochs]


def test_report_prints_the_table_and_writes_a_png(tmp_path: Path) -> None:
    result = _train(tmp_path / "run", epochs=2, step_interval=2)

    outcome = CliRunner().invoke(report_command, [str(tmp_path / "run")])

    assert outcome.exit_code == 0, outcome.output
    lines = outcome.output.splitlines()
    assert "2/2 epoch(s), finished" in lines[0]
    header = ["epoch", "loss", "val_loss", "accuracy", "val_accuracy", "lr", "seconds"]
    assert lines[1].split() == header
    first = result.history[0]
    assert lines[3].split()[:3] == [
        "1",
        f"{first.training_loss:.4f}",
        f"{first.validation_loss:.4f}",
    ]
    png = tmp_path / "run" / "report.png"
    assert f"wrote {png}" in outcome.output
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_report_of_a_folder_of_runs_plots_them_together(tmp_path: Path) -> None:
    _train(tmp_path / "runs" / "a", epochs=1)
    _train(tmp_path / "runs" / "b", epochs=2)

    outcome = CliRunner().invoke(report_command, [str(tmp_path / "runs")])

    assert outcome.exit_code == 0, outcome.output
    assert f"{tmp_path / 'runs' / 'a'}: 1/1 epoch(s)" in outcome.output
    assert f"{tmp_path / 'runs' / 'b'}: 2/2 epoch(s)" in outcome.output
    # One picture for both, in their common folder; -o puts it elsewhere.
    assert (tmp_path / "runs" / "report.png").read_bytes().startswith(PNG_MAGIC)
    elsewhere = tmp_path / "out" / "cmp.png"
    CliRunner().invoke(report_command, [str(tmp_path / "runs" / "a"), "-o", str(elsewhere)])
    assert elsewhere.read_bytes().startswith(PNG_MAGIC)


def test_report_without_matplotlib_prints_the_table_and_says_how_to_get_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train(tmp_path, epochs=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what "not installed" looks like

    outcome = CliRunner().invoke(report_command, [str(tmp_path)])

    assert outcome.exit_code == 0
    assert "epoch" in outcome.stdout
    assert "pip install 'bz-cli[plots]'" in outcome.stderr
    assert not (tmp_path / "report.png").exists()


def test_report_skips_a_line_cut_short_by_a_crash(tmp_path: Path) -> None:
    _train(tmp_path, epochs=2)
    log = tmp_path / "run_log.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20], encoding="utf-8")

    outcome = CliRunner().invoke(report_command, [str(tmp_path), "--no-plot"])

    assert outcome.exit_code == 0
    assert "2/2 epoch(s), incomplete" in outcome.output
    assert "1 unreadable line(s) skipped" in outcome.output


def test_report_of_a_folder_without_runs_is_a_usage_error(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(report_command, [str(tmp_path)])
    assert isinstance(outcome.exception, bz.UsageError)
    assert outcome.exception.exit_code == 2
    assert "no run_log.jsonl here or below" in str(outcome.exception)
    assert "\n" not in str(outcome.exception)

    outcome = CliRunner().invoke(report_command, [str(tmp_path / "missing")])
    assert isinstance(outcome.exception, bz.UsageError)
    assert "no such file or directory" in str(outcome.exception)


def test_non_finite_numbers_are_never_written_as_bare_nan(tmp_path: Path) -> None:
    from bz.plugins.run_log import json_safe

    text = json.dumps(json_safe({"a": float("nan"), "b": [float("inf"), 1.5], "c": (1, "x")}))
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": [1, "x"]}
