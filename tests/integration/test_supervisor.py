"""``bz train`` supervises the process that trains: a run that did not finish is never
reported as a success, and one killed inside a plugin's hook finishes without that plugin.

Every case runs ``bz train`` as a user does (its own process, which starts the training
process). The ``dying`` plugin ends that process in ``end_training_batch`` at step 9
(epoch 2; epoch 1's checkpoint is on disk): ``os._exit(0)``, a segfault, or SIGKILL to
itself. The ``threaded`` plugin starts a thread that calls ``os._exit(0)`` while the
training thread is outside every plugin's hook.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from tests._child import BZ_CHILD, SHORT_WAITS_ENV
from tests._fault_support import REPO_ROOT
from tests._plugin_packages_support import write_distribution
from tests._support import assert_same_weights, json_events

pytestmark = pytest.mark.slow

EPOCHS = 3
DEATH_STEP = 9  # six batches per epoch: in epoch 2, after epoch 1's checkpoint

TRAIN_PY = textwrap.dedent(
    """
    import time

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset, default_collate

    import bz


    def setup(config: bz.RunConfig) -> bz.TrainingSetup:
        pause = float(config.hyperparameters.get("pause", 0.0))
        generator = torch.Generator().manual_seed(3)
        inputs = torch.randn(48, 6, generator=generator)
        targets = (inputs[:, 0] + inputs[:, 1] > 0).long()
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        data = TensorDataset(inputs, targets)

        def collate(batch):
            time.sleep(pause)  # a slower loader: time outside every plugin's hook
            return default_collate(batch)

        return bz.TrainingSetup(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=optimizer,
            train_loader=DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate),
            val_loader=DataLoader(data, batch_size=24),
        )
    """
)

PLUGINS_PY = """
import ctypes
import os
import signal
import threading
import time

import attrs
import torch


@attrs.frozen
class DyingConfig:
    act: str = "exit0"
    step: int = 9


class Dying:
    Config = DyingConfig

    def __init__(self, config):
        self.name = "dying"
        self.config = config

    def end_training_batch(self, context):
        torch.rand(3)  # a draw of its own: the fence keeps it from training
        if context.global_step != self.config.step:
            return
        if self.config.act == "exit0":
            os._exit(0)
        elif self.config.act == "segfault":
            ctypes.string_at(0)
        elif self.config.act == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.config.act == "native_hang":  # holds the GIL: no Python thread runs
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            ctypes.PyDLL(None).sleep(600)
        elif self.config.act == "blocked_hang":  # lets the GIL go, ignores the timeout
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(600)


def _exit_later():
    time.sleep(0.3)
    os._exit(0)


class Threaded:
    def __init__(self):
        self.name = "threaded"

    def start_training_session(self, context):
        threading.Thread(target=_exit_later, daemon=True).start()
"""


def _project(folder: Path, plugins: list[Any], **config: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    data = {"epochs": EPOCHS, "device": "cpu", "seed": 5, "plugins": plugins, **config}
    (folder / "bzconfig.json").write_text(json.dumps(data), encoding="utf-8")
    write_distribution(
        folder / "site",
        "bz-dying-plugins",
        {"dying": "bz_dying_plugins:Dying", "threaded": "bz_dying_plugins:Threaded"},
        {"bz_dying_plugins.py": PLUGINS_PY},
    )
    return folder


def _env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BZ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(folder / "site")])
    return env


def _train(
    folder: Path, *args: str, short_waits: bool = False
) -> subprocess.CompletedProcess[str]:
    """``bz train`` in its own process; ``short_waits``: through tests/_child.py with
    ``BZ_TEST_SHORT_WAITS`` (a hook that never returns ends the training process 2 s
    after its interruption, not 10; a hung one is killed 3 s past plugin_timeout, not 15)."""
    env = _env(folder)
    entry = ["-m", "bz"]
    if short_waits:
        env[SHORT_WAITS_ENV] = "1"
        entry = ["-c", BZ_CHILD]
    return subprocess.run(
        [sys.executable, *entry, "train", "--log-format", "json", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a safety net for a hung run, not a timing assertion
        check=False,
    )


def _model(folder: Path) -> dict[str, torch.Tensor]:
    (run,) = (folder / ".bz" / "checkpoints").iterdir()
    payload = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    return dict(payload["model"])


def _events(stdout: str, name: str) -> list[dict[str, Any]]:
    return [event for event in json_events(stdout) if event["event"] == name]


def _bz_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("bz:")]


SUPERVISOR_IMPORTS = """
import atexit, os, sys

def report():
    if not os.environ.get("BZ_SUPERVISOR"):  # the supervisor, not its child
        print("supervisor imported torch:", "torch" in sys.modules, file=sys.stderr)

atexit.register(report)
from bz.commands import main
main()
"""


class CleanRun(NamedTuple):
    folder: Path
    done: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> CleanRun:
    """The run without the dying plugin: ``bz train`` started through a program that
    says at exit whether the supervising process imported torch (the same command line
    as ``bz train``: ``bz.commands.main`` reading the process's own arguments)."""
    folder = _project(tmp_path_factory.mktemp("clean") / "project", [])
    done = subprocess.run(
        [sys.executable, "-c", SUPERVISOR_IMPORTS, "train", "--log-format", "json"],
        cwd=folder,
        env=_env(folder),
        capture_output=True,
        text=True,
        timeout=300,  # a safety net for a hung run, not a timing assertion
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return CleanRun(folder, done)


@pytest.fixture(scope="module")
def clean_model(clean_run: CleanRun) -> dict[str, torch.Tensor]:
    """The weights of the run without the dying plugin."""
    return _model(clean_run.folder)


@pytest.mark.parametrize(
    ("act", "ended", "fault"),
    [
        (
            "exit0",
            "exited with code 0 without finishing",
            "the training process exited with code 0 without finishing (restarted without it)",
        ),
        (
            "segfault",
            "killed by SIGSEGV (a segfault)",
            "the training process was killed by SIGSEGV (a segfault) (restarted without it)",
        ),
        (
            "sigkill",
            "killed by SIGKILL",
            "the training process was killed by SIGKILL (restarted without it)",
        ),
    ],
)
def test_a_death_in_a_hook_restarts_without_the_plugin_and_ends_with_its_weights(
    tmp_path: Path, clean_model: dict[str, torch.Tensor], act: str, ended: str, fault: str
) -> None:
    folder = _project(tmp_path / "project", [{"dying": {"act": act, "step": DEATH_STEP}}])
    done = _train(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    (restart,) = _events(done.stdout, "restart")
    assert restart["plugin"] == "dying"
    assert restart["hook"] == "end_training_batch"
    assert restart["ended"] == ended
    assert restart["restart"] == 1
    assert restart["starts_from"] == "checkpoint"
    restart_lines = [line for line in _bz_lines(done.stderr) if "restarting" in line]
    assert restart_lines == [
        f"bz: training {ended} in plugin 'dying' (hook end_training_batch); restarting "
        "from the last checkpoint without it (restart 1 of 3)"
    ]
    (resumed,) = _events(done.stdout, "resumed")
    assert resumed["step"] == 6  # epoch 1's checkpoint
    (quarantined,) = _events(done.stdout, "plugin_quarantined")
    assert quarantined["plugin"] == "dying"
    summary = _events(done.stdout, "plugin_summary")[-1]["plugins"]["dying"]
    assert summary["status"] == "quarantined"
    assert fault in summary["fault"]
    assert [e["exit_code"] for e in _events(done.stdout, "exit")] == [0]
    assert_same_weights(_model(folder), clean_model)


@pytest.mark.parametrize(
    ("act", "ended"),
    [
        ("native_hang", "hung in native code for"),
        ("blocked_hang", "exited with code 1 without finishing"),  # bz's own escalation
    ],
)
def test_a_hook_hung_past_plugin_timeout_restarts_without_the_plugin(
    tmp_path: Path, clean_model: dict[str, torch.Tensor], act: str, ended: str
) -> None:
    folder = _project(
        tmp_path / "project",
        [{"dying": {"act": act, "step": DEATH_STEP}}],
        plugin_timeout=1,
    )
    done = _train(folder, short_waits=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (restart,) = _events(done.stdout, "restart")
    assert (restart["plugin"], restart["hook"]) == ("dying", "end_training_batch")
    assert restart["ended"].startswith(ended)
    assert_same_weights(_model(folder), clean_model)


def test_a_death_before_the_first_checkpoint_restarts_from_the_start(
    tmp_path: Path, clean_model: dict[str, torch.Tensor]
) -> None:
    # Step 2, in epoch 1: no checkpoint yet, and none from before to resume from.
    folder = _project(tmp_path / "project", [{"dying": {"act": "sigkill", "step": 2}}])
    done = _train(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    restart_lines = [line for line in _bz_lines(done.stderr) if "restarting" in line]
    assert restart_lines == [
        "bz: training killed by SIGKILL in plugin 'dying' (hook end_training_batch); "
        "restarting from the start without it (restart 1 of 3)"
    ]
    (restart,) = _events(done.stdout, "restart")
    assert restart["starts_from"] == "start"
    assert not _events(done.stdout, "resumed")
    assert_same_weights(_model(folder), clean_model)


def test_giving_up_before_the_first_checkpoint_says_bz_train_starts_over(
    tmp_path: Path,
) -> None:
    folder = _project(tmp_path / "project", [{"dying": {"act": "exit0", "step": 2}}])
    done = _train(folder, "--max-restarts", "0")
    assert done.returncode == 1
    message = (
        "training exited with code 0 without finishing in plugin 'dying' (hook "
        "end_training_batch); no restart left (--max-restarts 0); no checkpoint was "
        "written: `bz train` starts it over"
    )
    assert _bz_lines(done.stderr) == [f"bz: error: {message}"]
    (exit_event,) = _events(done.stdout, "exit")
    assert exit_event["error"] == message


def test_max_restarts_0_reports_the_death_and_fails(tmp_path: Path) -> None:
    folder = _project(tmp_path / "project", [{"dying": {"act": "exit0", "step": DEATH_STEP}}])
    done = _train(folder, "--max-restarts", "0")
    assert done.returncode == 1
    message = (
        "training exited with code 0 without finishing in plugin 'dying' (hook "
        "end_training_batch); no restart left (--max-restarts 0); `bz train` resumes "
        "from the last checkpoint"
    )
    assert _bz_lines(done.stderr) == [f"bz: error: {message}"]
    (exit_event,) = _events(done.stdout, "exit")
    assert exit_event["exit_code"] == 1
    assert exit_event["error"] == message
    assert not _events(done.stdout, "restart")
    (run,) = (folder / ".bz" / "checkpoints").iterdir()
    assert not (run / "model.pt").exists()
    assert (run / "epoch-0001.pt").exists()


def test_a_death_outside_any_hook_is_reported_not_retried(tmp_path: Path) -> None:
    folder = _project(
        tmp_path / "project", ["threaded"], epochs=20, hyperparameters={"pause": 0.01}
    )
    done = _train(folder)
    assert done.returncode == 1, done.stderr[-3000:]
    # Its thread ends the process 0.3 s into training: after a checkpoint or before.
    written = any((folder / ".bz" / "checkpoints").glob("*/epoch-*.pt"))
    later = (
        "`bz train` resumes from the last checkpoint"
        if written
        else "no checkpoint was written: `bz train` starts it over"
    )
    message = (
        "training exited with code 0 without finishing outside any plugin's hook "
        f"(--restart-on-crash restarts it); {later}"
    )
    assert _bz_lines(done.stderr) == [f"bz: error: {message}"]
    (exit_event,) = _events(done.stdout, "exit")
    assert (exit_event["exit_code"], exit_event["error"]) == (1, message)
    assert not _events(done.stdout, "restart")


def test_restart_on_crash_retries_a_death_outside_hooks_within_the_limit(tmp_path: Path) -> None:
    folder = _project(
        tmp_path / "project", ["threaded"], epochs=20, hyperparameters={"pause": 0.01}
    )
    done = _train(folder, "--restart-on-crash", "--max-restarts", "1")
    assert done.returncode == 1, done.stderr[-3000:]
    (restart,) = _events(done.stdout, "restart")
    assert restart["plugin"] is None
    lines = _bz_lines(done.stderr)
    assert lines[-1].startswith("bz: error: training exited with code 0 without finishing ")
    assert "no restart left (--max-restarts 1)" in lines[-1]
    assert [e["exit_code"] for e in _events(done.stdout, "exit")] == [1]


def _default_sigint() -> None:
    # Ctrl-C as in a terminal, even when the tests run in the background (where the
    # shell has children ignore SIGINT); a process group of its own, as a shell's job.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgid(0, 0)


def _start(folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bz", "train", "--log-format", "json"],
        cwd=folder,
        env=_env(folder),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_for_epoch(process: subprocess.Popen[str]) -> list[str]:
    """Read the json stream until the first epoch has ended (its checkpoint written)."""
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if '"checkpoint_saved"' in line:
            return lines
    raise AssertionError("training ended before its first checkpoint")


def _child_of(pid: int) -> int:
    for _ in range(100):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("no training process")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_training_process_is_reported(tmp_path: Path) -> None:
    folder = _project(tmp_path / "project", [], epochs=50, hyperparameters={"pause": 0.01})
    process = _start(folder)
    lines = _wait_for_epoch(process)
    os.kill(_child_of(process.pid), signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    message = (
        "training killed by SIGKILL outside any plugin's hook (--restart-on-crash "
        "restarts it); `bz train` resumes from the last checkpoint"
    )
    assert _bz_lines(stderr) == [f"bz: error: {message}"]
    (exit_event,) = _events("".join(lines) + stdout, "exit")
    assert (exit_event["exit_code"], exit_event["error"]) == (1, message)


@pytest.mark.parametrize(
    ("number", "code", "group"),
    [
        (signal.SIGINT, 130, False),
        (signal.SIGTERM, 143, False),
        (signal.SIGINT, 130, True),  # a terminal's Ctrl-C: every process of the job
        (signal.SIGTERM, 143, True),
    ],
)
def test_a_stop_signal_to_bz_train_reaches_training_once(
    tmp_path: Path, number: signal.Signals, code: int, group: bool
) -> None:
    folder = _project(tmp_path / "project", [], epochs=50, hyperparameters={"pause": 0.01})
    process = _start(folder)
    lines = _wait_for_epoch(process)
    if group:
        os.killpg(process.pid, number)
    else:
        process.send_signal(number)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-3000:]
    stream = "".join(lines) + stdout
    (requested,) = _events(stream, "interrupt_requested")  # once: not forwarded twice
    assert requested["signal"] == number.name
    saved = _events(stream, "checkpoint_saved")[-1]
    assert saved["step"] > 6  # the interrupt's own checkpoint, after the first epoch's
    assert f"bz: interrupted; checkpoint {saved['path']} written" in stderr
    assert [e["exit_code"] for e in _events(stream, "exit")] == [code]


def test_the_supervisor_never_imports_torch(clean_run: CleanRun) -> None:
    done = clean_run.done
    assert done.returncode == 0, done.stderr[-3000:]
    assert _events(done.stdout, "training_started")  # the child trained
    assert "supervisor imported torch: False" in done.stderr.splitlines()
