"""Every ``Trainer.fit`` logs ``run_started`` and ``run_finished`` with its ``outcome``.

README ("Logging and embedding"): ``run_started`` carries epochs, device, seed, plugins
and metrics; ``run_finished``'s ``outcome`` is ``completed``, ``stopped_early``,
``already_complete``, ``failed`` (with ``error``) or ``interrupted``. Each outcome is
produced here in process, the way a library user meets it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from tests._support import tiny_setup

import bz
from bz.plugins import PluginContext


def _config(**changes: Any) -> bz.RunConfig:
    return bz.RunConfig(epochs=2, device="cpu", plugins=[], metrics=["accuracy"], **changes)


def _events(
    plugins: list[Any], checkpoint_dir: Path | None = None, setup: bz.TrainingSetup | None = None
) -> list[dict[str, Any]]:
    setup = setup or tiny_setup()
    fit = bz.Trainer().fit
    with (
        structlog.testing.capture_logs() as events,
        contextlib.suppress(ValueError, KeyboardInterrupt),
    ):
        fit(setup, _config(), plugins, checkpoint_dir=checkpoint_dir)
    return [dict(e) for e in events if e["event"] in ("run_started", "run_finished")]


def test_run_started_names_the_run() -> None:
    started, _ = _events([])
    assert started["epochs"] == 2
    assert started["device"] == "cpu"
    assert started["seed"] == 0
    assert "plugins" in started
    assert "accuracy" in str(started["metrics"])


def test_completed_then_already_complete(tmp_path: Path) -> None:
    assert _events([], tmp_path)[-1]["outcome"] == "completed"
    assert _events([], tmp_path)[-1]["outcome"] == "already_complete"


def test_stopped_early() -> None:
    class Stop:
        name = "stop"

        def end_epoch(self, context: PluginContext) -> None:
            context.should_stop_training = True

    assert _events([Stop()])[-1]["outcome"] == "stopped_early"


def test_failed_names_the_error() -> None:
    setup = tiny_setup()

    def broken(inputs: torch.Tensor) -> torch.Tensor:
        raise ValueError("the model is broken")

    setup.model.forward = broken
    finished = _events([], setup=setup)[-1]
    assert finished["outcome"] == "failed"
    assert "the model is broken" in finished["error"]


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs SIGINT")
def test_interrupted() -> None:
    class CtrlC:
        name = "ctrl_c"

        def end_training_batch(self, context: PluginContext) -> None:
            if context.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    assert _events([CtrlC()])[-1]["outcome"] == "interrupted"
