"""Tests of ``loss_printer`` (the plugin guide's subclass style)."""

from __future__ import annotations

import pytest
from bz_example_plugins import LossPrinter

from bz.testing import load_plugin, make_context, run_plugin


def test_prints_every_log_interval_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    run_plugin(LossPrinter(log_interval=2), epochs=5)
    # structlog's default output (bz's run summary) goes to stdout too: keep our lines.
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch")]
    assert [line.split(":")[0] for line in lines] == ["Epoch 0", "Epoch 2", "Epoch 4"]


def test_end_epoch_reads_the_context(capsys: pytest.CaptureFixture[str]) -> None:
    context = make_context(epoch=5, training_loss_total=3.0, training_sample_count=2)
    LossPrinter(log_interval=5).end_epoch(context)
    assert capsys.readouterr().out == "Epoch 5: loss = 1.5000\n"


def test_created_from_json_options() -> None:
    plugin = load_plugin(LossPrinter, {"log_interval": 3})
    assert isinstance(plugin, LossPrinter)
    assert plugin.log_interval == 3
    assert load_plugin(LossPrinter, {"enabled": False}) is None


def test_bad_interval_is_refused() -> None:
    with pytest.raises(Exception, match="log_interval must be a positive integer"):
        load_plugin(LossPrinter, {"log_interval": 0})
