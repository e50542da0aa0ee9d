"""console_out and early_stopping, as users see them."""

from __future__ import annotations

import io
from typing import Any

import pytest
from tests._support import Events, assert_same_weights, tiny_setup, weights

import bz
from bz.config import MetricSpec, RunConfig
from bz.plugins import PluginContext
from bz.plugins.console_out import ConsoleOut, ConsoleOutConfig
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig

# -- early_stopping: decisions from a scripted sequence of values ----------------------


def decisions(values: list[float], **options: Any) -> list[bool]:
    """Feed ``values`` as the validation accuracy of successive epochs; stop requests."""
    plugin = EarlyStopping(EarlyStoppingConfig(monitor="accuracy", verbose=False, **options))
    stops = []
    for epoch, value in enumerate(values):
        context = PluginContext(epochs=100)
        context.epoch = epoch
        context.validation_metrics["accuracy"] = value
        plugin.end_epoch(context)
        stops.append(context.should_stop_training)
    return stops


def test_patience_counts_epochs_without_improvement() -> None:
    values = [0.5, 0.6, 0.6, 0.6, 0.6]
    assert decisions(values, mode="max", patience=3) == [False, False, False, False, True]


def test_min_delta_decides_what_counts_as_improvement() -> None:
    values = [0.5, 0.505, 0.509, 0.52]
    assert decisions(values, mode="max", patience=2, min_delta=0.01) == [
        False,
        False,
        True,
        False,
    ]


def test_mode_min_and_max_are_opposites() -> None:
    falling = [1.0, 0.9, 0.8, 0.7]
    assert decisions(falling, mode="min", patience=1) == [False] * 4
    assert decisions(falling, mode="max", patience=1) == [False, True, True, True]


def test_baseline_must_be_beaten_before_anything_counts() -> None:
    values = [0.5, 0.55, 0.58, 0.61]
    assert decisions(values, mode="max", patience=2, baseline=0.6) == [False, True, True, False]


def test_plateau_stops_when_the_curve_goes_flat_even_below_the_best() -> None:
    flat = [0.9, 0.5, 0.5005, 0.5002]
    assert decisions(flat, mode="max", patience=2, strategy="plateau") == [False] * 3 + [True]


def test_plateau_keeps_going_while_the_value_still_moves() -> None:
    recovering = [0.9, 0.5, 0.6, 0.7, 0.8]
    assert decisions(recovering, mode="max", patience=2, strategy="plateau") == [False] * 5
    assert decisions(recovering, mode="max", patience=2) == [False, False, True, True, True]


def test_a_missing_monitor_warns_once_and_never_stops(events: Events) -> None:
    plugin = EarlyStopping(EarlyStoppingConfig(monitor="f1_score", patience=1))
    for epoch in range(3):
        context = PluginContext()
        context.epoch = epoch
        plugin.end_epoch(context)
        assert not context.should_stop_training
    warnings = [e for e in events if e["event"] == "early_stopping_monitor_missing"]
    assert len(warnings) == 1


def test_state_round_trips() -> None:
    plugin = EarlyStopping(EarlyStoppingConfig(monitor="accuracy", mode="max", verbose=False))
    for epoch, value in enumerate([0.5, 0.7, 0.6]):
        context = PluginContext()
        context.epoch = epoch
        context.validation_metrics["accuracy"] = value
        plugin.end_epoch(context)
    copy = EarlyStopping(plugin.config)
    copy.load_state_dict(plugin.state_dict())
    assert (copy.best, copy.best_epoch, copy.wait, copy.history) == (0.7, 1, 1, [0.5, 0.7, 0.6])


# -- early_stopping in training ----------------------------------------------------------


def test_training_stops_and_ends_with_the_best_weights() -> None:
    config = RunConfig(epochs=30, device="cpu", plugins=(), metrics=(MetricSpec("accuracy"),))
    plugin = EarlyStopping(
        EarlyStoppingConfig(monitor="validation_loss", patience=2, min_delta=0.0, verbose=False)
    )
    snapshots: dict[int, dict[str, Any]] = {}

    class Snapshot:
        name = "snapshot"

        def end_validation_loop(self, context: PluginContext) -> None:
            assert context.model is not None
            snapshots[context.epoch] = weights(context.model)

    setup = tiny_setup(batches=2)
    # An absurd learning rate makes the validation loss get worse quickly.
    setup.optimizer.param_groups[0]["lr"] = 5.0
    result = bz.Trainer().fit(setup, config, [Snapshot(), plugin])
    assert result.stopped_early
    assert plugin.best_epoch is not None
    assert result.epochs_completed == plugin.best_epoch + 1 + 2
    assert_same_weights(weights(setup.model), snapshots[plugin.best_epoch])


# -- console_out ---------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_console(stream: io.StringIO, **options: Any) -> str:
    plugin = ConsoleOut(ConsoleOutConfig(update_interval=0.0, **options), stream=stream)
    config = RunConfig(epochs=2, device="cpu", plugins=(), metrics=(MetricSpec("accuracy"),))
    bz.Trainer().fit(tiny_setup(batches=3), config, [plugin])
    return stream.getvalue()


def test_console_out_prints_one_summary_line_per_epoch_without_bars_off_a_terminal() -> None:
    output = run_console(io.StringIO())
    lines = output.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(
        "loss " in line and "val_loss " in line and "val_accuracy " in line for line in lines
    )
    assert "\r" not in output
    assert "\x1b" not in output


def test_console_out_draws_bars_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    output = run_console(FakeTerminal())
    assert "epoch 1/2 " in output
    assert " train " in output
    assert "3/3" in output
    assert "█" in output
    assert "\x1b[1m" in output  # the epoch is bold


def test_console_out_respects_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    output = run_console(FakeTerminal())
    assert "\x1b[1m" not in output
    assert "█" in output  # bars are not colour


def test_console_out_bars_can_be_turned_off() -> None:
    output = run_console(FakeTerminal(), bars="never", summary=False)
    assert "█" not in output
    assert "epoch 1/2  loss" not in output
