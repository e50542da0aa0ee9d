"""``context.last_loss``: the latest training batch's loss, detached, whatever form the
loop keeps it in between reads (on the CPU, the number its loss sum already read)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import bz
from bz.plugins import PluginContext
from bz.plugins._context import summing_as_on_a_device

BATCHES = 6


def _batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    for _ in range(BATCHES):
        inputs = torch.randn(8, 4, generator=generator)
        yield inputs, (inputs.sum(dim=1) > 0).long()


class Loader:
    def __len__(self) -> int:
        return BATCHES

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batches()


class LossWatcher:
    """Compares ``last_loss`` with the batch's own loss, and checks what it keeps."""

    name = "loss_watcher"

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        """(last_loss, loss.detach()) of each batch, read in end_training_batch."""
        self.previous: weakref.ReferenceType[torch.Tensor] | None = None
        self.graph_alive_at_next_batch: list[bool] = []
        self.at_next_batch: list[float] = []
        self.at_epoch_end: list[float] = []

    def start_training_batch(self, context: PluginContext) -> None:
        if self.previous is not None:
            self.graph_alive_at_next_batch.append(self.previous() is not None)
            loss = context.last_loss
            assert loss is not None
            self.at_next_batch.append(float(loss))

    def end_training_batch(self, context: PluginContext) -> None:
        loss, last = context.loss, context.last_loss
        assert loss is not None
        assert last is not None
        self.seen.append((last, loss.detach().clone()))
        assert context.last_loss is last, "a second read gives the same tensor"
        self.previous = weakref.ref(loss)

    def end_epoch(self, context: PluginContext) -> None:
        loss = context.last_loss
        assert loss is not None
        self.at_epoch_end.append(float(loss))


def _fit(dtype: torch.dtype, watcher: LossWatcher) -> None:
    model = nn.Linear(4, 2)
    cross_entropy = nn.CrossEntropyLoss()

    def step(network: nn.Module, batch: Any) -> bz.StepResult:
        inputs, targets = batch
        return bz.StepResult(cross_entropy(network(inputs), targets).to(dtype))

    setup = bz.TrainingSetup(
        model=model,
        step=step,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=Loader(),
    )
    config = bz.RunConfig(epochs=2, device="cpu", plugins=(), plugin_errors="raise")
    bz.Trainer().fit(setup, config, plugins=[watcher])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("as_on_a_device", [False, True])
def test_last_loss_is_the_batch_s_loss_bit_for_bit_and_keeps_no_graph(
    dtype: torch.dtype, as_on_a_device: bool
) -> None:
    watcher = LossWatcher()
    if as_on_a_device:  # the loss sum adds tensors, as on CUDA/MPS, and reads nothing
        with summing_as_on_a_device():
            _fit(dtype, watcher)
    else:
        _fit(dtype, watcher)
    assert len(watcher.seen) == 2 * BATCHES
    for last, loss in watcher.seen:
        assert last.dtype == loss.dtype == dtype
        assert last.device == loss.device
        assert not last.requires_grad
        assert last.grad_fn is None
        assert last.shape == ()
        assert torch.equal(last, loss)
    # The previous batch's loss stays readable until the next one ends, and after the
    # training loop, while the loss it came from (and its graph) is long gone.
    values = [float(loss) for _, loss in watcher.seen]
    assert watcher.at_next_batch == values[:-1]
    assert watcher.at_epoch_end == [values[BATCHES - 1], values[-1]]
    assert watcher.graph_alive_at_next_batch == [False] * (2 * BATCHES - 1)


def test_last_loss_first_read_in_inference_mode_is_usable_outside_it() -> None:
    class InferenceReader:
        name = "inference_reader"

        def __init__(self) -> None:
            self.sums: list[torch.Tensor] = []

        def end_training_batch(self, context: PluginContext) -> None:
            with torch.inference_mode():
                first = context.last_loss
            assert first is not None
            assert not first.is_inference()
            self.sums.append(first.add_(0))  # an in-place use: refused on an inference tensor

    reader = InferenceReader()
    model = nn.Linear(4, 2)
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=Loader(),
    )
    bz.Trainer().fit(
        setup, bz.RunConfig(epochs=1, device="cpu", plugins=(), plugin_errors="raise"), [reader]
    )
    assert len(reader.sums) == BATCHES


def test_a_context_built_by_hand_shows_the_last_loss_it_was_given() -> None:
    context = PluginContext()
    assert context.last_loss is None
    loss = torch.tensor(0.25)
    context.last_loss = loss
    assert context.last_loss is loss
    context.last_loss = None
    assert context.last_loss is None
