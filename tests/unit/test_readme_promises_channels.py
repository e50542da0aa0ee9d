"""The guide's two assignable channels cannot break training either.

README ("What the sandbox guarantees": a plugin is "unable to break training") and the
plugin guide ("Talking back": set ``should_stop_training``, share data through
``extra``). Both are assigned, not only mutated, so the value a plugin assigns is the
loop's to read later: before this test an ``extra`` that was no dict made the next
rewind snapshot raise (``TypeError: 'int' object is not iterable``, the run failed),
and a ``should_stop_training`` whose truth cannot be told (a tensor of two elements)
raised in the loop when it read the flag. Now each is that plugin's fault, in its own
hook: quarantined, rewound, and the run ends with the weights of the run without it.
Values that mean a stop or a dict still work as before. Likewise a metric a plugin adds
must be a number (or a 0-d tensor): anything else is the adding plugin's fault, not that
of the loggers that format it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from tests._support import assert_same_weights, tiny_setup, weights

import bz
from bz.plugins import PluginContext
from bz.plugins.console_out import ConsoleOut
from bz.plugins.csv_logger import CsvLogger
from bz.plugins.run_log import RunLog


def _fit(plugins: list[Any]) -> tuple[dict[str, torch.Tensor], bz.FitResult]:
    setup = tiny_setup()
    config = bz.RunConfig(epochs=2, device="cpu", plugins=[], plugin_errors="rewind")
    result = bz.Trainer().fit(setup, config, plugins)
    return weights(setup.model), result


def _plugin(hook: str, act: Callable[[PluginContext], None]) -> Any:
    class Assigner:
        name = "assigner"

    setattr(Assigner, hook, lambda self, context: act(context))
    return Assigner()


def _extra_int(context: PluginContext) -> None:
    context.extra = 5  # type: ignore[assignment]  # the mistake under test


def _extra_list(context: PluginContext) -> None:
    context.extra = [("a", 1)]  # type: ignore[assignment]  # the mistake under test


def _stop_ambiguous(context: PluginContext) -> None:
    context.should_stop_training = torch.tensor([1, 0])  # type: ignore[assignment]


BAD: dict[str, Callable[[PluginContext], None]] = {
    "extra=5": _extra_int,
    "extra=[...]": _extra_list,
    "should_stop_training=tensor([1, 0])": _stop_ambiguous,
}


@pytest.mark.parametrize("hook", ["start_epoch", "end_training_batch", "end_epoch"])
@pytest.mark.parametrize("what", list(BAD))
def test_a_bad_channel_value_is_the_plugins_fault_and_changes_nothing(
    what: str, hook: str
) -> None:
    clean, clean_result = _fit([])
    got, result = _fit([_plugin(hook, BAD[what])])
    assert_same_weights(got, clean)
    assert result.global_step == clean_result.global_step
    assert not result.stopped_early
    (report,) = result.plugins
    assert report.fault is not None
    assert report.fault.stage == hook


def _extra_ordered(context: PluginContext) -> None:
    context.extra = OrderedDict(context.extra, mine=1)


def test_a_mapping_assigned_to_extra_is_kept_as_a_dict() -> None:
    seen: list[Any] = []

    class Reader:
        name = "reader"

        def end_epoch(self, context: PluginContext) -> None:
            seen.append(context.extra["mine"])

    _, result = _fit([_plugin("start_epoch", _extra_ordered), Reader()])
    assert seen == [1, 1]
    assert all(report.fault is None for report in result.plugins)


@pytest.mark.parametrize("value", [True, 1, torch.tensor(True)], ids=repr)
def test_a_value_that_means_stop_still_stops_after_the_step(value: Any) -> None:
    def stop(context: PluginContext) -> None:
        context.should_stop_training = value

    _, result = _fit([_plugin("end_training_batch", stop)])
    assert result.stopped_early
    assert result.global_step == 1
    assert result.plugins[0].fault is None


# A metric a plugin adds is read by every logger as a number. A value that is none (a
# string, a dict, a tensor of several elements) used to be accepted, and then failed
# console_out and csv_logger, which were quarantined for another plugin's data.


@pytest.mark.parametrize(
    "value", ["hello", {"a": 1}, None, torch.tensor([0.5, 1.0]), torch.tensor([0.5])], ids=repr
)
def test_a_metric_that_is_no_number_is_the_adding_plugins_fault(
    value: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def add(context: PluginContext) -> None:
        context.validation_metrics["mine"] = value

    loggers = [ConsoleOut(), RunLog(), CsvLogger()]
    _, result = _fit([_plugin("end_validation_loop", add), *loggers])
    faults = {report.name: report.fault for report in result.plugins}
    assert faults["assigner"] is not None
    assert faults["assigner"].stage == "end_validation_loop"
    assert faults["console_out"] is None
    assert faults["run_log"] is None
    assert faults["csv_logger"] is None
    assert all("mine" not in record.validation_metrics for record in result.history)


@pytest.mark.parametrize(
    "value", [3, 0.25, True, float("nan"), numpy.float32(0.5), torch.tensor(0.5)], ids=repr
)
def test_a_number_or_a_0d_tensor_is_a_metric_every_logger_takes(
    value: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def add(context: PluginContext) -> None:
        context.validation_metrics["mine"] = value

    loggers = [ConsoleOut(), RunLog(), CsvLogger()]
    _, result = _fit([_plugin("end_validation_loop", add), *loggers])
    assert all(report.fault is None for report in result.plugins)
    assert all("mine" in record.validation_metrics for record in result.history)
