"""``"isolation": "process"``: what a plugin does in its own process never reaches training.

Every case that trains runs ``bz train`` in a process of its own, as a user does, with
the ``iso`` plugin (``tests._isolation_support``) installed through entry points. A fault
ends the plugin's process or its hook; training finishes (exit 0) with the same weights
as a run without the plugin. A configuration refused before training is checked by
``bz train`` in the test's process (click's runner).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from tests._fault_support import REPO_ROOT, final_model_state
from tests._isolation_support import TRAIN_PY, install_isolation_distribution
from tests._support import assert_same_weights, json_events

from bz.commands import cli
from bz.plugins._isolated import QUEUE_LIMIT

pytestmark = pytest.mark.slow

EPOCHS = 3


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_isolation_distribution(tmp_path_factory.mktemp("site"))


def _write_project(
    folder: Path, plugins: list[Any], epochs: int = EPOCHS, batches: int = 4, **settings: Any
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    config = {
        "epochs": epochs,
        "device": "cpu",
        "seed": 3,
        "hyperparameters": {"batches": batches},
        "plugins": plugins,
        **settings,
    }
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")


def _refused_here(folder: Path, plugins: list[Any]) -> Result:
    """``bz train --log-format json`` in this process (click's runner), for a config
    refused before training starts: its own process would add nothing but a start-up."""
    _write_project(folder, plugins)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("BZ_CONFIG", raising=False)
        return CliRunner().invoke(cli, ["train", "--log-format", "json"])


def _train(
    folder: Path,
    site: Path,
    plugins: list[Any],
    *args: str,
    epochs: int = EPOCHS,
    batches: int = 4,
    **settings: Any,
) -> subprocess.CompletedProcess[str]:
    _write_project(folder, plugins, epochs=epochs, batches=batches, **settings)
    environment = {key: value for key, value in os.environ.items() if key != "BZ_CONFIG"}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(site)])
    return subprocess.run(
        [sys.executable, "-m", "bz", "train", "--log-format", "json", *args],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def reference(site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights of the same run without the plugin."""
    folder = tmp_path_factory.mktemp("reference")
    done = _train(folder, site, [])
    assert done.returncode == 0, done.stderr[-3000:]
    return final_model_state(folder)


def _iso(record: Path, **options: Any) -> dict[str, Any]:
    return {"iso": {"isolation": "process", "record": str(record), **options}}


def _failed(stdout: str) -> list[tuple[str, str]]:
    return [
        (e["plugin"], e["error"]) for e in json_events(stdout) if e["event"] == "plugin_failed"
    ]


def _epochs_completed(stdout: str, outcome: str = "completed") -> int:
    (finished,) = [e for e in json_events(stdout) if e["event"] == "run_finished"]
    assert finished["outcome"] == outcome
    return int(finished["epochs_completed"])


def _exit_code(stdout: str) -> int:
    (code,) = [e["exit_code"] for e in json_events(stdout) if e["event"] == "exit"]
    return int(code)


@pytest.mark.parametrize(
    ("act", "hook", "error"),
    [
        ("raise", "end_epoch", "in end_epoch: ValueError: injected fault"),
        ("segfault", "end_epoch", "its process was killed by SIGSEGV"),
        ("segfault", "end_training_batch", "its process was killed by SIGSEGV"),
        ("exit", "end_training_loop", "its process exited with code 0"),
        ("thread", "end_epoch", "its process exited with code 0"),
        ("hang", "end_epoch", "did not answer within plugin_timeout"),
    ],
)
def test_a_plugin_that_dies_or_hangs_in_its_process_is_quarantined_and_training_is_exact(
    act: str,
    hook: str,
    error: str,
    site: Path,
    tmp_path: Path,
    reference: dict[str, torch.Tensor],
) -> None:
    record = tmp_path / "iso.json"
    done = _train(tmp_path / "run", site, [_iso(record, act=act, hook=hook)], plugin_timeout=5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _exit_code(done.stdout) == 0
    assert _epochs_completed(done.stdout) == EPOCHS
    ((plugin, message),) = _failed(done.stdout)
    assert plugin == "iso"
    assert error in message
    assert_same_weights(final_model_state(tmp_path / "run"), reference)
    # It did run until its fault, in its own process.
    hooks = [entry[0] for entry in json.loads(record.read_text())["hooks"]]
    assert hooks[0] == "start_training_session"
    assert "end_training_session" not in hooks


@pytest.mark.parametrize("act", ["close_stdio", "signals"])
def test_closing_stdio_or_taking_signals_in_its_process_changes_nothing_for_training(
    act: str, site: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    # In process these are faults bz must catch; in its own process they are the
    # plugin's business: it keeps working, and a SIGTERM to bz still checkpoints as ever.
    record = tmp_path / "iso.json"
    done = _train(tmp_path / "run", site, [_iso(record, act=act, hook="start_training_session")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _failed(done.stdout) == []
    assert _epochs_completed(done.stdout) == EPOCHS
    assert_same_weights(final_model_state(tmp_path / "run"), reference)
    hooks = [entry[0] for entry in json.loads(record.read_text())["hooks"]]
    assert hooks[-1] == "end_training_session"


def test_extra_comes_back_to_other_plugins_and_a_stop_request_stops(
    site: Path, tmp_path: Path
) -> None:
    record, read = tmp_path / "iso.json", tmp_path / "reader.json"
    plugins = [_iso(record, stop_at_epoch=2), {"reader": {"record": str(read)}}]
    done = _train(tmp_path / "run", site, plugins, epochs=5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _failed(done.stdout) == []
    seen = json.loads(read.read_text())
    assert [entry["epoch"] for entry in seen] == [1, 2]  # stopped after epoch 2 of 5
    assert all(entry["loss"] > 0 for entry in seen)  # the epoch's loss reached its process
    assert _epochs_completed(done.stdout, "stopped_early") == 2


def test_its_state_is_checkpointed_and_restored_on_resume(site: Path, tmp_path: Path) -> None:
    record = tmp_path / "iso.json"
    folder = tmp_path / "run"
    first = _train(folder, site, [_iso(record)], epochs=2)
    assert first.returncode == 0, first.stderr[-3000:]
    hooks = [entry[0] for entry in json.loads(record.read_text())["hooks"]]
    calls_when_saved = hooks.index("end_training_session")  # every hook before it
    resumed = _train(folder, site, [_iso(record)], "--epochs", "3", epochs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(record.read_text())["loaded"] == {"calls": calls_when_saved}


def test_a_full_queue_drops_batch_calls_and_counts_them(site: Path, tmp_path: Path) -> None:
    # The plugin blocks in its first batch until the training loop has ended (the
    # in-process reader releases it then): training never waits for it, 64 calls fill its
    # queue, the rest are dropped and counted, and the epoch's end waits for the 64.
    record, release = tmp_path / "iso.json", tmp_path / "release"
    batches = 100
    plugins = [
        {"reader": {"record": str(tmp_path / "reader.json"), "release": str(release)}},
        _iso(record, block_until=str(release)),
    ]
    done = _train(tmp_path / "run", site, plugins, epochs=1, batches=batches)
    assert done.returncode == 0, done.stderr[-3000:]
    (dropped,) = [e for e in json_events(done.stdout) if e["event"] == "isolated_plugin_dropped"]
    hooks = [entry[0] for entry in json.loads(record.read_text())["hooks"]]
    assert dropped["dropped"] == batches - QUEUE_LIMIT
    assert hooks.count("end_training_batch") == QUEUE_LIMIT
    assert hooks[-1] == "end_training_session"


def test_the_loss_reaches_it_only_on_the_steps_it_asks_for(site: Path, tmp_path: Path) -> None:
    record = tmp_path / "iso.json"
    done = _train(tmp_path / "run", site, [_iso(record, step_interval=3)], epochs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [step for step, _loss in json.loads(record.read_text())["losses"]]
    assert steps == [3, 6]


@pytest.mark.parametrize(
    ("plugin", "reason"),
    [
        ({"early_stopping": {}}, "restore_best_weights copies the model's weights"),
        ({"ema": {}}, "it keeps an average of the model's weights"),
        ({"profiler": {}}, "torch's profiler"),
        ({"tensorboard": {"histogram_interval": 1}}, "histogram_interval reads the model"),
    ],
)
def test_a_plugin_that_needs_the_model_is_refused_before_training(
    plugin: dict[str, dict[str, Any]], reason: str, tmp_path: Path
) -> None:
    ((name, options),) = plugin.items()
    done = _refused_here(tmp_path, [{name: {**options, "isolation": "process"}}])
    assert done.exit_code == 2
    assert _exit_code(done.stdout) == 2
    (error,) = [e["error"] for e in json_events(done.stdout) if e["event"] == "exit"]
    assert f"plugins[0].{name}.isolation" in error
    assert reason in error
    assert "Traceback" not in done.stderr
    assert not (tmp_path / ".bz").exists()


def test_early_stopping_without_best_weights_runs_in_its_process(
    site: Path, tmp_path: Path
) -> None:
    options = {"isolation": "process", "restore_best_weights": False, "patience": 1}
    done = _train(tmp_path, site, [{"early_stopping": options}])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _failed(done.stdout) == []


def test_an_unknown_isolation_is_one_line_naming_the_plugin_and_the_file(tmp_path: Path) -> None:
    done = _refused_here(tmp_path, [{"run_log": {"isolation": "thread"}}])
    assert done.exit_code == 2
    (error,) = [e["error"] for e in json_events(done.stdout) if e["event"] == "exit"]
    assert error == (
        'bzconfig.json: plugins[0].run_log.isolation: expected "in-process" or "process", '
        'got "thread"'
    )


_TIMES = {"time", "seconds", "time/epoch_seconds", "_timestamp", "_runtime", "started", "ended"}


def _timeless(row: Any) -> Any:
    """``row`` without the times in it, at any depth (they differ between two runs)."""
    if not isinstance(row, dict):
        return row
    return {key: _timeless(value) for key, value in row.items() if key not in _TIMES}


@pytest.fixture(scope="module")
def loggers(site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run twice with tensorboard, run_log and wandb, all three in the training
    process, then all three in processes of their own: per isolation, the project folder.

    One pair of runs serves the tests below (each compares what one plugin wrote in
    process with what it wrote in its own process), instead of a pair per plugin.
    """
    root = tmp_path_factory.mktemp("loggers")
    folders = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.delenv("WANDB_API_KEY", raising=False)
        for isolation in ("in-process", "process"):
            folder = root / isolation
            for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
                patch.setenv(variable, str(folder / "wandb-home"))
            plugins = [
                {"tensorboard": {"isolation": isolation, "log_dir": "tb", "step_interval": 2}},
                {"run_log": {"isolation": isolation, "log_dir": "rl", "step_interval": 2}},
                {"wandb": {"isolation": isolation, "dir": "wb", "step_interval": 2}},
            ]
            done = _train(folder, site, plugins)
            assert done.returncode == 0, done.stderr[-3000:]
            assert _failed(done.stdout) == []
            folders[isolation] = folder
    return folders


def test_tensorboard_in_its_process_writes_the_scalars_it_writes_in_process(
    loggers: dict[str, Path],
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = []
    for isolation in ("in-process", "process"):
        folder = loggers[isolation]
        events = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0}).Reload()
        scalars.append(
            {
                tag: [(e.step, e.value) for e in events.Scalars(tag)]
                for tag in events.Tags()["scalars"]
                if tag != "time/epoch_seconds"
            }
        )
    in_process, isolated = scalars
    assert "step/loss" in in_process
    assert "loss/validation" in in_process
    assert isolated == in_process


def test_run_log_and_wandb_in_their_process_record_what_they_record_in_process(
    loggers: dict[str, Path],
) -> None:
    from tests.integration.test_integration_wandb import _history, _records

    logs, histories = [], []
    for isolation in ("in-process", "process"):
        folder = loggers[isolation]
        lines = (folder / "rl" / "run_log.jsonl").read_text().splitlines()
        logs.append([_timeless(json.loads(line)) for line in lines])
        (run_file,) = folder.glob("wb/**/offline-run-*/run-*.wandb")
        histories.append([_timeless(row) for row in _history(_records(run_file))])
    assert logs[0] == logs[1]
    assert any(line.get("event") == "step" for line in logs[0])
    assert histories[0] == histories[1]
    assert any("step/loss" in row for row in histories[0])


def test_process_plugins_start_together_and_start_up_is_not_a_hook(
    site: Path, tmp_path: Path
) -> None:
    """Each of the two is created only while the other is being created too, and each
    takes longer to create than ``plugin_timeout`` allows a hook: both start, together,
    and run their hooks."""
    folder = tmp_path / "met"
    folder.mkdir()
    options = {"isolation": "process", "folder": str(folder), "sleep": 1.5}
    plugins = [{"meet_a": options}, {"meet_b": options}]
    done = _train(tmp_path / "run", site, plugins, epochs=1, plugin_timeout=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _failed(done.stdout) == []
    for name in ("meet_a", "meet_b"):
        assert (folder / f"{name}-epochs").read_text(encoding="utf-8") == "1", name


@pytest.mark.parametrize("strict", [False, True], ids=["quarantined", "strict-plugins"])
def test_a_start_up_longer_than_plugin_start_timeout_is_the_plugins_fault(
    strict: bool, site: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    """``meet_a`` alone is never created (it waits for ``meet_b``, 60 s): with
    ``plugin_start_timeout`` at 2 s its process is ended then, not at the default 120 s."""
    folder = tmp_path / "met"
    folder.mkdir()
    plugins = [{"meet_a": {"isolation": "process", "folder": str(folder)}}]
    args = ["--strict-plugins"] if strict else []
    done = _train(tmp_path / "run", site, plugins, *args, plugin_start_timeout=2)
    error = (
        "IsolatedPluginError: plugin 'meet_a' (starting) did not answer within "
        "plugin_start_timeout (2 s)"
    )
    assert (folder / "meet_a-creating").exists(), "it was being created"
    if strict:  # --strict-plugins: the run stops, one line naming the plugin and the limit
        assert done.returncode == 1, done.stderr[-3000:]
        (line,) = done.stderr.splitlines()
        assert line == f"bz: error: plugin 'meet_a' failed in create: {error}", line
        return
    assert done.returncode == 0, done.stderr[-3000:]
    assert _failed(done.stdout) == [("meet_a", error)]
    assert _epochs_completed(done.stdout) == EPOCHS
    assert_same_weights(final_model_state(tmp_path / "run"), reference)


def test_limits_of_any_length_are_limits_not_errors(
    site: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    # The wait for a reply is the operating system's, in milliseconds in a C int: a
    # limit past about 25 days used to raise OverflowError in the training process.
    record = tmp_path / "iso.json"
    done = _train(
        tmp_path / "run", site, [_iso(record)], plugin_timeout=1e300, plugin_start_timeout=1e300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _failed(done.stdout) == []
    assert_same_weights(final_model_state(tmp_path / "run"), reference)
    hooks = [entry[0] for entry in json.loads(record.read_text())["hooks"]]
    assert hooks[-1] == "end_training_session"
