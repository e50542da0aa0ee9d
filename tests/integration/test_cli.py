"""The command line, end to end through click's CliRunner."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from bz.commands import cli

ProjectFactory = Callable[..., Path]


def bz(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("bz: error:")]


# -- train -----------------------------------------------------------------------------


def test_train_runs_a_project(project: ProjectFactory) -> None:
    project({"plugins": ["console_out"], "metrics": ["accuracy"]})
    result = bz("train")
    assert result.exit_code == 0, result.stderr
    assert "epoch 2/2" in result.stderr
    assert "val_accuracy" in result.stderr
    assert "trained 2 epoch(s)" in result.stderr


def test_options_override_the_config(project: ProjectFactory) -> None:
    project({"plugins": ["console_out"]})
    result = bz("train", "--epochs", "3", "--set", "hyperparameters.lr=0.5")
    assert result.exit_code == 0, result.stderr
    assert "epoch 3/3" in result.stderr


def test_json_logs_are_one_object_per_line_on_stdout(project: ProjectFactory) -> None:
    project({"plugins": ["console_out"]})
    result = bz("train", "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    names = [event["event"] for event in events]
    assert "training_started" in names
    assert "plugin_summary" in names
    assert all("timestamp" in event and "level" in event for event in events)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"epochs": "5x"}, 'bzconfig.json: epochs: expected int, got "5x"'),
        ({"plugins": ["consol_out"]}, "plugins[0]: unknown plugin 'consol_out' (did you mean"),
        (
            {"plugins": [{"early_stopping": {"patince": 3}}]},
            'plugins[0].early_stopping.patince: unknown key (did you mean "patience"?)',
        ),
        (
            {"plugins": [{"early_stopping": {"patience": "3"}}]},
            "plugins[0].early_stopping.patience: expected int",
        ),
        ({"metrics": ["acuracy"]}, "metrics[0]"),
    ],
)
def test_config_errors_are_one_line_and_exit_2(
    project: ProjectFactory, config: dict[str, object], expected: str
) -> None:
    project(config)
    result = bz("train")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    (line,) = error_lines(result)
    assert expected in line


def test_command_line_overrides_are_validated(project: ProjectFactory) -> None:
    project()
    result = bz("train", "--set", "epochs=[1]")
    assert result.exit_code == 2
    assert error_lines(result) == ["bz: error: command line: epochs: expected int, got [1]"]


def test_config_option_wins_over_the_environment(project: ProjectFactory) -> None:
    folder = project({"epochs": 1, "plugins": ["console_out"]})
    (folder / "other.json").write_text(
        json.dumps({"epochs": 3, "device": "cpu", "seed": 7, "plugins": ["console_out"]}),
        encoding="utf-8",
    )
    (folder / "broken.json").write_text("{", encoding="utf-8")
    from_env = bz("train", env={"BZ_CONFIG": str(folder / "other.json")})
    assert "epoch 3/3" in from_env.stderr
    cli_wins = bz(
        "train", "--config", str(folder / "bzconfig.json"), env={"BZ_CONFIG": "broken.json"}
    )
    assert cli_wins.exit_code == 0, cli_wins.stderr
    assert "epoch 1/1" in cli_wins.stderr


@pytest.mark.parametrize(
    ("train_py", "code", "expected"),
    [
        ("def setup(config:\n", 2, "train.py:1: syntax error"),
        ("x = 1\n", 2, "train.py: no setup function"),
        ("def setup(config):\n    return 42\n", 2, "setup returned int"),
        (
            "def setup(config):\n    raise RuntimeError('no data here')\n",
            1,
            "train.py:2: RuntimeError: no data here",
        ),
        ("import not_a_module_anywhere\n", 1, "ModuleNotFoundError"),
    ],
)
def test_train_py_problems(
    project: ProjectFactory, train_py: str, code: int, expected: str
) -> None:
    project(train_py=train_py)
    result = bz("train")
    assert result.exit_code == code
    (line,) = error_lines(result)
    assert expected in line
    assert "Traceback" not in result.output


def test_missing_train_py_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = bz("train")
    assert result.exit_code == 2
    assert "bz init" in error_lines(result)[0]


def test_traceback_flag_shows_the_cause(project: ProjectFactory) -> None:
    project(train_py="def setup(config):\n    raise RuntimeError('deep problem')\n")
    result = bz("train", "--traceback")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr


# -- check-config ----------------------------------------------------------------------


def test_check_config_accepts_a_good_file(project: ProjectFactory) -> None:
    project({"plugins": ["console_out", {"early_stopping": {"patience": 2}}]})
    result = bz("check-config")
    assert result.exit_code == 0
    assert "OK (2 plugin(s), 0 metric(s))" in result.stdout


def test_check_config_reports_plugin_options(project: ProjectFactory) -> None:
    project({"plugins": [{"console_out": {"update_interval": -1}}]})
    result = bz("check-config")
    assert result.exit_code == 2
    assert "plugins[0].console_out.update_interval" in error_lines(result)[0]


# -- init ------------------------------------------------------------------------------


def test_init_writes_a_project_that_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BZ_CONFIG", raising=False)
    created = bz("init", "demo")
    assert created.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["bzconfig.json", "train.py"]
    monkeypatch.chdir(tmp_path / "demo")
    trained = bz("train", "--epochs", "2")
    assert trained.exit_code == 0, trained.stderr
    assert "val_accuracy" in trained.stderr


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("# mine\n", encoding="utf-8")
    result = bz("init", str(tmp_path))
    assert result.exit_code == 2
    assert "--force" in error_lines(result)[0]
    assert (tmp_path / "train.py").read_text(encoding="utf-8") == "# mine\n"


def test_init_where_nothing_can_be_written_is_one_line(tmp_path: Path) -> None:
    # Under a file: the folder cannot be made (it was a traceback).
    (tmp_path / "a_file").write_text("", encoding="utf-8")
    result = bz("init", str(tmp_path / "a_file" / "project"))
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"bz: error: {tmp_path / 'a_file' / 'project'}: cannot write the project: Not a directory"
    ]
    assert "Traceback" not in result.output


# -- list-plugins, health --------------------------------------------------------------


def test_list_plugins_shows_the_built_ins() -> None:
    result = bz("list-plugins")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"console_out", "early_stopping"} <= set(names)


def test_list_plugins_json_describes_options() -> None:
    result = bz("list-plugins", "--json")
    described = {entry["name"]: entry for entry in json.loads(result.stdout)}
    early = described["early_stopping"]
    assert early["distribution"] == "bz-cli"
    assert "end_epoch" in early["hooks"]
    assert early["stateful"] is True
    patience = next(o for o in early["options"] if o["name"] == "patience")
    assert (patience["type"], patience["default"]) == ("integer", 10)


def test_list_plugins_unknown_name_suggests() -> None:
    result = bz("list-plugins", "early_stoping")
    assert result.exit_code == 2
    assert 'did you mean "early_stopping"?' in error_lines(result)[0]


def test_list_metrics_shows_options() -> None:
    plain = bz("list-metrics")
    assert plain.exit_code == 0
    names = [line.split()[0] for line in plain.stdout.splitlines()]
    assert {"accuracy", "f1_score", "top_k_accuracy", "mean_squared_error"} <= set(names)
    verbose = bz("list-metrics", "--verbose")
    assert 'average: "macro" | "micro" | "weighted" (default "macro")' in verbose.stdout
    listed = {m["name"]: m for m in json.loads(bz("list-metrics", "--json").stdout)}
    assert [o["name"] for o in listed["top_k_accuracy"]["options"]] == ["k"]


def test_health_reports_torch_and_devices() -> None:
    result = bz("health", "--json")
    report = json.loads(result.stdout)
    assert report["auto_device"] in {"cpu", "cuda", "mps"}
    assert report["torch"]


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["trian"])
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--log-format", "xml"], "bz train: Invalid value for '--log-format'"),
        (["train", "--set", "epochs"], "bz train: Invalid value for --set: expected KEY=VALUE"),
        (["train", "--bogus"], "bz train: No such option '--bogus'"),
        (["train", "--epochs", "x"], "bz train: Invalid value for '--epochs'"),
        (["nosuch"], "bz: No such command 'nosuch'"),
    ],
)
def test_usage_errors_from_the_command_line_are_one_line_and_exit_2(
    args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli, args, prog_name="bz")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("bz: error: " + message)
    assert lines[0].endswith("--help')")
