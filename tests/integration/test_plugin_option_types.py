"""A wrongly typed option of a built-in plugin is the user's mistake: one line naming the
plugin, the option and ``bzconfig.json``, exit 2 — never a traceback, never a plugin
quietly quarantined while the run exits 0.

The values are any JSON at all (``tests/_config_strategies.py``), so a field type whose
structuring crashes on the wrong kind of value (a ``dict`` option given a list, say)
is found the day the field is added.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests._config_strategies import json_values, plugin_option_classes
from tests._examples import examples
from tests._support import TINY_TRAIN_PY

from bz.commands import cli
from bz.config import ConfigError, PluginSpec, RunConfig
from bz.plugins._loader import check_plugin_options, discover

_discovery = functools.cache(discover)


@functools.cache
def _builtin_options() -> dict[str, tuple[str, ...]]:
    """Built-in plugin name -> the options its ``Config`` declares."""
    sources = _discovery().sources
    found: dict[str, tuple[str, ...]] = {}
    for name, config in plugin_option_classes().items():
        if config is not None and sources[name].module.startswith("bz.plugins."):
            found[name] = tuple(field.name for field in attrs.fields(config))
    return found


def _plugin_and_option() -> st.SearchStrategy[tuple[str, str]]:
    return st.sampled_from(sorted(_builtin_options())).flatmap(
        lambda name: st.tuples(st.just(name), st.sampled_from(_builtin_options()[name]))
    )


def test_the_built_in_plugins_with_options_are_all_here() -> None:
    # The property below would pass vacuously over an empty list.
    assert {"csv_logger", "mlflow", "tensorboard", "early_stopping"} <= set(_builtin_options())


@given(_plugin_and_option(), json_values)
@settings(max_examples=examples(400), deadline=None)
def test_any_json_value_for_any_option_is_accepted_or_a_config_error(
    where: tuple[str, str], value: Any
) -> None:
    name, option = where
    spec = PluginSpec(name, {option: value}, f"plugins[0].{name}")
    try:
        _, faults = check_plugin_options([spec], RunConfig(), discovery=_discovery())
    except ConfigError as exc:
        for line in str(exc).splitlines():
            assert line.startswith(f"plugins[0].{name}.{option}"), line
        return
    # Accepted: nothing was blamed on the plugin's code.
    assert faults == []


def _project(folder: Path, plugin: dict[str, Any]) -> Path:
    (folder / "train.py").write_text(TINY_TRAIN_PY, encoding="utf-8")
    config = {"epochs": 1, "device": "cpu", "plugins": [plugin]}
    path = folder / "bzconfig.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@given(_plugin_and_option(), json_values)
@settings(
    max_examples=examples(40),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_check_config_answers_any_option_value_with_one_line_or_success(
    tmp_path: Path, where: tuple[str, str], value: Any
) -> None:
    name, option = where
    config = _project(tmp_path, {name: {option: value}})
    result = CliRunner().invoke(cli, ["check-config", "--config", str(config)])
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert lines, result.output
        for line in lines:
            assert f"bzconfig.json: plugins[0].{name}.{option}" in line, line


@pytest.mark.parametrize("tags", [["a"], "a", 3, None])
def test_a_list_for_mlflows_tags_stops_bz_train_with_one_line(tmp_path: Path, tags: Any) -> None:
    # What a user met: mlflow quarantined with a 68-line traceback and exit 0.
    config = _project(tmp_path, {"mlflow": {"tags": tags}})
    result = CliRunner().invoke(cli, ["train", "--config", str(config), "--no-resume"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"bz: error: {config}: plugins[0].mlflow.tags: expected an object, got {json.dumps(tags)}"
    ]
