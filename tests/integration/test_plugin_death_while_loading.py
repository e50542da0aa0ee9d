"""A plugin that ends the training process while it is created is left out of a restart.

README ("And a plugin cannot end the run"): while a plugin loads (its module's import, its
``load_config``, ``create`` or constructor), the training process tells the supervising
``bz train`` which plugin loads and at which stage, as it does for a plugin's hooks. A
death there starts training again without that plugin (one ``restart`` line and event
naming the stage), and the run finishes; the restarted run does not load it at all and
lists it as quarantined. ``"isolation": "process"`` quarantines the same plugin
without a restart; both are shown here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests._fault_support import REPO_ROOT
from tests._plugin_packages_support import write_distribution
from tests._support import json_events, linear_train_py, run_bz

pytestmark = pytest.mark.slow

TRAIN_PY = linear_train_py(16)

PLUGIN_PY = """
import os

from bz.plugins import Plugin


class ExitsWhenCreated(Plugin):
    name = "exits_when_created"

    @staticmethod
    def create(config_data, training_config):
        os._exit(0)
"""


def _train(tmp_path: Path, entry: Any) -> subprocess.CompletedProcess[str]:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    config = {"epochs": 1, "device": "cpu", "plugins": [entry]}
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    site = write_distribution(
        folder / "site",
        "bz-exits-when-created",
        {"exits_when_created": "bz_exits_when_created:ExitsWhenCreated"},
        {"bz_exits_when_created.py": PLUGIN_PY},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BZ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(site)])
    return run_bz(folder, "train", "--log-format", "json", env=env, timeout=300)


def test_a_death_while_a_plugin_is_created_restarts_training_without_it(
    tmp_path: Path,
) -> None:
    done = _train(tmp_path, "exits_when_created")
    assert done.returncode == 0, done.stderr[-3000:]
    restarts = [line for line in done.stderr.splitlines() if "restarting" in line]
    assert restarts == [
        "bz: training exited with code 0 without finishing in plugin 'exits_when_created' "
        "(while loading, in its create); restarting from the run's newest checkpoint "
        "(from the start if it has none) without it (restart 1 of 3)"
    ]
    events = json_events(done.stdout)
    (restart,) = [e for e in events if e["event"] == "restart"]
    assert (restart["plugin"], restart["hook"]) == ("exits_when_created", "create")
    (summary,) = [e for e in events if e["event"] == "plugin_summary"]
    assert summary["plugins"]["exits_when_created"]["status"] == "quarantined"
    assert list((tmp_path / "project" / ".bz" / "checkpoints").glob("*/model.pt"))  # trained


def test_in_a_process_of_its_own_the_same_plugin_is_quarantined_and_the_run_finishes(
    tmp_path: Path,
) -> None:
    done = _train(tmp_path, {"exits_when_created": {"isolation": "process"}})
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = [e for e in json_events(done.stdout) if e["event"] == "plugin_summary"]
    assert summary["plugins"]["exits_when_created"]["status"] == "quarantined"
