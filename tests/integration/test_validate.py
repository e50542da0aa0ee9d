"""``bz validate`` and the loop's validation are one pass: the same loss, bit for bit.

The project is ``bz init``'s: 300 validation samples in batches of 256 and 44, so a
mean of batch means would differ from the per-sample mean the run logs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from tests._support import json_events

from bz.commands import cli
from bz.commands._project_template import train as template
from bz.config import RunConfig
from bz.training.checkpoint.files import read_checkpoint

TEMPLATE = Path(__file__).resolve().parents[2] / "src" / "bz" / "commands" / "_project_template"


def _train_then_validate(
    project: Callable[..., Path], **config: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last ``epoch_finished`` event of ``bz train`` and ``bz validate``'s report."""
    train_py = (TEMPLATE / "train.py").read_text(encoding="utf-8")
    settings = {"epochs": 1, "seed": 0, "metrics": ["accuracy"], **config}
    project(settings, train_py=train_py)
    runner = CliRunner()
    trained = runner.invoke(cli, ["train", "--log-format", "json"])
    assert trained.exit_code == 0, trained.output
    logged = [e for e in json_events(trained.stdout) if e["event"] == "epoch_finished"][-1]
    shown = runner.invoke(cli, ["validate", "--json"])
    assert shown.exit_code == 0, shown.output
    report: dict[str, Any] = json.loads(shown.stdout)
    return logged, report


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_validate_reports_the_validation_loss_the_run_logged(
    project: Callable[..., Path], precision: str
) -> None:
    logged, report = _train_then_validate(project, precision=precision)
    assert report["batches"] == 2, "300 samples in batches of 256 and 44"
    assert report["validation_loss"] == logged["validation_loss"]
    assert report["metrics"] == logged["validation_metrics"]


def test_a_smaller_last_batch_weighs_by_its_samples(project: Callable[..., Path]) -> None:
    _, report = _train_then_validate(project)
    setup = template.setup(RunConfig(seed=0))
    weights = read_checkpoint(Path(report["checkpoint"]), model_only=True)["model"]
    setup.model.load_state_dict(weights)
    setup.model.eval()
    assert setup.val_loader is not None
    assert setup.loss_fn is not None
    total, count, means = 0.0, 0, []
    with torch.no_grad():
        for inputs, targets in setup.val_loader:
            loss = float(setup.loss_fn(setup.model(inputs), targets))
            total += loss * len(targets)
            count += len(targets)
            means.append(loss)
    assert count == 300
    by_sample = total / count
    assert report["validation_loss"] == pytest.approx(by_sample, rel=1e-6)
    assert sum(means) / len(means) != pytest.approx(by_sample, rel=1e-3), "batch means differ"


@pytest.mark.slow  # trains the bz init project three epochs and validates it eight times
@pytest.mark.parametrize("apply_at_end", [False, True], ids=["trained-weights", "apply-at-end"])
def test_validate_evaluates_the_ema_average_the_run_validated_with(
    project: Callable[..., Path], apply_at_end: bool
) -> None:
    ema = {"decay": 0.9, "validate_with_ema": True, "apply_at_end": apply_at_end}
    train_py = (TEMPLATE / "train.py").read_text(encoding="utf-8")
    settings = {
        "epochs": 3,
        "seed": 0,
        "metrics": ["accuracy"],
        "plugins": [{"ema": ema}],
        "keep_best": {"monitor": "validation_loss"},
        "hyperparameters": {"lr": 0.3},
    }
    folder = project(settings, train_py=train_py)
    runner = CliRunner()
    trained = runner.invoke(cli, ["train", "--log-format", "json"])
    assert trained.exit_code == 0, trained.output
    logged = [e for e in json_events(trained.stdout) if e["event"] == "epoch_finished"]
    losses = [e["validation_loss"] for e in logged]

    def validate(*args: str) -> dict[str, Any]:
        shown = runner.invoke(cli, ["validate", "--json", *args])
        assert shown.exit_code == 0, shown.output
        report: dict[str, Any] = json.loads(shown.stdout)
        assert report["weights"] == "ema"
        return report

    # The finished run (model.pt), the checkpoint keep_best ranks first, and each epoch's.
    assert validate()["validation_loss"] == losses[-1]
    assert validate()["metrics"] == logged[-1]["validation_metrics"]
    best = validate("--best")
    assert best["validation_loss"] == min(losses)
    assert best["epoch"] == 1 + losses.index(min(losses))
    for epoch, loss in enumerate(losses, start=1):
        (path,) = folder.glob(f".bz/checkpoints/*/epoch-{epoch:04d}.pt")
        assert validate("--checkpoint", str(path))["validation_loss"] == loss
