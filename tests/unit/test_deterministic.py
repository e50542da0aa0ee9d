"""``deterministic: true``: the switches it turns on for the run, and its one-line failure."""

from __future__ import annotations

import os
import random

import attrs
import numpy
import pytest
import torch
from tests._support import assert_same_weights, tiny_setup, weights
from torch import nn
from torch.utils.data import DataLoader, Dataset

import bz
from bz.config import RunConfig
from bz.plugins import PluginContext
from bz.training.device import CUBLAS_WORKSPACE

CONFIG = RunConfig(epochs=1, device="cpu", plugins=(), deterministic=True)


class Switches:
    """Records the determinism switches as the loop's hooks see them."""

    name = "switches"

    def __init__(self) -> None:
        self.seen: tuple[bool, bool, bool, str | None] | None = None

    def end_training_batch(self, context: PluginContext) -> None:
        cudnn = torch.backends.cudnn
        self.seen = (
            torch.are_deterministic_algorithms_enabled(),
            cudnn.deterministic,
            cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        )


def test_the_switches_are_on_during_the_run_and_back_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    switches = Switches()
    bz.Trainer().fit(tiny_setup(), CONFIG, [switches])
    assert switches.seen == (True, True, False, CUBLAS_WORKSPACE)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is True
    # Off (the default), nothing is touched.
    bz.Trainer().fit(tiny_setup(), CONFIG.with_overrides(deterministic=False), [switches])
    assert switches.seen[:3] == (False, torch.backends.cudnn.deterministic, True)


def test_a_cublas_setting_of_the_users_own_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    switches = Switches()
    bz.Trainer().fit(tiny_setup(), CONFIG, [switches])
    assert switches.seen is not None
    assert switches.seen[3] == ":16:8"


class Scatters(nn.Module):
    """A linear layer whose forward uses ``Tensor.put_``, which has no deterministic
    kernel on the CPU (torch raises under ``use_deterministic_algorithms``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(inputs)
        mask = torch.zeros(out.numel()).put_(torch.tensor([0]), torch.tensor([1.0]))
        return out + mask.reshape(out.shape)


def test_an_op_without_a_deterministic_kernel_fails_with_one_line() -> None:
    model = Scatters()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    setup = attrs.evolve(tiny_setup(), model=model, optimizer=optimizer)
    with pytest.raises(bz.TrainingError) as caught:
        bz.Trainer().fit(setup, CONFIG)
    assert caught.value.exit_code == 1
    assert str(caught.value) == (
        'training failed at epoch 1, step 0: "deterministic": true, but put_ has no '
        "deterministic implementation on this device; replace that op, or set "
        "deterministic to false"
    )
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert not torch.are_deterministic_algorithms_enabled()
    # Without the switch the same model trains.
    bz.Trainer().fit(setup, CONFIG.with_overrides(deterministic=False))


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Points with noise drawn, in the loader's workers, from torch's, Python's and
    NumPy's generators."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(64, 4, generator=generator)
        self.targets = (self.inputs.sum(dim=1) > 0).long()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.rand(4) + random.random() + float(numpy.random.rand())
        return self.inputs[index] + 0.01 * noise, self.targets[index]


def _trained_with_workers() -> dict[str, torch.Tensor]:
    bz.seed_everything(3)
    loader = DataLoader(Augmented(), batch_size=16, shuffle=True, num_workers=2)
    setup = attrs.evolve(tiny_setup(), train_loader=loader)
    bz.Trainer().fit(setup, CONFIG.with_overrides(epochs=2, seed=3))
    return weights(setup.model)


@pytest.mark.slow
def test_loader_workers_draw_the_same_numbers_in_every_run() -> None:
    assert_same_weights(_trained_with_workers(), _trained_with_workers())
