"""A SIGKILL from outside that lands while a plugin's hook runs is counted as the plugin's.

README ("And a plugin cannot end the run from its hooks"): `bz train` knows which hook
was running when the training process died, not who killed it. An out-of-memory kill
or a ``kill -9`` sent by someone else while a hook runs is therefore that plugin's
death: training restarts without it. The README writes this down; here the test kills
the training process from outside while a plugin sits in ``end_epoch``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests._fault_support import REPO_ROOT
from tests._plugin_packages_support import write_distribution
from tests._support import json_events, linear_train_py

pytestmark = pytest.mark.slow

TRAIN_PY = linear_train_py(16)

PLUGIN_PY = """
import os
import time
from pathlib import Path


class Slow:
    name = "slow"

    def end_epoch(self, context):
        marker = Path(os.environ["SLOW_MARKER"])
        if context.epoch == 1 and not marker.exists():
            marker.write_text(str(os.getpid()))  # "I am in my hook now"
            time.sleep(60)
"""


def test_a_kill_from_outside_during_a_hook_restarts_without_that_plugin(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    config = {"epochs": 3, "device": "cpu", "plugins": ["slow"]}
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    site = write_distribution(
        folder / "site", "bz-slow", {"slow": "bz_slow:Slow"}, {"bz_slow.py": PLUGIN_PY}
    )
    marker = tmp_path / "in-hook"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BZ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(site)])
    env["SLOW_MARKER"] = str(marker)
    with subprocess.Popen(
        [sys.executable, "-m", "bz", "train", "--log-format", "json"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        deadline = time.monotonic() + 300  # a safety net, not a timing assertion
        while not marker.exists() or not marker.read_text():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)  # as the OOM killer would
        stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    (restart,) = [e for e in json_events(stdout) if e["event"] == "restart"]
    assert (restart["plugin"], restart["hook"]) == ("slow", "end_epoch")
    assert restart["ended"] == "killed by SIGKILL"
