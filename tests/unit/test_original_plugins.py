"""Plugins written for the original bz-cli run unchanged (issue: a user's first hour).

The original's example plugins assign ``self.logger = logging.getLogger(__name__)``,
divide ``training_loss_total`` by ``training_batch_count`` for the mean batch loss, and
read ``context.extra["epochs"]``; each of those is checked here through a real fit.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import struct
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bz
from bz import _logging
from bz.config import ConfigError, RunConfig
from bz.plugins import Plugin, PluginContext, loss_of
from bz.plugins._context import DeviceSum, summing_as_on_a_device
from bz.plugins._names import resolve, run_value_names
from bz.plugins.console_out import ConsoleOut
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig

CONFIG = RunConfig(epochs=2, device="cpu", seed=0)


def uneven_setup() -> bz.TrainingSetup:
    """Batches of 16, 16 and 5 samples: the sample-weighted mean and the mean of the
    batch means differ."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(37, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    batches = [(inputs[i : i + 16], targets[i : i + 16]) for i in (0, 16, 32)]
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=batches,
        val_loader=batches,
    )


# -- 1. self.logger is assignable ---------------------------------------------------------


class OriginalStyle(Plugin):
    """As the original's examples begin: ``super().__init__()``, then its own logger."""

    name = "original_style"

    def __init__(self) -> None:
        super().__init__()
        self.logger = logging.getLogger(__name__)
        self.seen: list[Any] = []

    def start_training_session(self, context: PluginContext) -> None:
        self.logger.info("Training will run for %s epochs", context.extra.get("epochs"))
        self.seen.append(context.extra.get("epochs"))

    @staticmethod
    def create(config_data: dict[str, Any], training_config: object) -> OriginalStyle | None:
        return OriginalStyle()


def test_a_plugin_may_assign_its_own_logger_and_it_wins() -> None:
    plugin = OriginalStyle.create({}, None)
    assert plugin is not None
    own: object = plugin.logger
    assert own is logging.getLogger(__name__)


def test_a_plugin_that_assigns_nothing_keeps_bz_logger() -> None:
    class Plain(Plugin):
        name = "plain"

    with structlog.testing.capture_logs() as events:
        Plain().logger.info("hello", value=1)
    assert events == [{"event": "hello", "value": 1, "plugin": "plain", "log_level": "info"}]


def test_an_original_style_plugin_runs_and_sees_the_epochs_in_extra() -> None:
    plugin = OriginalStyle()
    result = bz.Trainer().fit(uneven_setup(), attrs.evolve(CONFIG, epochs=3), [plugin])
    assert [report.fault for report in result.plugins] == [None]
    assert plugin.seen == [3]


def _guide_extra_keys() -> set[str]:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "plugin-guide.md").read_text("utf-8")
    table = guide.split("### What bz puts in `extra`", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE))


def test_the_guide_lists_every_extra_key_bz_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bz.plugins.run_log import RunLog

    seen: set[str] = set()

    class Watcher:
        name = "watcher"

        def __init__(self) -> None:
            for hook in ("start_training_session", "end_epoch", "end_training_session"):
                setattr(self, hook, self._look)
            self.on_rewind = self._look

        def _look(self, context: PluginContext) -> None:
            seen.update(context.extra)

    class Failing:
        name = "failing"

        def end_epoch(self, context: PluginContext) -> None:
            raise RuntimeError("rewind me")

    monkeypatch.chdir(tmp_path)
    config = attrs.evolve(CONFIG, plugin_errors="rewind")
    bz.Trainer().fit(uneven_setup(), config, [RunLog(), Failing(), Watcher()])
    assert {"active_plugins", "epochs", "plugin_reports", "rewind", "run_dir"} <= seen
    assert seen <= _guide_extra_keys()


# -- 2. the loss totals are the original's ------------------------------------------------


class LossReader:
    """Records what the original's formula gives and what bz's means give."""

    name = "loss_reader"

    def __init__(self) -> None:
        self.batch_losses: list[float] = []
        self.batch_sizes: list[int] = []
        self.epochs: list[dict[str, float]] = []
        self.val_losses: list[float] = []

    def start_epoch(self, context: PluginContext) -> None:
        self.batch_losses, self.batch_sizes, self.val_losses = [], [], []

    def end_training_batch(self, context: PluginContext) -> None:
        self.batch_losses.append(loss_of(context).item())
        assert context.batch is not None
        self.batch_sizes.append(len(context.batch[1]))

    def end_validation_batch(self, context: PluginContext) -> None:
        assert context.loss is not None
        self.val_losses.append(context.loss.item())

    def end_epoch(self, context: PluginContext) -> None:
        self.epochs.append(
            {
                "original": context.training_loss_total / context.training_batch_count,
                "original_val": context.validation_loss_total / context.validation_batch_count,
                "weighted": context.training_loss,
                "batch_mean": sum(self.batch_losses) / len(self.batch_losses),
                "sample_mean": sum(map(float.__mul__, self.batch_losses, self.batch_sizes))
                / sum(self.batch_sizes),
                "val_batch_mean": sum(self.val_losses) / len(self.val_losses),
            }
        )


def test_total_over_batch_count_is_the_mean_batch_loss_as_in_the_original() -> None:
    reader = LossReader()
    result = bz.Trainer().fit(uneven_setup(), CONFIG, [reader])
    for epoch, record in zip(reader.epochs, result.history, strict=True):
        assert math.isclose(epoch["original"], epoch["batch_mean"], rel_tol=1e-6)
        assert math.isclose(epoch["original_val"], epoch["val_batch_mean"], rel_tol=1e-6)
        # bz's own loss stays the sample-weighted mean, in the context and the record.
        assert math.isclose(epoch["weighted"], epoch["sample_mean"], rel_tol=1e-6)
        assert math.isclose(record.training_loss, epoch["sample_mean"], rel_tol=1e-6)
        assert not math.isclose(epoch["original"], epoch["weighted"], rel_tol=1e-4)


@given(
    st.lists(
        st.tuples(st.floats(-1e3, 1e3, allow_nan=False), st.integers(1, 64)),
        max_size=300,
    ),
    st.integers(0, 300),
)
def test_device_sum_keeps_the_weighted_and_the_plain_sum(
    pairs: list[tuple[float, int]], read_at: int
) -> None:
    """Also when read part-way (a plugin reading training_loss mid-epoch): the reading
    shows the sums so far and changes nothing about the final ones."""
    total = DeviceSum()
    tensors = [(torch.tensor(value), weight) for value, weight in pairs]  # float32, like losses
    exact = [(float(tensor), weight) for tensor, weight in tensors]
    for index, (tensor, weight) in enumerate(tensors):
        if index == read_at:
            so_far = exact[:index]
            assert math.isclose(
                total.value(), sum(v * w for v, w in so_far), rel_tol=1e-9, abs_tol=1e-6
            )
            assert math.isclose(
                total.batch_sum(), sum(v for v, _ in so_far), rel_tol=1e-9, abs_tol=1e-6
            )
        total.add(tensor, weight)
    assert math.isclose(total.value(), sum(v * w for v, w in exact), rel_tol=1e-9, abs_tol=1e-6)
    assert math.isclose(total.batch_sum(), sum(v for v, _ in exact), rel_tol=1e-9, abs_tol=1e-6)


@given(
    st.lists(
        st.tuples(
            st.floats(width=32, allow_nan=False, allow_infinity=False),
            st.integers(1, 64),
        ),
        max_size=200,
    ),
    st.integers(0, 200),
)
def test_cpu_floats_and_the_device_way_give_the_same_sums_bit_for_bit(
    pairs: list[tuple[float, int]], read_at: int
) -> None:
    """The CPU's Python floats against the in-place float64 sum a device keeps (the
    CPU runs it inside summing_as_on_a_device): the same numbers, also read part-way."""
    tensors = [(torch.tensor(value, dtype=torch.float32), weight) for value, weight in pairs]

    def sums(total: DeviceSum) -> list[float]:
        read: list[float] = []
        for index, (tensor, weight) in enumerate(tensors):
            if index == read_at:
                read += [total.value(), total.batch_sum()]
            total.add(tensor, weight)
        return [*read, total.value(), total.batch_sum()]

    on_the_cpu = sums(DeviceSum(0.25))
    with summing_as_on_a_device():
        on_a_device = sums(DeviceSum(0.25))
    assert [struct.pack("<d", v) for v in on_the_cpu] == [
        struct.pack("<d", v) for v in on_a_device
    ]


def test_a_run_reports_the_same_losses_bit_for_bit_either_way() -> None:
    # Uneven batches (16, 16, 5): the weight changes within each epoch.
    config = attrs.evolve(CONFIG, epochs=3)
    on_the_cpu = bz.Trainer().fit(uneven_setup(), config, [reader := LossReader()])
    with summing_as_on_a_device():
        on_a_device = bz.Trainer().fit(uneven_setup(), config, [device_reader := LossReader()])
    assert [(e.training_loss, e.validation_loss) for e in on_the_cpu.history] == [
        (e.training_loss, e.validation_loss) for e in on_a_device.history
    ]
    assert reader.epochs == device_reader.epochs


# -- 12. console_out's summary sees what other plugins added ------------------------------


def test_console_out_listed_first_still_prints_metrics_other_plugins_add() -> None:
    class Adder:
        name = "adder"

        def end_epoch(self, context: PluginContext) -> None:
            context.validation_metrics["my_score"] = 0.5

    stream = io.StringIO()
    console = ConsoleOut(stream=stream)
    bz.Trainer().fit(uneven_setup(), attrs.evolve(CONFIG, epochs=1), [console, Adder()])
    assert "val_my_score 0.5" in stream.getvalue()


# -- 13. early_stopping watches only what the run produces ---------------------------------


def test_a_monitor_the_run_never_produces_is_refused_before_training() -> None:
    plugin = EarlyStopping(EarlyStoppingConfig(monitor="val_accuracy"))
    stream = io.StringIO()
    with pytest.raises(ConfigError) as raised:
        bz.Trainer().fit(uneven_setup(), CONFIG, [plugin, ConsoleOut(stream=stream)])
    message = str(raised.value)
    assert message.startswith("plugins.early_stopping.monitor: 'val_accuracy' is no value")
    assert message.endswith("validation_loss, training_loss, val_loss, loss")
    assert stream.getvalue() == ""  # nothing trained


def test_the_console_name_of_a_configured_metric_is_watched() -> None:
    plugin = EarlyStopping(
        EarlyStoppingConfig(monitor="val_accuracy", mode="max", patience=1, min_delta=2.0)
    )
    config = attrs.evolve(CONFIG, epochs=5, metrics=("accuracy",))
    result = bz.Trainer().fit(uneven_setup(), config, [plugin])
    # Nothing improves by 2.0: the run stops after the second epoch.
    assert (len(result.history), result.stopped_by) == (2, "plugin")
    assert plugin.history == [r.validation_metrics["accuracy"] for r in result.history]


def test_a_monitor_another_plugin_may_add_is_left_to_the_first_epoch() -> None:
    class Adder:
        name = "adder"

        def end_epoch(self, context: PluginContext) -> None:
            context.validation_metrics["my_score"] = 0.5

    plugin = EarlyStopping(EarlyStoppingConfig(monitor="my_score", patience=1))
    result = bz.Trainer().fit(uneven_setup(), attrs.evolve(CONFIG, epochs=4), [Adder(), plugin])
    assert result.stopped_by == "plugin"
    assert plugin.history == [0.5, 0.5]


@given(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True), max_size=4))
def test_every_name_a_run_produces_resolves_to_a_value(metrics: list[str]) -> None:
    produced = {("training", "loss"), ("validation", "loss")}
    produced |= {(phase, metric) for metric in metrics for phase in ("training", "validation")}
    for name in run_value_names(metrics):
        assert any(place in produced for place in resolve(name)), name


# -- stdlib logging and print() under `bz train` ------------------------------------------


@pytest.fixture
def rendered() -> io.StringIO:
    """bz's JSON rendering into a buffer, as `bz train --log-format json` sets it up."""
    stream = io.StringIO()
    _logging.configure("json", "info", stream=stream)
    return stream


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_plugins_stdlib_records_become_bz_events_while_bz_hosts(
    rendered: io.StringIO,
) -> None:
    _logging.note_plugin_module("tests_fake_plugin_pkg.module", "fake")
    logger = logging.getLogger("tests_fake_plugin_pkg.module")
    with _logging.host_plugin_output("json", "info"):
        logger.info("epoch %d done", 3)
        logger.debug("not at info")
        logging.getLogger("some_library").info("library chatter")
        logging.getLogger("some_library").warning("library warning")
    logger.warning("after: not bz's to show")
    events = _lines(rendered)
    assert [(e["event"], e.get("plugin"), e["logger"]) for e in events] == [
        ("epoch 3 done", "fake", "tests_fake_plugin_pkg.module"),
        ("library warning", None, "some_library"),
    ]
    assert logger.level == logging.NOTSET  # put back


def test_two_plugins_of_one_package_each_get_their_own_records(
    rendered: io.StringIO,
) -> None:
    # One distribution often ships several plugins (one module each) and a helper module.
    _logging.note_plugin_module("tests_two_plugin_pkg.first", "first")
    _logging.note_plugin_module("tests_two_plugin_pkg.second", "second")
    with _logging.host_plugin_output("json", "info"):
        logging.getLogger("tests_two_plugin_pkg.second").info("from the second")
        logging.getLogger("tests_two_plugin_pkg.first.inner").info("from the first")
        logging.getLogger("tests_two_plugin_pkg.shared").info("from the helper")
    assert [(e["event"], e.get("plugin")) for e in _lines(rendered)] == [
        ("from the second", "second"),
        ("from the first", "first"),
        ("from the helper", None),  # shown (a plugin package's), but whose is unknown
    ]


def test_printing_under_json_output_becomes_an_event(
    rendered: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    with _logging.host_plugin_output("json", "info"):
        print("Epoch 0: loss = 0.69")
        print("half", end="")
    assert capsys.readouterr().out == ""
    assert [(e["event"], e["text"]) for e in _lines(rendered)] == [
        ("printed", "Epoch 0: loss = 0.69"),
        ("printed", "half"),
    ]


def test_a_plugins_print_is_attributed_to_it(rendered: io.StringIO) -> None:
    namespace: dict[str, Any] = {"__name__": "tests_printing_plugin.hooks"}
    exec("def hook():\n    print('from the plugin')\n", namespace)
    _logging.note_plugin_module("tests_printing_plugin.hooks", "printer")
    with _logging.host_plugin_output("json", "info"):
        namespace["hook"]()
    (event,) = _lines(rendered)
    assert (event["event"], event["text"], event["plugin"]) == (
        "printed",
        "from the plugin",
        "printer",
    )


def test_as_a_library_bz_configures_no_stdlib_logger() -> None:
    root = logging.getLogger()
    handlers = list(root.handlers)
    _logging.note_plugin_module("tests_library_plugin.module", "lib")
    assert logging.getLogger("tests_library_plugin").level == logging.NOTSET
    assert root.handlers == handlers
