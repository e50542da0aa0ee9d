"""``bz tune`` and the optuna plugin, with real Optuna studies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import structlog
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples
from tests._integration_support import read_jsonl, run_config, tiny_setup, write_project

import bz
from bz._tune import tune
from bz.commands.tune import tune_command
from bz.config import load_config
from bz.plugins._loader import load_plugins
from bz.plugins.optuna_search import (
    OptunaSearch,
    SearchDimension,
    TrialLink,
    current_trial,
    parse_space,
)

SPACE = {
    "lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
    "hidden": {"type": "int", "low": 4, "high": 16, "step": 4},
}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The command configures structlog for the console, as bz train does.
    yield
    structlog.reset_defaults()


def _project(tmp_path: Path, **optuna_options: Any) -> Path:
    options: dict[str, Any] = {"hyperparameters": SPACE, "sampler": "random", "seed": 3}
    options.update(optuna_options)
    return write_project(
        tmp_path,
        {"epochs": 2, "plugins": ["run_log", {"optuna": options}]},
    )


@pytest.mark.slow
def test_tune_runs_the_trials_prints_the_table_and_writes_the_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    config = _project(tmp_path, storage=storage, save_study="study.json")

    outcome = CliRunner().invoke(tune_command, ["--config", str(config), "--trials", "3"])

    assert outcome.exit_code == 0, outcome.output
    study = optuna.load_study(study_name="bz", storage=storage)
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    lines = outcome.stdout.splitlines()  # the table; events went to stderr
    header = ["trial", "state", "validation_loss", "epochs", "seconds", "hidden", "lr"]
    assert lines[0].split() == header
    best = study.best_trial
    assert f"*{best.number}" in outcome.stdout
    assert f"best: trial {best.number}, validation_loss" in outcome.stdout

    written = json.loads((tmp_path / "best_params.json").read_text(encoding="utf-8"))
    assert written["params"] == best.params
    assert written["value"] == best.value
    assert written["hyperparameters"] == best.params
    best_config = load_config(tmp_path / "bzconfig.best.json")
    assert best_config.hyperparameters == best.params
    assert best_config.epochs == 2
    trials = json.loads((tmp_path / "study.json").read_text(encoding="utf-8"))["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert all(len(t["intermediate_values"]) == 2 for t in trials)  # one report per epoch

    # Each trial is a full run with its own plugins, logging into its own folder, with
    # the sampled values in its hyperparameters.
    for trial in study.trials:
        log = tmp_path / "runs" / "bz" / f"trial-{trial.number}" / "run_log.jsonl"
        start, *epochs, _ = read_jsonl(log)
        assert start["hyperparameters"] == trial.params
        losses = [e["validation_loss"] for e in epochs]
        assert trial.value == min(losses)
        assert list(trial.intermediate_values.values()) == losses

    # The study is resumable: asking for 4 trials runs one more.
    outcome = CliRunner().invoke(tune_command, ["--config", str(config), "--trials", "4"])
    assert outcome.exit_code == 0, outcome.output
    resumed = optuna.load_study(study_name="bz", storage=storage).trials
    assert len(resumed) == 4
    assert resumed[3].params not in [t.params for t in resumed[:3]]  # no replayed seed
    assert resumed[3].state == optuna.trial.TrialState.COMPLETE


def test_pruned_trial_stops_training_through_the_stop_signal() -> None:
    # ThresholdPruner(upper=0) prunes every reported (positive) loss at once.
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    trial = study.ask()
    link = TrialLink(trial)
    token = current_trial.set(link)
    try:
        result = bz.Trainer().fit(tiny_setup(), run_config(epochs=5), [OptunaSearch()])
    finally:
        current_trial.reset(token)

    assert result.epochs_completed == 1
    assert result.stopped_early
    assert link.pruned_epoch == 0
    assert study.trials[0].intermediate_values == {0: result.history[0].validation_loss}


def test_the_plugin_is_idle_under_bz_train() -> None:
    result = bz.Trainer().fit(tiny_setup(), run_config(epochs=2), [OptunaSearch()])
    assert result.epochs_completed == 2


def test_monitor_a_metric_and_maximize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = _project(
        tmp_path,
        monitor="accuracy",
        direction="maximize",
        objective="last",
        save_best_config=None,
        hyperparameters={"lr": [0.05, 0.2]},
    )
    data = json.loads(config.read_text(encoding="utf-8"))
    data["metrics"] = ["accuracy"]
    config.write_text(json.dumps(data), encoding="utf-8")

    result = tune(config, n_trials=2)

    assert result.best is not None
    assert result.best.value == max(t.value for t in result.trials if t.value is not None)
    assert result.best.params["lr"] in (0.05, 0.2)
    assert [p.name for p in result.written] == ["best_params.json"]


def test_without_an_optuna_entry_tune_is_a_usage_error(tmp_path: Path) -> None:
    config = write_project(tmp_path, {"plugins": ["console_out"]})
    outcome = CliRunner().invoke(tune_command, ["--config", str(config)])
    assert isinstance(outcome.exception, bz.UsageError)
    assert outcome.exception.exit_code == 2
    assert "bz tune needs an optuna entry" in str(outcome.exception)


def test_an_empty_search_space_is_a_usage_error(tmp_path: Path) -> None:
    config = _project(tmp_path, hyperparameters={})
    with pytest.raises(bz.UsageError, match=r"plugins\[1\]\.optuna\.hyperparameters: the search"):
        tune(config)


def test_a_monitor_the_run_never_produces_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _project(tmp_path, monitor="f1")
    with pytest.raises(bz.ConfigError) as raised:
        tune(config, n_trials=1)
    # Refused before the first trial trains, named as early_stopping's monitor is.
    ((path, message),) = raised.value.problems
    assert raised.value.source == str(config)
    assert path == "plugins[1].optuna.monitor"
    assert message.startswith("'f1' is no value this run produces")
    assert not (tmp_path / "runs").exists()


def test_the_consoles_val_loss_is_a_monitor_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for early_stopping and keep_best; it used to fail after the first trial trained.
    monkeypatch.chdir(tmp_path)
    config = _project(tmp_path, monitor="val_loss")
    result = tune(config, n_trials=1)
    assert result.best is not None
    (trial,) = result.trials
    assert sorted(trial.intermediate_values) == [0, 1]


def test_all_trials_failing_is_a_training_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _project(tmp_path)
    train_py = tmp_path / "train.py"
    train_py.write_text(
        train_py.read_text(encoding="utf-8").replace(
            "hp = config.hyperparameters", "raise RuntimeError('no data today')"
        ),
        encoding="utf-8",
    )
    with pytest.raises(bz.TrainingError, match=r"all trials failed.*no data today") as caught:
        tune(config, n_trials=2)
    assert caught.value.exit_code == 1


def test_bad_search_space_names_the_json_path(tmp_path: Path) -> None:
    space = {"lr": {"type": "float", "low": 0, "high": 1, "log": True}, "act": {"typ": "x"}}
    config = _project(tmp_path, hyperparameters=space)
    with pytest.raises(bz.ConfigError) as caught:
        load_plugins(load_config(config).plugins, load_config(config))
    message = str(caught.value)
    assert "plugins[1].optuna.hyperparameters.lr.low: must be > 0 with log: true" in message
    assert (
        'plugins[1].optuna.hyperparameters.act.typ: unknown key (did you mean "type"?)' in message
    )


def test_a_dotted_name_needs_its_table(tmp_path: Path) -> None:
    config = _project(tmp_path, hyperparameters={"optim.lr": [0.1, 0.2]})
    with pytest.raises(bz.ConfigError, match=r"hyperparameters\.optim is not a table"):
        tune(config)


# -- the search space, as a contract ------------------------------------------------------

bounds = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@pytest.mark.filterwarnings("ignore:The distribution is specified by:UserWarning")
@settings(max_examples=examples(60), deadline=None)
@given(
    kind=st.sampled_from(["float", "int"]),
    low=bounds,
    high=bounds,
    log=st.booleans(),
    step=st.none() | st.floats(min_value=-2, max_value=10, allow_nan=False),
)
def test_every_accepted_range_yields_values_inside_it(
    kind: str, low: float, high: float, log: bool, step: float | None
) -> None:
    spec: dict[str, Any] = {"type": kind, "low": low, "high": high, "log": log}
    if step is not None:
        spec["step"] = step
    try:
        dimension = parse_space({"x": spec})["x"]
    except bz.ConfigError as error:
        rejected: bz.ConfigError | None = error
    else:
        rejected = None
    if rejected is not None:
        # Rejected: one line per problem, each naming the key that is wrong.
        assert all(path.startswith("x.") for path, _ in rejected.problems)
        return
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        value = dimension.suggest(study.ask(), "x")
        assert isinstance(value, (int, float))
        assert low - 1e-9 * abs(low) <= value <= high + 1e-9 * abs(high)
        if kind == "int":
            assert isinstance(value, int)
        if log:
            assert value > 0


@settings(max_examples=examples(30), deadline=None)
@given(choices=st.lists(st.none() | st.booleans() | st.integers() | st.text(max_size=5)))
def test_a_list_is_a_categorical_choice(choices: list[Any]) -> None:
    if not choices:
        with pytest.raises(bz.ConfigError, match="non-empty"):
            parse_space({"x": choices})
        return
    dimension = parse_space({"x": choices})["x"]
    assert dimension == SearchDimension(type="categorical", choices=tuple(choices))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert dimension.suggest(study.ask(), "x") in choices


@pytest.mark.slow
def test_tune_searches_the_digits_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped example, unchanged, searched over its learning rate and width.
    example = Path(__file__).resolve().parents[2] / "examples" / "digits"
    shipped = json.loads((example / "bzconfig.json").read_text(encoding="utf-8"))
    search = {
        "n_trials": 3,
        "sampler": "random",
        "seed": 0,
        "monitor": "accuracy",
        "direction": "maximize",
        "hyperparameters": {
            "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "hidden": [32, 128],
        },
    }
    config = {
        **shipped,
        "epochs": 3,
        "train_script": str(example / "train.py"),
        "plugins": ["console_out", {"optuna": search}],
    }
    path = tmp_path / "bzconfig.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    outcome = CliRunner().invoke(tune_command, ["--config", str(path)])

    assert outcome.exit_code == 0, outcome.output
    best = json.loads((tmp_path / "best_params.json").read_text(encoding="utf-8"))
    assert set(best["params"]) == {"lr", "hidden"}
    assert 0.8 < best["value"] <= 1.0, "three epochs on digits reach over 80% accuracy"
    assert load_config(tmp_path / "bzconfig.best.json").hyperparameters["hidden"] in (32, 128)
