"""Plugins read the loop's values and cannot overwrite them; the guide's channels stay open.

During a run a plugin that assigns ``epoch``, a counter, a loss total, ``model`` or a
metric the loop computed fails in its own hook (and is rewound). Adding its own metric
(``context.training_metrics["my_custom_metric"] = 0.95``, as the plugin guide writes
it), writing ``extra`` and setting ``should_stop_training`` work exactly as before, and a
``PluginContext`` built by hand stays an ordinary, writable object.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tests._support import assert_same_weights, tiny_setup, weights

import bz
from bz.plugins import PluginContext
from bz.plugins._context import LoopView
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig


def _config(**changes: Any) -> bz.RunConfig:
    return bz.RunConfig().with_overrides(
        epochs=3, device="cpu", metrics=["accuracy"], plugin_errors="rewind", **changes
    )


def _fit(plugins: list[Any], **changes: Any) -> tuple[dict[str, torch.Tensor], bz.FitResult]:
    setup = tiny_setup()
    result = bz.Trainer().fit(setup, _config(**changes), plugins)
    return weights(setup.model), result


class CustomMetric:
    """The guide's example: adds its own metric in ``end_epoch``."""

    name = "custom"

    def end_epoch(self, context: PluginContext) -> None:
        context.training_metrics["my_custom_metric"] = 0.95 - 0.1 * context.epoch


class Reader:
    """Runs after ``custom`` and reads what it added, and the loop's values."""

    name = "reader"

    def __init__(self) -> None:
        self.seen: list[float] = []
        self.held: PluginContext | None = None

    def end_epoch(self, context: PluginContext) -> None:
        self.seen.append(context.training_metrics["my_custom_metric"])
        self.held = context


def test_the_guides_channels_work_as_written() -> None:
    reader = Reader()
    stopper = EarlyStopping(
        EarlyStoppingConfig(monitor="my_custom_metric", mode="max", patience=1, min_delta=0.0)
    )
    _, result = _fit([CustomMetric(), reader, stopper])
    # Visible to the plugin after it, to early_stopping (which stopped on it: it only
    # falls) and in the epoch's record, which every logger reads.
    assert reader.seen == pytest.approx([0.95, 0.85])
    assert result.stopped_early
    assert [r.training_metrics["my_custom_metric"] for r in result.history] == pytest.approx(
        [0.95, 0.85]
    )
    assert all("accuracy" in r.training_metrics for r in result.history)
    # A context held across hooks shows the loop's current values.
    assert reader.held is not None
    assert reader.held.epoch == 1


def test_extra_and_the_stop_flag_work_as_written() -> None:
    class Sharer:
        name = "sharer"

        def end_epoch(self, context: PluginContext) -> None:
            context.extra["my_plugin_data"] = {"epoch": context.epoch}

    class Stopper:
        name = "stopper"

        def end_epoch(self, context: PluginContext) -> None:
            if context.extra["my_plugin_data"]["epoch"] == 1:
                context.should_stop_training = True

    _, result = _fit([Sharer(), Stopper()])
    assert result.epochs_completed == 2
    assert result.stopped_early


def _set_epoch(context: PluginContext) -> None:
    context.epoch = 7


def _set_step(context: PluginContext) -> None:
    context.global_step = 0


def _set_loss(context: PluginContext) -> None:
    context.validation_loss_total = 1e9


def _set_model(context: PluginContext) -> None:
    context.model = torch.nn.Linear(4, 2)  # type: ignore[misc]  # read-only to mypy as well


def _set_metric(context: PluginContext) -> None:
    context.validation_metrics["accuracy"] = 1.0


def _drop_metric(context: PluginContext) -> None:
    del context.validation_metrics["accuracy"]


def _replace_metrics(context: PluginContext) -> None:
    context.validation_metrics = {}


OVERWRITES: dict[str, Callable[[PluginContext], None]] = {
    "epoch": _set_epoch,
    "global_step": _set_step,
    "loss_total": _set_loss,
    "model": _set_model,
    "metric": _set_metric,
    "metric_deleted": _drop_metric,
    "metrics_replaced": _replace_metrics,
}


@pytest.mark.parametrize("what", list(OVERWRITES))
def test_overwriting_a_loop_value_is_the_plugins_fault_and_changes_nothing(what: str) -> None:
    clean, clean_result = _fit([EarlyStopping(EarlyStoppingConfig(patience=1, min_delta=1.0))])

    class Scribbler:
        name = "scribbler"

        def end_validation_loop(self, context: PluginContext) -> None:
            OVERWRITES[what](context)

    stopper = EarlyStopping(EarlyStoppingConfig(patience=1, min_delta=1.0))
    got, result = _fit([Scribbler(), stopper])
    assert_same_weights(got, clean)
    assert [r.validation_metrics for r in result.history] == [
        r.validation_metrics for r in clean_result.history
    ]
    fault = result.plugins[0].fault
    assert fault is not None
    assert fault.stage == "end_validation_loop"


def test_the_metric_dicts_stay_plain_dicts_for_loggers() -> None:
    class Dumper:
        name = "dumper"

        def __init__(self) -> None:
            self.dumped: list[str] = []

        def end_epoch(self, context: PluginContext) -> None:
            context.validation_metrics["mine"] = 1.0
            self.dumped.append(json.dumps(context.validation_metrics, sort_keys=True))

    dumper = Dumper()
    _fit([dumper])
    assert dumper.dumped
    assert all('"accuracy"' in line and '"mine": 1.0' in line for line in dumper.dumped)


def test_a_context_built_by_hand_stays_writable() -> None:
    # The plugin guide's test, as written there.
    context = PluginContext()
    context.epoch = 5
    context.training_loss_total = 2.0
    context.training_sample_count = 4
    context.validation_metrics = {"accuracy": 0.5}
    context.validation_metrics["accuracy"] = 0.75
    assert (context.epoch, context.training_loss, context.validation_metrics) == (
        5,
        0.5,
        {"accuracy": 0.75},
    )


@given(
    epoch=st.integers(0, 10**6),
    samples=st.integers(0, 10**9),
    batch=st.one_of(st.none(), st.integers(), st.text(max_size=3)),
)
def test_the_view_shows_every_field_as_the_loop_holds_it_now(
    epoch: int, samples: int, batch: object
) -> None:
    """Each field read through the view is the source's current object, also after the
    loop changes it (a plugin holding the view across hooks sees current values); the
    configuration's two (``run_config``, ``hyperparameters``) are equal read-only copies
    (tests/unit/test_context_config.py)."""
    source = PluginContext(epochs=7, rank=1, world_size=2, hyperparameters={"lr": epoch})
    view = LoopView(source)
    copied = {"run_config", "hyperparameters"}
    fields = [
        name
        for name in vars(source)
        if name not in {"training_metrics", "validation_metrics", *copied}
    ]
    assert {"epoch", "global_step", "batch", "extra", "_training_loss"} <= set(fields)
    source.epoch, source.training_sample_count, source.batch = epoch, samples, batch
    source.extra = {"shared": epoch}
    for name in fields:
        assert getattr(view, name) is getattr(source, name), name
    source.run_config = bz.RunConfig(hyperparameters={"lr": samples})
    assert (view.hyperparameters, view.run_config) == (source.hyperparameters, source.run_config)
    assert (view.epochs, view.rank, view.world_size) == (7, 1, 2)
    assert view.training_loss_total == source.training_loss_total
    assert view.is_main_process is False
    source.training_metrics = {"accuracy": 0.5}
    assert view.training_metrics == {"accuracy": 0.5}
