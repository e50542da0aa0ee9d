"""Tests of the two single-file examples: ``simple_logger`` and ``custom_logger``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from custom_logger_plugin import CustomLoggerConfig, CustomLoggerPlugin
from simple_plugin_example import SimpleLoggerPlugin

from bz.testing import capture_logs, check_plugin, load_plugin, make_context, run_plugin


def test_simple_logger_logs_one_event_per_epoch() -> None:
    with capture_logs() as events:
        run_plugin(SimpleLoggerPlugin(), epochs=2)
    losses = [e for e in events if e["event"] == "epoch_loss"]
    assert [(e["plugin"], e["epoch"]) for e in losses] == [
        ("simple_logger", 0),
        ("simple_logger", 1),
    ]
    assert all(e["validation_loss"] is not None for e in losses)


def test_custom_logger_writes_epochs_and_throughput(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "train.jsonl"
    plugin = CustomLoggerPlugin(CustomLoggerConfig(log_file=str(log), format="jsonl"))
    run_plugin(plugin, epochs=3)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "epoch", "epoch", "epoch", "end"]
    epoch = records[1]
    assert epoch["batches_per_second"] > 0
    assert {"training_loss", "validation_loss", "seconds"} <= epoch.keys()
    assert records[-1]["epochs"] == 3


def test_custom_logger_samples_per_second_needs_a_batch_size(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    plugin = CustomLoggerPlugin(CustomLoggerConfig(log_file=str(log)))
    plugin.start_training_session(make_context(epochs=1))
    plugin.start_epoch(make_context())
    plugin.end_epoch(
        make_context(epochs=1, hyperparameters={"batch_size": 8}, training_batch_count=4)
    )
    plugin.end_training_session(make_context())
    assert "samples_per_second=" in log.read_text().splitlines()[1]


def test_custom_logger_survives_an_unwritable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    plugin = CustomLoggerPlugin(CustomLoggerConfig(log_file=str(blocker / "x.log")))
    with capture_logs() as events:
        result = run_plugin(plugin, epochs=2)  # policy="raise": any exception would fail
    assert result.epochs_completed == 2
    assert [e["event"] for e in events if e.get("plugin") == "custom_logger"] == [
        "log_file_unavailable"
    ]


def test_custom_logger_flushes_when_training_fails(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    plugin = CustomLoggerPlugin(CustomLoggerConfig(log_file=str(log)))
    plugin.start_training_session(make_context(epochs=2))
    plugin.on_exception(make_context(exception=RuntimeError("boom")))
    assert log.read_text().splitlines()[-1] == "event=failed error=RuntimeError('boom')"


def test_custom_logger_options_are_checked() -> None:
    with pytest.raises(Exception, match=r"log_interval: must be >= 1"):
        load_plugin(CustomLoggerPlugin, {"log_interval": 0})
    assert check_plugin(CustomLoggerPlugin()) == (
        "start_training_session",
        "start_epoch",
        "end_epoch",
        "end_training_session",
        "on_exception",
    )
