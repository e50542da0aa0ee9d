"""A plugin that misbehaves on cue in a process of its own (``"isolation": "process"``).

``iso`` does what its ``act`` option says in its ``hook`` at epoch ``at_epoch`` (counted
from 1), and records what it saw in ``<record>`` (a JSON file, written at every hook):
the hooks it was called in, the ``extra`` entries other plugins set, its state. ``reader``
is an in-process plugin that records what ``context.extra["iso"]`` holds at ``end_epoch``;
``meet_a`` and ``meet_b`` can only be created at the same time. All are installed
through entry points by :func:`install_isolation_distribution`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from bz.plugins import PluginContext

ISO_DISTRIBUTION = "bz-isolation-plugins"

TRAIN_PY = """\
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    generator = torch.Generator().manual_seed(1)
    batches = int(config.hyperparameters.get("batches", 4))
    inputs = torch.randn(8 * batches, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = TensorDataset(inputs, targets)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=DataLoader(data, batch_size=8, shuffle=True),
        val_loader=DataLoader(data, batch_size=16),
    )
"""
"""A ``train.py`` with ``hyperparameters.batches`` training batches per epoch."""


@attrs.frozen
class IsoConfig:
    """Options of ``iso``."""

    record: str
    act: str = "none"
    hook: str = "end_epoch"
    at_epoch: int = 1
    stop_at_epoch: int | None = None
    sleep: float = 0.0
    step_interval: int | None = None
    block_until: str | None = None
    """Its first end_training_batch waits until this file exists (``reader`` writes it)."""


def _exit_soon() -> None:
    time.sleep(0.2)
    os._exit(0)


def _act(act: str) -> None:
    if act == "raise":
        raise ValueError("injected fault")
    if act == "segfault":
        ctypes.string_at(0)
    elif act == "exit":
        os._exit(0)
    elif act == "hang":
        time.sleep(3600)
    elif act == "close_stdio":
        sys.stdout.close()
        sys.stderr.close()
        os.close(1)
        os.close(2)
    elif act == "signals":
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: os._exit(0))
    elif act == "thread":
        threading.Thread(target=_exit_soon, daemon=True).start()
        time.sleep(1.0)


class IsoPlugin:
    """Records what it sees; misbehaves once, on cue."""

    Config = IsoConfig

    def __init__(self, config: IsoConfig) -> None:
        self.name = "iso"
        self.config = config
        self.calls = 0
        self.seen: dict[str, Any] = {"hooks": [], "losses": [], "extra": [], "loaded": None}
        if config.step_interval is not None:
            self.gradient_norm_every = config.step_interval

    def _record(self, hook: str, context: PluginContext) -> None:
        self.calls += 1
        self.seen["hooks"].append([hook, context.epoch + 1, context.global_step])
        Path(self.config.record).write_text(json.dumps(self.seen), encoding="utf-8")
        if hook == self.config.hook and context.epoch + 1 == self.config.at_epoch:
            _act(self.config.act)

    def start_training_session(self, context: PluginContext) -> None:
        self._record("start_training_session", context)

    def end_training_batch(self, context: PluginContext) -> None:
        if self.config.sleep:
            time.sleep(self.config.sleep)
        release = self.config.block_until
        while release is not None and not Path(release).exists():
            time.sleep(0.01)
        loss = context.last_loss
        if loss is not None:
            self.seen["losses"].append([context.global_step, float(loss)])
        self._record("end_training_batch", context)

    def end_training_loop(self, context: PluginContext) -> None:
        context.extra["iso"] = {"epoch": context.epoch + 1, "loss": context.training_loss}
        self._record("end_training_loop", context)

    def end_epoch(self, context: PluginContext) -> None:
        self.seen["extra"].append(context.extra.get("run_dir"))
        if self.config.stop_at_epoch == context.epoch + 1:
            context.should_stop_training = True
        self._record("end_epoch", context)

    def end_training_session(self, context: PluginContext) -> None:
        self._record("end_training_session", context)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seen["loaded"] = dict(state)


@attrs.frozen
class ReaderConfig:
    """Options of ``reader``."""

    record: str
    release: str | None = None
    """A file it writes at ``end_training_loop`` (``iso``'s ``block_until``)."""


class ReaderPlugin:
    """In process: what ``context.extra["iso"]`` holds at each ``end_epoch``."""

    Config = ReaderConfig

    def __init__(self, config: ReaderConfig) -> None:
        self.name = "reader"
        self.config = config
        self.seen: list[Any] = []

    def end_training_loop(self, context: PluginContext) -> None:
        if self.config.release is not None:
            Path(self.config.release).write_text("go", encoding="utf-8")

    def end_epoch(self, context: PluginContext) -> None:
        self.seen.append(context.extra.get("iso"))
        Path(self.config.record).write_text(json.dumps(self.seen), encoding="utf-8")


@attrs.frozen
class MeetConfig:
    """Options of ``meet_a`` and ``meet_b``."""

    folder: str
    """Where each writes the file that says it is being created, and reads the other's."""
    sleep: float = 0.0
    """Seconds its creation takes before that (as a slow import would)."""


class MeetA:
    """Created only once ``meet_b`` is being created too (each waits for the other's
    file, 60 s at most): two process plugins started one after the other never are."""

    Config = MeetConfig
    name = "meet_a"
    other = "meet_b"

    def __init__(self, config: MeetConfig) -> None:
        self.config = config
        time.sleep(config.sleep)
        folder = Path(config.folder)
        (folder / f"{self.name}-creating").write_text("", encoding="utf-8")
        deadline = time.monotonic() + 60.0
        while not (folder / f"{self.other}-creating").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.other} was not being created at the same time")
            time.sleep(0.01)

    def end_epoch(self, context: PluginContext) -> None:
        path = Path(self.config.folder) / f"{self.name}-epochs"
        path.write_text(str(context.epoch + 1), encoding="utf-8")


class MeetB(MeetA):
    """``meet_a``'s partner."""

    name = "meet_b"
    other = "meet_a"


def install_isolation_distribution(folder: Path) -> Path:
    """A ``*.dist-info`` registering ``iso`` and ``reader`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "bz_isolation_plugins-0.0.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {ISO_DISTRIBUTION}\nVersion: 0.0.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[bz.plugins]\n"
        "iso = tests._isolation_support:IsoPlugin\n"
        "reader = tests._isolation_support:ReaderPlugin\n"
        "meet_a = tests._isolation_support:MeetA\n"
        "meet_b = tests._isolation_support:MeetB\n",
        encoding="utf-8",
    )
    return folder
