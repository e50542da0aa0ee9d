"""The MLflow run survives a training process that dies: one run, each epoch logged once.

README ("a resumed run continues the same MLflow run") and docs/integrations.md
("Resume"): the MLflow run's id is the plugin's state in bz's checkpoints. Here the
resume is the one `bz train` makes by itself after another plugin segfaults in a hook
(README, "bz train never reports success ..."): a real sqlite store, `bz train` as a
user runs it; the store then holds one run, ``FINISHED``, with ``loss/training`` at
epochs 1, 2, 3, each once. A death before the first checkpoint (nothing to resume the
run's id from) leaves that first MLflow run ``RUNNING`` beside the finished one, as
docs/integrations.md writes down.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tests._fault_support import REPO_ROOT
from tests._plugin_packages_support import write_distribution
from tests._support import linear_train_py, run_bz

pytestmark = pytest.mark.slow

TRAIN_PY = linear_train_py(32)

PLUGIN_PY = """
import ctypes
import os


class Segfaults:
    name = "segfaults"

    def end_training_batch(self, context):
        at = int(os.environ["SEGFAULT_AT_EPOCH"])  # counted from 0, as context.epoch
        if context.epoch == at and context.batch_index == 2:
            ctypes.string_at(0)
"""


@pytest.mark.parametrize("at_epoch", [1, 0], ids=["after a checkpoint", "before any"])
def test_a_restart_after_a_segfault_continues_the_same_mlflow_run(
    tmp_path: Path, at_epoch: int
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plugins = ["segfaults", {"mlflow": {"tracking_uri": store, "experiment_name": "crash"}}]
    config = {"epochs": 3, "device": "cpu", "plugins": plugins}
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    site = write_distribution(
        folder / "site",
        "bz-segfaults",
        {"segfaults": "bz_segfaults:Segfaults"},
        {"bz_segfaults.py": PLUGIN_PY},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BZ_", "MLFLOW_"))}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env["SEGFAULT_AT_EPOCH"] = str(at_epoch)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(site)])
    done = run_bz(folder, "train", "--log-format", "json", env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGSEGV" in done.stderr  # it did die, and was restarted

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("crash")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    finished = [run for run in runs if run.info.status == "FINISHED"]
    assert len(finished) == 1
    history = client.get_metric_history(finished[0].info.run_id, "loss/training")
    assert sorted(metric.step for metric in history) == [1, 2, 3]
    # Killed with no checkpoint to resume from, the first MLflow run is left RUNNING
    # beside the one the restart started; after a checkpoint there is only one run.
    left = [run.info.status for run in runs if run.info.status != "FINISHED"]
    assert left == (["RUNNING"] if at_epoch == 0 else [])
