"""Resource use of the loop: nothing kept alive across steps, nothing read back per batch.

The loop must not hold a batch, its outputs or its autograd graph once the step that
used them is over, and a long run must not accumulate tensors. Both are checked with
weak references and by counting the tensors that are alive, never with timings or
process memory figures, so the checks hold on a busy shared machine too. Host
read-backs (``item``, ``tolist``, ``float(t)``, ...) are counted the same way: a run
with twice the batches must read back exactly as often, so batches read nothing.
"""

from __future__ import annotations

import gc
import io
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import bz
from bz.config import MetricSpec
from bz.metrics import build_metrics
from bz.plugins import PluginContext
from bz.plugins._context import DeviceSum
from bz.plugins.console_out import ConsoleOut
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig
from bz.testing import count_host_reads

Refs = list["weakref.ReferenceType[torch.Tensor]"]


class FreshBatches:
    """A loader that makes each batch as it is asked for and keeps none of them.

    Every tensor it hands out is registered (weakly) in ``made`` under its step, so a
    test can tell whether anything still holds it.
    """

    def __init__(self, batches: int, made: list[Refs]) -> None:
        self.batches = batches
        self.made = made

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(len(self.made))
        for _ in range(self.batches):
            inputs = torch.randn(8, 4, generator=generator)
            targets = (inputs.sum(dim=1) > 0).long()
            self.made.append([weakref.ref(inputs), weakref.ref(targets)])
            yield inputs, targets
            # The generator's own frame must not be what keeps a batch alive.
            del inputs, targets


class RecordingModel(nn.Module):
    """A small classifier that registers (weakly) every output it produces."""

    def __init__(self, outputs: Refs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.outputs = outputs

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs: torch.Tensor = self.layers(inputs)
        self.outputs.append(weakref.ref(outputs))
        return outputs


def _alive(refs: Refs) -> int:
    return sum(ref() is not None for ref in refs)


def _builtin_plugins() -> list[Any]:
    return [
        ConsoleOut(stream=io.StringIO()),
        EarlyStopping(EarlyStoppingConfig(monitor="training_loss", patience=10**6)),
    ]


def _metrics() -> dict[str, Any]:
    return build_metrics([MetricSpec("accuracy"), MetricSpec("f1_score")])


class StepWatcher:
    """After each step, counts what the step before it left alive.

    Each step's references are checked once, when they should just have died: a weak
    reference never comes back to life, so later checks would add nothing.
    """

    name = "step_watcher"

    def __init__(self, batches: list[Refs], outputs: Refs, losses: Refs) -> None:
        self.batches, self.outputs, self.losses = batches, outputs, losses
        self.outputs_alive_after_step: list[int] = []
        self.batches_alive_at_next_step: list[int] = []
        self.validation_outputs_alive: list[int] = []

    def start_training_batch(self, context: PluginContext) -> None:
        """The next batch is fetched: the previous one, its outputs, loss and graph must
        be gone (the context shows them to plugins only until its step ends)."""
        if len(self.batches) >= 2:
            self.batches_alive_at_next_step.append(_alive(self.batches[-2]))
        if self.outputs:
            self.outputs_alive_after_step.append(_alive(self.outputs[-1:] + self.losses[-1:]))

    def end_training_loop(self, context: PluginContext) -> None:
        """The epoch's last step is over: its outputs, loss and graph must be gone."""
        self.outputs_alive_after_step.append(_alive(self.outputs[-1:] + self.losses[-1:]))

    def end_validation_batch(self, context: PluginContext) -> None:
        """Validation keeps no more than the batch it is on."""
        self.validation_outputs_alive.append(_alive(self.outputs[-3:-1]))


def test_no_batch_output_or_graph_outlives_its_step() -> None:
    batches: list[Refs] = []
    outputs: Refs = []
    losses: Refs = []
    cross_entropy = nn.CrossEntropyLoss()

    def loss_fn(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = cross_entropy(predicted, targets)
        losses.append(weakref.ref(loss))
        return loss

    model = RecordingModel(outputs)
    watcher = StepWatcher(batches, outputs, losses)
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=loss_fn,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        train_loader=FreshBatches(40, batches),
        val_loader=FreshBatches(10, []),
    )
    # Reference cycles would be freed only by the cyclic collector, later; with it off,
    # "dead" means freed the moment the last reference went.
    gc.disable()
    try:
        result = bz.Trainer().fit(
            setup,
            bz.RunConfig(epochs=3, device="cpu", plugins=(), plugin_errors="raise"),
            plugins=[watcher, *_builtin_plugins()],
            metrics=_metrics(),
        )
    finally:
        gc.enable()
    assert result.global_step == 3 * 40
    assert len(watcher.outputs_alive_after_step) == 3 * 40 - 1 + 3
    assert set(watcher.outputs_alive_after_step) == {0}, "outputs, loss or graph outlived a step"
    assert len(watcher.batches_alive_at_next_step) == 3 * 40 - 1
    assert set(watcher.batches_alive_at_next_step) == {0}, "a batch outlived its step"
    assert len(watcher.validation_outputs_alive) == 3 * 10
    assert max(watcher.validation_outputs_alive) <= 1, "validation outputs accumulate"


def _live_tensors() -> tuple[int, int]:
    """How many tensors are alive, and the bytes of the distinct storages behind them."""
    count, storages = 0, {}
    for obj in gc.get_objects():
        # type(), not isinstance(): the latter reads __class__, which some torch
        # objects turn into a deprecation warning.
        if issubclass(type(obj), torch.Tensor):
            count += 1
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return count, sum(storages.values())


class TensorCensus:
    """Counts the live tensors at the start of some epochs (a census takes a while)."""

    name = "tensor_census"

    def __init__(self, epochs: set[int]) -> None:
        self.epochs = epochs
        self.counts: list[tuple[int, int]] = []

    def start_epoch(self, context: PluginContext) -> None:
        """Same point of every epoch counted: the counts must not grow."""
        if context.epoch in self.epochs:
            gc.collect()
            self.counts.append(_live_tensors())


@pytest.mark.slow
def test_a_thousand_steps_leave_the_live_tensors_unchanged() -> None:
    epochs = 15
    census = TensorCensus({2, 3, 8, epochs - 1})
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(80 * 8, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    train = [(inputs[i : i + 8], targets[i : i + 8]) for i in range(0, len(inputs), 8)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        train_loader=train,
        val_loader=train[:10],
    )
    result = bz.Trainer().fit(
        setup,
        bz.RunConfig(epochs=epochs, device="cpu", plugins=(), plugin_errors="raise"),
        plugins=[census, *_builtin_plugins()],
        metrics=_metrics(),
    )
    assert result.global_step == epochs * 80
    # The first epochs create what lives for the whole run (momentum buffers, gradients,
    # metric state, the best weights); from then on nothing may accumulate.
    assert len(census.counts) == 4
    assert len(set(census.counts)) == 1, f"live (tensors, bytes) grew: {census.counts}"


def test_a_long_epoch_keeps_no_loss_tensor() -> None:
    total = DeviceSum()
    added: Refs = []
    steps = 1287
    for step in range(steps):
        loss = torch.tensor(float(step % 10))
        added.append(weakref.ref(loss))
        total.add(loss)
        del loss
    assert _alive(added) == 0
    assert total.value() == pytest.approx(sum(step % 10 for step in range(steps)))


# -- host read-backs ----------------------------------------------------------------------


def _reads_in_a_run(batches: int) -> Counter[str]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batches * 8, 5, generator=generator)
    targets = torch.randint(0, 3, (batches * 8,), generator=generator)
    train = [(inputs[i : i + 8], targets[i : i + 8]) for i in range(0, len(inputs), 8)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=train,
        val_loader=train[: batches // 2],
    )
    metrics = build_metrics(
        [MetricSpec(name) for name in ("accuracy", "precision", "recall", "f1_score")]
        + [MetricSpec("top_k_accuracy", {"k": 2})]
    )
    counter: Counter[str] = Counter()
    with count_host_reads(counter):
        bz.Trainer().fit(
            setup,
            bz.RunConfig(epochs=2, device="cpu", plugins=(), plugin_errors="raise"),
            plugins=_builtin_plugins(),
            metrics=metrics,
        )
    return counter


def test_the_counter_sees_a_host_read() -> None:
    counter: Counter[str] = Counter()
    with count_host_reads(counter):
        float(torch.ones(()).sum())
        f"{torch.ones(())}"
    assert counter == Counter({"__float__": 1, "__format__": 1})


def test_batches_read_nothing_back_to_the_host_with_the_built_ins_on() -> None:
    # Reads happen per epoch (the metrics' one tolist, the loss the summary line shows,
    # early stopping's monitored value); twice the batches must not add a single one.
    short, long = _reads_in_a_run(8), _reads_in_a_run(16)
    assert sum(short.values()) > 0, "the run read nothing at all: is the counter working?"
    assert long == short
