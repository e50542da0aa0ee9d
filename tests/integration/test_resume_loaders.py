"""``kill -9`` in the middle of an epoch, then ``bz train``, for every kind of loader.

Each kind (:data:`tests._loader_kinds.KINDS`) trains three epochs with a checkpoint
every ``B + 1`` steps (``B`` batches per epoch), so the newest checkpoint before the
kill is two batches into the third epoch. The resumed run must end with exactly
(``torch.equal``) the weights and optimizer state of a run never interrupted, and must
not have read the batches already trained, except for an iterable dataset without
state, which is replayed and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests._fault_support import REPO_ROOT
from tests._loader_kinds import KINDS, TRAIN_PY
from tests._support import TRAINING_DIED, assert_same_weights, json_events

EPOCHS = 3
CHILD = "from tests._fault_support import child_main; child_main()"
BATCHES = {"distributed_sampler": 3, "drop_last": 5}
"""Batches per epoch where not six."""


def _project(folder: Path, kind: str, every: int) -> Path:
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    config = {
        "epochs": EPOCHS,
        "device": "cpu",
        "seed": 11,
        "plugins": [],
        "checkpoint_every_steps": every,
        "hyperparameters": {"loader": kind},
    }
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _run(folder: Path, **faults: str) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("BZ_TEST_") and key != "BZ_CONFIG"
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(faults)
    return subprocess.run(
        [sys.executable, "-c", CHILD, "train", "--log-format", "json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _final(folder: Path) -> dict[str, torch.Tensor]:
    (run_dir,) = (folder / ".bz" / "checkpoints").iterdir()
    payload = torch.load(run_dir / f"epoch-{EPOCHS:04d}.pt", map_location="cpu", weights_only=True)
    state: dict[str, torch.Tensor] = dict(payload["model"])
    for index, per_param in payload["optimizer"]["state"].items():
        for key, value in per_param.items():
            state[f"optimizer.{index}.{key}"] = value
    return state


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_killed_mid_epoch_resumes_bit_identical(tmp_path: Path, kind: str) -> None:
    batches = BATCHES.get(kind, 6)
    every = batches + 1
    clean = _project(tmp_path / "clean", kind, every)
    folder = _project(tmp_path / "killed", kind, every)
    done = _run(clean)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    kill_at = 2 * every + 1  # right after the step following the checkpoint at 2 * every
    killed = _run(folder, BZ_TEST_SIGNAL="KILL", BZ_TEST_SIGNAL_AT_STEP=str(kill_at))
    assert killed.returncode == TRAINING_DIED, killed.stdout[-3000:] + killed.stderr[-3000:]
    resumed = _run(folder)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    events = json_events(resumed.stdout)
    (resume,) = [event for event in events if event["event"] == "resumed"]
    # The checkpoint lies inside epoch 3: events count epochs from 1, as the console does.
    assert (resume["epoch"], resume["batch"]) == (3, 2 * every - 2 * batches)
    replayed = [event for event in events if event["event"] == "resume_replaying"]
    assert bool(replayed) == (kind == "iterable"), replayed
    assert_same_weights(_final(folder), _final(clean))
