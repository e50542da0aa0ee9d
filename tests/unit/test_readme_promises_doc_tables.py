"""The option tables of docs/integrations.md, docs/metrics.md and docs/distributed.md are
the options bz has, with the defaults bz uses.

Each `## \\`plugin\\`` section of integrations.md has a `| option | default | |` table:
its rows must be exactly the plugin's options (as `bz list-plugins --verbose --json`
shows them), and a default written as a JSON value must be the default. A default
written in words ("the run directory", "the config's `seed`") is filled in at run time:
the option's own default is then `null`. Likewise metrics.md's `| Option | Type |
Default | Meaning |` tables for the metric each `### \\`name\\`` section describes, and
distributed.md's `| key | default | |` table against `RunConfig`. In process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bz.commands.main import cli
from bz.config import RunConfig, unstructure

DOCS = Path(__file__).resolve().parents[2] / "docs"
_TICKED = re.compile(r"`([^`]+)`")


def _tables(text: str, header: str) -> list[tuple[str, list[list[str]]]]:
    """``(the heading above it, its rows' cells)`` for each table starting with ``header``."""
    found: list[tuple[str, list[list[str]]]] = []
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line
        if line.startswith(header):
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = re.split(r"(?<!\\)\|", lines[i].strip().strip("|"))
                rows.append([cell.strip() for cell in cells])
                i += 1
            found.append((heading, rows))
            continue
        i += 1
    return found


def _default(cell: str) -> tuple[bool, Any]:
    """``(True, value)`` when the cell opens with one JSON value in backticks."""
    match = re.match(r"`([^`]+)`", cell)
    if match is None:
        return False, None
    try:
        return True, json.loads(match.group(1))
    except json.JSONDecodeError:
        return False, None


def _listed(command: str) -> dict[str, dict[str, dict[str, Any]]]:
    result = CliRunner().invoke(cli, [command, "--verbose", "--json"])
    assert result.exit_code == 0, result.output
    return {
        entry["name"]: {option["name"]: option for option in entry["options"]}
        for entry in json.loads(result.output)
        if entry.get("error") is None
    }


def _plugin_tables() -> list[tuple[str, list[list[str]]]]:
    text = (DOCS / "integrations.md").read_text(encoding="utf-8")
    found = []
    for heading, rows in _tables(text, "| option | default | |"):
        names = _TICKED.findall(heading)
        name = "optuna" if "bz tune" in names else names[0].split()[0]
        found.append((name, rows))
    return found


PLUGIN_TABLES = _plugin_tables()


@pytest.fixture(scope="module")
def plugins() -> dict[str, dict[str, dict[str, Any]]]:
    return _listed("list-plugins")


def test_integrations_md_has_an_options_table_per_integration() -> None:
    names = [name for name, _ in PLUGIN_TABLES]
    assert len(names) == len(set(names))
    expected = {"tensorboard", "run_log", "wandb", "mlflow", "csv_logger", "profiler", "ema"}
    assert {*expected, "optuna"} <= set(names)


@pytest.mark.parametrize(("name", "rows"), PLUGIN_TABLES, ids=[n for n, _ in PLUGIN_TABLES])
def test_an_options_table_is_the_plugins_options_and_defaults(
    plugins: dict[str, dict[str, dict[str, Any]]], name: str, rows: list[list[str]]
) -> None:
    if name not in plugins:
        pytest.skip(f"{name}: its extra is not installed")
    options = plugins[name]
    documented = {_TICKED.fullmatch(row[0]).group(1): row[1] for row in rows}  # type: ignore[union-attr]
    assert set(documented) == set(options)
    for option, cell in documented.items():
        is_json, value = _default(cell)
        actual = options[option]["default"]
        assert actual == (value if is_json else None), (option, cell, actual)


def test_metrics_md_option_tables_are_the_metrics_options_and_defaults() -> None:
    metrics = _listed("list-metrics")
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    tables = _tables(text, "| Option | Type | Default | Meaning |")
    assert len(tables) >= 2
    for heading, rows in tables:
        names = [name for name in _TICKED.findall(heading) if name in metrics]
        assert names, heading
        for name in names:
            options = metrics[name]
            documented = {_TICKED.fullmatch(r[0]).group(1): r[2] for r in rows}  # type: ignore[union-attr]
            assert set(documented) == set(options), name
            for option, cell in documented.items():
                # list-metrics shows a default as JSON text
                assert json.loads(options[option]["default"]) == _default(cell)[1], (name, option)


def test_distributed_md_table_is_the_configs_defaults() -> None:
    text = (DOCS / "distributed.md").read_text(encoding="utf-8")
    ((_, rows),) = _tables(text, "| key | default | |")
    actual = unstructure(RunConfig())
    for key_cell, default, _ in rows:
        value: Any = actual
        for part in _TICKED.fullmatch(key_cell).group(1).split("."):  # type: ignore[union-attr]
            value = value[part]
        assert value == _default(default)[1], key_cell
