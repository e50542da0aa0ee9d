"""The examples that train what people train: a Hugging Face classifier (mapping batches,
no loss_fn), a causal language model with a per-step warm-up, a two-input model with its
own step. Each trains here as a user would run it, on data it generates, offline.

The Hugging Face example also shows the two promises that matter most for a model that
computes its own loss: ``kill -9`` in the middle of an epoch and resuming ends with
``torch.equal`` weights, and ``bz validate`` reports the loss the run logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from click.testing import CliRunner
from tests._checkpoint_support import train_here
from tests._child import FAULT_CHILD
from tests._support import TRAINING_DIED, json_events

import bz
from bz._setup import call_setup, load_setup_function
from bz.commands import cli
from bz.config import load_config
from bz.metrics import build_metrics
from bz.plugins import PluginContext

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"


def _project(tmp_path: Path, example: str, **changes: Any) -> Path:
    """A copy of an example with ``changes`` to its bzconfig.json (``hyperparameters``
    merged) and its checkpoints inside the copy."""
    folder = tmp_path / example
    folder.mkdir(parents=True)
    shutil.copy(EXAMPLES / example / "train.py", folder / "train.py")
    config = json.loads((EXAMPLES / example / "bzconfig.json").read_text(encoding="utf-8"))
    config["hyperparameters"].update(changes.pop("hyperparameters", {}))
    config.update(changes, device="cpu", plugins=[])
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _bz(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``bz`` in ``folder``, through the fault-injecting entry of the kill tests."""
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("BZ_")}
    clean_env["PYTHONPATH"] = str(REPO_ROOT)
    child = FAULT_CHILD
    return subprocess.run(
        [sys.executable, "-c", child, *args],
        cwd=folder,
        env={**clean_env, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _events(outcome: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in outcome.stdout.splitlines() if line.startswith("{")]


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    (run,) = (folder / ".bz" / "checkpoints").iterdir()
    payload = torch.load(run / "model.pt", weights_only=True)
    return dict(payload["model"])


# Six batches of 16 sentences per epoch; a checkpoint every two optimizer steps.
HF_SMALL: dict[str, Any] = {
    "epochs": 2,
    "hyperparameters": {"sentences": 96, "batch_size": 16},
    "checkpoint_every_steps": 2,
}


def test_the_hf_classifier_resumes_bit_identical_after_kill_9_mid_epoch(tmp_path: Path) -> None:
    clean = _project(tmp_path / "clean", "hf_text_classification", **HF_SMALL)
    killed = _project(tmp_path / "killed", "hf_text_classification", **HF_SMALL)
    trained = _bz(clean, "train", "--log-format", "json")
    assert trained.returncode == 0, trained.stderr[-3000:]
    # Step 9 is the third of the second epoch, one step after the step-8 checkpoint.
    died = _bz(
        killed, "train", "--log-format", "json", BZ_TEST_SIGNAL="KILL", BZ_TEST_SIGNAL_AT_STEP="9"
    )
    assert died.returncode == TRAINING_DIED
    # The resumed run reads only what the killed process left on disk: in this process.
    code, resumed = train_here(killed)
    assert code == 0, resumed[-3000:]
    assert any(e["event"] == "resumed" for e in json_events(resumed))
    mine, reference = _final_weights(killed), _final_weights(clean)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(mine[key], value), key

    # bz validate evaluates the finished run's weights as the run's own validation did.
    logged = [e for e in _events(trained) if e["event"] == "epoch_finished"][-1]
    # (In this process: what it reads is on disk; its own process would add nothing.)
    report = CliRunner().invoke(
        cli, ["validate", "--config", str(clean / "bzconfig.json"), "--json"]
    )
    assert report.exit_code == 0, report.output[-3000:]
    validated = json.loads(report.stdout)
    assert validated["validation_loss"] == pytest.approx(logged["validation_loss"], rel=1e-6)
    assert validated["metrics"]["accuracy"] == logged["validation_metrics"]["accuracy"]


def _fit_example(
    tmp_path: Path, example: str, plugins: list[Any] | None = None, **changes: Any
) -> tuple[bz.TrainingSetup, bz.FitResult]:
    """Train an example in this process, as ``bz train`` does (seeded, then setup)."""
    folder = _project(tmp_path, example, **changes)
    config = attrs.evolve(load_config(folder / "bzconfig.json"), checkpoint_interval=0)
    bz.seed_everything(config.seed or 0)
    setup = call_setup(load_setup_function(folder / "train.py"), config)
    result = bz.Trainer().fit(setup, config, plugins or [], metrics=build_metrics(config.metrics))
    return setup, result


class Rates:
    """The learning rate and the gradient norm each optimizer step sees."""

    name = "rates"

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.clipped: list[bool] = []

    def before_optimizer_step(self, context: PluginContext) -> None:
        assert context.optimizer is not None
        self.rates.append(context.optimizer.param_groups[0]["lr"])
        self.clipped.append(context.gradient_norm is not None)


class _Records(logging.Handler):
    """Every record a logger passes on."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_causal_lm_warms_up_per_optimizer_step_under_accumulation(tmp_path: Path) -> None:
    # 96 sequences in batches of 8: 12 batches, 3 optimizer steps an epoch (groups of 4).
    rates = Rates()
    # transformers warns through its own logger (which does not propagate to the root).
    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            setup, result = _fit_example(
                tmp_path,
                "causal_lm",
                [rates],
                epochs=3,
                hyperparameters={"sequences": 96, "warmup_steps": 3, "lr": 0.003},
            )
    finally:
        logging.getLogger("transformers").removeHandler(records)
    # A model built right warns about nothing (bos/eos ids inside the vocabulary, ...).
    assert records.messages == []
    assert [str(w.message) for w in caught] == []
    assert result.global_step == 9
    assert setup.scheduler.last_epoch == 9
    warmup = [0.001, 0.002, 0.003]
    decay = [0.003 * (9 - step) / 6 for step in range(3, 9)]
    assert rates.rates == pytest.approx(warmup + decay)
    assert all(rates.clipped)  # gradient_clip.max_norm from the example's bzconfig.json
    first, last = result.history[0], result.history[-1]
    assert last.validation_loss is not None
    assert first.validation_loss is not None
    assert last.validation_loss < first.validation_loss


def test_the_two_input_model_trains_with_its_own_step(tmp_path: Path) -> None:
    _, result = _fit_example(tmp_path, "two_inputs", epochs=3)
    assert result.global_step == 3 * 32
    assert result.history[-1].validation_metrics["accuracy"] > 0.8


def test_the_hf_classifier_learns_in_process(tmp_path: Path) -> None:
    _, result = _fit_example(tmp_path, "hf_text_classification", epochs=3)
    first, last = result.history[0], result.history[-1]
    assert last.training_loss < first.training_loss
    assert last.validation_metrics["accuracy"] > 0.75


def test_smoke_runs_the_step_in_training_and_validation(tmp_path: Path) -> None:
    folder = _project(tmp_path, "two_inputs")
    outcome = _bz(folder, "train", "--smoke", "--log-format", "json")
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    (finished,) = [e for e in _events(outcome) if e["event"] == "epoch_finished"]
    assert finished["step"] == 1
    assert finished["validation_metrics"]["accuracy"] >= 0.0
