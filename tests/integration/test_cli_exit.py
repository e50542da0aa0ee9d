"""How ``bz train`` ends when it cannot train: the exit code, the one error line, and
(with ``--log-format json``) the closing ``exit`` event, wherever the stop comes from."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tests._support import TINY_TRAIN_PY, bz_env, json_events, run_bz

from bz.commands import cli

ProjectFactory = Callable[..., Path]


def bz(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# -- SIGTERM while train.py's setup() runs ------------------------------------------------

SLOW_SETUP = TINY_TRAIN_PY.replace(
    "def setup(",
    "import pathlib, time\n\n\n"
    "def setup(config):\n"
    "    pathlib.Path('in_setup').touch()\n"
    "    time.sleep(600)\n\n\n"
    "def _unused(",
    1,
)


@pytest.mark.slow
def test_sigterm_during_setup_exits_143_with_the_exit_event(project: ProjectFactory) -> None:
    folder = project(train_py=SLOW_SETUP)
    env = bz_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "bz", "train", "--log-format", "json"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (folder / "in_setup").exists():  # setup() has started
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM.value, stderr
    assert "bz: interrupted" in stderr
    assert "Traceback" not in stderr
    last = json_events(stdout)[-1]
    assert (last["event"], last["exit_code"]) == ("exit", 143)


# A signal that lands deep in the stack (a library's nested imports, a recursive model
# builder): its Python handler has no room to run and fails with RecursionError.
DEEP_SETUP = TINY_TRAIN_PY.replace(
    "def setup(",
    "import os, signal, sys\n\n\n"
    "def _depth() -> int:\n"
    "    frame, n = sys._getframe(), 0\n"
    "    while frame is not None:\n"
    "        frame, n = frame.f_back, n + 1\n"
    "    return n\n\n\n"
    "def _deep(n: int, number: int) -> None:\n"
    "    if n <= 4:\n"
    "        os.kill(os.getpid(), number)\n"
    "        return\n"
    "    _deep(n - 1, number)\n\n\n"
    "def setup(config):\n"
    "    _deep(sys.getrecursionlimit() - _depth(), int(os.environ['BZ_TEST_SIGNAL']))\n\n\n"
    "def _unused(",
    1,
)


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_whose_handler_cannot_run_still_stops_setup_with_its_exit_code(
    project: ProjectFactory, number: signal.Signals
) -> None:
    folder = project(train_py=DEEP_SETUP)
    env = {**bz_env(), "BZ_TEST_SIGNAL": str(number.value)}
    result = run_bz(folder, "train", "--log-format", "json", env=env)
    assert result.returncode == 128 + number.value, result.stderr
    assert result.stderr.strip().splitlines() == ["bz: interrupted"]
    last = json_events(result.stdout)[-1]
    assert (last["event"], last["exit_code"]) == ("exit", 128 + number.value)


# -- click's usage errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--bogus", "--log-format", "json"], "No such option '--bogus'"),
        (["--log-format=json", "--epochs", "x"], "'x' is not a valid integer"),
        (["--log-format", "console", "--log-format", "json", "--set"], "'--set' requires"),
        # Found by train itself, which writes the event: still exactly one.
        (["--log-format", "json", "--set", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_a_usage_error_with_json_logs_ends_with_the_exit_event(
    args: list[str], problem: str
) -> None:
    result = bz("train", *args)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert problem in line
    (event,) = json_events(result.stdout)
    assert event["event"] == "exit"
    assert event["exit_code"] == 2
    assert f"bz: error: {event['error']}" == line


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--bogus", "--log-format", "console"],
        ["--log-format", "json", "--log-format", "console", "--bogus"],
        ["--log-format", "xml"],  # the format itself is the error: unknown
        ["--set", "--log-format", "--log-format", "console", "--bogus"],
    ],
)
def test_a_usage_error_without_json_logs_prints_only_the_error_line(args: list[str]) -> None:
    result = bz("train", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1


# -- where a bad plugins / metrics list came from -----------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "problem"),
    [
        ('plugins=["consol_out"]', "plugins[0]: unknown plugin 'consol_out'"),
        ('plugins=[{"early_stopping": {"patience": "x"}}]', "plugins[0].early_stopping.patience"),
        ('metrics=["acuracy"]', 'metrics[0]: unknown metric "acuracy"'),
        ('metrics=[{"f1_score": {"averag": "macro"}}]', "metrics[0].f1_score.averag"),
    ],
)
@pytest.mark.parametrize("processes", [[], ["--nproc-per-node", "2"]])
def test_a_bad_list_given_with_set_is_blamed_on_set(
    project: ProjectFactory, assignment: str, problem: str, processes: list[str]
) -> None:
    project({"plugins": ["console_out"], "metrics": ["accuracy"]})
    result = bz("train", "--smoke", *processes, "--set", assignment)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"bz: error: --set: {problem}"), line


@pytest.mark.parametrize("processes", [[], ["--nproc-per-node", "2"]])
def test_a_bad_list_in_the_file_is_blamed_on_the_file(
    project: ProjectFactory, processes: list[str]
) -> None:
    project({"plugins": ["consol_out"]})
    result = bz("train", *processes, "--set", "metrics=[]")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("bz: error: bzconfig.json: plugins[0]: unknown plugin"), line


# -- several processes: one error line ----------------------------------------------------------


def test_train_py_problems_are_found_before_the_processes_start(project: ProjectFactory) -> None:
    folder = project()
    (folder / "train.py").unlink()
    result = bz("train", "--nproc-per-node", "2")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "train.py: file not found (bz looks for train.py next to bzconfig.json" in line


def test_a_missing_train_script_the_config_names_is_blamed_on_that_setting(
    project: ProjectFactory,
) -> None:
    folder = project({"train_script": "scripts/fit.py"})
    result = bz("train")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line == (
        f"bz: error: {folder / 'scripts' / 'fit.py'}: file not found (bzconfig.json's "
        "train_script names it ('scripts/fit.py'): fix the path)"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup_body", "code", "lines"),
    [
        # Found only by running setup(), in every process: exit 2, its line once.
        ("return None", 2, ["setup returned NoneType; it must return bz.TrainingSetup"]),
        # A failure (exit 1): the process's reason once, then which process it was.
        (
            "raise RuntimeError('no data')",
            1,
            ["train.py:2: RuntimeError: no data", "process rank"],
        ),
    ],
)
def test_an_error_in_every_process_is_printed_once(
    project: ProjectFactory, setup_body: str, code: int, lines: list[str]
) -> None:
    folder = project(train_py=f"def setup(config):\n    {setup_body}\n")
    done = run_bz(folder, "train", "--nproc-per-node", "2")
    assert done.returncode == code, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("bz: error:")]
    assert len(errors) == len(lines), done.stderr
    for error, expected in zip(errors, lines, strict=True):
        assert expected in error
    assert "bz: interrupted" not in done.stderr


def test_bad_input_found_before_launching_ends_with_one_exit_event(
    project: ProjectFactory,
) -> None:
    project()
    result = bz(
        "train", "--nproc-per-node", "2", "--log-format", "json", "--set", 'plugins=["nope"]'
    )
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    (event,) = [e for e in json_events(result.stdout) if e["event"] == "exit"]
    assert event["exit_code"] == 2
    assert f"bz: error: {event['error']}" == line


@pytest.mark.slow
def test_several_processes_end_their_json_stream_with_one_exit_event(
    project: ProjectFactory,
) -> None:
    folder = project(train_py="def setup(config):\n    return None\n")
    done = run_bz(folder, "train", "--nproc-per-node", "2", "--log-format", "json")
    assert done.returncode == 2, done.stderr
    events = json_events(done.stdout)
    exits = [e for e in events if e["event"] == "exit"]
    assert len(exits) == 1, done.stdout
    assert exits[0] == events[-1]
    assert exits[0]["exit_code"] == 2
    assert "setup returned NoneType" in exits[0]["error"]


# -- what a batch hands a metric does not fit it: bad input ---------------------------------

ONE_COLUMN = TINY_TRAIN_PY.replace("nn.Linear(8, 2)", "nn.Linear(8, 1)").replace(
    "nn.CrossEntropyLoss()", "lambda outputs, targets: outputs.square().mean()"
)


def test_outputs_that_do_not_fit_a_metric_are_bad_input_named_by_the_metric(
    project: ProjectFactory,
) -> None:
    project({"metrics": ["accuracy"]}, train_py=ONE_COLUMN)
    result = bz("train", "--no-resume", "--log-format", "json")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("bz: error: accuracy: scores need one column per class (N, C)"), line
    assert "src/bz" not in line
    assert "Traceback" not in result.stderr
    assert json_events(result.stdout)[-1]["exit_code"] == 2
