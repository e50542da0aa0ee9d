"""Regressions found by trying to break the loop and the sandbox.

A plugin can change state that no ``state_dict`` holds: torch's global grad mode, which
parameters require gradients, the optimizer's parameter groups. Under ``rewind`` a
fault after such a change must still leave the weights of the run without the plugin.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tests._support import assert_same_weights, tiny_setup, weights

import bz
from bz.config import RunConfig
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
