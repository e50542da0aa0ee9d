"""Tests of ``epoch_timer``, written as a plugin author would with ``bz.testing``."""

from __future__ import annotations

import pytest
from bz_example_plugins import EpochTimer, EpochTimerConfig

from bz import ConfigError
from bz.testing import check_plugin, load_plugin, make_context, run_plugin


def test_reports_each_epoch_duration_as_a_training_metric() -> None:
    result = run_plugin(EpochTimer(), epochs=3)
    assert [sorted(r.training_metrics) for r in result.history] == [["epoch_seconds"]] * 3
    assert all(r.training_metrics["epoch_seconds"] >= 0 for r in result.history)


def test_bz_accepts_it_and_sees_its_hooks() -> None:
    assert check_plugin(EpochTimer()) == ("start_epoch", "end_epoch")


def test_options_are_structured_into_config() -> None:
    plugin = load_plugin(EpochTimer, {"metric": "secs", "warn_after": 2})
    assert isinstance(plugin, EpochTimer)
    assert plugin.config == EpochTimerConfig(metric="secs", warn_after=2.0)


def test_bad_options_name_the_json_path() -> None:
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.epoch_timer\.warn_after: must be >= 0"):
        load_plugin(EpochTimer, {"warn_after": -1})
    with pytest.raises(ConfigError, match='did you mean "metric"'):
        load_plugin(EpochTimer, {"metrc": "x"})


def test_state_survives_a_resume() -> None:
    first = EpochTimer()
    first.start_epoch(make_context(epoch=0))
    first.end_epoch(make_context(epoch=0))
    second = EpochTimer()
    second.load_state_dict(first.state_dict())
    assert second.epochs_timed == 1
    assert second.total_seconds == first.total_seconds
