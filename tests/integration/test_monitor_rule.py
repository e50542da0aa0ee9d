"""One rule for every watched name: ``early_stopping``'s ``monitor`` and ``keep_best``.

Both accept the same names (the console's ``val_loss`` too), both refuse a validation
name in a run without a ``val_loader`` before training (one line, exit 2, naming the
config file), and ``bz check-config`` reports both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st
from tests._support import TINY_TRAIN_PY, tiny_setup

import bz
from bz.commands import cli
from bz.config import ConfigError, KeepBest, RunConfig
from bz.plugins._names import run_value_names
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig
from bz.training.checkpoint.best import check_monitor

ProjectFactory = Callable[..., Path]

NO_VALIDATION_TRAIN_PY = TINY_TRAIN_PY.replace("val_loader=DataLoader(data, batch_size=32),", "")
assert NO_VALIDATION_TRAIN_PY != TINY_TRAIN_PY

_metric = st.sampled_from(["accuracy", "f1", "mae", "precision"])
_name = st.one_of(
    st.text(max_size=16),
    st.builds(
        "{}{}".format,
        st.sampled_from(["", "val_", "validation_", "training_", "train_"]),
        st.sampled_from(["loss", "accuracy", "f1", "mae", "los", "acc"]),
    ),
)


def _early_stopping_accepts(monitor: str, metrics: list[str], validates: bool) -> bool:
    names = run_value_names(metrics, validates=validates)
    return EarlyStoppingConfig(monitor=monitor).monitor_problem(names) is None


def _keep_best_accepts(monitor: str, metrics: list[str], validates: bool) -> bool:
    try:
        check_monitor(KeepBest(monitor=monitor), metrics, validates=validates)
    except ConfigError as exc:
        (problem,) = exc.problems
        assert problem[0] == "keep_best.monitor"
        assert "\n" not in problem[1]
        return False
    return True


@given(_name, st.lists(_metric, unique=True, max_size=3), st.booleans())
def test_keep_best_and_early_stopping_accept_the_same_names(
    monitor: str, metrics: list[str], validates: bool
) -> None:
    accepted = _keep_best_accepts(monitor, metrics, validates)
    assert accepted == _early_stopping_accepts(monitor, metrics, validates)
    if monitor in ("val_loss", "validation_loss", "training_loss", "loss"):
        assert accepted == (validates or monitor in ("training_loss", "loss"))
    if monitor.startswith(("val_", "validation_")) and not validates:
        assert not accepted  # no validation data, no validation value


@pytest.mark.parametrize("monitor", ["val_loss", "validation_loss", "val_accuracy"])
def test_early_stopping_on_a_validation_value_without_val_loader_is_refused(
    monitor: str,
) -> None:
    config = RunConfig(device="cpu", plugins=(), metrics=("accuracy",))
    setup = tiny_setup(validation=False)
    before = {key: value.clone() for key, value in setup.model.state_dict().items()}
    plugin = EarlyStopping(EarlyStoppingConfig(monitor=monitor))
    with pytest.raises(ConfigError) as raised:
        bz.Trainer().fit(setup, config, [plugin])
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"plugins.early_stopping.monitor: {monitor!r} is a validation value")
    assert "no val_loader" in message
    assert "validation_loss" not in message.split("one of:")[1]  # not offered as a choice
    after = setup.model.state_dict()
    assert all(value.equal(after[key]) for key, value in before.items())  # nothing trained


def _train(*args: str) -> Result:
    return CliRunner().invoke(cli, ["train", *args])


def _error_line(result: Result) -> str:
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("bz: error:")]
    return line


def test_train_refuses_early_stopping_on_val_loss_without_val_loader(
    project: ProjectFactory,
) -> None:
    project({"plugins": [{"early_stopping": {"monitor": "val_loss"}}]}, NO_VALIDATION_TRAIN_PY)
    result = _train()
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert line.startswith(
        "bz: error: bzconfig.json: plugins[0].early_stopping.monitor: 'val_loss'"
    )
    assert "no val_loader" in line
    assert not list(Path().rglob("*.pt"))  # nothing trained


def test_train_refuses_keep_best_on_a_name_nothing_produces_naming_the_file(
    project: ProjectFactory,
) -> None:
    project({"keep_best": {"monitor": "val_los"}})
    result = _train()
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert line.startswith("bz: error: bzconfig.json: keep_best.monitor: 'val_los'")
    assert 'did you mean "val_loss"?' in line


def test_keep_best_accepts_the_consoles_val_loss(project: ProjectFactory) -> None:
    folder = project({"epochs": 2, "keep_best": {"monitor": "val_loss", "count": 1}})
    result = _train()
    assert result.exit_code == 0, result.output
    (run,) = (folder / ".bz" / "checkpoints").iterdir()
    sidecar = (run / "epoch-0002.pt.json").read_text()
    assert '"monitor": "val_loss"' in sidecar
    assert '"value": null' not in sidecar  # the validation loss was found and recorded


def test_check_config_reports_keep_best_monitor_like_train(project: ProjectFactory) -> None:
    project({"keep_best": {"monitor": "accuracy"}})
    result = CliRunner().invoke(cli, ["check-config"])
    assert result.exit_code == 0, result.output
    assert (
        "bzconfig.json: keep_best.monitor: 'accuracy' is no value this run produces"
        in result.stderr
    )
    assert "(unless train.py's setup adds it)" in result.stderr
    trained = _train()
    assert trained.exit_code == 2
    assert "keep_best.monitor: 'accuracy' is no value" in _error_line(trained)


def test_check_config_is_quiet_about_a_keep_best_monitor_that_exists(
    project: ProjectFactory,
) -> None:
    project({"metrics": ["accuracy"], "keep_best": {"monitor": "val_accuracy"}})
    result = CliRunner().invoke(cli, ["check-config"])
    assert result.exit_code == 0, result.output
    assert "keep_best" not in result.stderr


_tables = st.dictionaries(_metric, st.floats(-1, 1, allow_nan=False), max_size=3)


@given(_name, _tables, _tables, st.booleans())
def test_optuna_reads_a_watched_name_as_early_stopping_does(
    monitor: str,
    training: dict[str, float],
    validation: dict[str, float],
    validates: bool,
) -> None:
    from bz.plugins import PluginContext
    from bz.plugins._names import find_value
    from bz.plugins.optuna_search import OptunaConfig, monitored

    context = PluginContext()
    context.training_batch_count = 1
    context.validation_batch_count = 1 if validates else 0
    context.training_metrics.update(training)
    context.validation_metrics.update(validation if validates else {})
    read = monitored(
        monitor,
        training_loss=context.training_loss,
        validation_loss=context.validation_loss if validates else None,
        training_metrics=training,
        validation_metrics=validation if validates else {},
    )
    expected = find_value(monitor, context)
    both_nan = (
        read is not None and expected is not None and math.isnan(read) and math.isnan(expected)
    )
    assert read == expected or both_nan  # no loss counted yet reads NaN in both
    names = run_value_names([*training, *validation], validates=validates)
    refused = OptunaConfig(monitor=monitor).monitor_problem(names)
    assert (refused is None) == _early_stopping_accepts(
        monitor, [*training, *validation], validates
    )
