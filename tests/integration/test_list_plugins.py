"""``bz list-plugins`` (plain, ``--verbose``, ``--json``, one NAME) and ``bz config-schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner, Result
from tests._plugin_packages_support import REPO, Packages, packages

from bz.commands import cli
from bz.commands.schema import bzconfig_schema, config_schema

__all__ = ["packages"]  # the fixture, imported for the tests below

TIMER = """
    import attrs
    from bz.plugins import PluginContext


    @attrs.frozen
    class TimerConfig:
        every: int = 2
        '''Report every N epochs.'''
        label: str | None = None


    class Timer:
        '''Times epochs.'''

        name = "timer"
        Config = TimerConfig

        def __init__(self, config: TimerConfig) -> None:
            self.config = config

        def start_epoch(self, context: PluginContext) -> None: ...

        def end_epoch(self, context: PluginContext) -> None: ...

        def state_dict(self) -> dict[str, int]:
            return {}

        def load_state_dict(self, state: dict[str, int]) -> None: ...
"""

GUIDE_STYLE = """
    from bz.plugins import Plugin


    class Printer(Plugin):
        name = "printer"

        def __init__(self, log_interval: int = 10) -> None:
            super().__init__(name=self.name)
            self.log_interval = log_interval

        def end_epoch(self, context): ...

        @staticmethod
        def load_config(config_data):
            return {"enabled": True, "log_interval": config_data.get("log_interval", 10)}

        @staticmethod
        def create(config_data, training_config):
            return Printer(**{k: v for k, v in config_data.items() if k != "enabled"})
"""


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["list-plugins", *args])


@pytest.fixture
def timer(packages: Packages) -> Packages:
    packages.install("timer-plugin", {"timer": "timer_plugin:Timer"}, {"timer_plugin.py": TIMER})
    return packages


# -- listing --------------------------------------------------------------------------------


def test_plain_listing_shows_name_distribution_and_entry_point(timer: Packages) -> None:
    result = invoke()
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()}
    assert rows["timer"] == ["timer-plugin", "1.0.0", "timer_plugin:Timer"]
    assert rows["console_out"][0] == "bz-cli"


def test_verbose_shows_hooks_state_and_every_option(timer: Packages) -> None:
    result = invoke("--verbose", "timer")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "timer",
        "  Times epochs.",
        "  distribution: timer-plugin 1.0.0",
        "  entry point:  timer_plugin:Timer",
        "  hooks:        start_epoch, end_epoch",
        "  stateful:     yes (saved in checkpoints)",
        '  isolation:    "in-process" (default) or "process"',
        "  options:",
        "    every: integer (default 2)",
        "        Report every N epochs.",
        "    label: string | null (default null)",
    ]


def test_verbose_lists_every_installed_plugin(timer: Packages) -> None:
    names = [line for line in invoke("--verbose").output.splitlines() if line and line[0] != " "]
    assert {"console_out", "early_stopping", "timer"} <= set(names)


def test_json_has_every_field(timer: Packages) -> None:
    result = invoke("--json")
    assert result.exit_code == 0
    described = {entry["name"]: entry for entry in json.loads(result.output)}
    assert described["timer"] == {
        "name": "timer",
        "distribution": "timer-plugin",
        "version": "1.0.0",
        "entry_point": "timer_plugin:Timer",
        "module": "timer_plugin",
        "summary": "Times epochs.",
        "hooks": ["start_epoch", "end_epoch"],
        "options": [
            {
                "name": "every",
                "type": "integer",
                "default": 2,
                "required": False,
                "doc": "Report every N epochs.",
                "constraints": "",
            },
            {
                "name": "label",
                "type": "string | null",
                "default": None,
                "required": False,
                "doc": "",
                "constraints": "",
            },
        ],
        "options_from": "Config",
        "stateful": True,
        "isolation": '"in-process" (default) or "process"',
        "error": None,
        "duplicate_of": None,
    }
    assert described["early_stopping"]["stateful"] is True
    assert described["ema"]["isolation"] == (
        '"in-process" only (needs the training process: it keeps an average of the '
        "model's weights)"
    )


def test_guide_style_options_come_from_load_config(packages: Packages) -> None:
    packages.install(
        "printer", {"printer": "printer_mod:Printer"}, {"printer_mod.py": GUIDE_STYLE}
    )
    (entry,) = json.loads(invoke("--json", "printer").output)
    assert entry["hooks"] == ["end_epoch"]
    assert [(o["name"], o["type"], o["default"]) for o in entry["options"]] == [
        ("enabled", "boolean", True),
        ("log_interval", "integer", 10),
    ]
    assert entry["options_from"] == "load_config"
    text = invoke("--verbose", "printer").output
    assert "options (defaults from load_config; bz does not check them):" in text


def test_unknown_name_is_a_usage_error_with_a_suggestion(timer: Packages) -> None:
    result = invoke("--verbose", "timr")
    assert result.exit_code == 2
    assert result.stderr == "bz: error: no plugin named 'timr' (did you mean \"timer\"?)\n"


# -- load errors ----------------------------------------------------------------------------


def test_load_errors_are_listed_not_raised(packages: Packages) -> None:
    site = packages.install(
        "broken-plugins",
        {
            "broken": "broken_mod:Broken",
            "not_a_plugin": "odd_mod:VALUE",
            "bad_hook": "odd_mod:BadHook",
        },
        {
            "broken_mod.py": "import does_not_exist\n",
            "odd_mod.py": """
                VALUE = 42


                class BadHook:
                    name = "bad_hook"

                    def end_epoch(self) -> None: ...
            """,
        },
    )
    result = invoke("--json")
    assert result.exit_code == 0
    errors = {e["name"]: e["error"] for e in json.loads(result.output)}
    assert errors["broken"] == (
        "PluginImportError: broken_mod:Broken (from broken-plugins 1.0.0) failed to import: "
        f"{site / 'broken_mod.py'}:1: ModuleNotFoundError: No module named 'does_not_exist'"
    )
    assert (
        "odd_mod:VALUE (from broken-plugins 1.0.0) is a int, not a plugin"
        in errors["not_a_plugin"]
    )
    assert errors["bad_hook"].endswith(
        "end_epoch(self) -> None cannot be called as end_epoch(self, context) "
        f"(at {site / 'odd_mod.py'}:8)"
    )
    assert errors["console_out"] is None
    verbose = invoke("--verbose", "broken").output
    assert "  LOAD ERROR:   PluginImportError: broken_mod:Broken" in verbose


def test_duplicated_name_says_which_wins_and_why(packages: Packages) -> None:
    source = "class P:\n    name = 'shared'\n"
    packages.install("zeta-plugins", {"shared": "zeta_mod:P"}, {"zeta_mod.py": source})
    packages.install("alpha-plugins", {"shared": "alpha_mod:P"}, {"alpha_mod.py": source})
    entries = [e for e in json.loads(invoke("--json").output) if e["name"] == "shared"]
    assert [(e["distribution"], e["duplicate_of"] is None) for e in entries] == [
        ("alpha-plugins", True),
        ("zeta-plugins", False),
    ]
    assert entries[1]["duplicate_of"].endswith(
        "using alpha-plugins: the first distribution in alphabetical order is used"
    )
    assert "NOT USED:" in invoke("--verbose", "shared").output


def test_a_builtin_name_cannot_be_taken(packages: Packages) -> None:
    source = "class P:\n    name = 'console_out'\n"
    packages.install("aaa-plugins", {"console_out": "aaa_mod:P"}, {"aaa_mod.py": source})
    entries = [e for e in json.loads(invoke("--json").output) if e["name"] == "console_out"]
    assert [e["distribution"] for e in entries] == ["bz-cli", "aaa-plugins"]
    assert "bz's own plugins take precedence" in entries[1]["duplicate_of"]


# -- config-schema --------------------------------------------------------------------------


def schema_errors(config: Any, schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(config)]


def shipped_configs() -> list[Path]:
    return [
        *sorted((REPO / "examples").glob("*/bzconfig.json")),
        REPO / "src" / "bz" / "commands" / "_project_template" / "bzconfig.json",
    ]


def test_config_schema_command_prints_a_valid_draft_2020_12_schema(timer: Packages) -> None:
    result = CliRunner().invoke(config_schema, [])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    timer_options = schema["$defs"]["plugin.timer"]
    assert timer_options["properties"]["every"] == {
        "type": "integer",
        "default": 2,
        "description": "Report every N epochs.",
    }
    assert "metric.top_k_accuracy" in schema["$defs"]


def test_config_schema_writes_a_file(tmp_path: Path) -> None:
    target = tmp_path / "bzconfig.schema.json"
    result = CliRunner().invoke(config_schema, ["--output", str(target)])
    assert result.exit_code == 0
    assert json.loads(target.read_text())["title"] == "bzconfig.json"


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_are_valid(path: Path, packages: Packages) -> None:
    packages.install_example()  # examples/custom-plugin's config names its plugins
    assert schema_errors(json.loads(path.read_text()), bzconfig_schema()) == []


def test_schema_follows_the_config_fields() -> None:
    import attrs

    from bz.config import RunConfig

    properties = bzconfig_schema()["properties"]
    assert list(properties) == [field.name for field in attrs.fields(RunConfig)]
    assert properties["epochs"]["minimum"] == 1


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"epoch": 3}, "$: Additional properties are not allowed ('epoch' was unexpected)"),
        ({"epochs": "3"}, "$.epochs: '3' is not of type 'integer'"),
        ({"epochs": 0}, "$.epochs: 0 is less than the minimum of 1"),
        ({"plugins": ["console_oot"]}, "$.plugins[0]"),
        ({"plugins": [{"timer": {"every": "2"}}]}, "$.plugins[0]"),
        ({"plugins": [{"timer": {"evry": 2}}]}, "$.plugins[0]"),
        ({"metrics": [{"top_k_accuracy": {"k": "5"}}]}, "$.metrics[0]"),
        ({"plugin_errors": "ignore"}, "$.plugin_errors: 'ignore' is not one of"),
    ],
)
def test_invalid_configs_are_rejected(config: Any, where: str, timer: Packages) -> None:
    errors = schema_errors(config, bzconfig_schema())
    assert errors, f"{config} was accepted"
    assert any(error.startswith(where) for error in errors), errors


def test_schema_accepts_what_bz_accepts(timer: Packages) -> None:
    config = {
        "epochs": 3,
        "seed": None,
        "plugins": ["console_out", {"timer": {"every": 3, "label": None}}, {"timer": None}],
        "metrics": ["accuracy", {"top_k_accuracy": {"k": 3}}],
    }
    assert schema_errors(config, bzconfig_schema()) == []


def test_ema_shows_its_options_with_their_bounds() -> None:
    result = invoke("--verbose", "ema")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "  stateful:     yes (saved in checkpoints)" in text
    for option in (
        "decay: number (default 0.999",
        "warmup: boolean (default true)",
        "every_n_steps: integer (default 1",
        "validate_with_ema: boolean (default false)",
        "apply_at_end: boolean (default false)",
    ):
        assert f"    {option}" in text, option
    assert "(1 + n) / (10 + n)" in text


def test_an_options_doc_of_several_lines_stays_under_its_option() -> None:
    # ema's docs run over two lines each: every line of a doc is indented as its first.
    result = invoke("--verbose", "ema")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = lines.index("  options:") + 1
    options = lines[start:]
    assert options
    for line in options:
        assert line.startswith("    "), f"{line!r} is not under an option"
    docs = [line for line in options if line.startswith("        ")]
    assert any(line.strip().startswith("memory early in training") for line in docs), (
        "the second line of warmup's doc"
    )
