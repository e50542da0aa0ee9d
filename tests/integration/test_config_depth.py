"""A configuration nested beyond what bz reads is one line and exit 2, at any depth.

``bzconfig.json`` for ``bz train`` and ``bz check-config``, a ``bz train --set`` value, and a
plugin's own options: each deeper than ``MAX_DEPTH`` levels is refused with one line
naming where, never a ``RecursionError``.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st
from tests._fault_support import no_rendering
from tests._support import TINY_TRAIN_PY

from bz import _logging
from bz._converter import MAX_DEPTH
from bz.commands import cli
from bz.config import ConfigError, RunConfig, structure


def _nested_text(depth: int) -> str:
    """A JSON list nested ``depth`` levels (built as text: too deep for json.dumps)."""
    return "[" * depth + "]" * depth


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _bz(*args: str) -> tuple[Result, list[MutableMapping[str, Any]]]:
    with pytest.MonkeyPatch.context() as patch, structlog.testing.capture_logs() as events:
        patch.setattr(_logging, "configure", no_rendering)
        result = CliRunner().invoke(cli, list(args))
    return result, events


def _one_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _project(folder: Path, config_text: str) -> Path:
    (folder / "train.py").write_text(TINY_TRAIN_PY, encoding="utf-8")
    path = folder / "bzconfig.json"
    path.write_text(config_text, encoding="utf-8")
    return path


@pytest.mark.parametrize("depth", [5_000, 100_000])
@pytest.mark.parametrize("command", ["train", "check-config"])
def test_a_config_file_nested_too_deep_is_one_line_and_exit_2(
    command: str, depth: int, tmp_path: Path
) -> None:
    text = '{"epochs": 1, "hyperparameters": {"deep": ' + _nested_text(depth) + "}}"
    config = _project(tmp_path, text)
    result, _ = _bz(command, "--config", str(config))
    assert f"nested deeper than {MAX_DEPTH} levels" in _one_line(result)


def test_a_config_file_nested_beyond_the_limit_but_parseable_names_where(
    tmp_path: Path,
) -> None:
    # Deep enough for bz, shallow enough for the JSON parser: the path says where.
    config = {"epochs": 1, "hyperparameters": {"deep": _nested(MAX_DEPTH + 5)}}
    path = _project(tmp_path, json.dumps(config))
    line = _one_line(_bz("check-config", "--config", str(path))[0])
    assert "hyperparameters.deep" in line
    assert f"nested deeper than {MAX_DEPTH} levels" in line


@pytest.mark.parametrize("depth", [MAX_DEPTH + 5, 100_000])
def test_a_set_value_nested_too_deep_is_one_line_and_exit_2(depth: int, tmp_path: Path) -> None:
    config = _project(tmp_path, json.dumps({"epochs": 1}))
    value = _nested_text(depth)
    result, _ = _bz("train", "--config", str(config), "--set", f"hyperparameters.x={value}")
    line = _one_line(result)
    assert "nested deeper" in line
    assert "hyperparameters" in line


def test_a_plugins_options_nested_too_deep_are_one_line_and_exit_2(tmp_path: Path) -> None:
    deep = {"console_out": {"update_interval": _nested(MAX_DEPTH + 5)}}
    config = _project(tmp_path, json.dumps({"epochs": 1, "plugins": [deep]}))
    line = _one_line(_bz("check-config", "--config", str(config))[0])
    assert "plugins[0].console_out" in line
    assert "nested deeper" in line


@given(st.integers(min_value=0, max_value=MAX_DEPTH * 2))
def test_nesting_is_accepted_exactly_up_to_the_limit(depth: int) -> None:
    # hyperparameters itself is one level: its value may nest MAX_DEPTH - 1 more.
    data = {"hyperparameters": {"value": _nested(depth)}}
    if depth + 2 <= MAX_DEPTH:
        assert structure(data, RunConfig).hyperparameters["value"] == _nested(depth)
    else:
        with pytest.raises(ConfigError, match="nested deeper"):
            structure(data, RunConfig)
