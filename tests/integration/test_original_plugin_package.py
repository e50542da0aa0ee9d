"""Two single-file plugins written in bz-cli 0.x's style, installed with pip, trained with.

Written as the original's ``examples/custom-plugin`` describes its two plugins (our own
code, following that description): a minimal one that logs through
``logging.getLogger(__name__)`` at session start, every five epochs and at the end, and
a file logger that writes the loss every ten batches and per epoch with the original's
formula ``context.training_loss_total / context.training_batch_count``. Both assign
``self.logger`` and read ``context.extra.get("epochs")``; neither knows anything of bz
beyond the plugin guide.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests._support import bz_env, json_events, run_bz

HELLO_PLUGIN = '''
"""A minimal bz plugin: says hello, then reports progress every five epochs."""

import logging
from typing import Any, Dict, Optional

from bz.plugins import Plugin, PluginContext


class HelloPlugin(Plugin):
    name = "hello_plugin"

    def __init__(self, greeting: str = "Hello from a plugin"):
        super().__init__()
        self.greeting = greeting
        self.logger = logging.getLogger(__name__)

    def start_training_session(self, context: PluginContext) -> None:
        self.logger.info(f"{self.greeting}!")
        self.logger.info(f"Training will run for {context.extra.get('epochs', 'unknown')} epochs")

    def end_epoch(self, context: PluginContext) -> None:
        if context.epoch % 5 == 0:
            self.logger.info(f"Epoch {context.epoch} completed")

    def end_training_session(self, context: PluginContext) -> None:
        self.logger.info("Training completed")

    @staticmethod
    def load_config(config_data: dict) -> Dict[str, Any]:
        return {
            "greeting": config_data.get("greeting", "Hello from a plugin"),
            "enabled": config_data.get("enabled", True),
        }

    @staticmethod
    def create(config_data: dict, training_config) -> Optional["HelloPlugin"]:
        config = HelloPlugin.load_config(config_data)
        if not config.get("enabled", True):
            return None
        return HelloPlugin(greeting=config["greeting"])


if __name__ == "__main__":
    plugin = HelloPlugin.create({"greeting": "Demo"}, None)
    print(f"Created plugin: {type(plugin).__name__} ({plugin.greeting})")
'''

FILE_LOGGER_PLUGIN = '''
"""A bz plugin that writes the training loss to a file."""

import logging
from typing import Any, Dict, Optional

from bz.plugins import Plugin, PluginContext


class FileLossLogger(Plugin):
    name = "file_loss_logger"

    def __init__(self, log_file: str = "training.log", log_level: str = "INFO"):
        super().__init__()
        self.log_file = log_file
        self.logger = logging.getLogger(__name__)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(levelname)s - %(message)s"))
        self.logger.addHandler(handler)
        self.logger.setLevel(getattr(logging, log_level.upper()))

    def start_training_session(self, context: PluginContext) -> None:
        self.logger.info(f"Session started - epochs: {context.extra.get('epochs', 'unknown')}")

    def end_training_batch(self, context: PluginContext) -> None:
        if context.training_batch_count % 10 == 0:
            loss = context.training_loss_total / context.training_batch_count
            self.logger.info(
                f"Epoch {context.epoch} batch {context.training_batch_count} loss {loss:.6f}"
            )

    def end_epoch(self, context: PluginContext) -> None:
        train_loss = (
            context.training_loss_total / context.training_batch_count
            if context.training_batch_count > 0
            else 0
        )
        val_loss = (
            context.validation_loss_total / context.validation_batch_count
            if context.validation_batch_count > 0
            else 0
        )
        self.logger.info(
            f"Epoch {context.epoch} train_loss {train_loss:.6f} val_loss {val_loss:.6f}"
        )

    def end_training_session(self, context: PluginContext) -> None:
        self.logger.info("Session completed")

    @staticmethod
    def load_config(config_data: dict) -> Dict[str, Any]:
        return {
            "log_file": config_data.get("log_file", "training.log"),
            "log_level": config_data.get("log_level", "INFO"),
            "enabled": config_data.get("enabled", True),
        }

    @staticmethod
    def create(config_data: dict, training_config) -> Optional["FileLossLogger"]:
        config = FileLossLogger.load_config(config_data)
        if not config.get("enabled", True):
            return None
        return FileLossLogger(log_file=config["log_file"], log_level=config["log_level"])
'''

PYPROJECT = """
[project]
name = "old-style-plugins"
version = "0.1.0"
dependencies = ["bz-cli"]

[project.entry-points."bz.plugins"]
hello_plugin = "hello_plugin:HelloPlugin"
file_loss_logger = "file_logger_plugin:FileLossLogger"

[tool.setuptools]
py-modules = ["hello_plugin", "file_logger_plugin"]
"""

# 320 samples in batches of 16 (20 per epoch) and 32 (10): equal batches, so the mean
# of the batch losses (the original's formula) is also the epoch's sample-weighted loss,
# which bz's own run_log records: the two files must agree.
TRAIN_PY = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(320, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = TensorDataset(inputs, targets)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        train_loader=DataLoader(data, batch_size=16, shuffle=True),
        val_loader=DataLoader(data, batch_size=32),
    )
"""

CONFIG = {
    "epochs": 6,
    "device": "cpu",
    "plugins": [
        "console_out",
        {"hello_plugin": {"enabled": True, "greeting": "Hi from 0.x"}},
        {"file_loss_logger": {"enabled": True, "log_file": "losses.log"}},
        "run_log",
    ],
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two plugins packaged as the original's docstrings say, installed with pip."""
    root = tmp_path_factory.mktemp("old-style")
    package = root / "old-style-plugins"
    package.mkdir()
    (package / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    (package / "hello_plugin.py").write_text(textwrap.dedent(HELLO_PLUGIN), encoding="utf-8")
    logger_source = textwrap.dedent(FILE_LOGGER_PLUGIN)
    (package / "file_logger_plugin.py").write_text(logger_source, encoding="utf-8")
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run(
        [*pip, "--target", str(target), str(package)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return target


def _env(site: Path) -> dict[str, str]:
    env = bz_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return env


def _project(folder: Path) -> Path:
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    (folder / "bzconfig.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    return folder


@pytest.mark.slow
def test_original_style_plugins_log_the_real_losses_and_reach_the_console(
    site: Path, tmp_path: Path
) -> None:
    project = _project(tmp_path / "console")
    trained = run_bz(project, "train", env=_env(site))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "QUARANTINED" not in trained.stderr

    # The minimal plugin's lines, on the console beside bz's own.
    for line in ("Hi from 0.x!", "Training will run for 6 epochs", "Epoch 0 completed"):
        assert line in trained.stderr, trained.stderr[-3000:]
    assert "Epoch 5 completed" in trained.stderr
    assert "Training completed" in trained.stderr
    assert "Epoch 1 completed" not in trained.stderr

    # The file logger's file: the run's own losses, as bz's run_log recorded them.
    written = (project / "losses.log").read_text(encoding="utf-8").splitlines()
    assert written[0] == "INFO - Session started - epochs: 6"
    assert written[-1] == "INFO - Session completed"
    pattern = re.compile(r"INFO - Epoch (\d) train_loss (\S+) val_loss (\S+)")
    epochs = [match.groups() for line in written if (match := pattern.fullmatch(line))]
    (run_dir,) = (project / "runs").iterdir()
    records = [json.loads(line) for line in (run_dir / "run_log.jsonl").open(encoding="utf-8")]
    reference = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == len(reference) == 6
    for (epoch, train_loss, val_loss), record in zip(epochs, reference, strict=True):
        assert int(epoch) == record["epoch"]
        assert float(train_loss) == pytest.approx(record["training_loss"], abs=2e-6)
        assert float(val_loss) == pytest.approx(record["validation_loss"], abs=2e-6)
    batches = [line for line in written if " batch " in line]
    assert len(batches) == 12  # batches 10 and 20 of each epoch
    assert all(0.0 < float(line.rsplit(" ", 1)[1]) < 1.0 for line in batches), batches
    # Its lines reached the console too.
    assert "Epoch 5 train_loss" in trained.stderr


@pytest.mark.slow
def test_original_style_plugins_under_json_logging(site: Path, tmp_path: Path) -> None:
    project = _project(tmp_path / "json")
    trained = run_bz(project, "train", "--log-format", "json", env=_env(site))
    assert trained.returncode == 0, trained.stderr[-3000:]
    lines = trained.stdout.splitlines()
    events = json_events(trained.stdout)
    assert len(events) == len(lines), "every stdout line is a JSON event"
    hello = [e["event"] for e in events if e.get("plugin") == "hello_plugin"]
    assert hello == [
        "Hi from 0.x!",
        "Training will run for 6 epochs",
        "Epoch 0 completed",
        "Epoch 5 completed",
        "Training completed",
    ]
    logged = [e for e in events if e.get("plugin") == "file_loss_logger"]
    assert {e["logger"] for e in logged} == {"file_logger_plugin"}
    assert len([e for e in logged if "train_loss" in e["event"]]) == 6

    # --log-level warning hides their INFO records, as it hides bz's.
    quiet = run_bz(
        project, "train", "--no-resume", "--log-format", "json", "--log-level", "warning",
        env=_env(site),
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert [e for e in json_events(quiet.stdout) if "plugin" in e and e["level"] == "info"] == []


@pytest.mark.slow
def test_the_minimal_plugins_own_demo_runs(site: Path) -> None:
    demo = subprocess.run(
        [sys.executable, str(site / "hello_plugin.py")],
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.strip() == "Created plugin: HelloPlugin (Demo)"
