"""``bz report`` on what a user has at hand (found by using bz as shipped)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bz.commands import cli

_EPOCH = {
    "event": "epoch",
    "epoch": 0,
    "step": 4,
    "seconds": 0.5,
    "training_loss": 0.7,
    "validation_loss": 0.4,
    "training_metrics": {},
    "validation_metrics": {},
    "lr": [0.01],
    "scalars": {},
}


def _run(tmp_path: Path, *extra_lines: str) -> Path:
    run = tmp_path / "runs" / "20261206-120000"
    run.mkdir(parents=True)
    lines = [json.dumps({"event": "start", "epochs": 1}), json.dumps(_EPOCH), *extra_lines]
    (run / "run_log.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run


def test_a_plot_that_cannot_be_written_is_one_line_exit_2_after_the_table(
    tmp_path: Path,
) -> None:
    pytest.importorskip("matplotlib")
    run = _run(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    # Where the PNG should go is under a file, not a folder (as a read-only run folder,
    # this was an OSError traceback, exit 1).
    result = CliRunner().invoke(cli, ["report", str(run), "-o", str(blocker / "report.png")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "0.7000" in result.output  # the table still came first
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"bz: error: {blocker}")
    assert "cannot write the plot" in last
    assert "--no-plot" in last


def test_a_run_log_line_with_a_number_too_long_to_read_is_skipped(tmp_path: Path) -> None:
    run = _run(
        tmp_path, '{"event": "epoch", "epoch": 1' + "0" * sys.get_int_max_str_digits() + "}"
    )
    result = CliRunner().invoke(cli, ["report", str(run), "--no-plot"])
    assert result.exit_code == 0, result.output
    assert "0.7000" in result.output
