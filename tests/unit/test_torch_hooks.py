"""Torch hooks a plugin registers from inside its hooks are the plugin's.

One case per kind of hook (module forward pre / forward / backward pre / backward, their
global forms, tensor grad and post-accumulate-grad hooks, optimizer step pre / post and
their global forms): the plugin registers it in ``start_epoch``; the hook changes the
weights and raises on its fifth call, inside torch's forward, backward or step. That is
the plugin's fault (quarantined, rewound): the run trains all its epochs and ends with
the weights of the run without the plugin. Quarantining the plugin removes its hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from tests._fault_support import resume_setup
from tests._support import assert_same_weights, weights
from torch.nn.modules import module as torch_module
from torch.optim import optimizer as torch_optimizer
from torch.utils.hooks import RemovableHandle

import bz
from bz.plugins import PluginContext
from bz.training.device import seed_everything

CONFIG = bz.RunConfig(epochs=2, device="cpu", seed=5, checkpoint_interval=1)

Fire = Callable[[], None]
Register = Callable[[torch.nn.Module, torch.optim.Optimizer, Fire], list[RemovableHandle]]


def _train(
    plugins: list[Any], folder: Path, config: bz.RunConfig = CONFIG
) -> tuple[dict[str, torch.Tensor], bz.FitResult]:
    seed_everything(5)
    setup = resume_setup(config)
    result = bz.Trainer().fit(setup, config, plugins, checkpoint_dir=folder)
    return weights(setup.model), result


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _train([], tmp_path_factory.mktemp("clean"))[0]


def _layer(model: torch.nn.Module, index: int) -> torch.nn.Module:
    return list(model.children())[index]


def _tensor_hook(parameter: torch.nn.Parameter, method: str, fire: Fire) -> RemovableHandle:
    # Tensor's registration methods are untyped in torch.
    register: Callable[[Callable[[Any], None]], RemovableHandle] = getattr(parameter, method)
    return register(lambda _value: fire())


def _each_parameter(
    model: torch.nn.Module, register: Callable[[torch.nn.Parameter], RemovableHandle]
) -> list[RemovableHandle]:
    return [register(parameter) for parameter in model.parameters()]


# What the plugin registers, by kind: each calls ``fire`` and returns None (no change).
KINDS: dict[str, Register] = {
    "forward_pre_hook": lambda model, opt, fire: [
        _layer(model, 0).register_forward_pre_hook(lambda m, args: fire())
    ],
    "forward_hook": lambda model, opt, fire: [
        _layer(model, 0).register_forward_hook(lambda m, args, out: fire())
    ],
    "backward_pre_hook": lambda model, opt, fire: [
        _layer(model, 3).register_full_backward_pre_hook(lambda m, grad_out: fire())
    ],
    "backward_hook": lambda model, opt, fire: [
        _layer(model, 3).register_full_backward_hook(lambda m, grad_in, grad_out: fire())
    ],
    "global_forward_pre_hook": lambda model, opt, fire: [
        torch_module.register_module_forward_pre_hook(lambda m, args: fire())
    ],
    "global_forward_hook": lambda model, opt, fire: [
        torch_module.register_module_forward_hook(lambda m, args, out: fire())
    ],
    "global_backward_hook": lambda model, opt, fire: [
        torch_module.register_module_full_backward_hook(lambda m, grad_in, grad_out: fire())
    ],
    "grad_hook": lambda model, opt, fire: _each_parameter(
        model, lambda p: _tensor_hook(p, "register_hook", fire)
    ),
    "post_accumulate_grad_hook": lambda model, opt, fire: _each_parameter(
        model, lambda p: _tensor_hook(p, "register_post_accumulate_grad_hook", fire)
    ),
    "optimizer_step_pre_hook": lambda model, opt, fire: [
        opt.register_step_pre_hook(lambda o, args, kwargs: fire())
    ],
    "optimizer_step_post_hook": lambda model, opt, fire: [
        opt.register_step_post_hook(lambda o, args, kwargs: fire())
    ],
    "global_optimizer_step_post_hook": lambda model, opt, fire: [
        torch_optimizer.register_optimizer_step_post_hook(lambda o, args, kwargs: fire())
    ],
}


class Hooker:
    """Registers a torch hook in ``start_epoch``; the hook fails on call ``fail_at``."""

    name = "hooker"

    def __init__(self, register: Register, fail_at: int | None = 5) -> None:
        self.register = register
        self.fail_at = fail_at
        self.fired = 0
        self.handles: list[RemovableHandle] = []
        self.model: torch.nn.Module | None = None

    def start_epoch(self, context: PluginContext) -> None:
        if not self.handles:
            assert context.model is not None
            assert context.optimizer is not None
            self.model = context.model
            self.handles = self.register(context.model, context.optimizer, self._fire)

    def _fire(self) -> None:
        self.fired += 1
        if self.fired == self.fail_at:
            assert self.model is not None
            with torch.no_grad():
                for parameter in self.model.parameters():
                    parameter.add_(0.5)
            raise RuntimeError("the hook fails")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # on the first layer
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_fault_in_a_torch_hook_a_plugin_registered_is_that_plugins_and_is_rewound(
    kind: str, clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    hooker = Hooker(KINDS[kind])
    try:
        with structlog.testing.capture_logs() as events:
            trained, result = _train([hooker], tmp_path)
    finally:
        hooker.remove()  # should the sandbox have missed them, later tests must not see them
    assert hooker.fired >= 5
    assert result.epochs_completed == CONFIG.epochs
    fault = result.plugins[0].fault
    assert fault is not None
    assert fault.plugin == "hooker"
    assert "the hook fails" in fault.error
    failed = [e for e in events if e["event"] == "plugin_failed"]
    assert [e["plugin"] for e in failed] == ["hooker"]
    assert_same_weights(trained, clean)
    # Quarantined with the plugin: the hooks fire no more.
    assert hooker.fired == 5


@pytest.mark.parametrize("kind", ["forward_hook", "global_forward_hook", "grad_hook"])
def test_quarantining_a_plugin_removes_the_torch_hooks_it_registered(
    kind: str, tmp_path: Path
) -> None:
    class FailsLater(Hooker):
        def end_epoch(self, context: PluginContext) -> None:
            self.fired_at_fault = self.fired
            raise RuntimeError("fails in end_epoch")

    plugin = FailsLater(KINDS[kind], fail_at=None)
    try:
        _train([plugin], tmp_path)
    finally:
        plugin.remove()
    assert plugin.fired_at_fault > 0
    # Epoch 0 ran again without it (rewound), and epoch 1 too: no call since the fault.
    assert plugin.fired == plugin.fired_at_fault


def test_hooks_registered_outside_plugins_are_left_alone(tmp_path: Path) -> None:
    fired = []
    seed_everything(5)
    setup = resume_setup(CONFIG)
    handle = setup.model.register_forward_hook(lambda m, args, out: fired.append(1))
    try:
        bz.Trainer().fit(setup, CONFIG, [], checkpoint_dir=tmp_path)
        # Still the user's own hook, unwrapped, after the run too.
        assert next(iter(setup.model._forward_hooks.values())).__name__ == "<lambda>"
    finally:
        handle.remove()
    assert len(fired) > 0


def test_a_hook_that_returns_normally_keeps_acting_after_the_run_as_the_plugins(
    tmp_path: Path,
) -> None:
    # Acting on the model is a plugin's right: a healthy plugin's hook stays in place
    # (guarded) after the run, and torch's own registration methods are torch's again.
    hooker = Hooker(KINDS["forward_hook"], fail_at=None)
    try:
        _train([hooker], tmp_path)
        fired = hooker.fired
        assert hooker.model is not None
        hooker.model(torch.zeros(1, 6))
        assert hooker.fired == fired + 1
    finally:
        hooker.remove()
    assert not hasattr(torch.nn.Module.register_forward_hook, "__wrapped__")
    assert not hasattr(torch.Tensor.register_hook, "__wrapped__")
