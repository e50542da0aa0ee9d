"""Embedding bz in a program (issue 15, points 1-5): logs follow the host, exceptions
keep their type, ``RunConfig`` takes what the JSON takes, every run has a start and an
end event, and ``bz train --log-format json`` reports every outcome as a JSON line.

The two host programs under ``examples/embedding_*`` run here as the user would run
them, in a fresh interpreter, and the test reads what reached the host's output.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import torch
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st
from tests._support import Events, tiny_setup

import bz
from bz.commands import cli
from bz.config import MetricSpec, PluginSpec, RunConfig, structure
from bz.plugins import Plugin, PluginContext

REPO = Path(__file__).resolve().parents[2]
ProjectFactory = Callable[..., Path]


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300, check=True
    )


# -- 1: logs follow the host -----------------------------------------------------------------


@pytest.mark.slow
def test_a_structlog_host_receives_every_event_through_its_own_processors() -> None:
    done = run_python("examples/embedding_structlog/host.py")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(line["app"] == "host" for line in lines)  # every line went through the host
    names = [line["event"] for line in lines]
    assert names == [
        "run_started",
        "epoch_note",
        "epoch_finished",
        "epoch_note",
        "epoch_finished",
        "plugin_summary",
        "run_finished",
        "host_trained",
        "run_started",
        "plugin_summary",
        "run_finished",
        "host_caught",
    ]
    assert lines[1]["plugin"] == "epoch_note"
    assert [line["outcome"] for line in lines if line["event"] == "run_finished"] == [
        "completed",
        "failed",
    ]
    caught = lines[-1]
    assert caught["error"] == "the host's loss refuses these labels"
    assert caught["notes"] == ["bz: training failed at epoch 1, step 0 (in the training loop)"]
    assert done.stderr == ""


StdlibHost = tuple[list[str], list[tuple[str, str, str, dict[str, Any]]]]


@pytest.fixture(scope="module")
def stdlib_host() -> StdlibHost:
    """The stdlib host example's output lines and bz's records among them: one run of
    the program, which the two tests below read for different things."""
    done = run_python("examples/embedding_stdlib/host.py")
    lines = done.stdout.splitlines()
    records = []
    for line in lines:
        if not line.startswith(("bz ", "bz.plugin.")):
            continue  # the host's own line, or (until the sandbox change) a stray one
        logger, level, event, fields = line.split(" ", 3)
        records.append((logger, level, event, json.loads(fields)))
    return lines, records


@pytest.mark.slow
def test_a_stdlib_host_receives_records_on_the_bz_hierarchy_with_their_fields(
    stdlib_host: StdlibHost,
) -> None:
    lines, records = stdlib_host
    received = [(logger, level, event) for logger, level, event, _ in records]
    assert ("bz", "INFO", "run_started") in received
    assert received.count(("bz", "INFO", "epoch_finished")) == 2
    assert received.count(("bz.plugin.loss_watch", "INFO", "loss_seen")) == 2
    assert ("bz", "INFO", "run_finished") in received
    finished = next(f for _, _, e, f in records if e == "run_finished")
    assert finished["outcome"] == "completed"
    assert finished["epochs_completed"] == 2
    epochs = [f["epoch"] for _, _, e, f in records if e == "epoch_finished"]
    assert epochs == [1, 2], "numbered from 1, as the console and checkpoint names do"
    # seed=None and fork_rng() leave the host's generators as they were.
    assert lines[-1] == "host: trained 2 epochs; generators unchanged: True"


@pytest.mark.slow
def test_a_stdlib_host_sees_nothing_but_its_own_lines(stdlib_host: StdlibHost) -> None:
    lines, _ = stdlib_host
    assert all(line.startswith(("bz ", "bz.plugin.", "host: ")) for line in lines), lines


UNCONFIGURED_HOST = textwrap.dedent(
    """
    import torch
    from torch import nn
    import bz

    inputs = torch.randn(32, 4)
    targets = (inputs.sum(dim=1) > 0).long()
    model = nn.Linear(4, 2)
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=[(inputs, targets)],
    )
    bz.Trainer().fit(setup, bz.RunConfig(epochs=2, device="cpu", plugins=[]))
    """
)


@pytest.mark.slow
def test_a_host_that_configured_nothing_sees_nothing_on_stdout() -> None:
    assert run_python("-c", UNCONFIGURED_HOST).stdout == ""


def test_without_structlog_configured_events_are_records_with_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    structlog.reset_defaults()  # what a host that never touched structlog has
    with caplog.at_level(logging.DEBUG, logger="bz"):
        bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, plugins=[]))
    started = next(r for r in caplog.records if getattr(r, "bz", {}).get("event") == "run_started")
    assert started.name == "bz"
    assert started.levelno == logging.INFO
    assert getattr(started, "epochs") == 1  # noqa: B009  # a field set through `extra`
    fields = dict(started.bz)  # type: ignore[attr-defined]  # set through `extra`
    assert fields.pop("model")["parameters"] == 58  # the model's summary
    assert fields == {
        "event": "run_started",
        "epochs": 1,
        "device": "auto",
        "seed": 0,
        "plugins": [],
        "metrics": [],
        "checkpoints": None,
    }


def test_without_any_configuration_only_warnings_reach_stderr() -> None:
    # A fresh interpreter: pytest's own logging handlers would hide the last resort.
    done = run_python(
        "-c",
        "from bz._logging import get_logger\n"
        "log = get_logger('bz')\n"
        "log.debug('quiet_debug')\n"
        "log.info('quiet_info', epoch=1)\n"
        "log.warning('loud_warning', epoch=2)\n",
    )
    assert done.stdout == ""
    assert done.stderr == "loud_warning epoch=2\n"  # Python's last-resort handler


# -- 2: exceptions keep their type ----------------------------------------------------------


def test_the_hosts_exception_is_caught_by_its_own_type() -> None:
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise KeyError("label 7")

    setup = attrs.evolve(tiny_setup(), loss_fn=loss)
    with pytest.raises(KeyError) as caught:
        bz.Trainer().fit(setup, RunConfig(epochs=1, plugins=[]))
    assert caught.value.__notes__ == [
        "bz: training failed at epoch 1, step 0 (in the training loop)"
    ]


def test_a_plugin_failure_under_raise_is_an_exported_bz_class() -> None:
    class Broken:
        name = "broken"

        def end_epoch(self, context: PluginContext) -> None:
            raise RuntimeError("plugin bug")

    config = RunConfig(epochs=1, plugins=[], plugin_errors="raise")
    with pytest.raises(bz.PluginFailure, match="plugin 'broken' failed in end_epoch") as caught:
        bz.Trainer().fit(tiny_setup(), config, [Broken()])
    assert isinstance(caught.value, bz.TrainingError)
    assert isinstance(caught.value.__cause__, RuntimeError)


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    subclasses: list[type] = cls.__subclasses__()
    for sub in subclasses:
        found += [sub, *_subclasses(sub)]
    return found


def test_every_bz_error_class_is_exported() -> None:
    import bz.plugins._loader  # import the modules that define error classes
    import bz.plugins._sandbox

    for cls in _subclasses(bz.BzError):
        assert getattr(bz, cls.__name__, None) is cls, cls
        assert cls.__name__ in bz.__all__


def test_bz_train_still_renders_the_users_exception_as_one_line(
    project: ProjectFactory,
) -> None:
    train_py = textwrap.dedent(
        """
        import torch
        from torch import nn
        import bz

        def broken_loss(outputs, targets):
            raise ValueError("bad labels")

        def setup(config):
            model = nn.Linear(4, 2)
            data = [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))]
            return bz.TrainingSetup(
                model=model, loss_fn=broken_loss, train_loader=data,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            )
        """
    )
    project(train_py=train_py)
    result = bz_cli("train")
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert "run_finished" not in result.stderr  # console mode renders the end itself
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("bz: error:")]
    assert line.startswith("bz: error: training failed at epoch 1, step 0: ")
    assert line.endswith("train.py:7: ValueError: bad labels")
    with_traceback = bz_cli("train", "--traceback")
    assert "Traceback" in with_traceback.stderr
    assert "bz: training failed at epoch 1, step 0" in with_traceback.stderr  # the note


# -- 3: FitResult fields and seeding in library mode -----------------------------------------


def test_seed_none_leaves_the_hosts_generators_unseeded() -> None:
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    with torch.random.fork_rng():
        bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, seed=None, plugins=[]))
    assert torch.equal(torch.rand(3), expected)
    # The default (seed 0) does reseed them, as documented.
    torch.manual_seed(99)
    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, plugins=[]))
    assert not torch.equal(torch.rand(3), expected)


def test_the_readme_passes_fit_a_training_setup_not_the_setup_function() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "result = bz.Trainer().fit(make_setup(config), config, plugins=[MyPlugin()])" in readme


# -- 4: RunConfig takes what the JSON takes --------------------------------------------------

_names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_options = st.dictionaries(
    _names, st.one_of(st.integers(), st.booleans(), st.text(max_size=5)), max_size=3
)
_entries = st.lists(
    st.one_of(_names, st.builds(lambda n, o: {n: o}, _names, _options)), max_size=5
)


@given(_entries, _entries)
def test_run_config_in_python_equals_the_same_json(metrics: list[Any], plugins: list[Any]) -> None:
    in_python = RunConfig(metrics=metrics, plugins=plugins)
    from_json = structure({"metrics": metrics, "plugins": plugins}, RunConfig)
    assert in_python == from_json
    assert [s.path for s in in_python.plugins] == [s.path for s in from_json.plugins]
    assert all(isinstance(spec, MetricSpec) for spec in in_python.metrics)
    assert all(isinstance(spec, PluginSpec) for spec in in_python.plugins)


@given(
    st.one_of(
        st.integers(),
        st.text(max_size=5),
        st.lists(st.one_of(st.integers(), st.floats(), st.none()), min_size=1, max_size=3),
        st.lists(st.dictionaries(_names, _options, min_size=2, max_size=3), min_size=1),
        st.lists(st.builds(lambda n, v: {n: v}, _names, st.integers()), min_size=1),
    )
)
def test_run_config_refuses_other_values_at_construction(value: Any) -> None:
    with pytest.raises(TypeError, match=r"RunConfig\(metrics=\.\.\.\)"):
        RunConfig(metrics=value)
    with pytest.raises(TypeError, match=r"RunConfig\(plugins=\.\.\.\)"):
        RunConfig(plugins=value)


def test_metric_names_train_in_library_mode() -> None:
    result = bz.Trainer().fit(
        tiny_setup(), RunConfig(epochs=1, plugins=[], metrics=["accuracy", {"f1_score": None}])
    )
    assert result.final is not None
    assert set(result.final.validation_metrics) == {"accuracy", "f1_score"}


# -- 5: start and end events; every CLI outcome is a JSON line -------------------------------


def test_library_mode_logs_run_started_and_run_finished(events: Events) -> None:
    class StopAtOnce(Plugin):
        name = "stop"

        def end_epoch(self, context: PluginContext) -> None:
            context.should_stop_training = True

    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=3, plugins=[]), [StopAtOnce()])
    started, finished = (e for e in events if e["event"] in ("run_started", "run_finished"))
    assert started["epochs"] == 3
    assert started["plugins"] == ["stop"]
    assert finished["outcome"] == "stopped_early"
    assert finished["epochs_completed"] == 1


def test_a_failed_run_ends_with_run_finished_failed(events: Events) -> None:
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        bz.Trainer().fit(attrs.evolve(tiny_setup(), loss_fn=loss), RunConfig(plugins=[]))
    (finished,) = [e for e in events if e["event"] == "run_finished"]
    assert finished["outcome"] == "failed"
    assert finished["error"] == "ValueError: nope"
    assert finished["log_level"] == "error"


def bz_cli(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def json_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize(
    ("config", "train_py", "code", "error"),
    [
        ({}, None, 0, None),
        ({"epochs": "5x"}, None, 2, 'bzconfig.json: epochs: expected int, got "5x"'),
        ({"plugins": [{"early_stopping": {"patince": 1}}]}, None, 2, "patince: unknown key"),
        ({}, "def setup(config):\n    return 3\n", 2, "setup returned int"),
        ({}, "def setup(config):\n    raise OSError('disk')\n", 1, "OSError: disk"),
    ],
    ids=["success", "config error", "plugin option", "bad train.py", "setup raises"],
)
def test_every_outcome_of_json_mode_is_a_json_line_with_the_exit_code(
    project: ProjectFactory,
    config: dict[str, Any],
    train_py: str | None,
    code: int,
    error: str | None,
) -> None:
    if train_py is None:
        project(config)
    else:
        project(config, train_py=train_py)
    result = bz_cli("train", "--log-format", "json")
    assert result.exit_code == code
    lines = json_lines(result)  # every stdout line is JSON
    last = lines[-1]
    assert last["event"] == "exit"
    assert last["exit_code"] == code
    if error is None:
        assert "error" not in last
        assert [e["event"] for e in lines].count("run_finished") == 1
    else:
        assert error in last["error"]
        assert last["level"] == "error"
        # The one-line message on stderr stays.
        assert error in result.stderr


def test_json_mode_reports_a_bad_set_as_a_json_line(project: ProjectFactory) -> None:
    project()
    result = bz_cli("train", "--log-format", "json", "--set", "novalue")
    assert result.exit_code == 2
    (last,) = json_lines(result)
    assert last["event"] == "exit"
    assert last["exit_code"] == 2
    assert "expected KEY=VALUE" in last["error"]
