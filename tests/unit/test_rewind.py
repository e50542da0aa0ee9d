"""The sandbox's promise: a failing or careless plugin never changes what training produces.

The matrix: every hook a fresh run reaches × something a plugin can do (draw from each
global random generator, change the weights, the gradients or the learning rate, set the
stop flag, overwrite a value the loop owns, replace the model) × then raise or return.
Wherever the contract says so, the final weights are ``torch.equal`` to those of the run
without the plugin. The setup draws from every generator a real run does (shuffle,
dropout, Python's and NumPy's generators in the collate function).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, cast

import attrs
import numpy
import pytest
import structlog
import torch
import torch.nn.utils.prune
from tests._fault_support import resume_setup
from tests._support import assert_same_weights, quick_first
from torch import nn

import bz
from bz.plugins import HOOK_NAMES, PluginContext
from bz.training.device import seed_everything

EPOCHS = 2
CONFIG = bz.RunConfig(epochs=EPOCHS, device="cpu", seed=5, checkpoint_interval=1)

# Hooks a fresh run reaches (load_checkpoint needs a resume, on_rewind a fault, and
# on_exception a failing run: each has its own test below).
HOOKS = [h for h in HOOK_NAMES if h not in ("load_checkpoint", "on_rewind", "on_exception")]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(
    plugins: list[Any], folder: Path, config: bz.RunConfig = CONFIG
) -> tuple[dict[str, torch.Tensor], bz.FitResult]:
    seed_everything(5)  # the model's initial weights come from the global generator
    setup = resume_setup(config)
    result = bz.Trainer().fit(setup, config, plugins, checkpoint_dir=folder)
    return _weights(setup.model), result


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of the run without the plugin."""
    return _train([], tmp_path_factory.mktemp("clean"))[0]


# -- what a plugin does before raising or returning ---------------------------------------


def _draw_torch(context: PluginContext) -> None:
    torch.rand(7)


def _draw_python(context: PluginContext) -> None:
    random.random()
    random.gauss(0.0, 1.0)


def _draw_numpy(context: PluginContext) -> None:
    numpy.random.rand(7)


def _change_weights(context: PluginContext) -> None:
    assert context.model is not None
    with torch.no_grad():
        for parameter in context.model.parameters():
            parameter.add_(0.5)


def _change_grads(context: PluginContext) -> None:
    assert context.model is not None
    for parameter in context.model.parameters():
        if parameter.grad is not None:
            parameter.grad.mul_(50.0)


def _change_lr(context: PluginContext) -> None:
    assert context.optimizer is not None
    for group in context.optimizer.param_groups:
        group["lr"] *= 10.0


def _set_stop(context: PluginContext) -> None:
    context.should_stop_training = True


def _overwrite_loop_value(context: PluginContext) -> None:
    context.epoch = 99


def _replace_model(context: PluginContext) -> None:
    context.model = torch.nn.Linear(6, 2)  # type: ignore[misc]  # the point: mypy flags it, and at run time it is a fault


def _model(context: PluginContext) -> torch.nn.Module:
    assert context.model is not None
    return context.model


def _layers(context: PluginContext) -> list[torch.nn.Module]:
    return list(_model(context).children())


# -- beyond the state dicts: the model as objects, torch hooks, the process -------------


def _set_dropout(context: PluginContext) -> None:
    for module in _model(context).modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.9  # a dropout schedule


def _forward_hook(context: PluginContext) -> None:
    _layers(context)[0].register_forward_hook(lambda module, args, output: output * 2.0)


def _grad_hook(context: PluginContext) -> None:
    for parameter in _model(context).parameters():
        # Tensor.register_hook is untyped in torch.
        register = cast(
            "Callable[[Callable[[torch.Tensor], torch.Tensor]], object]", parameter.register_hook
        )
        register(lambda grad: grad * 10.0)


def _optimizer_hook(context: PluginContext) -> None:
    assert context.optimizer is not None
    model = _model(context)

    def nudge(optimizer: object, args: object, kwargs: object) -> None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01)

    context.optimizer.register_step_post_hook(nudge)


def _prune(context: PluginContext) -> None:
    prune: Callable[..., object] = torch.nn.utils.prune.l1_unstructured  # untyped in torch
    prune(_layers(context)[0], "weight", amount=0.5)


def _swap_parameter(context: PluginContext) -> None:
    layer = _layers(context)[0]
    assert isinstance(layer, torch.nn.Linear)
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5)


def _to_double(context: PluginContext) -> None:
    _model(context).double()


def _enter_autocast(context: PluginContext) -> None:
    enter: Callable[[], object] = torch.autocast("cpu", dtype=torch.bfloat16).__enter__
    enter()  # and never leaves (__enter__ is untyped in torch)


def _replace_signal_handler(context: PluginContext) -> None:
    signal.signal(signal.SIGTERM, lambda number, frame: None)


ACTIONS: dict[str, Callable[[PluginContext], None]] = {
    "draw_torch": _draw_torch,
    "draw_python": _draw_python,
    "draw_numpy": _draw_numpy,
    "change_weights": _change_weights,
    "change_grads": _change_grads,
    "change_lr": _change_lr,
    "set_stop": _set_stop,
    "overwrite_loop_value": _overwrite_loop_value,
    "replace_model": _replace_model,
    "set_dropout": _set_dropout,
    "forward_hook": _forward_hook,
    "grad_hook": _grad_hook,
    "optimizer_hook": _optimizer_hook,
    "prune": _prune,
    "swap_parameter": _swap_parameter,
    "to_double": _to_double,
    "enter_autocast": _enter_autocast,
    "replace_signal_handler": _replace_signal_handler,
}

# Actions that are a plugin's right when it returns normally (acting on the model and
# optimizer, asking to stop); their effect stays. Every other action, and every action
# followed by a fault, leaves the weights of the run without the plugin.
LEGITIMATE = {
    "change_weights",
    "change_grads",
    "change_lr",
    "set_stop",
    "set_dropout",
    "forward_hook",
    "grad_hook",
    "optimizer_hook",
    "prune",
    "swap_parameter",
}
# Faults even when the hook returns: a write the view refuses, a handler bz keeps.
FAULTED_ON_RETURN = {"overwrite_loop_value", "replace_model", "replace_signal_handler"}
# A float64 model fed float32 batches cannot train: tested followed by a fault only.
RAISE_ONLY = {"to_double"}


class Actor:
    """Does ``action`` in ``hook`` (the first time it is reached), then raises or returns."""

    name = "actor"

    def __init__(self, hook: str, action: Callable[[PluginContext], None], fail: bool) -> None:
        self.hook, self.action, self.fail = hook, action, fail
        self.done = False
        setattr(self, hook, self._act)

    def _act(self, context: PluginContext) -> None:
        if self.done:
            return
        self.done = True
        self.action(context)
        if self.fail:
            raise RuntimeError(f"fails in {self.hook}")


def _faults(events: list[MutableMapping[str, Any]]) -> list[tuple[str, str]]:
    return [(e["plugin"], e["hook"]) for e in events if e["event"] == "plugin_failed"]


@pytest.mark.slow
@pytest.mark.parametrize("then", ["raise", "return"])
@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("hook", HOOKS)
def test_the_matrix(
    hook: str, action: str, then: str, clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    if then == "return" and action in RAISE_ONLY:
        pytest.skip("cannot train on: tested followed by a fault")
    actor = Actor(hook, ACTIONS[action], fail=then == "raise")
    with structlog.testing.capture_logs() as events:
        weights, result = _train([actor], tmp_path)
    assert actor.done, f"{hook} was never reached"
    assert not torch._C._is_any_autocast_enabled()
    if then == "return" and action in LEGITIMATE:
        return  # the plugin's right; what it changes, stays
    assert_same_weights(weights, clean)
    assert result.epochs_completed == EPOCHS
    faulted = then == "raise" or action in FAULTED_ON_RETURN
    assert _faults(events) == ([("actor", hook)] if faulted else [])


@pytest.mark.parametrize(
    "action",
    quick_first(
        "set_dropout",
        "forward_hook",
        "grad_hook",
        "optimizer_hook",
        "prune",
        "swap_parameter",
        "to_double",
        "enter_autocast",
        "replace_signal_handler",
    ),
)
def test_what_a_plugin_changes_beyond_the_state_dicts_is_rewound(
    action: str, clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # The fast witness of the new rows of the matrix: a batch hook and an epoch hook.
    for hook in ("end_training_batch", "end_epoch"):
        actor = Actor(hook, ACTIONS[action], fail=True)
        with structlog.testing.capture_logs() as events:
            weights, result = _train([actor], tmp_path / hook)
        assert_same_weights(weights, clean)
        assert result.epochs_completed == EPOCHS
        assert _faults(events) == [("actor", hook)]


def test_the_optimizer_still_holds_the_parameters_after_a_rewound_swap(tmp_path: Path) -> None:
    seed_everything(5)
    setup = resume_setup(CONFIG)
    actor = Actor("end_training_batch", _swap_parameter, fail=True)
    bz.Trainer().fit(setup, CONFIG, [actor], checkpoint_dir=tmp_path)
    held = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in setup.model.parameters()} == held


def test_an_autocast_a_hook_leaves_entered_is_put_back_even_when_it_returns(
    clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    actor = Actor("start_training_batch", _enter_autocast, fail=False)
    weights, result = _train([actor], tmp_path)
    assert result.plugins[0].fault is None
    assert not torch._C._is_any_autocast_enabled()
    assert_same_weights(weights, clean)


def test_a_fault_after_changing_the_weights_is_rewound(
    clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # The fast witness of the matrix (which is marked slow): one hook per phase.
    for hook in ("start_training_session", "end_training_batch", "end_epoch", "save_checkpoint"):
        actor = Actor(hook, _change_weights, fail=True)
        weights, result = _train([actor], tmp_path / hook)
        assert_same_weights(weights, clean)
        assert result.plugins[0].fault is not None


def test_isolate_keeps_what_the_plugin_did_before_failing(
    clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # The cheaper policy, and the reason rewind is the default.
    actor = Actor("end_training_batch", _change_weights, fail=True)
    config = CONFIG.with_overrides(plugin_errors="isolate")
    weights, _ = _train([actor], tmp_path, config)
    assert any(not torch.equal(weights[k], clean[k]) for k in clean)


class Recorder:
    """An observing plugin: counts epochs and hears about rewinds."""

    name = "recorder"

    def __init__(self) -> None:
        self.rewinds: list[dict[str, Any]] = []
        self.epochs: list[int] = []

    def start_epoch(self, context: PluginContext) -> None:
        self.epochs.append(context.epoch)

    def on_rewind(self, context: PluginContext) -> None:
        self.rewinds.append(dict(context.extra["rewind"]))


def test_other_plugins_are_told_and_see_the_replay(
    clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    recorder = Recorder()
    actor = Actor("end_validation_loop", _change_lr, fail=True)
    with structlog.testing.capture_logs() as events:
        weights, _ = _train([recorder, actor], tmp_path)
    assert_same_weights(weights, clean)
    assert len(recorder.rewinds) == 1
    told = recorder.rewinds[0]
    assert (told["plugin"], told["hook"], told["epoch"]) == ("actor", "end_validation_loop", 0)
    assert recorder.epochs == [0, 0, 1]  # epoch 0 ran again
    assert [e["plugin"] for e in events if e["event"] == "training_rewound"] == ["actor"]


def test_a_plugin_failing_in_on_rewind_is_rewound_too(
    clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    second = Actor("on_rewind", _change_weights, fail=True)
    second.name = "second"
    first = Actor("end_epoch", _change_weights, fail=True)
    weights, result = _train([second, first], tmp_path)
    assert_same_weights(weights, clean)
    assert [r.fault is not None for r in result.plugins] == [True, True]


def test_a_fault_in_load_checkpoint_is_rewound(tmp_path: Path) -> None:
    reference, _ = _train([], tmp_path / "reference")
    _first, _ = _train([], tmp_path / "run", CONFIG.with_overrides(epochs=1))
    actor = Actor("load_checkpoint", _change_weights, fail=True)
    weights, result = _train([actor], tmp_path / "run")
    assert result.resumed_from is not None
    assert_same_weights(weights, reference)


def test_observing_plugins_never_change_training(
    clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    class Sampler:
        def __init__(self, name: str) -> None:
            self.name = name
            for hook in HOOKS:
                setattr(self, hook, self._draw)

        def _draw(self, context: PluginContext) -> None:
            torch.rand(3)
            random.random()
            numpy.random.rand(3)

    weights, _ = _train([Sampler("a"), Sampler("b")], tmp_path)
    assert_same_weights(weights, clean)


# -- every BaseException is the plugin's fault ------------------------------------------------


class CustomBase(BaseException):
    """Not an Exception: a plugin's own BaseException subclass."""


@pytest.mark.parametrize(
    "error",
    [SystemExit(0), SystemExit(3), GeneratorExit(), asyncio.CancelledError(), CustomBase()],
    ids=["SystemExit0", "SystemExit3", "GeneratorExit", "CancelledError", "custom"],
)
def test_every_base_exception_is_the_plugins_fault(
    error: BaseException, clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    class Raiser:
        name = "raiser"

        def end_epoch(self, context: PluginContext) -> None:
            _change_weights(context)
            raise error

    weights, result = _train([Raiser()], tmp_path)
    assert result.epochs_completed == EPOCHS
    assert_same_weights(weights, clean)
    fault = result.plugins[0].fault
    assert fault is not None
    assert type(error).__name__ in fault.error


def test_a_hung_hook_is_stopped_reported_with_its_stack_and_rewound(
    clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    class Hanging:
        name = "hanging"

        def end_training_batch(self, context: PluginContext) -> None:
            _change_weights(context)
            time.sleep(600)

    config = CONFIG.with_overrides(plugin_timeout=0.2)
    with structlog.testing.capture_logs() as events:
        weights, result = _train([Hanging()], tmp_path, config)
    assert_same_weights(weights, clean)
    fault = result.plugins[0].fault
    assert fault is not None
    assert "PluginTimeout" in fault.error
    failed = [e for e in events if e["event"] == "plugin_failed"]
    assert len(failed) == 1
    # The traceback logged is the plugin's own stack: it ends in its time.sleep.
    stack = failed[0]["exc_info"].__traceback__
    frames = []
    while stack is not None:
        frames.append(stack.tb_frame.f_code.co_name)
        stack = stack.tb_next
    assert "end_training_batch" in frames


def test_a_learning_rate_changed_before_a_fault_never_reaches_a_checkpoint(
    tmp_path: Path,
) -> None:
    _, clean_result = _train([], tmp_path / "clean")
    actor = Actor("end_epoch", _change_lr, fail=True)
    _, result = _train([actor], tmp_path / "faulty")
    assert clean_result.checkpoint is not None
    assert result.checkpoint is not None

    def learning_rates(path: Path) -> list[float]:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return [group["lr"] for group in payload["optimizer"]["param_groups"]]

    assert learning_rates(result.checkpoint) == learning_rates(clean_result.checkpoint)


# -- lazy modules -------------------------------------------------------------------------


def _lazy_setup(config: bz.RunConfig) -> bz.TrainingSetup:
    """``resume_setup`` with ``nn.LazyLinear`` layers (shaped by the first batch)."""
    setup = resume_setup(config)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Dropout(0.3), nn.LazyLinear(2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    return attrs.evolve(setup, model=model, optimizer=optimizer, scheduler=scheduler)


class _SeesBatches:
    """Records the inputs of every training batch; with ``fail``, fails in the last step
    after scaling the weights (what rewind must undo)."""

    name = "sees_batches"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.inputs: list[torch.Tensor] = []

    def start_training_batch(self, context: PluginContext) -> None:
        inputs, _ = context.batch
        self.inputs.append(inputs.clone())

    def end_training_batch(self, context: PluginContext) -> None:
        if self.fail and context.global_step == EPOCHS * 6:
            with torch.no_grad():
                for parameter in bz.plugins.model_of(context).parameters():
                    parameter.mul_(2.0)
            raise RuntimeError("injected fault after scaling the weights")


def _fit_lazy(plugin: _SeesBatches) -> dict[str, torch.Tensor]:
    config = bz.RunConfig(epochs=EPOCHS, device="cpu", seed=5)  # no checkpoints
    seed_everything(5)
    setup = _lazy_setup(config)
    result = bz.Trainer().fit(setup, config, [plugin])
    (report,) = result.plugins
    assert (report.fault is not None) == plugin.fail
    return _weights(setup.model)


def test_a_lazy_model_trains_on_the_same_batches_and_rewinds_exactly() -> None:
    clean, faulty = _SeesBatches(), _SeesBatches(fail=True)
    weights = _fit_lazy(clean)
    assert weights["0.weight"].shape == (16, 6)
    assert_same_weights(_fit_lazy(faulty), weights)
    # The forward that shapes the lazy layers draws nothing training draws from: the
    # batches (shuffle, collate jitter) are those of the same model built eagerly.
    seed_everything(5)
    eager = resume_setup(CONFIG)
    seen = _SeesBatches()
    bz.Trainer().fit(eager, bz.RunConfig(epochs=EPOCHS, device="cpu", seed=5), [seen])
    assert len(clean.inputs) == len(seen.inputs) == EPOCHS * 6
    for lazy_batch, eager_batch in zip(clean.inputs, seen.inputs, strict=True):
        assert torch.equal(lazy_batch, eager_batch)


def test_a_lazy_model_with_a_loader_read_once_is_one_clear_error() -> None:
    config = bz.RunConfig(epochs=1, device="cpu")
    setup = _lazy_setup(config)
    once = attrs.evolve(setup, train_loader=iter(list(setup.train_loader)))
    with pytest.raises(bz.UsageError, match=r"lazy modules .* can be read only once"):
        bz.Trainer().fit(once, config, [])
