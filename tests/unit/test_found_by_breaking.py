"""Regressions found by trying to break the loop and the sandbox.

A plugin can change state that no ``state_dict`` holds: torch's global grad mode, which
parameters require gradients, the optimizer's parameter groups. Under ``rewind`` a
fault after such a change must still leave the weights of the run without the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tests._support import assert_same_weights, tiny_setup, weights

import bz
from bz.config import GradientClip, RunConfig
from bz.plugins import NamedPlugin, PluginContext, model_of, optimizer_of

CONFIG = RunConfig(epochs=3, device="cpu", plugins=(), seed=0)


class FailsAfter:
    """In ``start_epoch`` of epoch 1: do something, then raise."""

    name = "fails_after"

    def __init__(self, action: Callable[[PluginContext], None], *, fail: bool = True) -> None:
        self.action = action
        self.fail = fail

    def start_epoch(self, context: PluginContext) -> None:
        if context.epoch == 1:
            self.action(context)
            if self.fail:
                raise RuntimeError("boom")


def _final_weights(plugins: list[NamedPlugin]) -> dict[str, torch.Tensor]:
    setup = tiny_setup()
    try:
        bz.Trainer().fit(setup, CONFIG, plugins=plugins)
    finally:
        torch.set_grad_enabled(True)
    return weights(setup.model)


def _no_grad(context: PluginContext) -> None:
    torch.set_grad_enabled(False)


def _freeze(context: PluginContext) -> None:
    next(iter(model_of(context).parameters())).requires_grad_(False)


def _add_group(context: PluginContext) -> None:
    optimizer_of(context).add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})


@pytest.mark.parametrize("action", [_no_grad, _freeze, _add_group])
def test_a_fault_after_changing_state_outside_the_state_dicts_is_rewound(
    action: Callable[[PluginContext], None],
) -> None:
    expected = _final_weights([])
    assert_same_weights(_final_weights([FailsAfter(action)]), expected)


def test_a_plugin_that_leaves_grad_mode_off_does_not_break_the_step() -> None:
    # Returning normally is not a fault, but the global grad mode is not the plugin's
    # to keep: without it the next backward pass has no graph.
    expected = _final_weights([])
    assert_same_weights(_final_weights([FailsAfter(_no_grad, fail=False)]), expected)
    assert torch.is_grad_enabled()


class _Lengthless:
    """Five batches of ten, from a loader without ``__len__``."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(50, 3, generator=generator)
        self.targets = torch.randn(50, 1, generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, 50, 10):
            yield self.inputs[start : start + 10], self.targets[start : start + 10]


class _NormWatcher:
    name = "norm_watcher"

    def __init__(self) -> None:
        self.outside: list[str] = []

    def _check(self, hook: str, context: PluginContext) -> None:
        if context.gradient_norm is not None:
            self.outside.append(hook)

    def end_training_loop(self, context: PluginContext) -> None:
        self._check("end_training_loop", context)

    def start_validation_loop(self, context: PluginContext) -> None:
        self._check("start_validation_loop", context)

    def end_epoch(self, context: PluginContext) -> None:
        self._check("end_epoch", context)


def test_the_trailing_step_of_a_lengthless_loader_leaves_no_gradient_norm_behind() -> None:
    # 5 batches in groups of 2: the last group steps after the loop; its norm must not
    # stay in the context for the hooks that follow ("None outside the batch hooks").
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = _Lengthless()
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=torch.nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=data,
        val_loader=[(data.inputs[:10], data.targets[:10])],
    )
    watcher = _NormWatcher()
    config = RunConfig(
        epochs=1,
        device="cpu",
        plugins=(),
        plugin_errors="raise",
        accumulate_grad_batches=2,
        gradient_clip=GradientClip(max_norm=1.0),
    )
    result = bz.Trainer().fit(setup, config, plugins=[watcher])
    assert result.global_step == 3
    assert watcher.outside == []


class _ScalesThenFails:
    """Scales the weights after step 2 (and returns), fails after step 7: rewound."""

    name = "scales_then_fails"

    def end_training_batch(self, context: PluginContext) -> None:
        if context.global_step == 2:
            with torch.no_grad():
                for parameter in model_of(context).parameters():
                    parameter.mul_(3.0)
        if context.global_step == 7:
            raise RuntimeError("boom")


class _CrashesOnRewind:
    """Stands for a crash (kill -9, a second Ctrl-C) while the epoch is replayed."""

    name = "crashes_on_rewind"

    def on_rewind(self, context: PluginContext) -> None:
        raise KeyboardInterrupt


def test_a_crash_while_an_epoch_is_replayed_resumes_without_the_failed_attempts_checkpoints(
    tmp_path: Path,
) -> None:
    # The failed attempt wrote step checkpoints holding the scaled weights; were they
    # left on disk, the resume would start from the newest of them.
    config = RunConfig(epochs=2, device="cpu", plugins=(), seed=0, checkpoint_every_steps=2)
    reference = tiny_setup(batches=10)
    bz.Trainer().fit(reference, config, checkpoint_dir=tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        bz.Trainer().fit(
            tiny_setup(batches=10),
            config,
            plugins=[_ScalesThenFails(), _CrashesOnRewind()],
            checkpoint_dir=tmp_path / "run",
        )
    resumed = tiny_setup(batches=10)
    bz.Trainer().fit(resumed, config, checkpoint_dir=tmp_path / "run")
    assert_same_weights(weights(resumed.model), weights(reference.model))
