"""The training loop as plugins and library users see it."""

from __future__ import annotations

import math
import traceback
from collections import Counter
from typing import Any

import attrs
import pytest
import torch
from tests._support import assert_same_weights, tiny_setup, weights

import bz
from bz.config import RunConfig
from bz.plugins import HOOK_NAMES, Plugin, PluginContext
from bz.plugins._context import DeviceSum
from bz.testing import HOST_READS, count_host_reads

CONFIG = RunConfig(epochs=2, device="cpu", plugins=())


class Recorder:
    """Implements every hook and records the order they fire in."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []
        for hook in HOOK_NAMES:
            setattr(self, hook, self._recording(hook))

    def _recording(self, hook: str) -> Any:
        def record(context: PluginContext) -> None:
            self.calls.append(hook)

        return record


def test_hooks_fire_in_the_documented_order() -> None:
    recorder = Recorder()
    bz.Trainer().fit(tiny_setup(batches=2), CONFIG, [recorder])
    train_batch = [
        "start_training_batch",
        "after_backward",
        "before_optimizer_step",
        "end_training_batch",
    ]
    val_batch = ["start_validation_batch", "end_validation_batch"]
    epoch = [
        "start_epoch",
        "start_training_loop",
        *train_batch * 2,
        "end_training_loop",
        "start_validation_loop",
        *val_batch * 2,
        "end_validation_loop",
        "end_epoch",
    ]
    assert recorder.calls == ["start_training_session", *epoch * 2, "end_training_session"]


def test_without_validation_data_no_validation_hooks_fire() -> None:
    recorder = Recorder()
    result = bz.Trainer().fit(tiny_setup(validation=False), CONFIG, [recorder])
    assert not [c for c in recorder.calls if "validation" in c]
    assert result.final is not None
    assert result.final.validation_loss is None


def test_a_stop_request_is_honoured_after_the_current_step() -> None:
    class StopEarly:
        name = "stop_early"

        def __init__(self) -> None:
            self.batches_after_request = 0
            self.epoch_ends: list[int] = []

        def end_training_batch(self, context: PluginContext) -> None:
            if context.should_stop_training:
                self.batches_after_request += 1
            if context.global_step == 2:
                context.should_stop_training = True

        def end_epoch(self, context: PluginContext) -> None:
            self.epoch_ends.append(context.training_batch_count)

    plugin = StopEarly()
    result = bz.Trainer().fit(tiny_setup(batches=4), attrs.evolve(CONFIG, epochs=5), [plugin])
    assert plugin.batches_after_request == 0, "no batch is trained after the request"
    assert result.global_step == 2
    assert result.stopped_early
    assert result.stopped_by == "plugin"
    assert result.epochs_completed == 0
    assert plugin.epoch_ends == [2], "the epoch ends early, its hooks still run"
    assert result.final is not None
    assert result.final.partial


def test_seeded_runs_are_reproducible() -> None:
    first, second = tiny_setup(), tiny_setup()
    bz.Trainer().fit(first, attrs.evolve(CONFIG, seed=3))
    bz.Trainer().fit(second, attrs.evolve(CONFIG, seed=3))
    assert_same_weights(weights(first.model), weights(second.model))


def test_training_matches_a_hand_written_loop() -> None:
    setup, reference = tiny_setup(), tiny_setup()
    bz.Trainer().fit(setup, attrs.evolve(CONFIG, epochs=3))
    for _ in range(3):
        for inputs, targets in reference.train_loader:
            reference.optimizer.zero_grad(set_to_none=True)
            assert reference.loss_fn is not None
            loss = reference.loss_fn(reference.model(inputs), targets)
            torch.autograd.backward(loss)
            reference.optimizer.step()
    assert_same_weights(weights(setup.model), weights(reference.model))


def test_loss_totals_sum_batch_means_and_the_losses_are_sample_weighted() -> None:
    seen: dict[str, float] = {}

    class Reader:
        name = "reader"

        def end_epoch(self, context: PluginContext) -> None:
            seen["total"] = context.training_loss_total
            seen["count"] = context.training_batch_count
            seen["samples"] = context.training_sample_count
            seen["mean"] = context.training_loss
            seen["val_count"] = context.validation_batch_count

    result = bz.Trainer().fit(tiny_setup(batches=3), attrs.evolve(CONFIG, epochs=1), [Reader()])
    assert seen["count"] == 3
    assert seen["val_count"] == 2
    assert seen["samples"] > seen["count"]
    # Equal batches: the mean of the batch means (the original's formula) is the
    # sample-weighted mean (uneven batches: tests/unit/test_original_plugins.py).
    assert math.isclose(seen["mean"], seen["total"] / seen["count"])
    assert result.final is not None
    assert math.isclose(result.final.training_loss, seen["mean"])


def test_a_plugin_scribbling_on_the_context_cannot_change_the_loop() -> None:
    class Scribbler:
        name = "scribbler"

        def end_training_batch(self, context: PluginContext) -> None:
            context.epoch = 99
            context.global_step = -5
            context.training_loss_total = 1e9
            context.training_batch_count = 0

    expected = tiny_setup()
    clean = bz.Trainer().fit(expected, CONFIG)
    setup = tiny_setup()
    result = bz.Trainer().fit(setup, CONFIG, [Scribbler()])
    assert_same_weights(weights(setup.model), weights(expected.model))
    assert result.global_step == clean.global_step
    assert [r.training_loss for r in result.history] == [r.training_loss for r in clean.history]


def test_plugins_may_add_metrics_and_share_data() -> None:
    class Producer:
        name = "producer"

        def end_epoch(self, context: PluginContext) -> None:
            context.training_metrics["custom"] = 0.5
            context.extra["producer_data"] = {"epoch": context.epoch}

    class Consumer:
        name = "consumer"

        def __init__(self) -> None:
            self.seen: list[Any] = []

        def end_epoch(self, context: PluginContext) -> None:
            self.seen.append((context.extra["producer_data"], context.extra["active_plugins"]))

    consumer = Consumer()
    result = bz.Trainer().fit(tiny_setup(), CONFIG, [Producer(), consumer])
    assert consumer.seen[1] == ({"epoch": 1}, ["producer", "consumer"])
    assert result.history[0].training_metrics == {"custom": 0.5}


def test_configured_metrics_reach_the_context() -> None:
    seen: list[dict[str, float]] = []

    class Reader:
        name = "reader"

        def end_epoch(self, context: PluginContext) -> None:
            seen.append(dict(context.validation_metrics))

    config = bz.RunConfig(epochs=1, device="cpu", plugins=(), metrics=())
    from bz.config import MetricSpec

    config = attrs.evolve(config, metrics=(MetricSpec("accuracy"),))
    bz.Trainer().fit(tiny_setup(), config, [Reader()])
    assert list(seen[0]) == ["accuracy"]
    assert 0.0 <= seen[0]["accuracy"] <= 1.0


def test_the_context_shows_model_optimizer_device_and_sizes() -> None:
    seen: dict[str, Any] = {}

    class Inspector(Plugin):
        name = "inspector"

        def start_training_session(self, context: PluginContext) -> None:
            seen.update(
                model=context.model,
                optimizer=context.optimizer,
                device=context.device,
                batches=context.training_batches_per_epoch,
                val_batches=context.validation_batches_per_epoch,
                epochs=context.epochs,
                main=context.is_main_process,
            )

    setup = tiny_setup(batches=3)
    bz.Trainer().fit(setup, CONFIG, [Inspector()])
    assert seen["model"] is setup.model
    assert seen["optimizer"] is setup.optimizer
    assert seen["device"] == torch.device("cpu")
    assert (seen["batches"], seen["val_batches"], seen["epochs"]) == (3, 2, 2)
    assert seen["main"] is True


def test_the_scheduler_steps_once_per_epoch() -> None:
    setup = tiny_setup()
    scheduler = torch.optim.lr_scheduler.StepLR(setup.optimizer, step_size=1, gamma=0.5)
    bz.Trainer().fit(attrs.evolve(setup, scheduler=scheduler), attrs.evolve(CONFIG, epochs=3))
    assert setup.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_bad_batches_are_reported_as_such() -> None:
    setup = attrs.evolve(tiny_setup(), train_loader=[(torch.zeros(2, 4),)])
    with pytest.raises(bz.UsageError, match=r"train_loader yielded tuple of length 1"):
        bz.Trainer().fit(setup, CONFIG)


def test_a_failure_in_user_code_keeps_its_type_and_gains_a_note() -> None:
    setup = tiny_setup()

    def exploding_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.shape[0] > 0:
            raise ValueError("shapes are wrong")
        return outputs.sum()

    # Before: a bz.TrainingError that `except ValueError` in the host did not catch.
    with pytest.raises(ValueError, match="shapes are wrong") as caught:
        bz.Trainer().fit(attrs.evolve(setup, loss_fn=exploding_loss), CONFIG)
    assert type(caught.value) is ValueError
    assert caught.value.__notes__ == [
        "bz: training failed at epoch 1, step 0 (in the training loop)"
    ]
    assert caught.value.__traceback__ is not None
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[-1] == "exploding_loss"


def test_training_setup_checks_its_fields() -> None:
    with pytest.raises(bz.UsageError, match=r"model must be a torch\.nn\.Module"):
        bz.TrainingSetup(
            model="not a model",  # type: ignore[arg-type]  # the point of the test
            loss_fn=torch.nn.MSELoss(),
            optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
            train_loader=[],
        )


def test_device_sum_reads_back_only_when_asked() -> None:
    # The device way (a GPU's; on the CPU inside count_host_reads): adding reads nothing.
    counter: Counter[str] = Counter()
    with count_host_reads(counter):
        total = DeviceSum()
        for value in range(100):
            total.add(torch.tensor(float(value)))
        assert sum(counter.values()) == 0
        assert total.value() == sum(range(100))
    assert counter == Counter({"__float__": 1})


def test_on_the_cpu_each_value_is_read_once_as_it_is_added(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CPU way: one item per value (the CPU is the host: nothing to wait for), then
    # the sums are Python floats, read without touching a tensor.
    reads: Counter[str] = Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(*args: Any, _name: str = name, _original: Any = original) -> Any:
            reads[_name] += 1
            return _original(*args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    total = DeviceSum()
    for value in range(100):
        total.add(torch.tensor(float(value)))
    assert total.value() == sum(range(100))
    assert reads == Counter({"item": 100})


def test_unavailable_devices_are_a_usage_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(bz.UsageError, match="CUDA is not available"):
        bz.Trainer().fit(tiny_setup(), attrs.evolve(CONFIG, device="cuda"))
