"""The bzconfig.json contract: what is accepted, what is refused, and how it is reported."""

from __future__ import annotations

import codecs
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from tests._config_strategies import json_values, names, valid_documents
from tests._examples import examples

from bz.config import (
    ConfigError,
    PluginSpec,
    RunConfig,
    find_config_file,
    load_config,
    structure,
    unstructure,
)

# -- strategies ------------------------------------------------------------------------

# Every key of RunConfig and of its tables, generated from the attrs classes.
valid_configs = valid_documents()


@pytest.mark.parametrize("key", [field.name for field in attrs.fields(RunConfig)])
def test_the_config_strategy_reaches_every_key(key: str) -> None:
    # The first example found will do: no shrinking (the slow part of find). The count is
    # a search limit, not a property's example count: the quick profile must not cut it.
    quick = settings(database=None, phases=[Phase.generate], max_examples=1000)
    found = find(valid_configs, lambda data: key in data, settings=quick)
    structure(found, RunConfig)


# -- properties ------------------------------------------------------------------------


@given(valid_configs)
@settings(max_examples=examples(200), deadline=None)
def test_valid_json_round_trips(data: dict[str, Any]) -> None:
    config = structure(data, RunConfig)
    again = structure(json.loads(json.dumps(unstructure(config))), RunConfig)
    assert again == config


@given(valid_configs)
@settings(max_examples=examples(100), deadline=None)
def test_given_keys_are_kept(data: dict[str, Any]) -> None:
    config = structure(data, RunConfig)
    keys = ("epochs", "device", "compile", "seed", "plugin_errors", "train_script")
    for key in (*keys, "checkpoint_async"):
        if key in data:
            assert getattr(config, key) == data[key]
    table = data.get("distributed", {})
    for key in ("backend", "timeout", "strategy"):
        if key in table:
            assert getattr(config.distributed, key) == table[key]
    for key, value in table.get("fsdp", {}).items():
        kept = getattr(config.distributed.fsdp, key)
        assert kept == (tuple(value) if isinstance(value, list) else value)
    if "plugins" in data:
        assert [spec.name for spec in config.plugins] == [
            entry if isinstance(entry, str) else next(iter(entry)) for entry in data["plugins"]
        ]


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
@settings(max_examples=examples(300), deadline=None)
def test_any_json_object_gives_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    try:
        structure(data, RunConfig)
    except ConfigError as exc:
        problems = exc.problems
    else:
        return
    assert problems, "a config error names at least one problem"
    assert all(isinstance(path, str) and message for path, message in problems)


@given(json_values)
@settings(max_examples=examples(200), deadline=None)
def test_any_json_document_gives_a_config_or_a_config_error(data: Any) -> None:
    with contextlib.suppress(ConfigError):
        structure(data, RunConfig)


@given(valid_configs, names.filter(lambda n: n not in RunConfig.__annotations__), json_values)
@settings(max_examples=examples(100), deadline=None)
def test_an_unknown_key_is_named(data: dict[str, Any], key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        structure({**data, key: value}, RunConfig)
    assert (key, "unknown key") in [(p, m.split(" (")[0]) for p, m in caught.value.problems]


@given(valid_configs, st.sampled_from(["epochs", "seed"]), st.text(min_size=1, max_size=5))
@settings(max_examples=examples(100), deadline=None)
def test_a_string_where_an_int_belongs_is_named(data: dict[str, Any], key: str, bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        structure({**data, key: bad}, RunConfig)
    assert [path for path, _ in caught.value.problems] == [key]


# -- messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"epochs": "5x"}, 'epochs: expected int, got "5x"'),
        ({"epochs": 0}, "epochs: must be >= 1, got 0"),
        ({"epochs": True}, "epochs: expected int, got true"),
        ({"epoch": 3}, 'epoch: unknown key (did you mean "epochs"?)'),
        ({"device": "gpu"}, "device"),
        ({"plugin_errors": "isolat"}, 'did you mean "isolate"?'),
        ({"plugins": "console_out"}, 'plugins: expected a list, got "console_out"'),
        ({"plugins": ["console_out", 3]}, "plugins[1]: expected"),
        ({"plugins": [{"a": 1, "b": 2}]}, "plugins[0]: expected"),
        ({"plugins": [{"my_plugin": 5}]}, "plugins[0].my_plugin: expected an object of options"),
        ({"hyperparameters": []}, "hyperparameters: expected an object, got []"),
    ],
)
def test_errors_name_the_path(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        structure(data, RunConfig)
    assert expected in caught.value.render()


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        structure({"epochs": "x", "device": 3, "colour": "red"}, RunConfig)
    paths = sorted(path for path, _ in caught.value.problems)
    assert paths == ["colour", "device", "epochs"]


def test_plugin_specs_keep_their_json_path() -> None:
    config = structure({"plugins": ["console_out", {"my_plugin": {"log_interval": 5}}]}, RunConfig)
    assert config.plugins == (
        PluginSpec("console_out", {}, "plugins[0]"),
        PluginSpec("my_plugin", {"log_interval": 5}, "plugins[1].my_plugin"),
    )


def test_enabled_false_marks_a_plugin_disabled() -> None:
    config = structure({"plugins": [{"early_stopping": {"enabled": False}}]}, RunConfig)
    assert not config.plugins[0].enabled


def test_defaults_are_documented_values() -> None:
    config = RunConfig()
    assert (config.epochs, config.device, config.compile, config.seed) == (10, "auto", False, 0)
    assert [spec.name for spec in config.plugins] == ["console_out"]
    assert config.plugin_errors == "rewind"


# -- files -----------------------------------------------------------------------------


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BZ_CONFIG", raising=False)
    assert find_config_file() == Path("bzconfig.json")
    monkeypatch.setenv("BZ_CONFIG", "from_env.json")
    assert find_config_file() == Path("from_env.json")
    assert find_config_file("explicit.json") == Path("explicit.json")


def test_load_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bzconfig.json"
    path.write_text('{"epochs": "many"}', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.render() == f'{path}: epochs: expected int, got "many"'


def test_invalid_json_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bzconfig.json"
    path.write_text('{\n  "epochs": 3,\n}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"invalid JSON at line 3, column 1"):
        load_config(path)


@given(valid_configs)
@settings(max_examples=50, deadline=None)
def test_a_byte_order_mark_changes_nothing(data: dict[str, Any]) -> None:
    # Notepad and PowerShell's Out-File begin UTF-8 files with one; json.loads refused it
    # ("Unexpected UTF-8 BOM (decode using utf-8-sig)").
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bzconfig.json"
        path.write_bytes(codecs.BOM_UTF8 + json.dumps(data).encode("utf-8"))
        assert load_config(path) == structure(data, RunConfig)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.json")


@given(
    st.one_of(
        st.fixed_dictionaries(
            {"strategy": st.text(max_size=6).filter(lambda t: t not in ("ddp", "fsdp"))}
        ),
        st.fixed_dictionaries(
            {
                "fsdp": st.fixed_dictionaries(
                    {
                        "shard_modules": st.text(max_size=8)
                        | st.integers()
                        | st.lists(st.integers(), min_size=1, max_size=2)
                        | st.just([""])
                    }
                )
            }
        ),
        st.fixed_dictionaries(
            {
                "fsdp": st.fixed_dictionaries(
                    {"offload_to_cpu": st.integers() | st.text(max_size=4)}
                )
            }
        ),
    )
)
@settings(max_examples=examples(100), deadline=None)
def test_bad_fsdp_settings_are_config_errors_naming_the_key(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        structure({"distributed": table}, RunConfig)
    (path, _message), *_ = caught.value.problems
    assert path.startswith("distributed.")
    assert path.split(".")[-1].split("[")[0] in {"strategy", "shard_modules", "offload_to_cpu"}


@given(st.text(max_size=8) | st.integers() | st.booleans() | st.none())
@settings(max_examples=examples(100), deadline=None)
def test_check_finite_is_epoch_or_step_and_nothing_else(value: Any) -> None:
    if value in ("epoch", "step") and isinstance(value, str):
        assert structure({"check_finite": value}, RunConfig).check_finite == value
        return
    with pytest.raises(ConfigError) as caught:
        structure({"check_finite": value}, RunConfig)
    assert [path for path, _ in caught.value.problems] == ["check_finite"]


@given(json_values)
@settings(max_examples=examples(100), deadline=None)
def test_deterministic_takes_only_a_boolean(value: Any) -> None:
    if isinstance(value, bool):
        assert structure({"deterministic": value}, RunConfig).deterministic is value
        return
    with pytest.raises(ConfigError) as caught:
        structure({"deterministic": value}, RunConfig)
    assert [path for path, _ in caught.value.problems] == ["deterministic"]


def test_check_finite_and_deterministic_default_to_todays_behaviour() -> None:
    config = RunConfig()
    assert (config.check_finite, config.deterministic) == ("epoch", False)
