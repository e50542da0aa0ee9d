"""The profiler plugin: a real torch.profiler trace, throughput and peak memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests._integration_support import run_config, tiny_setup

import bz
from bz.plugins import PluginContext
from bz.plugins._inspection import implemented_hooks
from bz.plugins.profiler import TOP_OPERATORS_FILE, TRACE_FILE, Profiler, ProfilerConfig


class Probe:
    """Records what ``context.extra`` holds at ``end_epoch`` (listed before the profiler)."""

    def __init__(self) -> None:
        self.name = "probe"
        self.seen: list[dict[str, Any]] = []

    def end_epoch(self, context: PluginContext) -> None:
        self.seen.append(
            {
                "profiler": dict(context.extra.get("profiler", {})),
                "scalars": dict(context.extra.get("scalars", {})),
            }
        )


def test_trace_of_the_chosen_steps_and_the_top_operators(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ProfilerConfig(log_dir=str(tmp_path), skip_steps=2, warmup_steps=1, active_steps=2)
    plugin = Profiler(config)
    bz.Trainer().fit(tiny_setup(), run_config(epochs=2), [plugin])

    assert plugin.trace_path == tmp_path / TRACE_FILE
    trace = json.loads((tmp_path / TRACE_FILE).read_text(encoding="utf-8"))
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::addmm" in names  # the Linear layers' forward
    steps = sorted(n for n in names if isinstance(n, str) and n.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#3", "ProfilerStep#4"]  # after 2 skipped and 1 warm-up
    assert plugin.top
    assert len(plugin.top) <= 15
    assert all(not row.name.startswith("ProfilerStep") for row in plugin.top)
    self_times = [row.self_cpu_time for row in plugin.top]
    assert self_times == sorted(self_times, reverse=True)
    table = (tmp_path / TOP_OPERATORS_FILE).read_text(encoding="utf-8")
    assert plugin.top[0].name in table
    assert plugin.top[0].name in capsys.readouterr().err


def test_throughput_and_memory_reach_plugins_listed_before_it(tmp_path: Path) -> None:
    probe = Probe()
    plugin = Profiler(ProfilerConfig(trace=False, log_dir=str(tmp_path)))
    config = run_config(epochs=2, hyperparameters={"batch_size": 16})
    bz.Trainer().fit(tiny_setup(), config, [probe, plugin])

    assert [seen["profiler"]["epoch"] for seen in probe.seen] == [0, 1]
    for seen in probe.seen:
        stats, scalars = seen["profiler"], seen["scalars"]
        assert stats["batch_size"] == 16
        assert stats["samples_per_second"] == pytest.approx(stats["batches_per_second"] * 16)
        assert stats["batches_per_second"] == pytest.approx(4 / stats["seconds"])
        assert stats["memory"] == "process_max_rss"
        assert stats["peak_memory_bytes"] > 1_000_000  # a Python process with torch loaded
        assert scalars["perf/samples_per_second"] == stats["samples_per_second"]
        assert scalars["perf/peak_memory_mb"] == stats["peak_memory_bytes"] / 2**20
    assert not list(tmp_path.iterdir())  # trace: false writes nothing


def test_without_a_batch_size_samples_are_counted_by_the_loop(tmp_path: Path) -> None:
    probe = Probe()
    plugin = Profiler(ProfilerConfig(trace=False))
    setup = tiny_setup()
    bz.Trainer().fit(setup, run_config(epochs=1), [probe, plugin])

    (seen,) = probe.seen
    stats = seen["profiler"]
    samples = sum(len(inputs) for inputs, _ in setup.train_loader)
    assert stats["batch_size"] is None
    assert stats["samples_per_second"] == pytest.approx(samples / stats["seconds"])
    assert stats["batches_per_second"] > 0
    assert seen["scalars"]["perf/samples_per_second"] == stats["samples_per_second"]


def test_no_per_batch_call_unless_tracing() -> None:
    assert "end_training_batch" in implemented_hooks(Profiler())
    assert "end_training_batch" not in implemented_hooks(Profiler(ProfilerConfig(trace=False)))


def test_too_short_a_run_for_the_trace_says_so(
    tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    plugin = Profiler(ProfilerConfig(log_dir=str(tmp_path), skip_steps=50))
    bz.Trainer().fit(tiny_setup(), run_config(epochs=1), [plugin])

    assert not (tmp_path / TRACE_FILE).exists()
    (warning,) = [e for e in events if e["event"] == "profiler_no_trace"]
    assert "lower skip_steps" in warning["hint"]


def test_a_run_ending_mid_recording_still_writes_the_trace(tmp_path: Path) -> None:
    plugin = Profiler(ProfilerConfig(log_dir=str(tmp_path), skip_steps=1, active_steps=50))
    bz.Trainer().fit(tiny_setup(), run_config(epochs=1), [plugin])
    assert (tmp_path / TRACE_FILE).is_file()


def test_other_ranks_trace_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plugin = Profiler(ProfilerConfig(skip_steps=0, active_steps=1))
    context = PluginContext(rank=1, world_size=2)
    plugin.start_training_session(context)
    plugin.end_training_batch(context)
    plugin.end_training_session(context)
    assert plugin.trace_path is None
    assert not list(tmp_path.iterdir())
