"""Plugins read the run's configuration and cannot change it, nor the caller's copy.

``RunConfig`` is frozen, but its ``hyperparameters`` and the options of its ``metrics``
and ``plugins`` entries are tables a plugin could change in place. A program that runs
``Trainer.fit`` (or ``bz.run``) and reuses its config must find it as it was after the
run, whatever the plugins did. During a run, ``context.run_config`` and
``context.hyperparameters`` read like the config (equal, ``json.dumps`` as before) and
are read-only at every depth: a change raises ``TypeError`` in the plugin's own hook,
which makes it that plugin's fault, like a write to any other value the loop owns. So is
``create``'s ``training_config``; the options a plugin is created from are its own copy.
"""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples
from tests._support import assert_same_weights, tiny_setup, weights

import bz
from bz.config import PluginSpec, RunConfig, unstructure
from bz.plugins import PluginContext
from bz.plugins._context import read_only_config
from bz.plugins._loader import load_plugins


def _config() -> RunConfig:
    return RunConfig(
        epochs=2,
        device="cpu",
        hyperparameters={"lr": 0.1, "layers": [8, 8], "optimizer": {"betas": [0.9, 0.99]}},
        metrics=["accuracy", {"f1_score": {"average": "macro"}}],
        plugins=[{"console_out": {"update_interval": 1.0}}],
    )


def _change_lr(context: PluginContext) -> None:
    assert context.run_config is not None
    context.run_config.hyperparameters["lr"] = 5


def _append_layer(context: PluginContext) -> None:
    assert context.run_config is not None
    context.run_config.hyperparameters["layers"].append(3)


def _change_beta(context: PluginContext) -> None:
    assert context.run_config is not None
    context.run_config.hyperparameters["optimizer"]["betas"][0] = 0.5


def _drop_from_hyperparameters(context: PluginContext) -> None:
    del context.hyperparameters["lr"]


def _nested_hyperparameters(context: PluginContext) -> None:
    # context.hyperparameters was a copy one level deep: its tables were the caller's.
    context.hyperparameters["optimizer"].update(name="sgd")


def _plugin_options(context: PluginContext) -> None:
    assert context.run_config is not None
    context.run_config.plugins[0].options["update_interval"] = 0.0  # type: ignore[index]


def _metric_options(context: PluginContext) -> None:
    assert context.run_config is not None
    context.run_config.metrics[1].options.pop("average")  # type: ignore[attr-defined]


CHANGES: dict[str, Callable[[PluginContext], None]] = {
    "run_config.hyperparameters": _change_lr,
    "a list in it": _append_layer,
    "a list in a table in it": _change_beta,
    "context.hyperparameters": _drop_from_hyperparameters,
    "a table in context.hyperparameters": _nested_hyperparameters,
    "a plugin's options": _plugin_options,
    "a metric's options": _metric_options,
}


def _fit(plugins: list[Any], config: RunConfig) -> tuple[dict[str, Any], bz.FitResult]:
    setup = tiny_setup()
    result = bz.Trainer().fit(setup, config, plugins)
    return weights(setup.model), result


@pytest.mark.parametrize("what", list(CHANGES))
def test_changing_the_configuration_is_the_plugins_fault_and_the_callers_stays(
    what: str,
) -> None:
    config = _config()
    before = copy.deepcopy(config)

    class Changer:
        name = "changer"

        def end_epoch(self, context: PluginContext) -> None:
            CHANGES[what](context)

    clean, _ = _fit([], _config())
    got, result = _fit([Changer()], config)
    fault = result.plugins[0].fault
    assert fault is not None
    assert (fault.stage, fault.error.split(":")[0]) == ("end_epoch", "TypeError")
    assert "read-only for plugins" in fault.error
    assert config == before
    assert unstructure(config) == unstructure(before)
    assert_same_weights(got, clean)


def test_plugins_read_the_configuration_as_before_and_copies_are_their_own() -> None:
    config = _config()
    before = copy.deepcopy(config)

    class Reader:
        name = "reader"

        def __init__(self) -> None:
            self.read: list[Any] = []

        def end_epoch(self, context: PluginContext) -> None:
            shown = context.run_config
            assert shown is not None
            mine = copy.deepcopy(shown.hyperparameters)
            mine["layers"].append(3)  # a copy is a plugin's own, plain and writable
            shallow = dict(context.hyperparameters)
            shallow["lr"] = 1.0
            self.read.append(
                (
                    shown == config,
                    json.dumps(context.hyperparameters, sort_keys=True),
                    unstructure(shown)["hyperparameters"],
                    pickle.loads(pickle.dumps(shown.hyperparameters)),
                    mine,
                    shallow["lr"],
                )
            )

    reader = Reader()
    _, result = _fit([reader], config)
    assert result.plugins[0].fault is None
    hyperparameters = before.hyperparameters
    assert reader.read[-1] == (
        True,
        json.dumps(hyperparameters, sort_keys=True),
        hyperparameters,
        hyperparameters,
        {**hyperparameters, "layers": [8, 8, 3]},
        1.0,
    )
    assert config == before


def test_create_sees_the_configuration_read_only_and_its_options_as_its_own() -> None:
    # The plugin guide's style: create(config_data, training_config).
    class Tidy:
        name = "tidy"

        @staticmethod
        def create(config_data: dict[str, Any], training_config: RunConfig) -> Tidy:
            config_data["nested"]["seen"] = True  # its own copy
            return Tidy()

    class Meddler:
        name = "meddler"

        @staticmethod
        def create(config_data: dict[str, Any], training_config: RunConfig) -> Meddler:
            training_config.hyperparameters["lr"] = 5
            return Meddler()

    config = RunConfig(
        hyperparameters={"lr": 0.1},
        plugins=[{"tidy": {"nested": {"seen": False}}}, "meddler"],
    )
    before = copy.deepcopy(config)
    plugins = load_plugins(
        config.plugins, config, policy="isolate", registry={"tidy": Tidy, "meddler": Meddler}
    )
    assert plugins.active_names == ["tidy"]
    (fault,) = plugins.faults
    assert (fault.plugin, fault.stage) == ("meddler", "create")
    assert "TypeError: run_config.hyperparameters is the run's configuration" in fault.error
    assert config == before


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


def _containers(value: Any) -> list[Any]:
    """Every table and list inside ``value`` (itself included)."""
    if isinstance(value, dict):
        return [value, *(c for item in value.values() for c in _containers(item))]
    if isinstance(value, list):
        return [value, *(c for item in value for c in _containers(item))]
    return []


@settings(max_examples=examples(100), deadline=None)
@given(hyperparameters=st.dictionaries(st.text(max_size=3), _json, max_size=4), options=_json)
def test_the_shown_configuration_equals_the_callers_and_no_table_in_it_changes(
    hyperparameters: dict[str, Any], options: Any
) -> None:
    config = RunConfig(
        hyperparameters=hyperparameters,
        plugins=[PluginSpec("console_out", {"x": options})],
    )
    before = copy.deepcopy(config)
    shown = read_only_config(config)
    assert shown == config
    assert json.dumps(unstructure(shown), sort_keys=True) == json.dumps(
        unstructure(config), sort_keys=True
    )
    changes: list[Callable[[Any], object]] = [
        lambda c: c.clear(),
        lambda c: c.__setitem__(0 if isinstance(c, list) else "k", 1),
        lambda c: c.pop(),
        lambda c: c.__iadd__([1]) if isinstance(c, list) else c.__ior__({"k": 1}),
        lambda c: c.append(1) if isinstance(c, list) else c.setdefault("k", 1),
    ]
    for container in _containers(shown.hyperparameters) + _containers(shown.plugins[0].options):
        for change in changes:
            with pytest.raises(TypeError, match="read-only for plugins"):
                change(container)
    assert config == before
    assert copy.deepcopy(shown) == config


def test_a_plugin_in_its_own_process_sees_the_configuration_read_only_too() -> None:
    from bz.plugins._isolated_child import _Server

    class Changer:
        name = "changer"

        def end_epoch(self, context: PluginContext) -> None:
            assert context.run_config is not None
            context.run_config.hyperparameters["layers"].append(3)

    config = _config()
    server = _Server(Changer(), frozenset({"end_epoch"}), config)
    snapshot = {"extra": {}, "hyperparameters": dict(config.hyperparameters)}
    kind, (hook, error) = server.handle(("hook", "end_epoch", snapshot))
    assert (kind, hook) == ("fault", "end_epoch")
    assert error.startswith("TypeError: run_config.hyperparameters['layers'] is the run's")
