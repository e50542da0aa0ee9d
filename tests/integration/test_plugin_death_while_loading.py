"""A plugin that ends the training process while it is created is reported, not restarted.

README ("And a plugin cannot end the run"): the restart without the plugin covers deaths
inside a plugin's *hooks*. Creating a plugin (its module's import, its ``create`` or
constructor) is no hook: a death there is a death "outside any plugin's hook", reported
with exit 1 like one from a thread of the plugin's own (tests/integration/
test_supervisor.py). The README writes that exception down and names the remedy,
``"isolation": "process"``, under which the same plugin is quarantined and the run
finishes; both are shown here.
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


def test_a_death_while_a_plugin_is_created_is_reported_as_outside_any_hook(
    tmp_path: Path,
) -> None:
    done = _train(tmp_path, "exits_when_created")
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("bz: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "exited with code 0 without finishing outside any plugin's hook" in errors[0]
    assert not [e for e in json_events(done.stdout) if e["event"] == "restart"]


def test_in_a_process_of_its_own_the_same_plugin_is_quarantined_and_the_run_finishes(
    tmp_path: Path,
) -> None:
    done = _train(tmp_path, {"exits_when_created": {"isolation": "process"}})
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = [e for e in json_events(done.stdout) if e["event"] == "plugin_summary"]
    assert summary["plugins"]["exits_when_created"]["status"] == "quarantined"
