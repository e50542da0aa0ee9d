"""Both plugin styles, the hook table, and what loading checks."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from tests._support import Events, tiny_setup

import bz
from bz._entry_points import Discovery, EntrySource
from bz.config import PluginSpec, RunConfig
from bz.plugins import HOOK_NAMES, NamedPlugin, Plugin, PluginContext, StatefulPlugin
from bz.plugins._hooks import HOOKS
from bz.plugins._inspection import implemented_hooks, near_miss_hooks
from bz.plugins._loader import load_plugins

CONFIG = RunConfig(epochs=1, device="cpu", plugins=())


class Structural:
    """No base class at all."""

    name = "structural"

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def end_epoch(self, context: PluginContext) -> None:
        self.epochs.append(context.epoch)


class Explicit(Plugin):
    name = "explicit"

    def __init__(self, log_interval: int = 10) -> None:
        super().__init__(name=self.name)
        self.log_interval = log_interval

    def start_epoch(self, context: PluginContext) -> None:
        self.logger.info("epoch_started", epoch=context.epoch)


def test_the_hook_table_is_the_protocol() -> None:
    protocol_hooks = [name for name in dir(Plugin) if name in HOOK_NAMES]
    assert sorted(protocol_hooks) == sorted(HOOK_NAMES)
    assert len(set(HOOK_NAMES)) == len(HOOKS) == 18
    assert all(spec.doc for spec in HOOKS)


def test_a_structural_plugin_trains() -> None:
    plugin = Structural()
    assert isinstance(plugin, NamedPlugin)
    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=2, device="cpu", plugins=()), [plugin])
    assert plugin.epochs == [0, 1]


def test_an_explicit_subclass_inherits_no_ops_and_a_logger(
    events: Events,
) -> None:
    plugin = Explicit(log_interval=5)
    context = PluginContext()
    for hook in HOOK_NAMES:
        if hook != "start_epoch":
            assert getattr(plugin, hook)(context) is None
    assert implemented_hooks(plugin) == ("start_epoch",)
    bz.Trainer().fit(tiny_setup(), CONFIG, [plugin])
    assert {
        "event": "epoch_started",
        "epoch": 0,
        "plugin": "explicit",
        "log_level": "info",
    } in events


def test_super_init_may_rename() -> None:
    class Renamed(Plugin):
        name = "original"

        def __init__(self) -> None:
            super().__init__(name="renamed")

    assert Renamed().name == "renamed"


def test_context_is_constructible_without_arguments() -> None:
    context = PluginContext()
    context.epoch = 5
    assert (context.epoch, context.training_loss_total, context.validation_loss_total) == (5, 0, 0)
    assert context.training_metrics == {}
    assert context.extra == {}
    assert context.should_stop_training is False


@pytest.mark.parametrize("subclass", [False, True], ids=["structural", "Plugin subclass"])
def test_a_misspelled_hook_is_a_load_fault_not_a_silent_no_op(
    events: Events, subclass: bool
) -> None:
    # Before: a warning, and the plugin was loaded doing nothing at all.
    class Typo(Plugin if subclass else object):  # type: ignore[misc]  # base chosen per case
        name = "typo"

        def end_epcoh(self, context: PluginContext) -> None:
            pass

        def helper(self) -> None:
            pass

    assert near_miss_hooks(Typo()) == [("end_epcoh", "end_epoch")]
    plugins = load_plugins([PluginSpec("typo")], CONFIG, registry={"typo": Typo})
    assert plugins.active_names == []
    (fault,) = plugins.faults
    assert fault.stage == "load"
    assert "end_epcoh is not a hook (did you mean end_epoch?)" in fault.error
    assert [e["plugin"] for e in events if e["event"] == "plugin_failed"] == ["typo"]
    with pytest.raises(bz.PluginFailure, match="did you mean end_epoch"):
        load_plugins([PluginSpec("typo")], CONFIG, registry={"typo": Typo}, policy="raise")


def test_hooks_with_wrong_signatures_are_rejected_at_load(
    events: Events,
) -> None:
    class NoContext:
        name = "no_context"

        def end_epoch(self) -> None:
            pass

    class Async:
        name = "async"

        async def end_epoch(self, context: PluginContext) -> None:
            pass

    plugins = load_plugins(
        [PluginSpec("no_context"), PluginSpec("async")],
        CONFIG,
        registry={"no_context": NoContext, "async": Async},
    )
    assert plugins.active == []
    errors = {fault.plugin: fault.error for fault in plugins.faults}
    assert "cannot be called as end_epoch(context)" in errors["no_context"]
    assert "async" in errors["async"]


@attrs.frozen
class CounterConfig:
    every: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    """Count every N epochs."""


class Counter:
    name = "counter"
    Config = CounterConfig

    def __init__(self, config: CounterConfig) -> None:
        self.config = config
        self.count = 0

    def end_epoch(self, context: PluginContext) -> None:
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: Any) -> None:
        self.count = state["count"]


def test_an_attrs_config_class_receives_the_json_options() -> None:
    plugins = load_plugins(
        [PluginSpec("counter", {"every": 3}, "plugins[0].counter")],
        CONFIG,
        registry={"counter": Counter},
    )
    (plugin,) = plugins.active
    assert isinstance(plugin, Counter)
    assert plugin.config == CounterConfig(every=3)
    assert isinstance(plugin, StatefulPlugin)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"evry": 3}, 'plugins[0].counter.evry: unknown key (did you mean "every"?)'),
        ({"every": "3"}, 'plugins[0].counter.every: expected int, got "3"'),
        ({"every": 0}, "plugins[0].counter.every: must be >= 1: 0"),
    ],
)
def test_bad_plugin_options_are_config_errors(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(bz.ConfigError) as caught:
        load_plugins(
            [PluginSpec("counter", options, "plugins[0].counter")],
            CONFIG,
            registry={"counter": Counter},
        )
    assert caught.value.render().startswith(expected)


def test_a_plugin_without_config_refuses_options() -> None:
    with pytest.raises(bz.ConfigError, match="plugin 'structural' takes no options"):
        load_plugins(
            [PluginSpec("structural", {"x": 1}, "plugins[0].structural")],
            CONFIG,
            registry={"structural": Structural},
        )


def test_enabled_false_creates_nothing() -> None:
    plugins = load_plugins(
        [PluginSpec("counter", {"enabled": False})], CONFIG, registry={"counter": Counter}
    )
    assert plugins.active == []
    assert plugins.faults == []


def test_enabled_false_keeps_an_installed_plugin_that_cannot_import_listed_but_not_a_typo() -> (
    None
):
    # What the plugin guide says of "enabled": false: bz neither imports the plugin (so an
    # installed one whose dependencies are missing can stay listed, off) nor forgets the
    # name (one no installed distribution provides is refused, off or on: a typo).
    broken = EntrySource("needs_gone", "tests_no_such_module_anywhere:Plugin", "gone", "1.0")
    discovery = Discovery({"needs_gone": broken}, {})
    plugins = load_plugins(
        [PluginSpec("needs_gone", {"enabled": False})], CONFIG, discovery=discovery
    )
    assert (plugins.active, plugins.faults) == ([], [])
    with pytest.raises(bz.ConfigError, match="unknown plugin 'needs_gon'"):
        load_plugins(
            [PluginSpec("needs_gon", {"enabled": False}, "plugins[0]")],
            CONFIG,
            discovery=discovery,
        )


def test_unknown_plugins_are_config_errors_with_suggestions() -> None:
    with pytest.raises(bz.ConfigError) as caught:
        load_plugins([PluginSpec("early_stoping", {}, "plugins[2]")], CONFIG)
    assert caught.value.problems == (
        ("plugins[2]", "unknown plugin 'early_stoping' (did you mean \"early_stopping\"?)"),
    )


def test_listing_a_plugin_twice_is_a_config_error() -> None:
    with pytest.raises(bz.ConfigError, match=r"plugins\[1\]: plugin 'console_out' is already"):
        load_plugins(
            [
                PluginSpec("console_out", {}, "plugins[0]"),
                PluginSpec("console_out", {}, "plugins[1]"),
            ],
            CONFIG,
        )
