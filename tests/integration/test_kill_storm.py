"""Signals at random moments, and at the moments a random storm found.

``test_a_short_kill_storm_ends_with_the_uninterrupted_weights`` is a short storm of
:mod:`tests.kill_storm` (``python -m tests.kill_storm --storms N`` runs long ones):
``bz train`` started again and again, each time hit by SIGKILL, SIGTERM or SIGINT after
a random delay, then resumed to the end; ``model.pt`` must equal an uninterrupted run's.
Its seed is printed when it fails; ``BZ_STORM_SEED=N`` replays it.

The other tests put a signal exactly where storms found a window: while bz is writing a
log line. The handler of Ctrl-C and SIGTERM logs ``interrupt_requested`` itself, and it
runs in the middle of whatever the main thread was doing, possibly its own write of
another line.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests import kill_storm
from tests._child import FAULT_CHILD as CHILD
from tests._fault_support import BATCHES_PER_EPOCH, REPO_ROOT, RESUME_TRAIN_PY
from tests._support import assert_same_weights, json_events

pytestmark = pytest.mark.slow

EPOCHS = 3
# The first epoch stays the best (training loss watched as if higher were better), so
# the weights the run ends with (restored) differ from every later epoch's.
RESTORES = {"early_stopping": {"monitor": "training_loss", "mode": "max", "patience": 10}}


def _project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(RESUME_TRAIN_PY, encoding="utf-8")
    config = {
        "epochs": EPOCHS,
        "device": "cpu",
        "seed": 11,
        "plugins": [RESTORES],
        # Without the fix, a hook that never returns is ended by the timeout (600 s by
        # default): short, so the test fails on the weights instead of waiting.
        "plugin_timeout": 20,
    }
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _train(folder: Path, **faults: str) -> tuple[int, list[dict[str, Any]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BZ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(faults)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "train", "--log-format", "json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a safety net for a hung child, not a timing assertion
        check=False,
    )
    return done.returncode, json_events(done.stdout)


def _names(events: list[dict[str, Any]]) -> list[str]:
    return [str(event["event"]) for event in events]


def _model(folder: Path) -> dict[str, torch.Tensor]:
    (run,) = (folder / ".bz" / "checkpoints").iterdir()
    payload = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    return dict(payload["model"])


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    folder = _project(tmp_path_factory.mktemp("clean") / "run")
    code, _ = _train(folder)
    assert code == 0
    return _model(folder)


def test_sigterm_while_bz_writes_a_log_line_stops_after_the_step_and_resumes_exactly(
    tmp_path: Path, clean: dict[str, torch.Tensor]
) -> None:
    folder = _project(tmp_path / "run")
    # SIGTERM lands while the first checkpoint_saved line is being written.
    code, events = _train(
        folder, BZ_TEST_SIGNAL="TERM", BZ_TEST_SIGNAL_IN_EVENT="checkpoint_saved"
    )
    assert code == 143, _names(events)
    names = _names(events)
    first = names.index("checkpoint_saved")
    assert names[first + 1] == "interrupt_requested", "announced right after that line"
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    assert Path(saved[-1]["path"]).name == "epoch-0001-batch-00001.pt"
    assert saved[-1]["step"] == BATCHES_PER_EPOCH + 1
    code, events = _train(folder)
    assert code == 0, _names(events)
    assert_same_weights(_model(folder), clean)


def test_sigterm_while_early_stopping_logs_its_restore_keeps_the_best_weights(
    tmp_path: Path, clean: dict[str, torch.Tensor]
) -> None:
    folder = _project(tmp_path / "run")
    # The end of the session: early stopping has put the best weights back and is
    # writing early_stopping_restored when SIGTERM comes.
    code, events = _train(
        folder, BZ_TEST_SIGNAL="TERM", BZ_TEST_SIGNAL_IN_EVENT="early_stopping_restored"
    )
    assert "plugin_failed" not in _names(events), "early_stopping was blamed for the signal"
    assert "interrupt_requested" in _names(events)
    # After the last checkpoint there is no step left to stop after: the run completes.
    assert code == 0, _names(events)
    assert_same_weights(_model(folder), clean)
    code, events = _train(folder)
    assert (code, _names(events).count("already_complete")) == (0, 1)
    assert_same_weights(_model(folder), clean)


def test_ctrl_c_after_the_last_step_leaves_a_finished_run_whose_best_weights_come_next(
    tmp_path: Path, clean: dict[str, torch.Tensor]
) -> None:
    folder = _project(tmp_path / "run")
    # After the last step: validation and end_epoch still run, the last checkpoint is
    # written, and the session ends interrupted, before early stopping restores.
    last = str(EPOCHS * BATCHES_PER_EPOCH)
    code, events = _train(folder, BZ_TEST_SIGNAL="INT", BZ_TEST_SIGNAL_AT_STEP=last)
    assert code == 130, _names(events)
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    assert Path(saved[-1]["path"]).name == f"epoch-{EPOCHS:04d}.pt"
    assert "model_saved" not in _names(events)
    code, events = _train(folder)
    assert code == 0, _names(events)
    assert "model_rebuilding" in _names(events)
    assert "epoch_finished" not in _names(events), "nothing is trained again"
    assert_same_weights(_model(folder), clean)


def test_a_short_kill_storm_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    given = os.environ.get(kill_storm.SEED_ENV)
    seed = int(given) if given else random.randrange(1_000_000)
    shape = kill_storm.Shape(epochs=4, attempts=4)
    ref = kill_storm.reference(tmp_path / "reference", shape.epochs)
    outcome = kill_storm.storm(tmp_path / "storm", seed, shape, ref)
    assert not outcome.differs, f"{outcome.report()}\nstorm seed {seed} ({kill_storm.SEED_ENV})"
