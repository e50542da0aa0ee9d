"""console_out and early_stopping, as users see them."""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import pytest
from tests._support import Events, assert_same_weights, tiny_setup, weights

import bz
from bz.config import MetricSpec, RunConfig
from bz.plugins import PluginContext
from bz.plugins._inspection import implemented_hooks
from bz.plugins.console_out import ConsoleOut, ConsoleOutConfig
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig
from bz.testing import count_host_reads

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
    # The second epoch was best: numbered 2, as the console and checkpoint names say.
    assert (copy.best, copy.best_epoch, copy.wait, copy.history) == (0.7, 2, 1, [0.5, 0.7, 0.6])


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
            snapshots[context.epoch + 1] = weights(context.model)

    setup = tiny_setup(batches=2)
    # An absurd learning rate makes the validation loss get worse quickly.
    setup.optimizer.param_groups[0]["lr"] = 5.0
    result = bz.Trainer().fit(setup, config, [Snapshot(), plugin])
    assert result.stopped_early
    assert plugin.best_epoch is not None
    assert result.epochs_completed == plugin.best_epoch + 2 == plugin.stopped_epoch
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
    output = run_console(io.StringIO(), model_summary=False)
    lines = output.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(
        "loss " in line and "val_loss " in line and "val_accuracy " in line for line in lines
    )
    assert "\r" not in output
    assert "\x1b" not in output
    assert "samples/s" not in output
    assert "ETA" not in output


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


@pytest.mark.parametrize("bars", ["auto", "always", "never"])
@pytest.mark.parametrize("terminal", [True, False])
def test_console_out_has_per_batch_hooks_only_where_it_may_draw_bars(
    bars: str, terminal: bool
) -> None:
    # Off a terminal (or with bars off) the loop has nothing to call per batch for it.
    stream = FakeTerminal() if terminal else io.StringIO()
    plugin = ConsoleOut(ConsoleOutConfig(bars=bars), stream=stream)  # type: ignore[arg-type]
    draws = bars == "always" or (bars == "auto" and terminal)
    per_batch = {"end_training_batch", "end_validation_batch"}
    hooks = set(implemented_hooks(plugin))
    assert per_batch <= hooks if draws else not per_batch & hooks
    assert {"start_epoch", "end_epoch", "end_training_session", "on_exception"} <= hooks


# -- console_out: throughput and ETA, on a fake clock ------------------------------------


class FakeClock:
    """``time.perf_counter`` for the plugin: moved by hand, or by ``tick`` per call."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


class Ticker:
    """Listed before console_out: each training batch takes ``seconds`` on the clock."""

    name = "ticker"

    def __init__(self, clock: FakeClock, seconds: float, validation: float = 0.0) -> None:
        self.clock, self.seconds, self.validation = clock, seconds, validation

    def end_training_batch(self, context: PluginContext) -> None:
        self.clock.now += self.seconds

    def end_validation_batch(self, context: PluginContext) -> None:
        self.clock.now += self.validation


def bar_lines(seconds: float, validation: float = 0.0, batches: int = 6, **keys: Any) -> list[str]:
    """Every bar drawn during a 3-epoch run whose batches take ``seconds`` each."""
    clock = FakeClock()
    stream = FakeTerminal()
    plugin = ConsoleOut(
        ConsoleOutConfig(update_interval=0.0, bars="always"), stream=stream, clock=clock
    )
    config = RunConfig(epochs=3, device="cpu", plugins=(), **keys)
    ticker = Ticker(clock, seconds, validation)
    bz.Trainer().fit(tiny_setup(batches=batches), config, [ticker, plugin])
    return [part for part in stream.getvalue().split("\r\x1b[2K") if part.strip()]


def bar(lines: list[str], epoch: str, progress: str) -> str:
    (line,) = [x for x in lines if x.startswith(f"epoch {epoch} ") and f" {progress} " in x]
    return line


@pytest.fixture
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.mark.usefixtures("wide_terminal")
def test_console_out_bars_show_throughput_and_the_time_left() -> None:
    # 16 samples a batch, 1000 s a batch, 6 batches an epoch, 3 epochs.
    lines = bar_lines(1000.0)
    first = bar(lines, "1/3", "1/6")
    assert "samples/s" not in first  # one batch is not a pace yet
    third = bar(lines, "1/3", "3/6")
    assert third.endswith(" 0.02 samples/s ETA 50:00")  # 3 batches left in the epoch
    assert "run ETA 4:10:00 | train " in third  # 3000 s + 2 epochs of 6000 s
    assert bar_lines(0.001)[2].endswith(" 16.0k samples/s ETA 00:00")


@pytest.mark.usefixtures("wide_terminal")
def test_console_out_run_eta_counts_the_epochs_left_with_their_validation() -> None:
    # An epoch: 6 batches of 1000 s and 2 validation batches of 500 s, 7000 s in all.
    lines = bar_lines(1000.0, validation=500.0)
    assert "run ETA 4:10:00 |" in bar(lines, "1/3", "3/6")  # not measured yet: 3000 + 12000
    assert "run ETA 2:46:40 |" in bar(lines, "2/3", "3/6")  # 3000 + 7000
    assert "run ETA 00:00 | train" in bar(lines, "3/3", "6/6")


@pytest.mark.usefixtures("wide_terminal")
def test_console_out_run_eta_respects_max_steps() -> None:
    lines = bar_lines(1000.0, max_steps=8)
    assert "run ETA 1:23:20 |" in bar(lines, "1/3", "3/6")  # 5 steps left
    assert bar(lines, "1/3", "3/6").endswith(" ETA 50:00")  # the epoch's own ETA
    lines = bar_lines(1000.0, max_steps=4, accumulate_grad_batches=2)
    assert "run ETA 1:06:40 |" in bar(lines, "1/3", "4/6")  # 2 steps of 2 batches left


@pytest.mark.usefixtures("wide_terminal")
def test_console_out_run_eta_respects_max_time() -> None:
    # max_time is 10000 s from the start of the session; the loop's own clock is real.
    lines = bar_lines(1000.0, max_time=10_000)
    assert "run ETA 2:30:00 |" in bar(lines, "1/3", "1/6")  # known before any pace
    assert "run ETA 1:56:40 |" in bar(lines, "1/3", "3/6")  # sooner than the epochs' 4:10:00


@pytest.mark.usefixtures("wide_terminal")
def test_console_out_paces_a_resumed_epoch_from_its_own_batches() -> None:
    # Resumed after 4 of 10 batches: counts start above 0 and the skipped batches took
    # no training time here.
    context = PluginContext(epochs=2)
    context.run_config = RunConfig(epochs=2, device="cpu", plugins=())
    context.training_batches_per_epoch = 10
    clock = FakeClock()
    stream = FakeTerminal()
    plugin = ConsoleOut(
        ConsoleOutConfig(update_interval=0.0, bars="always"), stream=stream, clock=clock
    )
    plugin.start_training_session(context)
    plugin.start_epoch(context)
    clock.now = 50.0  # creating the iterator and skipping the 4 batches
    for done in (5, 6, 7):
        context.training_batch_count = done
        context.training_sample_count = 16 * done
        plugin.end_training_batch(context)
        clock.now += 2.0
    line = stream.getvalue().split("\r\x1b[2K")[-1]
    assert line.endswith(" 7/10 loss 0.0000 54.0s 8.00 samples/s ETA 00:06")
    assert "run ETA 00:26 |" in line  # 6 s + one epoch of 10 batches of 2 s


def test_console_out_fits_the_bars_to_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    lines = bar_lines(1000.0, max_time=10_000)
    assert all(len(line) < 80 for line in lines if not line.endswith("\n"))
    # The bars and the elapsed time go before the throughput and ETAs.
    line = bar(lines, "1/3", "3/6")
    assert line.startswith("epoch 1/3 run ETA 1:56:40 | train 3/6 loss ")
    assert line.endswith(" 0.02 samples/s ETA 50:00")


def console_reads(batches: int) -> Counter[str]:
    clock = FakeClock(tick=1e-6)  # every redraw after the first waits for update_interval
    stream = FakeTerminal()
    plugin = ConsoleOut(ConsoleOutConfig(bars="always"), stream=stream, clock=clock)
    config = RunConfig(epochs=2, device="cpu", plugins=(), max_steps=1000, max_time=1000)
    counter: Counter[str] = Counter()
    with count_host_reads(counter):
        bz.Trainer().fit(tiny_setup(batches=batches), config, [plugin])
    assert "samples/s" in stream.getvalue()
    assert "run ETA" in stream.getvalue()
    return counter


def test_console_out_bars_read_nothing_from_the_device_per_step() -> None:
    assert console_reads(8) == console_reads(16)
