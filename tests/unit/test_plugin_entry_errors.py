"""A plugin's configuration errors name its entry in the list the same way, whichever
check finds them: structuring its options, the watched name checked once ``setup()`` is
known, or a ``ConfigError`` / ``ConfigValueError`` its own code raises about a field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples
from tests._support import tiny_setup

import bz
from bz._run import _check_monitors
from bz.config import ConfigError, ConfigValueError, RunConfig, structure
from bz.plugins import PluginContext
from bz.plugins._loader import check_plugin_options, load_plugins
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig

_SETUP = tiny_setup()
"""One setup for every example: the monitor check reads its metrics and val_loader."""


class _Guided:
    """A plugin in the plugin guide's style whose ``load_config`` refuses a value."""

    name = "guided"
    refusal: Exception = ConfigValueError("every", "must be at least 1, got 0")

    @staticmethod
    def load_config(config_data: Mapping[str, Any]) -> dict[str, Any]:
        raise _Guided.refusal

    @staticmethod
    def create(config_data: Mapping[str, Any], training_config: RunConfig) -> _Guided:
        _Guided.load_config(config_data)
        return _Guided()

    def end_epoch(self, context: PluginContext) -> None:
        """Nothing: it never gets created."""


class _Checking:
    """A plugin whose constructor checks its options itself (a ``ConfigError`` with the
    field's path, as ``bz.config.structure`` gives it without a path)."""

    name = "checking"

    def __init__(self) -> None:
        structure({"every": "5x"}, _EveryConfig)

    def end_epoch(self, context: PluginContext) -> None:
        """Nothing: it never gets created."""


@attrs.frozen
class _EveryConfig:
    every: int = 1


_REGISTRY = {"guided": _Guided, "checking": _Checking}

_OTHERS: list[Any] = [
    "console_out",
    {"ema": {}},
    {"profiler": {"enabled": False}},
    {"run_log": {"enabled": False}},
]
_AROUND = st.tuples(
    st.lists(st.sampled_from(range(len(_OTHERS))), unique=True), st.integers(0, len(_OTHERS))
).map(
    lambda drawn: (
        [_OTHERS[i] for i in drawn[0][: drawn[1]]],
        [_OTHERS[i] for i in drawn[0][drawn[1] :]],
    )
)
"""Other plugins before and after the one that is wrong (each listed once)."""


def _config(entries: list[Any]) -> RunConfig:
    return structure({"device": "cpu", "plugins": entries}, RunConfig)


def _load_and_check(config: RunConfig) -> None:
    """What ``bz train`` checks of the plugins: loading them, then (setup known) what
    they watch."""
    plugins = load_plugins(config.plugins, config, policy="raise")
    _check_monitors(config, None, config, _SETUP, plugins, {})


def _problem(raised: pytest.ExceptionInfo[ConfigError]) -> tuple[str, str]:
    (problem,) = raised.value.problems
    assert "\n" not in problem[1]
    return problem


@settings(max_examples=examples(60), deadline=None)
@given(_AROUND, st.sampled_from(["structure", "monitor"]))
def test_early_stopping_errors_name_its_entry_whichever_check_finds_them(
    around: tuple[list[Any], list[Any]], kind: str
) -> None:
    before, after = around
    index = len(before)
    options = {"patince": 3} if kind == "structure" else {"monitor": "val_acc"}
    config = _config([*before, {"early_stopping": options}, *after])
    with pytest.raises(ConfigError) as raised:
        _load_and_check(config)
    path, message = _problem(raised)
    field = "patince" if kind == "structure" else "monitor"
    assert path == f"plugins[{index}].early_stopping.{field}"
    if kind == "monitor":
        assert message.startswith("'val_acc' is no value this run produces")


@settings(max_examples=examples(40), deadline=None)
@given(_AROUND, st.sampled_from(["guided", "checking"]), st.sampled_from(["value", "error"]))
def test_errors_a_plugins_own_code_raises_about_a_field_name_its_entry(
    around: tuple[list[Any], list[Any]], name: str, raised_as: str
) -> None:
    before, after = around
    _Guided.refusal = (
        ConfigValueError("every", "must be at least 1, got 0")
        if raised_as == "value"
        else ConfigError([("every", "must be at least 1, got 0")])
    )
    config = _config([*before, {name: {"every": 0}} if name == "guided" else name, *after])
    with pytest.raises(ConfigError) as raised:
        load_plugins(config.plugins, config, policy="isolate", registry=_REGISTRY)
    path, message = _problem(raised)
    # A plugin listed as a plain string is named by its name, as structuring names it.
    assert path == f"plugins[{len(before)}].{name}.every"
    assert "\n" not in message


def test_check_config_names_the_entry_like_train() -> None:
    config = _config(["console_out", {"early_stopping": {"patince": 3}}])
    with pytest.raises(ConfigError) as raised:
        check_plugin_options(config.plugins, config)
    assert _problem(raised)[0] == "plugins[1].early_stopping.patince"


def test_plugins_made_in_code_are_named_by_their_name() -> None:
    plugin = EarlyStopping(EarlyStoppingConfig(monitor="val_acc"))
    with pytest.raises(ConfigError) as raised:
        bz.Trainer().fit(tiny_setup(), RunConfig(device="cpu", plugins=()), [plugin])
    assert _problem(raised)[0] == "plugins.early_stopping.monitor"
