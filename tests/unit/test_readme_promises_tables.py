"""The README's and docs/training.md's tables say what bz does: read them, and check.

A promise in the README is exactly what a test shows. These tables are promises users
copy from: the `bzconfig.json` keys and their defaults, the options each command takes,
the options (and defaults) of the built-in plugins, the built-in metrics, the fields of
`FitResult` and `EpochRecord`, and the hooks in order. The tests pin no list of their
own: they read the documents, so a default changed in the code, or an option renamed,
fails here until the document says so too. In process (click's CliRunner, bz as a
library): nothing here needs a subprocess.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import click
import pytest
from click.testing import CliRunner

import bz
from bz.commands.main import cli
from bz.config import RunConfig, unstructure
from bz.plugins import HOOK_NAMES

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TRAINING = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")

_TICKED = re.compile(r"`([^`]+)`")


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole line) up to the next heading of any level."""
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(r"^#{1,6} ", text[start:], re.MULTILINE)
    return text[start : start + following.start()] if following else text[start:]


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each row of the table whose header line starts with ``header``."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows: list[list[str]] = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _config_defaults(text: str) -> dict[str, Any]:
    """``key -> default`` from a ``| key | default | meaning |`` table (JSON values)."""
    table: dict[str, Any] = {}
    for row in _table_rows(text, "| key | default | meaning |"):
        default = json.loads(_TICKED.fullmatch(row[1]).group(1))  # type: ignore[union-attr]
        for key in _TICKED.findall(row[0]):
            table[key] = default
    return table


README_DEFAULTS = _config_defaults(_section(README, "### `bzconfig.json`"))
TRAINING_DEFAULTS = _config_defaults(TRAINING)
ACTUAL = unstructure(RunConfig())


def test_the_readme_table_lists_every_key_bzconfig_json_takes() -> None:
    fields = {field.name for field in attrs.fields(RunConfig)}
    assert set(README_DEFAULTS) == fields


@pytest.mark.parametrize("key", sorted(README_DEFAULTS))
def test_a_readme_default_is_the_default(key: str) -> None:
    documented = README_DEFAULTS[key]
    if isinstance(documented, dict):  # `distributed`: the keys the README names
        assert {name: ACTUAL[key][name] for name in documented} == documented
    else:
        assert ACTUAL[key] == documented


@pytest.mark.parametrize("key", sorted(TRAINING_DEFAULTS))
def test_a_training_md_default_is_the_default(key: str) -> None:
    assert ACTUAL[key] == TRAINING_DEFAULTS[key]


def test_the_config_file_names_are_the_ones_the_readme_gives() -> None:
    # "The file is `--config PATH`, else `$BZ_CONFIG`, else `./bzconfig.json`"
    assert "`--config PATH`, else `$BZ_CONFIG`, else `./bzconfig.json`" in README
    assert bz.config.CONFIG_ENV_VAR == "BZ_CONFIG"
    assert bz.config.DEFAULT_CONFIG_FILE == "bzconfig.json"
    assert any("--config" in p.opts for p in cli.commands["train"].params)


# -- Commands ---------------------------------------------------------------------------

_OPTION = re.compile(r"(?<![\w-])(--?[a-z][a-z-]*)")


def _commands_table() -> list[tuple[str, set[str], str]]:
    """``(command, options the row names, the row's text)`` from README's Commands."""
    found = []
    for row in _table_rows(_section(README, "## Commands"), "| command | what it does |"):
        usage = _TICKED.match(row[0]).group(1)  # type: ignore[union-attr]
        name = usage.split()[1]
        options: set[str] = set()
        for ticked in _TICKED.findall(row[0] + " " + row[1]):
            if not ticked.startswith("-") and not ticked.startswith("bz "):
                continue
            for word in ticked.split():
                for part in word.strip("[]").split("/"):
                    if _OPTION.fullmatch(part):
                        options.add(part)
        found.append((name, options, row[1]))
    return found


COMMANDS = _commands_table()


def _option_names(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        names.update(param.opts)
        names.update(param.secondary_opts)
    return names


def test_the_commands_table_names_every_command_bz_has() -> None:
    assert {name for name, _, _ in COMMANDS} == set(cli.commands)


@pytest.mark.parametrize(("name", "options"), [(n, o) for n, o, _ in COMMANDS])
def test_every_option_the_commands_table_names_exists(name: str, options: set[str]) -> None:
    command = cli.commands[name]
    assert options <= _option_names(command), options - _option_names(command)


def test_max_restarts_defaults_to_three_as_the_table_says() -> None:
    row = next(text for name, _, text in COMMANDS if name == "train")
    assert "`--max-restarts N` (3)" in row
    (param,) = [p for p in cli.commands["train"].params if "--max-restarts" in p.opts]
    assert param.default == 3


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_answers_help(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"], prog_name="bz")
    assert result.exit_code == 0, result.output
    assert f"bz {name}" in result.output


def test_the_checkpoint_settings_table_names_train_s_options_and_defaults() -> None:
    text = (ROOT / "docs" / "checkpoints.md").read_text(encoding="utf-8")
    rows = _table_rows(_section(text, "## Settings"), "| `bzconfig.json`")
    assert len(rows) >= 6
    train_options = _option_names(cli.commands["train"])
    for key_cell, command_line, default, _ in rows:
        key = _TICKED.fullmatch(key_cell).group(1)  # type: ignore[union-attr]
        documented = default.strip("`")
        actual = unstructure(RunConfig())[key]
        assert actual == (documented if isinstance(actual, str) else json.loads(documented)), key
        for ticked in _TICKED.findall(command_line):
            option = ticked.split()[0]
            if option.startswith("--") and option != "--set":
                assert option in train_options, (key, option)


# -- Built-in plugins' options ----------------------------------------------------------


def _plugin_options_in(text: str) -> dict[str, list[tuple[str, str | None]]]:
    """``plugin -> [(option, what the parentheses after it say)]`` from the bullets
    ``- **`name`** ... Options: `a` (0.1), `b` (`x`|`y`), `c`.``"""
    found: dict[str, list[tuple[str, str | None]]] = {}
    for bullet in re.split(r"\n- \*\*`", text)[1:]:
        name = bullet.split("`", 1)[0]
        match = re.search(r"Options:\s+(.*?)(?:\.(?:\s|$)|$)", bullet, re.DOTALL)
        if match is None:
            continue
        items = re.findall(r"`(\w+)`(?:\s+\(([^)]*)\))?", match.group(1))
        found[name] = [(option, note or None) for option, note in items]
    return found


README_PLUGIN_OPTIONS = _plugin_options_in(README)


@pytest.fixture(scope="module")
def listed() -> dict[str, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["list-plugins", "--verbose", "--json"])
    assert result.exit_code == 0, result.output
    plugins = json.loads(result.output)
    return {entry["name"]: entry for entry in plugins}


def test_the_readme_documents_the_built_in_plugins_options() -> None:
    assert {"console_out", "early_stopping", "ema"} <= set(README_PLUGIN_OPTIONS)


@pytest.mark.parametrize(
    ("plugin", "option", "note"),
    [(p, o, n) for p, items in README_PLUGIN_OPTIONS.items() for o, n in items],
)
def test_a_plugin_option_the_readme_names_exists_with_its_default(
    listed: dict[str, dict[str, Any]], plugin: str, option: str, note: str | None
) -> None:
    if plugin not in listed:
        pytest.skip(f"{plugin}: its extra is not installed")
    options = {entry["name"]: entry for entry in listed[plugin]["options"]}
    assert option in options, sorted(options)
    if note is None or note == "...":
        return
    if "|" in note:  # choices: `a`|`b`, in the order the option's type gives them
        choices = json.loads(f"[{options[option]['type'].replace(' | ', ',')}]")
        assert _TICKED.findall(note) == [c for c in choices if c is not None]
        return
    assert json.loads(note) == options[option]["default"], options[option]


# -- Metrics, FitResult, EpochRecord, hooks ----------------------------------------------


def test_the_built_in_metrics_are_the_readme_s() -> None:
    sentence = _section(README, "## Metrics").split("Built in: ", 1)[1].split("; `bz list", 1)[0]
    documented = set(re.findall(r"`(\w+)`(?!:)", sentence)) - {"average", "k"}
    documented -= {"macro", "micro", "weighted"}
    result = CliRunner().invoke(cli, ["list-metrics", "--json"])
    assert result.exit_code == 0, result.output
    assert documented == {entry["name"] for entry in json.loads(result.output)}


def _fields_listed(marker: str) -> set[str]:
    bullet = README.split(f"- **`{marker}`**", 1)[1].split("\n- ", 1)[0].split("\n\n", 1)[0]
    return {name for name in re.findall(r"`(\w+)`", bullet) if not name[0].isupper()}


def test_fit_result_has_the_fields_the_readme_lists() -> None:
    documented = _fields_listed("FitResult") - {"name", "hooks", "calls", "seconds", "fault"}
    documented |= {"seconds"}
    assert documented <= set(dir(bz.FitResult)) | {f.name for f in attrs.fields(bz.FitResult)}


def test_epoch_record_has_the_fields_the_readme_lists() -> None:
    assert _fields_listed("EpochRecord") <= {field.name for field in attrs.fields(bz.EpochRecord)}


def test_the_hooks_are_listed_in_the_order_bz_calls_them() -> None:
    sentence = README.split("Hooks, in order: ", 1)[1].split("In the batch hooks", 1)[0]
    documented = [name for name in _TICKED.findall(sentence) if name in HOOK_NAMES]
    assert documented == [name for name in HOOK_NAMES if name in documented]
    assert set(documented) == set(HOOK_NAMES) - {"on_rewind"}


def test_the_public_names_the_readme_retired_are_gone() -> None:
    assert "`bz.PluginSet` and `bz.tune` are no longer exported" in README
    assert "PluginSet" not in bz.__all__
    assert "tune" not in bz.__all__
    assert not hasattr(bz, "PluginSet")
