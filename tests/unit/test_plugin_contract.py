"""The plugin contract without surprises (issue 15, points 6-14).

Each test installs a plugin package the way a third-party author would ship it and
drives it through the commands a user runs: ``bz train``, ``check-config``,
``list-plugins``, ``config-schema``.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st
from tests._plugin_packages_support import Packages, packages
from tests._support import tiny_setup

import bz
from bz.commands import cli
from bz.config import PluginSpec, RunConfig
from bz.plugins import (
    ContextNotReady,
    Plugin,
    PluginContext,
    device_of,
    loss_of,
    model_of,
    optimizer_of,
)
from bz.plugins._loader import load_plugins
from bz.plugins._order import Order, sort_plugins

__all__ = ["packages"]  # the fixture, imported for the tests below

ProjectFactory = Callable[..., Path]

GRADNORM = """
import attrs
from attrs import validators

from bz.plugins import PluginContext, hook


@attrs.frozen
class GradNormConfig:
    every: int = attrs.field(validator=validators.ge(1))
    mode: str = attrs.field(default="l2", validator=validators.in_(["l1", "l2"]))
    tag: str = attrs.field(
        default="grad", validator=[validators.min_len(1), validators.max_len(8)]
    )
    scale: float = attrs.field(
        default=1.0, validator=validators.and_(validators.gt(0), validators.lt(10))
    )


class GradNorm:
    name = "grad_norm"
    Config = GradNormConfig

    def __init__(self, config: GradNormConfig) -> None:
        self.config = config

    @hook
    def after_backward(self, context: PluginContext) -> None:
        pass
"""

BAD_DEFAULT = """
import attrs


@attrs.frozen
class LateConfig:
    every: int = "10"


class Late:
    name = "late"
    Config = LateConfig

    def __init__(self, config: LateConfig) -> None:
        self.every = config.every + 1  # what would fail in a hook, blamed on the hook

    def end_epoch(self, context) -> None:
        pass
"""

PLAIN = """
class Plain:
    name = "plain"

    def end_epoch(self, context) -> None:
        pass
"""


def bz_cli(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def gradnorm(packages: Packages) -> Packages:
    packages.install(
        "bz-gradnorm",
        {"grad_norm": "gradnorm:GradNorm", "late": "late:Late", "plain": "plain:Plain"},
        {"gradnorm.py": GRADNORM, "late.py": BAD_DEFAULT, "plain.py": PLAIN},
    )
    return packages


# -- 6 and 9: option errors name the plugin, the file, and what to add -------------------------


@pytest.mark.parametrize("command", ["train", "check-config"])
def test_a_missing_required_option_names_the_plugin_file_and_what_to_add(
    gradnorm: Packages, project: ProjectFactory, command: str
) -> None:
    project({"plugins": ["grad_norm"]})
    result = bz_cli(command)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "bz: error: bzconfig.json: plugins[0].grad_norm.every: "
        'missing required key (add "every": <int>)'
    ]


@pytest.mark.parametrize("command", ["train", "check-config"])
def test_bz_train_names_the_file_in_plugin_option_errors(
    gradnorm: Packages, project: ProjectFactory, command: str
) -> None:
    project({"plugins": ["console_out", {"grad_norm": {"every": 2, "evry": 3}}]})
    result = bz_cli(command)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        'bz: error: bzconfig.json: plugins[1].grad_norm.evry: unknown key (did you mean "every"?)'
    ]


def test_attrs_validators_refuse_values_with_their_path(
    gradnorm: Packages, project: ProjectFactory
) -> None:
    project({"plugins": [{"grad_norm": {"every": 0, "mode": "l3"}}]})
    result = bz_cli("check-config")
    assert result.exit_code == 2
    assert "plugins[0].grad_norm.every: must be >= 1: 0" in result.stderr


# -- 7: a default the field's own type refuses ----------------------------------------------


def test_a_wrong_default_is_a_load_error_naming_class_and_field(gradnorm: Packages) -> None:
    expected = "LateConfig.every: default '10' does not fit its type: expected int"
    plugins = load_plugins([PluginSpec("late")], RunConfig(plugins=[]))
    (fault,) = plugins.faults
    assert fault.stage == "config"
    assert expected in fault.error
    with pytest.raises(bz.PluginFailure, match=expected):
        load_plugins([PluginSpec("late")], RunConfig(plugins=[]), policy="raise")
    listed = bz_cli("list-plugins", "--verbose", "late")
    assert f"LOAD ERROR:   BadDefaultError: {expected}" in listed.output


def test_check_config_reports_the_wrong_default(
    gradnorm: Packages, project: ProjectFactory
) -> None:
    project({"plugins": ["late"]})
    result = bz_cli("check-config")
    assert "plugin 'late' failed in config" in result.stderr
    assert "LateConfig.every" in result.stderr


# -- 8: a plugin without Config or create takes no options, and says so ------------------------


def test_list_plugins_and_the_loader_agree_on_a_plugin_without_options(
    gradnorm: Packages, project: ProjectFactory
) -> None:
    (entry,) = json.loads(bz_cli("list-plugins", "--json", "plain").output)
    assert entry["options"] == []
    assert "  options:      none" in bz_cli("list-plugins", "-v", "plain").output
    project({"plugins": [{"plain": {"x": 1}}]})
    result = bz_cli("check-config")
    assert result.exit_code == 2
    assert "plugins[0].plain: plugin 'plain' takes no options (got x)" in result.stderr


# -- 10: attrs' validators reach the schema and list-plugins -----------------------------------


def test_attrs_validators_reach_config_schema(gradnorm: Packages) -> None:
    schema = json.loads(bz_cli("config-schema").output)
    options = schema["$defs"]["plugin.grad_norm"]["properties"]
    assert options["every"]["minimum"] == 1
    assert options["mode"]["enum"] == ["l1", "l2"]
    assert (options["tag"]["minLength"], options["tag"]["maxLength"]) == (1, 8)
    assert options["scale"]["exclusiveMinimum"] == 0
    assert options["scale"]["exclusiveMaximum"] == 10


def test_attrs_validators_reach_list_plugins(gradnorm: Packages) -> None:
    lines = bz_cli("list-plugins", "-v", "grad_norm").output.splitlines()
    assert "    every: integer (required; >= 1)" in lines
    assert '    mode: string (default "l2"; one of "l1", "l2")' in lines
    assert '    tag: string (default "grad"; length >= 1, length <= 8)' in lines
    assert "    scale: number (default 1.0; > 0, < 10)" in lines


# -- 11: typed accessors and a logger for plugins without a base class ------------------------


def test_typed_accessors_return_what_the_loop_sets_in_training_hooks() -> None:
    seen: list[tuple[str, int]] = []

    class Watcher:
        name = "watcher"

        def after_backward(self, context: PluginContext) -> None:
            assert model_of(context) is not None
            assert optimizer_of(context) is not None
            seen.append(("after_backward", context.global_step))

        def end_training_batch(self, context: PluginContext) -> None:
            assert loss_of(context).device == device_of(context)
            seen.append(("end_training_batch", context.global_step))

    bz.Trainer().fit(tiny_setup(batches=2), RunConfig(epochs=1, plugins=[]), [Watcher()])
    # global_step counts optimizer steps finished (the documented rule).
    assert seen == [
        ("after_backward", 0),
        ("end_training_batch", 1),
        ("after_backward", 1),
        ("end_training_batch", 2),
    ]


def test_accessors_say_where_a_value_is_set() -> None:
    with pytest.raises(ContextNotReady, match=r"context\.model is not set here"):
        model_of(PluginContext())
    with pytest.raises(ContextNotReady, match="last_loss"):
        loss_of(PluginContext())


def test_a_plugin_without_a_base_class_gets_a_bound_logger(
    events: list[dict[str, Any]],
) -> None:
    from bz.plugins import plugin_logger

    class Bare:
        name = "bare"

        def __init__(self) -> None:
            self.logger = plugin_logger(self)

        def end_epoch(self, context: PluginContext) -> None:
            self.logger.info("bare_epoch", epoch=context.epoch)

    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, plugins=[]), [Bare()])
    assert {"event": "bare_epoch", "epoch": 0, "plugin": "bare", "log_level": "info"} in events


# -- 14: ordering --------------------------------------------------------------------------


def _recorder(name: str, order: Order | None, calls: list[str]) -> Plugin:
    class Recorder(Plugin):
        def end_epoch(self, context: PluginContext) -> None:
            calls.append(self.name)

    plugin = Recorder(name=name)
    if order is not None:
        plugin.order = order  # type: ignore[attr-defined]  # declared per instance in this test
    return plugin


def test_without_declarations_plugins_run_in_list_order() -> None:
    calls: list[str] = []
    plugins = [_recorder(n, None, calls) for n in ["c", "a", "b"]]
    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, plugins=[]), plugins)
    assert calls == ["c", "a", "b"]


def test_a_plugin_declared_after_early_stopping_sees_its_decision() -> None:
    decisions: list[bool] = []

    class Reporter(Plugin):
        name = "reporter"
        order = Order(after="early_stopping")

        def end_epoch(self, context: PluginContext) -> None:
            decisions.append(context.should_stop_training)

    specs: list[dict[str, dict[str, Any]]] = [
        {"reporter": {}},
        {"early_stopping": {"patience": 1, "min_delta": 100.0}},
    ]
    config = RunConfig(epochs=5, plugins=specs)
    plugins = load_plugins(config.plugins, config, registry={"reporter": Reporter})
    assert plugins.active_names == ["early_stopping", "reporter"]
    # Trainer.fit takes plugin objects (PluginSet is not public): the loaded ones.
    result = bz.Trainer().fit(tiny_setup(), config, plugins.active)
    assert result.stopped_early
    assert decisions[-1] is True


def test_first_and_last_win_over_list_order() -> None:
    calls: list[str] = []
    plugins = [
        _recorder("a", Order(last=True), calls),
        _recorder("b", None, calls),
        _recorder("c", Order(first=True), calls),
    ]
    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, plugins=[]), plugins)
    assert calls == ["c", "b", "a"]


def test_a_cycle_is_a_load_error_naming_the_plugins() -> None:
    class A:
        name = "a"
        order = Order(after="b")

        def end_epoch(self, context: PluginContext) -> None: ...

    class B:
        name = "b"
        order = Order(after="a")

        def end_epoch(self, context: PluginContext) -> None: ...

    config = RunConfig(plugins=["a", "b"])
    with pytest.raises(bz.OrderCycleError, match="'a' after 'b' after 'a'") as raised:
        load_plugins(config.plugins, config, registry={"a": A, "b": B})
    assert raised.value.exit_code == 2
    # Each plugin of the cycle is named where it is defined, as other load problems are.
    assert str(raised.value).endswith(
        f"form a cycle; 'a' at {__file__}:{_line_of(A)}, 'b' at {__file__}:{_line_of(B)})"
    )


def _line_of(cls: type) -> int:
    import inspect

    return inspect.getsourcelines(cls)[1]


def test_a_malformed_order_is_the_plugins_fault() -> None:
    class Odd:
        name = "odd"
        order = ("first",)

    plugins = load_plugins([PluginSpec("odd")], RunConfig(plugins=[]), registry={"odd": Odd})
    (fault,) = plugins.faults
    assert fault.error == (
        "TypeError: order is tuple; it must be bz.plugins.Order(...) "
        f"(at {__file__}:{_line_of(Odd)})"
    )


@st.composite
def _declarations(draw: st.DrawFn) -> list[Order]:
    count = draw(st.integers(1, 6))
    names = [f"p{i}" for i in range(count)]
    orders = []
    for _ in names:
        position = draw(st.sampled_from([None, "first", "last"]))
        orders.append(
            Order(
                before=draw(st.lists(st.sampled_from([*names, "absent"]), max_size=2)),
                after=draw(st.lists(st.sampled_from([*names, "absent"]), max_size=2)),
                first=position == "first",
                last=position == "last",
            )
        )
    return orders


@given(_declarations())
def test_the_order_honours_every_declaration_or_reports_a_cycle(orders: list[Order]) -> None:
    names = [f"p{i}" for i in range(len(orders))]
    try:
        ordered = sort_plugins(names, names, orders)
    except bz.OrderCycleError:
        return
    assert sorted(ordered) == sorted(names)
    position = {name: i for i, name in enumerate(ordered)}
    for name, order in zip(names, orders, strict=True):
        for other in order.before:
            if other in position and other != name:
                assert position[name] < position[other]
        for other in order.after:
            if other in position and other != name:
                assert position[name] > position[other]
        for other, other_order in zip(names, orders, strict=True):
            if order.first and not other_order.first:
                assert position[name] < position[other]
            if order.last and not other_order.last:
                assert position[name] > position[other]


@given(st.integers(0, 8))
def test_no_declarations_means_list_order(count: int) -> None:
    names = [f"p{i}" for i in range(count)][::-1]
    assert sort_plugins(names, names, [Order()] * count) == names


def test_order_refuses_first_and_last_together() -> None:
    with pytest.raises(ValueError, match="both first and last"):
        Order(first=True, last=True)


# -- 12: a misspelled hook is caught (see also test_plugin_protocol) ---------------------------


def test_a_misspelled_hook_quarantines_the_plugin_in_a_real_run() -> None:
    class Typo(Plugin):
        name = "typo"

        def end_epcoh(self, context: PluginContext) -> None:
            pass

    result = bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, plugins=[]), [Typo()])
    (report,) = result.plugins
    assert report.fault is not None
    assert "did you mean end_epoch" in report.fault.error


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"every": 1, "mode": "l3"},
            "plugins[0].grad_norm.mode: must be in ['l1', 'l2'] (got 'l3')",
        ),
        ({"every": 1, "tag": "a long tag"}, "plugins[0].grad_norm.tag: length must be <= 8: 10"),
        ({"every": 1, "scale": 10}, "plugins[0].grad_norm.scale: must be < 10: 10.0"),
    ],
)
def test_every_attrs_validator_error_is_one_line_with_its_path(
    gradnorm: Packages, options: dict[str, Any], expected: str
) -> None:
    config = RunConfig(plugins=[{"grad_norm": options}])
    with pytest.raises(bz.ConfigError) as raised:
        load_plugins(config.plugins, config)
    assert str(raised.value) == expected


# -- 13: bz's own plugins are written as the guide asks -------------------------------------


def _builtin_plugin_classes() -> list[type]:
    from bz.plugins._loader import discover, load_factory

    sources = discover().sources.values()
    return [load_factory(s) for s in sources if s.distribution == "bz-cli"]


def test_every_builtin_hook_is_marked_and_every_class_declares_its_contract() -> None:
    import importlib

    from structlog.typing import FilteringBoundLogger

    from bz.commands.catalog import class_hooks
    from bz.plugins._typing import HOOK_MARKER

    classes = _builtin_plugin_classes()
    assert len(classes) >= 7
    for cls in classes:
        for name in class_hooks(cls):
            assert getattr(getattr(cls, name), HOOK_MARKER, False), f"{cls.__name__}.{name}"
        module = importlib.import_module(cls.__module__)
        assert getattr(module, "_", None) is cls, f"{cls.__module__}: no ConfiguredPluginClass"
        logger = getattr(cls, "logger", None)
        if isinstance(logger, property):
            assert logger.fget is not None
            hints = typing.get_type_hints(
                logger.fget, vars(module) | {"FilteringBoundLogger": FilteringBoundLogger}
            )
            assert hints["return"] is FilteringBoundLogger, cls
        assert not hasattr(cls, "_logger"), f"{cls.__name__} keeps an untyped _logger()"
