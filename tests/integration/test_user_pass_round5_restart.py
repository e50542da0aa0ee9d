"""``bz train --no-resume`` and a plugin that kills the training process.

``--no-resume`` (or ``"resume": false``) starts a run over: the old checkpoints of the
same run signature are discarded once the new run writes its first one. A plugin that
killed the training process before that used to make the supervisor restart with
``--resume``: the restarted process resumed the *old* run ("nothing to train"), exit 0,
and the model the user asked to retrain from scratch was the old one. The restart now
starts over as asked until the new run has a checkpoint, and resumes from that one after.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tests._support import assert_same_weights
from tests.integration.test_supervisor import _events, _model, _project, _train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose run has finished once, without plugins (its checkpoints remain):
    one ``bz train`` for the module, copied for each test (the run signature names no
    path, so the copy resumes as the original would)."""
    folder = _project(tmp_path_factory.mktemp("finished") / "project", [])
    done = _train(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def _finished_run(finished_project: Path, tmp_path: Path) -> Path:
    """A copy of the finished project of its own for this test."""
    return Path(shutil.copytree(finished_project, tmp_path / "project"))


def _with_plugins(folder: Path, plugins: list[object]) -> None:
    path = folder / "bzconfig.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**config, "plugins": plugins}), encoding="utf-8")


@pytest.mark.parametrize("start_over", [["--no-resume"], ["--set", "resume=false"]])
def test_a_death_before_the_new_runs_first_checkpoint_starts_over_again(
    finished_project: Path, tmp_path: Path, start_over: list[str]
) -> None:
    folder = _finished_run(finished_project, tmp_path)
    clean = _model(folder)
    _with_plugins(folder, [{"dying": {"act": "segfault", "step": 2}}])  # in epoch 1
    done = _train(folder, *start_over)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [e["plugin"] for e in _events(done.stdout, "restart")] == ["dying"]
    assert not _events(done.stdout, "already_complete")
    assert not _events(done.stdout, "resumed")  # never the old run
    (finished,) = _events(done.stdout, "run_finished")[-1:]
    assert finished["outcome"] == "completed"
    assert finished["epochs_completed"] == 3
    assert_same_weights(_model(folder), clean)


def test_a_death_after_the_new_runs_first_checkpoint_resumes_from_it(
    finished_project: Path, tmp_path: Path
) -> None:
    folder = _finished_run(finished_project, tmp_path)
    clean = _model(folder)
    _with_plugins(folder, [{"dying": {"act": "segfault", "step": 9}}])  # in epoch 2
    done = _train(folder, "--no-resume")
    assert done.returncode == 0, done.stderr[-3000:]
    (resumed,) = _events(done.stdout, "resumed")
    assert resumed["step"] == 6  # the new run's epoch 1, not the old run's end
    (finished,) = _events(done.stdout, "run_finished")[-1:]
    assert finished["outcome"] == "completed"
    weights: dict[str, torch.Tensor] = _model(folder)
    assert_same_weights(weights, clean)
