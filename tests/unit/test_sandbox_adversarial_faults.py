"""A hostile plugin's faults are its own: isolated, blamed on it by name, and the other
plugins in the same round still run exactly once.

Through real ``Trainer.fit`` runs (the end report, the weights) and through
``PluginSet`` (exact call counts over many rounds, the straight rounds included).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._support import assert_same_weights, tiny_setup, weights
from torch import nn

import bz
from bz.config import RunConfig
from bz.plugins import HOOK_NAMES, PluginContext
from bz.plugins._sandbox import PluginSet

HOOKS = [hook for hook in HOOK_NAMES if hook not in ("on_exception", "load_checkpoint")]
PER_BATCH = [
    "start_training_batch",
    "after_backward",
    "before_optimizer_step",
    "end_training_batch",
]


class CustomBase(BaseException):
    pass


class UnprintableError(Exception):
    """An exception whose message itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("no message for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


def recurse(depth: int = 0) -> int:
    return recurse(depth + 1) + 1


def _raise(exc: BaseException) -> Callable[[], object]:
    def act() -> object:
        raise exc

    return act


RAISES: dict[str, Callable[[], object]] = {
    "RuntimeError": _raise(RuntimeError("boom")),
    "SystemExit(0)": lambda: sys.exit(0),
    "SystemExit(3)": lambda: sys.exit(3),
    "GeneratorExit": _raise(GeneratorExit()),
    "CancelledError": _raise(asyncio.CancelledError()),
    "custom BaseException": _raise(CustomBase("mine")),
    "StopIteration": _raise(StopIteration()),
    "RecursionError (deep recursion)": recurse,
    "MemoryError": _raise(MemoryError()),
    "unprintable exception": _raise(UnprintableError()),
}


class Counter:
    """Counts its calls per hook; ``act`` (when given) runs in ``fail_in`` at call ``at``."""

    def __init__(
        self,
        name: str,
        hooks: list[str] = HOOKS,
        act: Callable[[], object] | None = None,
        fail_in: str | None = None,
        at: int = 1,
    ) -> None:
        self.name = name
        self.calls: dict[str, int] = {}
        for hook in hooks:
            setattr(self, hook, self._make(hook, act if hook == fail_in else None, at))

    def _make(
        self, hook: str, act: Callable[[], object] | None, at: int
    ) -> Callable[[PluginContext], None]:
        def method(context: PluginContext) -> None:
            self.calls[hook] = self.calls.get(hook, 0) + 1
            if act is not None and self.calls[hook] == at:
                act()

        return method


def fit(plugins: list[Any], **options: Any) -> tuple[dict[str, torch.Tensor], Any]:
    config = RunConfig(epochs=2, device="cpu", plugins=(), **options)
    setup = tiny_setup()
    result = bz.Trainer().fit(setup, config, plugins=plugins)
    return weights(setup.model), result


_CLEAN: dict[str, torch.Tensor] = {}


def clean() -> dict[str, torch.Tensor]:
    if not _CLEAN:
        _CLEAN.update(fit([])[0])
    return _CLEAN


def faults_by_name(result: Any) -> dict[str, Any]:
    return {report.name: report.fault for report in result.plugins if report.fault is not None}


_LONE: dict[str, int] = {}


def lone_calls() -> dict[str, int]:
    """A well-behaved plugin's calls per hook in a run with no fault."""
    if not _LONE:
        alone = Counter("alone")
        fit([alone])
        _LONE.update(alone.calls)
    return _LONE


@pytest.mark.parametrize("policy", ["rewind", "isolate"])
@pytest.mark.parametrize("kind", sorted(RAISES))
@pytest.mark.parametrize("hook", ["start_training_session", "end_training_batch", "end_epoch"])
def test_anything_a_plugin_raises_is_its_fault_and_training_is_unchanged(
    kind: str, hook: str, policy: str
) -> None:
    plugins = [
        Counter("before"),
        Counter("hostile", act=RAISES[kind], fail_in=hook, at=2 if hook in PER_BATCH else 1),
        Counter("after"),
    ]
    trained, result = fit(plugins, plugin_errors=policy)
    assert_same_weights(trained, clean())
    faults = faults_by_name(result)
    assert list(faults) == ["hostile"], faults
    assert faults["hostile"].stage == hook
    assert "Traceback" not in faults["hostile"].error
    if policy == "isolate":
        # The round goes on after the fault: each plugin beside it is called once per
        # hook call the run makes, as if the hostile one were not there.
        assert plugins[0].calls == plugins[2].calls == lone_calls()
    else:
        # The round ends at the fault and the part is replayed (after ``on_rewind``):
        # the plugin before it saw the failed round's hook once more than the one after.
        assert plugins[0].calls.pop("on_rewind") == plugins[2].calls.pop("on_rewind") == 1
        plugins[0].calls[hook] -= 1
        assert plugins[0].calls == plugins[2].calls
        assert plugins[2].calls["end_training_session"] == 1


@pytest.mark.parametrize("kind", ["RuntimeError", "SystemExit(0)", "custom BaseException"])
@pytest.mark.parametrize("torch_hook", ["forward", "grad", "optimizer"])
def test_a_fault_in_a_torch_hook_the_plugin_registered_is_its_own(
    kind: str, torch_hook: str
) -> None:
    act = RAISES[kind]

    class Hooking:
        name = "hooking"

        def start_training_session(self, context: PluginContext) -> None:
            model, optimizer = context.model, context.optimizer
            assert model is not None
            assert optimizer is not None
            if torch_hook == "forward":
                model.register_forward_hook(lambda module, args, output: act())
            elif torch_hook == "grad":
                register = cast(
                    "Callable[[Callable[[torch.Tensor], object]], object]",
                    next(model.parameters()).register_hook,  # untyped in torch
                )
                register(lambda grad: act())
            else:

                def step_post(optimizer: Any, args: Any, kwargs: Any) -> None:
                    act()

                optimizer.register_step_post_hook(step_post)

    bystander = Counter("bystander")
    trained, result = fit([Hooking(), bystander])
    assert_same_weights(trained, clean())
    faults = faults_by_name(result)
    assert list(faults) == ["hooking"], faults
    expected = {
        "forward": "forward_hook",
        "grad": "grad_hook",
        "optimizer": "optimizer_step_post_hook",
    }
    assert faults["hooking"].stage == f"torch {expected[torch_hook]}"
    assert bystander.calls["end_training_session"] == 1


class Exploder:
    """Raises in ``__del__`` (Python ignores it: printed as unraisable, never raised)."""

    def __del__(self) -> None:
        raise RuntimeError("raised in __del__")


def test_a_plugin_raising_in_del_changes_nothing_and_is_not_blamed() -> None:
    class Deleting(Counter):
        def __del__(self) -> None:
            raise RuntimeError("the plugin's own __del__")

    def drop() -> None:
        Exploder()

    plugin = Deleting("deleting", act=drop, fail_in="end_training_batch", at=1)
    unraisable: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        trained, result = fit([plugin])
    finally:
        sys.unraisablehook = previous
    assert_same_weights(trained, clean())
    assert faults_by_name(result) == {}
    assert [str(hook.exc_value) for hook in unraisable] == ["raised in __del__"]


RETURNS: dict[str, object] = {
    "an int": 1,
    "False": False,
    "NotImplemented": NotImplemented,
    "an exception instance (returned, not raised)": RuntimeError("returned"),
    "a tensor": torch.ones(3, requires_grad=True),
    "a coroutine object": None,  # filled below: an ``async def`` hook
}


@pytest.mark.parametrize("kind", sorted(RETURNS))
def test_a_hook_returning_an_odd_value_changes_nothing(kind: str) -> None:
    value = RETURNS[kind]

    class Odd:
        name = "odd"

        def __init__(self) -> None:
            for hook in HOOKS:
                setattr(self, hook, self._returns)

        def _returns(self, context: PluginContext) -> object:
            if kind == "a coroutine object":

                async def later() -> None:
                    raise RuntimeError("never awaited")

                coroutine = later()
                coroutine.close()  # not awaited, and no warning either
                return coroutine
            return value

    trained, result = fit([Odd(), Counter("bystander")])
    assert_same_weights(trained, clean())
    assert faults_by_name(result) == {}


def test_a_per_batch_hook_past_plugin_timeout_is_stopped_and_named() -> None:
    class Slow(Counter):
        pass

    def hang() -> None:
        time.sleep(60)

    slow = Slow("slow", hooks=PER_BATCH, act=hang, fail_in="after_backward", at=3)
    bystander = Counter("bystander", hooks=PER_BATCH)
    started = time.monotonic()
    trained, result = fit([bystander, slow], plugin_timeout=0.5)
    assert time.monotonic() - started < 30
    assert_same_weights(trained, clean())
    faults = faults_by_name(result)
    assert list(faults) == ["slow"]
    assert faults["slow"].stage == "after_backward"
    assert "PluginTimeout" in faults["slow"].error


# -- many plugins, faults anywhere: exact blame and exact calls (PluginSet) -------------

ROUNDS = 60
KINDS = sorted(RAISES)
TYPE_NAMES = {kind: kind.split("(")[0].strip() for kind in KINDS} | {
    "custom BaseException": "CustomBase",
    "RecursionError (deep recursion)": "RecursionError",
    "unprintable exception": "UnprintableError",
}


class Member:
    def __init__(self, name: str, plan: dict[int, str]) -> None:
        self.name = name
        self.plan = plan
        """Call number -> what to raise there (the first one quarantines it)."""
        self.called = 0

    def after_backward(self, context: PluginContext) -> object:
        self.called += 1
        kind = self.plan.get(self.called)
        if kind is not None:
            return RAISES[kind]()
        return None


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=50),
    data=st.data(),
)
def test_many_plugins_with_faults_at_random_places_are_blamed_exactly(
    size: int, data: st.DataObject
) -> None:
    faulty = data.draw(
        st.dictionaries(
            st.integers(min_value=0, max_value=size - 1),
            st.tuples(st.integers(min_value=1, max_value=ROUNDS), st.sampled_from(KINDS)),
            max_size=min(size, 12),
        ),
        label="faulty",
    )
    members = [
        Member(f"plugin_{i}", {faulty[i][0]: faulty[i][1]} if i in faulty else {})
        for i in range(size)
    ]
    plugins = PluginSet([(member, ("after_backward",)) for member in members], policy="isolate")
    context = PluginContext()
    for _ in range(ROUNDS):
        plugins.call("after_backward", context)
    assert [member.called for member in members] == [
        faulty[i][0] if i in faulty else ROUNDS for i in range(size)
    ]
    blamed = {fault.plugin: fault for fault in plugins.faults}
    assert set(blamed) == {f"plugin_{i}" for i in faulty}
    for i, (_, kind) in faulty.items():
        fault = blamed[f"plugin_{i}"]
        assert fault.stage == "after_backward"
        assert fault.error.split(":")[0] == TYPE_NAMES[kind]
    assert {report.name: report.calls for report in plugins.report()} == {
        member.name: member.called for member in members
    }
    assert plugins.active_names == [f"plugin_{i}" for i in range(size) if i not in faulty]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(min_value=2, max_value=12), data=st.data())
def test_plugins_failing_in_the_same_round_are_each_blamed_and_the_rest_run_once(
    size: int, data: st.DataObject
) -> None:
    at = data.draw(st.integers(min_value=1, max_value=ROUNDS), label="round")
    failing = data.draw(
        st.sets(st.integers(min_value=0, max_value=size - 1), min_size=1, max_size=size),
        label="failing",
    )
    kinds = data.draw(st.lists(st.sampled_from(KINDS), min_size=size, max_size=size))
    members = [Member(f"p{i}", {at: kinds[i]} if i in failing else {}) for i in range(size)]
    plugins = PluginSet([(member, ("after_backward",)) for member in members], policy="isolate")
    context = PluginContext()
    for _ in range(ROUNDS):
        plugins.call("after_backward", context)
    assert [member.called for member in members] == [
        at if i in failing else ROUNDS for i in range(size)
    ]
    assert [fault.plugin for fault in plugins.faults] == [f"p{i}" for i in sorted(failing)]


def test_a_model_forward_hook_that_raises_keeps_the_other_plugins_forward_hooks() -> None:
    seen: list[int] = []

    class Watching:
        name = "watching"

        def start_training_session(self, context: PluginContext) -> None:
            assert context.model is not None
            context.model.register_forward_hook(lambda m, a, o: seen.append(1))

    class Failing:
        name = "failing"

        def start_training_session(self, context: PluginContext) -> None:
            assert context.model is not None

            def fail(module: nn.Module, args: object, output: object) -> None:
                raise CustomBase("in a forward hook")

            context.model.register_forward_hook(fail)

    trained, result = fit([Failing(), Watching()])
    assert_same_weights(trained, clean())
    assert list(faults_by_name(result)) == ["failing"]
    assert len(seen) >= 8  # 4 batches x 2 epochs, plus validation


# -- a fault inside another plugin's hook ---------------------------------------------


class Evaluating:
    """Runs the model inside its own hook (an evaluation plugin), maybe catching what
    the forward raises, as a careless author would."""

    name = "evaluating"

    def __init__(self, catch: tuple[type[BaseException], ...]) -> None:
        self.catch = catch
        self.calls = 0

    def end_training_batch(self, context: PluginContext) -> None:
        self.calls += 1
        assert context.model is not None
        with torch.no_grad(), contextlib.suppress(*self.catch):
            context.model(torch.zeros(2, 4))


class BreaksInOthersForward:
    """A forward hook that, in a forward some other plugin runs (batch of 2), changes the
    weights and raises."""

    name = "breaking"

    def start_training_session(self, context: PluginContext) -> None:
        assert context.model is not None

        def fail(module: nn.Module, args: tuple[torch.Tensor, ...], output: object) -> None:
            if args[0].shape[0] == 2:
                with torch.no_grad():
                    for parameter in module.parameters():
                        parameter.add_(1.0)
                raise RuntimeError("in a forward another plugin ran")

        context.model.register_forward_hook(fail)


@pytest.mark.parametrize(
    "catch",
    [
        (),
        (Exception,),
        (BaseException,),
    ],
    ids=["not caught", "caught as Exception", "caught as BaseException"],
)
def test_a_torch_hook_failing_inside_another_plugins_hook_is_blamed_and_rewound(
    catch: tuple[type[BaseException], ...],
) -> None:
    expected = fit([Evaluating(())])[0]
    evaluating = Evaluating(catch)
    trained, result = fit([BreaksInOthersForward(), evaluating])
    faults = faults_by_name(result)
    assert list(faults) == ["breaking"], faults
    assert faults["breaking"].stage == "torch forward_hook"
    assert_same_weights(trained, expected)


def test_a_swallowed_verdict_under_raise_still_ends_the_run() -> None:
    # plugin_errors "raise": the fault in the torch hook ends the run, even though the
    # plugin whose forward it ran in catches everything.
    with pytest.raises(bz.PluginFailure, match="breaking"):
        fit([BreaksInOthersForward(), Evaluating((BaseException,))], plugin_errors="raise")


def test_a_swallowed_verdict_is_raised_once_and_the_run_goes_on() -> None:
    # After the rewind the replay trains without the faulty plugin: nothing pending is
    # left to fire again, and the catching plugin keeps being called every batch.
    evaluating = Evaluating((BaseException,))
    _, result = fit([BreaksInOthersForward(), evaluating])
    assert list(faults_by_name(result)) == ["breaking"]
    clean = Evaluating(())
    fit([clean])
    # One batch's call more: the batch whose call held the fault, then replayed.
    assert evaluating.calls == clean.calls + 1
