"""Every error about what a step returned names where the step is defined.

docs/training.md ("Bad input"): one line, exit code 2, naming what is wrong and where.
A user's step that returns a float, a ``StepResult`` with a bad loss or sample count, or
nothing for the configured metrics, is told so with ``file:line:`` of the step's ``def``
(as the "does not require grad" error already was), not with bz's own location.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import bz
from bz.config import MetricSpec, RunConfig
from bz.metrics._registry import build_metrics

CONFIG = RunConfig(epochs=1, device="cpu", plugins=(), plugin_errors="raise", seed=0)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 3, generator=generator)
    return [(inputs, (inputs[:, 0] > 0).long())] * 2


def returns_a_float(model: nn.Module, batch: Any) -> Any:
    return float(nn.functional.cross_entropy(model(batch[0]), batch[1]).detach())


def returns_a_float_loss(model: nn.Module, batch: Any) -> Any:
    return bz.StepResult(1.0)  # type: ignore[arg-type]  # wrong on purpose


def returns_a_tensor_count(model: nn.Module, batch: Any) -> Any:
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    return bz.StepResult(loss, samples=torch.tensor(8))  # type: ignore[arg-type]  # wrong on purpose


def returns_the_loss_alone(model: nn.Module, batch: Any) -> Any:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


CASES: list[tuple[Callable[[nn.Module, Any], Any], bool, str]] = [
    (returns_a_float, False, "step returned float"),
    (returns_a_float_loss, False, "step returned a StepResult whose loss is float"),
    (returns_a_tensor_count, False, "step returned StepResult(samples=...) of type Tensor"),
    (returns_the_loss_alone, True, "metrics are configured but step gave them nothing"),
]


@pytest.mark.parametrize(("step", "metrics", "what"), CASES, ids=[c[2] for c in CASES])
def test_the_error_starts_with_the_file_and_line_of_the_step(
    step: Callable[[nn.Module, Any], Any], metrics: bool, what: str
) -> None:
    model = nn.Linear(3, 2)
    setup = bz.TrainingSetup(
        model=model,
        step=step,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=_data(),
    )
    chosen = build_metrics([MetricSpec("accuracy")]) if metrics else {}
    with pytest.raises(bz.UsageError) as caught:
        bz.Trainer().fit(setup, CONFIG, [], metrics=chosen)
    message = str(caught.value)
    line = inspect.getsourcelines(step)[1]
    assert message.startswith(f"{__file__}:{line}: {what}"), message
    assert "\n" not in message
