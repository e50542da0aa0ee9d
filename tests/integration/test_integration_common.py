"""What every integration plugin shares: discovery, typed options, rank 0, the sandbox."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tests._integration_support import read_jsonl, run_config, tiny_setup, write_project

import bz
from bz.commands.catalog import describe_all
from bz.config import load_config
from bz.plugins import PluginContext
from bz.plugins._loader import load_plugins
from bz.plugins.csv_logger import CsvLogger, CsvLoggerConfig
from bz.plugins.mlflow_logger import Mlflow
from bz.plugins.optuna_search import OptunaSearch
from bz.plugins.profiler import Profiler, ProfilerConfig
from bz.plugins.run_log import RunLog, RunLogConfig
from bz.plugins.tensorboard import TensorBoard, TensorBoardConfig
from bz.plugins.wandb_logger import Wandb

INTEGRATIONS = ("tensorboard", "run_log", "wandb", "profiler", "optuna", "csv_logger", "mlflow")


def test_each_plugin_is_installed_with_documented_options() -> None:
    described = {d.name: d for d in describe_all(load=True)}
    for name in INTEGRATIONS:
        plugin = described[name]
        assert plugin.distribution == "bz-cli"
        assert plugin.error is None, plugin.error
        assert plugin.options, f"{name} has no typed options"
        undocumented = [field.name for field in plugin.options if not field.doc]
        assert not undocumented, f"{name}: options without a docstring: {undocumented}"


@pytest.mark.parametrize(
    "cls", [TensorBoard, RunLog, Wandb, Profiler, OptunaSearch, CsvLogger, Mlflow]
)
def test_each_plugin_declares_what_it_does_on_other_ranks(cls: type) -> None:
    assert "rank" in (cls.__doc__ or "")


def test_options_from_bzconfig_are_structured_and_checked(tmp_path: Path) -> None:
    config = write_project(
        tmp_path,
        {
            "plugins": [
                {"tensorboard": {"log_dir": "tb", "histogram_interval": 2}},
                {"run_log": {"step_interval": 10}},
                {"profiler": {"trace": False, "batch_size": 16}},
                {"wandb": {"mode": "disabled", "tags": ["a", "b"]}},
            ]
        },
    )
    run = load_config(config)
    plugins = load_plugins(run.plugins, run)
    # The loggers summarise the epoch: they run after the others (Order(last=True)).
    assert plugins.active_names == ["profiler", "tensorboard", "run_log", "wandb"]
    profiler, tensorboard, run_log, wandb = plugins.active
    assert isinstance(tensorboard, TensorBoard)
    assert tensorboard.config == TensorBoardConfig(log_dir="tb", histogram_interval=2)
    assert isinstance(profiler, Profiler)
    assert profiler.config.batch_size == 16
    assert getattr(wandb, "config").tags == ("a", "b")  # noqa: B009  # typed as NamedPlugin
    assert isinstance(run_log, RunLog)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"tensorboard": {"histogram_interval": 0}},
            "plugins[0].tensorboard.histogram_interval: must be >= 1, got 0",
        ),
        ({"run_log": {"step_intervall": 5}}, 'did you mean "step_interval"?'),
        (
            {"wandb": {"mode": "offlne"}},
            'plugins[0].wandb.mode: expected one of "online", "offline", "disabled"',
        ),
        ({"profiler": {"sort_by": "time"}}, "plugins[0].profiler.sort_by: expected one of"),
    ],
)
def test_bad_options_name_the_plugin_and_the_key(
    tmp_path: Path, entry: dict[str, object], expected: str
) -> None:
    config = write_project(tmp_path, {"plugins": [entry]})
    run = load_config(config)
    with pytest.raises(bz.ConfigError) as caught:
        load_plugins(run.plugins, run)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "plugin",
    [
        TensorBoard(),
        RunLog(),
        Profiler(ProfilerConfig(skip_steps=0, warmup_steps=0, active_steps=1)),
        CsvLogger(CsvLoggerConfig(step_interval=1)),
    ],
    ids=["tensorboard", "run_log", "profiler", "csv_logger"],
)
def test_other_ranks_write_nothing(
    plugin: bz.plugins.NamedPlugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    context = PluginContext(rank=1, world_size=2, epochs=1)
    for hook in ("start_training_session", "start_epoch", "end_training_batch", "end_epoch"):
        method = getattr(plugin, hook, None)
        if method is not None:
            method(context)
    getattr(plugin, "end_training_session")(context)  # noqa: B009  # every one has it
    assert not list(tmp_path.iterdir())


def test_a_failing_integration_cannot_change_training(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("", encoding="utf-8")
    broken: list[bz.plugins.NamedPlugin] = [
        TensorBoard(TensorBoardConfig(log_dir=str(blocker / "tb"))),
        RunLog(RunLogConfig(log_dir=str(blocker / "log"))),
    ]
    config = run_config(epochs=2)

    plain = tiny_setup()
    bz.Trainer().fit(plain, config)
    with_broken = tiny_setup()
    result = bz.Trainer().fit(with_broken, config, broken)

    assert {r.name for r in result.plugins if r.fault is not None} == {"tensorboard", "run_log"}
    for left, right in zip(
        plain.model.state_dict().values(), with_broken.model.state_dict().values(), strict=True
    ):
        assert torch.equal(left, right)


def test_a_whole_run_from_bzconfig_logs_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_project(
        tmp_path,
        {
            "hyperparameters": {"batch_size": 16},
            "plugins": ["run_log", "tensorboard", {"profiler": {"trace": False}}],
        },
    )
    bz.run(config)

    (run_dir,) = (tmp_path / "runs").iterdir()
    *_, epoch, end = read_jsonl(run_dir / "run_log.jsonl")
    # The profiler's numbers reach the run log through context.extra["scalars"].
    assert epoch["scalars"]["perf/samples_per_second"] > 0
    assert end["extra"]["profiler"]["batch_size"] == 16
    assert list(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_extra_is_reported_when_plugins_load(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # what "not installed" looks like
    config = write_project(tmp_path, {"plugins": ["run_log", name]})
    run = load_config(config)

    plugins = load_plugins(run.plugins, run)

    assert plugins.active_names == ["run_log"]
    (fault,) = plugins.faults
    assert fault.stage == "create"
    assert f"pip install 'bz-cli[{name}]'" in fault.error
