"""Bad input a user's first week produces, found by using bz as shipped.

Each was a traceback (or a watchdog thread dying) before; the promise is one line naming
the value and where it is, exit code 2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples

from bz import _supervision
from bz.commands import cli
from bz.config import ConfigError, RunConfig, load_config

HUGE_DAYS = "1" + "0" * 400 + ":00:00:00"
"""A ``D:HH:MM:SS`` duration with more seconds than a float holds."""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bzconfig.json"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_duration_of_more_days_than_a_float_holds_is_a_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"max_time": "' + HUGE_DAYS + '"}')
    with pytest.raises(ConfigError, match=r"max_time: expected a finite number of seconds"):
        load_config(path)


def test_the_same_duration_in_python_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="checkpoint_every_seconds: expected a finite"):
        RunConfig(checkpoint_every_seconds=HUGE_DAYS)


@settings(max_examples=examples(100), deadline=None)
@given(days=st.integers(min_value=0, max_value=10**400))
def test_any_day_count_is_finite_seconds_or_a_value_error(days: int) -> None:
    text = f"{days}:00:00:00"
    if days * 86400 >= 2**1024 - 2**970:  # rounds to a float past the largest
        with pytest.raises(ValueError, match="max_time: expected a finite number"):
            RunConfig(max_time=text)
    else:
        max_time = RunConfig(max_time=text).max_time
        assert max_time is not None
        assert math.isfinite(max_time)


def test_an_integer_longer_than_python_reads_is_a_config_error(tmp_path: Path) -> None:
    digits = sys.get_int_max_str_digits() + 1
    path = _write(tmp_path, '{"epochs": 1' + "0" * digits + "}")
    with pytest.raises(ConfigError, match=r"invalid JSON: a number with more than \d+ digits"):
        load_config(path)


@pytest.mark.parametrize("command", ["check-config", "train"])
def test_the_cli_reports_such_a_file_in_one_line_and_exits_2(tmp_path: Path, command: str) -> None:
    digits = sys.get_int_max_str_digits() + 1
    path = _write(tmp_path, '{"epochs": 1' + "0" * digits + "}")
    result = CliRunner().invoke(cli, [command, "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "invalid JSON: a number with more than" in result.output


def test_a_set_value_longer_than_python_reads_is_exit_2_naming_set(tmp_path: Path) -> None:
    path = _write(tmp_path, "{}")
    digits = sys.get_int_max_str_digits() + 1
    result = CliRunner().invoke(
        cli, ["train", "--config", str(path), "--set", "epochs=1" + "0" * digits]
    )
    assert result.exit_code == 2, result.output
    assert "--set" in result.output
    assert "epochs: invalid JSON: a number" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("seconds", [1e7, math.inf, float(2**31)])
def test_a_plugin_timeout_of_weeks_or_infinity_keeps_the_heartbeat_going(
    monkeypatch: pytest.MonkeyPatch, seconds: float
) -> None:
    # The watchdog thread calls heartbeat(plugin_timeout) once a second; a value its
    # int32 slot could not hold raised there and killed the thread (no timeout at all).
    view = memoryview(bytearray(_supervision.NAMES_OFFSET)).cast("i")
    monkeypatch.setattr(_supervision, "where", view)
    monkeypatch.setattr(_supervision, "_block", object())
    _supervision.heartbeat(seconds)
    assert view[_supervision.TIMEOUT_MS] == _supervision.TIMEOUT_CAP_S * 1000
    assert view[_supervision.BEAT] == 1


def test_config_schema_into_a_folder_that_does_not_exist_is_one_line_exit_2(
    tmp_path: Path,
) -> None:
    target = tmp_path / "missing" / "bzconfig.schema.json"
    result = CliRunner().invoke(cli, ["config-schema", "-o", str(target)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"bz: error: {target}: cannot write the schema: No such file or directory"
    ]


@pytest.mark.parametrize("train_script", ["", ".", "models"])
@pytest.mark.parametrize("command", ["check-config", "train"])
def test_a_train_script_naming_a_folder_says_so(
    tmp_path: Path, command: str, train_script: str
) -> None:
    # Was "<folder> does not exist" / "file not found" about a folder that exists.
    (tmp_path / "models").mkdir()
    path = _write(tmp_path, json.dumps({"train_script": train_script}))
    result = CliRunner().invoke(cli, [command, "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "a folder, not a file" in result.output
    assert "not found" not in result.output
    assert "does not exist" not in result.output


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"epochs": 2, "seed": 1, "epochs": 30}', "epochs"),
        ('{"plugins": [{"early_stopping": {"patience": 3, "patience": 5}}]}', "patience"),
    ],
)
def test_a_key_given_twice_is_a_config_error_not_a_silent_last_wins(
    tmp_path: Path, text: str, key: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf'invalid JSON: "{key}" is given twice in one object'):
        load_config(path)


def test_equal_keys_in_different_objects_are_fine(tmp_path: Path) -> None:
    text = '{"epochs": 2, "keep_best": {"monitor": "validation_loss", "count": 2}}'
    assert load_config(_write(tmp_path, text)).epochs == 2
