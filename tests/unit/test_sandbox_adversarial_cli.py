"""``bz train`` with hostile plugins installed: the run ends 0, and its end report names
each plugin with the hook it failed in, however odd what it raised."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner
from tests._fault_support import no_rendering
from tests._support import TINY_TRAIN_PY

from bz import _logging
from bz.commands import cli

PLUGINS = textwrap.dedent(
    """
    import sys


    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no message")


    class Mine(BaseException):
        pass


    class Exiting:
        name = "exiting"

        def end_training_batch(self, context):
            sys.exit(0)


    class Unprintable_:
        name = "unprintable"

        def end_epoch(self, context):
            raise Unprintable()


    class Custom:
        name = "custom"

        def after_backward(self, context):
            raise Mine("mine")


    class Quiet:
        name = "quiet"

        def __init__(self):
            self.calls = 0

        def end_training_batch(self, context):
            self.calls += 1
    """
)


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    info = site / "bz_hostile_plugins-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bz-hostile-plugins\nVersion: 0.0.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[bz.plugins]\n"
        "exiting = bz_hostile_plugins:Exiting\n"
        "unprintable = bz_hostile_plugins:Unprintable_\n"
        "custom = bz_hostile_plugins:Custom\n"
        "quiet = bz_hostile_plugins:Quiet\n",
        encoding="utf-8",
    )
    (site / "bz_hostile_plugins.py").write_text(PLUGINS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    return tmp_path


def test_bz_train_names_every_hostile_plugin_and_its_hook_and_exits_0(installed: Path) -> None:
    (installed / "train.py").write_text(TINY_TRAIN_PY, encoding="utf-8")
    config = {
        "epochs": 2,
        "device": "cpu",
        "plugins": ["quiet", "exiting", "unprintable", "custom"],
    }
    (installed / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch, structlog.testing.capture_logs() as events:
        patch.setattr(_logging, "configure", no_rendering)
        result = CliRunner().invoke(cli, ["train", "--config", str(installed / "bzconfig.json")])
    assert result.exit_code == 0, result.output
    failed = {e["plugin"]: e["hook"] for e in events if e["event"] == "plugin_failed"}
    assert failed == {
        "exiting": "end_training_batch",
        "unprintable": "end_epoch",
        "custom": "after_backward",
    }
    for name, hook in failed.items():
        assert f"plugin '{name}' failed in {hook}" in result.stderr, result.stderr
    assert "<exception str() failed>" in result.stderr
    assert "quiet" not in {e.get("plugin") for e in events if e["event"] == "plugin_failed"}
