"""The csv_logger plugin: files read back with pandas, resumed runs continued exactly."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pandas
import pytest
import torch
from tests._integration_support import run_config, tiny_setup

import bz
from bz.plugins.csv_logger import CsvLogger, CsvLoggerConfig, check_writable
from bz.plugins.run_log import RunLog


def _table(path: Path) -> pandas.DataFrame:
    return pandas.read_csv(path)


def test_one_row_per_epoch_with_the_loops_values(tmp_path: Path) -> None:
    plugin = CsvLogger(CsvLoggerConfig(log_dir=str(tmp_path)))
    result = bz.Trainer().fit(tiny_setup(), run_config(epochs=3), [plugin])

    table = _table(tmp_path / "metrics.csv")
    assert list(table.columns[:3]) == ["kind", "epoch", "step"]
    assert list(table["kind"]) == ["epoch"] * 3
    assert list(table["epoch"]) == [1, 2, 3]  # counted from 1, as the console does
    assert list(table["step"]) == [4, 8, 12]
    history = result.history
    assert list(table["loss/training"]) == pytest.approx([r.training_loss for r in history])
    assert list(table["loss/validation"]) == pytest.approx([r.validation_loss for r in history])
    accuracy = [r.validation_metrics["accuracy"] for r in history]
    assert list(table["accuracy/validation"]) == pytest.approx(accuracy)
    assert list(table["lr"]) == pytest.approx([0.1] * 3)
    assert (table["time/epoch_seconds"] > 0).all()


def test_step_rows_every_n_steps_share_the_header(tmp_path: Path) -> None:
    plugin = CsvLogger(CsvLoggerConfig(log_dir=str(tmp_path), step_interval=2))
    bz.Trainer().fit(tiny_setup(), run_config(epochs=2), [plugin])

    path = tmp_path / "metrics.csv"
    table = _table(path)
    steps = table[table["kind"] == "step"]
    epochs = table[table["kind"] == "epoch"]
    assert list(steps["step"]) == [2, 4, 6, 8]
    assert list(steps["epoch"]) == [1, 1, 2, 2]
    assert list(epochs["step"]) == [4, 8]
    assert steps["step/loss"].notna().all()
    assert (steps["step/grad_norm"] > 0).all()
    assert list(steps["step/lr"]) == pytest.approx([0.1] * 4)
    assert steps["loss/training"].isna().all()  # a step row leaves epoch columns empty
    # Rows in the order they happened; one header, the same width on every line.
    assert list(table["kind"]) == ["step", "step", "epoch", "step", "step", "epoch"]
    with path.open(encoding="utf-8", newline="") as file:
        widths = {len(row) for row in csv.reader(file)}
    assert len(widths) == 1


def test_gradient_accumulation_writes_each_step_once(tmp_path: Path) -> None:
    plugin = CsvLogger(CsvLoggerConfig(log_dir=str(tmp_path), step_interval=1))
    bz.Trainer().fit(tiny_setup(), run_config(epochs=1, accumulate_grad_batches=2), [plugin])

    steps = _table(tmp_path / "metrics.csv").query("kind == 'step'")
    assert list(steps["step"]) == [1, 2]  # four batches, two optimizer steps


def test_default_folder_is_the_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bz.Trainer().fit(tiny_setup(), run_config(epochs=1), [CsvLogger(), RunLog()])

    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "metrics.csv").is_file()
    assert (run / "run_log.jsonl").is_file()


class _FailAt:
    """A loss function that raises on its ``at``-th call (a crash mid-run)."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.calls = 0
        self.loss = torch.nn.CrossEntropyLoss()

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("crash")
        loss: torch.Tensor = self.loss(outputs, targets)
        return loss


def _fit(folder: Path, fail_at: int | None) -> None:
    setup = tiny_setup(validation=False)
    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=_FailAt(fail_at),
        optimizer=setup.optimizer,
        train_loader=setup.train_loader,
    )
    config = run_config(epochs=3, metrics=[], checkpoint_every_steps=3)
    plugin = CsvLogger(CsvLoggerConfig(step_interval=1))
    bz.Trainer().fit(setup, config, [plugin], checkpoint_dir=folder)


def _rows(folder: Path) -> list[tuple[str, int, int, float]]:
    (run,) = (folder / "runs").iterdir()
    table = _table(run / "metrics.csv")
    loss = table["step/loss"].fillna(table["loss/training"])
    return list(zip(table["kind"], table["epoch"], table["step"], loss, strict=True))


def test_a_resumed_run_continues_the_file_without_repeating_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed, whole = tmp_path / "crashed", tmp_path / "whole"
    for folder in (crashed, whole):
        folder.mkdir()
    monkeypatch.chdir(crashed)
    # Crashes in the 8th batch: steps 1-7 are written, the last checkpoint is at step 6.
    with pytest.raises(RuntimeError, match="crash"):
        _fit(crashed / "checkpoints", fail_at=8)
    assert _rows(crashed)[-1][:3] == ("step", 2, 7)
    _fit(crashed / "checkpoints", fail_at=None)
    monkeypatch.chdir(whole)
    _fit(whole / "checkpoints", fail_at=None)

    # The resumed run continued the first run's file, and created no other.
    resumed_rows, whole_rows = _rows(crashed), _rows(whole)
    assert [row[:3] for row in resumed_rows] == [row[:3] for row in whole_rows]
    assert [row[3] for row in resumed_rows] == pytest.approx([row[3] for row in whole_rows])
    assert len(whole_rows) == 3 * 4 + 3


def test_rows_after_the_checkpoint_are_dropped_even_with_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    plugin = CsvLogger(CsvLoggerConfig(log_dir=str(tmp_path), step_interval=1))
    context = bz.plugins.PluginContext(epochs=2)
    plugin.start_training_session(context)
    plugin.start_epoch(context)
    state = None
    for step in (1, 2, 3):
        context.global_step = step
        context.last_loss = torch.tensor(float(step))
        plugin.end_training_batch(context)
        if step == 2:
            state = plugin.state_dict()
    plugin.end_epoch(context)  # adds the epoch columns: the file is rewritten wider
    assert state is not None

    resumed = CsvLogger(CsvLoggerConfig(log_dir=str(tmp_path), step_interval=1))
    resumed.start_training_session(context)
    resumed.load_state_dict(state)

    table = _table(path)
    assert list(table["step"]) == [1, 2]
    assert "time/epoch_seconds" in table.columns  # the header stays as wide as it became


class _FailsInSecondEpoch:
    """A plugin that fails at the end of the second epoch (after csv_logger wrote it)."""

    name = "fails"

    def end_epoch(self, context: bz.plugins.PluginContext) -> None:
        if context.epoch == 1:
            raise RuntimeError("plugin bug")


def test_a_rewound_epoch_is_written_once(tmp_path: Path) -> None:
    def rows(folder: Path, plugins: list[bz.plugins.NamedPlugin]) -> list[tuple[str, int, int]]:
        logger = CsvLogger(CsvLoggerConfig(log_dir=str(folder), step_interval=2))
        config = run_config(epochs=3, plugin_errors="rewind")
        bz.Trainer().fit(tiny_setup(), config, [logger, *plugins])
        table = _table(folder / "metrics.csv")
        return list(zip(table["kind"], table["epoch"], table["step"], strict=True))

    assert rows(tmp_path / "rewound", [_FailsInSecondEpoch()]) == rows(tmp_path / "plain", [])


# -- a folder it cannot write: found before training, the plugin quarantined there ------


def _fault_stage(plugin: CsvLogger) -> str | None:
    result = bz.Trainer().fit(tiny_setup(), run_config(epochs=2), [plugin])
    (report,) = result.plugins
    return None if report.fault is None else report.fault.stage


def test_a_log_dir_under_a_file_is_refused_when_the_session_starts(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder", encoding="utf-8")
    folder = tmp_path / "notes.txt" / "csv"
    plugin = CsvLogger(CsvLoggerConfig(log_dir=str(folder)))
    # Not at the end of the first epoch, with an epoch of rows lost and a traceback.
    assert _fault_stage(plugin) == "start_training_session"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_a_read_only_log_dir_is_refused_when_the_session_starts(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        plugin = CsvLogger(CsvLoggerConfig(log_dir=str(locked / "csv")))
        assert _fault_stage(plugin) == "start_training_session"
    finally:
        locked.chmod(0o755)


def test_a_writable_folder_that_does_not_exist_yet_is_fine_and_made_at_the_first_row(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "a" / "b"
    assert _fault_stage(CsvLogger(CsvLoggerConfig(log_dir=str(folder)))) is None
    assert (folder / "metrics.csv").is_file()


def test_the_folder_check_creates_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    check_writable(folder)
    assert list(tmp_path.iterdir()) == []
