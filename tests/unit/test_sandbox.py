"""The sandbox contract: a failing plugin cannot change training, and is reported once."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from tests._support import Events, assert_same_weights, tiny_setup, weights

import bz
from bz.config import PluginSpec, RunConfig
from bz.plugins import HOOK_NAMES, Plugin, PluginContext
from bz.plugins._loader import load_plugins
from bz.plugins._sandbox import PluginFailure

CONFIG = RunConfig(epochs=2, device="cpu", plugins=())


class Exploding:
    """Raises in one chosen hook, every time it is called."""

    def __init__(self, hook: str) -> None:
        self.name = "exploding"
        self.calls = 0

        def fail(context: PluginContext) -> None:
            self.calls += 1
            raise RuntimeError(f"boom in {hook}")

        setattr(self, hook, fail)


def clean_weights() -> dict[str, Any]:
    setup = tiny_setup()
    bz.Trainer().fit(setup, CONFIG)
    return weights(setup.model)


# on_exception only runs when training fails; it is covered separately below.
TRAINING_HOOKS = [
    hook for hook in HOOK_NAMES if hook not in ("on_exception", "load_checkpoint", "on_rewind")
]


@pytest.mark.parametrize("hook", TRAINING_HOOKS)
def test_a_plugin_failing_in_any_hook_leaves_the_weights_bit_identical(
    hook: str, events: Events
) -> None:
    expected = clean_weights()
    setup = tiny_setup()
    plugin = Exploding(hook)
    result = bz.Trainer().fit(setup, CONFIG, plugins=[plugin])
    assert_same_weights(weights(setup.model), expected)
    if hook == "save_checkpoint":
        return  # fires only when checkpoints are written
    failures = [e for e in events if e["event"] == "plugin_failed"]
    assert len(failures) == 1, "a fault is logged exactly once"
    assert failures[0]["plugin"] == "exploding"
    assert failures[0]["hook"] == hook
    assert isinstance(failures[0]["exc_info"], RuntimeError)
    assert plugin.calls == 1, "a quarantined plugin is never called again"
    (report,) = result.plugins
    assert report.fault is not None
    assert report.fault.stage == hook


def test_other_plugins_keep_running_after_one_is_quarantined() -> None:
    seen: list[int] = []

    class Counter:
        name = "counter"

        def end_epoch(self, context: PluginContext) -> None:
            seen.append(context.epoch)

    bz.Trainer().fit(tiny_setup(), CONFIG, plugins=[Exploding("start_epoch"), Counter()])
    assert seen == [0, 1]


def test_raise_policy_makes_a_fault_fatal() -> None:
    with pytest.raises(PluginFailure, match=r"plugin 'exploding' failed in end_epoch"):
        bz.Trainer().fit(
            tiny_setup(), attrs.evolve(CONFIG, plugin_errors="raise"), [Exploding("end_epoch")]
        )


def test_raise_policy_still_lets_other_plugins_flush() -> None:
    flushed: list[str] = []

    class Flusher:
        name = "flusher"

        def on_exception(self, context: PluginContext) -> None:
            assert context.exception is not None
            flushed.append(type(context.exception).__name__)

    with pytest.raises(PluginFailure):
        bz.Trainer().fit(
            tiny_setup(),
            attrs.evolve(CONFIG, plugin_errors="raise"),
            [Exploding("start_epoch"), Flusher()],
        )
    assert flushed


def test_ctrl_c_from_a_plugin_is_never_swallowed() -> None:
    class Interrupting:
        name = "interrupting"

        def end_training_batch(self, context: PluginContext) -> None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bz.Trainer().fit(tiny_setup(), CONFIG, [Interrupting()])


def test_on_exception_runs_when_training_fails_and_a_failing_one_does_not_hide_the_error() -> None:
    calls: list[str] = []

    class Recorder:
        name = "recorder"

        def on_exception(self, context: PluginContext) -> None:
            calls.append(str(context.exception))

    setup = tiny_setup()

    def broken_loss(outputs: Any, targets: Any) -> Any:
        raise ValueError("bad loss")

    broken = attrs.evolve(setup, loss_fn=broken_loss)
    with pytest.raises(ValueError, match="bad loss"):  # the user's error, as itself
        bz.Trainer().fit(broken, CONFIG, [Exploding("on_exception"), Recorder()])
    assert calls == ["bad loss"]


def test_the_summary_reports_time_and_calls_per_plugin(
    events: Events,
) -> None:
    class Slowish:
        name = "slowish"

        def end_training_batch(self, context: PluginContext) -> None:
            sum(range(1000))

    result = bz.Trainer().fit(tiny_setup(batches=4), CONFIG, [Slowish()])
    (report,) = result.plugins
    assert report.calls == 2 * 4
    assert report.seconds > 0
    (summary,) = [e for e in events if e["event"] == "plugin_summary"]
    assert summary["plugins"]["slowish"]["calls"] == 8
    assert summary["plugins"]["slowish"]["status"] == "ok"


# -- loading goes through the same boundary ------------------------------------------


class BadCreate:
    name = "bad_create"

    def __init__(self) -> None:
        raise RuntimeError("cannot start")


@attrs.frozen
class ExplodingConfig:
    level: int = attrs.field(default=1)

    @level.validator
    def _explode(self, _attribute: Any, _value: int) -> None:
        raise RuntimeError("validator crashed")


class BadConfig:
    name = "bad_config"
    Config = ExplodingConfig

    def __init__(self, config: ExplodingConfig) -> None:
        self.config = config


class NotAPlugin:
    """No name attribute."""


class WrongSignature:
    name = "wrong_signature"

    def end_epoch(self, context: PluginContext, extra: int) -> None:
        pass


@pytest.mark.parametrize(
    ("factory", "stage", "message"),
    [
        (BadCreate, "create", "cannot start"),
        (BadConfig, "config", "validator crashed"),
        (NotAPlugin, "load", "not a plugin"),
        (WrongSignature, "load", "cannot be called as end_epoch(context)"),
    ],
)
def test_loading_faults_are_isolated_and_reported(
    factory: type, stage: str, message: str, events: Events
) -> None:
    name = "broken"
    plugins = load_plugins([PluginSpec(name, {}, "plugins[0]")], CONFIG, registry={name: factory})
    assert plugins.active_names == []
    (fault,) = plugins.faults
    assert (fault.plugin, fault.stage) == (name, stage)
    assert message in fault.error
    assert [e["hook"] for e in events if e["event"] == "plugin_failed"] == [stage]


def test_loading_faults_raise_under_the_raise_policy() -> None:
    with pytest.raises(PluginFailure, match="cannot start"):
        load_plugins(
            [PluginSpec("broken", {}, "plugins[0]")],
            CONFIG,
            policy="raise",
            registry={"broken": BadCreate},
        )


def test_an_explicit_subclass_only_runs_the_hooks_it_defines() -> None:
    class OnlyEnd(Plugin):
        name = "only_end"

        def end_epoch(self, context: PluginContext) -> None:
            pass

    plugins = load_plugins([PluginSpec("only_end")], CONFIG, registry={"only_end": OnlyEnd})
    report = plugins.report()
    assert report[0].hooks == ("end_epoch",)
    assert not plugins.implements("end_training_batch")


class Counting:
    """Counts its own ``after_backward`` calls; raises in the ``fail_at``-th one."""

    def __init__(self, name: str, fail_at: int = 0) -> None:
        self.name, self.fail_at, self.called = name, fail_at, 0

    def after_backward(self, context: PluginContext) -> None:
        self.called += 1
        if self.called == self.fail_at:
            raise RuntimeError("boom")


@pytest.mark.parametrize("policy", ["isolate", "raise"])
def test_reported_calls_are_the_calls_made_when_a_round_ends_early(policy: str) -> None:
    # Calls are counted per round, not per call: a round a fault ends early must not
    # count the plugins after the faulty one, and a quarantined plugin stops counting.
    from bz.plugins._sandbox import PluginSet

    first, faulty, last = Counting("first"), Counting("faulty", fail_at=3), Counting("last")
    plugins = PluginSet(
        [(plugin, ("after_backward",)) for plugin in (first, faulty, last)],
        policy=policy,  # type: ignore[arg-type]  # parametrized with valid policies
    )
    context = PluginContext()
    for _ in range(40):
        try:
            plugins.call("after_backward", context)
        except PluginFailure:
            break
    reported = {report.name: report.calls for report in plugins.report()}
    assert reported == {"first": first.called, "faulty": 3, "last": last.called}
    assert last.called == (40 if policy == "isolate" else 2)
