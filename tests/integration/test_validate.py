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
from tests._support import TINY_TRAIN_PY, json_events

from bz.commands import cli
from bz.commands._project_template import train as template
from bz.config import RunConfig
from bz.training.checkpoint.files import FINAL_MODEL, read_checkpoint
from bz.training.checkpoint.sidecars import sidecar

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


# -- a damaged model.pt ------------------------------------------------------------------------


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _run_folder(folder: Path) -> Path:
    (run,) = (folder / ".bz" / "checkpoints").iterdir()
    return run


@pytest.mark.parametrize("epochs", [2, 4], ids=["finished", "epochs-raised-since"])
def test_a_damaged_model_pt_is_refused_never_replaced_by_a_checkpoint(
    project: Callable[..., Path], epochs: int
) -> None:
    # With early stopping's restore_best_weights the newest checkpoint holds other weights
    # than model.pt: evaluating it under the final weights' name would report a number
    # the run never ended with. Raising `epochs` since made the run look unfinished,
    # and bz validate used to pass over the damaged file to the newest checkpoint.
    folder = project({"epochs": 2})
    runner = CliRunner()
    assert runner.invoke(cli, ["train"]).exit_code == 0
    run = _run_folder(folder)
    final, newest = run / FINAL_MODEL, run / "epoch-0002.pt"
    _damage(final)
    project({"epochs": epochs})
    refused = runner.invoke(cli, ["validate"])
    assert refused.exit_code == 2, refused.output
    assert refused.stdout == ""
    assert refused.stderr == (
        f"bz: error: {final}: the run's final weights are damaged (its checksum does not "
        "match what bz wrote (damaged or replaced)); bz validate evaluates no other weights "
        "in their place: run `bz train` to write them again, or evaluate the newest "
        f"checkpoint with --checkpoint {newest}\n"
    )
    chosen = runner.invoke(cli, ["validate", "--json", "--checkpoint", str(newest)])
    assert chosen.exit_code == 0, chosen.output
    assert json.loads(chosen.stdout)["checkpoint"] == str(newest)


def test_a_damaged_model_pt_older_than_the_newest_checkpoint_is_passed_over(
    project: Callable[..., Path],
) -> None:
    # Its sidecar says it was written before the run trained on: it is not the weights
    # the run ended with either way, as an intact one of that age would not be.
    folder = project({"epochs": 1})
    runner = CliRunner()
    assert runner.invoke(cli, ["train"]).exit_code == 0
    run = _run_folder(folder)
    final = run / FINAL_MODEL
    old = {path: path.read_bytes() for path in (final, sidecar(final))}
    project({"epochs": 2})
    assert runner.invoke(cli, ["train"]).exit_code == 0
    for path, data in old.items():
        path.write_bytes(data)
    _damage(final)
    project({"epochs": 3})
    shown = runner.invoke(cli, ["validate", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["checkpoint"] == str(run / "epoch-0002.pt")


# -- an exception in the user's code -----------------------------------------------------------


_RAISES_IN_VALIDATION = (
    TINY_TRAIN_PY.replace(
        "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))",
        "model = Model()",
    )
    .replace(
        "import bz\n",
        "import bz\n\n\n"
        "class Model(nn.Linear):\n"
        "    def __init__(self) -> None:\n"
        "        super().__init__(4, 2)\n"
        "        self.batches = 0\n\n"
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "        batch = self.batches\n"
        "        self.batches += 0 if self.training else 1\n"
        "        if not self.training and os.environ.get('FAIL_IN_VALIDATION') == str(batch):\n"
        "            RAISE\n"
        "        return super().forward(x)\n",
    )
    .replace("import torch\n", "import os\n\nimport torch\n", 1)
)


@pytest.mark.parametrize(
    ("statement", "shown"),
    [("raise ValueError('bad batch')", "ValueError: bad batch"), ("sys.exit(0)", "SystemExit: 0")],
)
def test_an_exception_in_the_users_code_fails_validate_in_one_line_naming_its_line(
    project: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, statement: str, shown: str
) -> None:
    train_py = _RAISES_IN_VALIDATION.replace("RAISE", statement).replace(
        "import os\n", "import os\nimport sys\n", 1
    )
    line_number = train_py.splitlines().index(f"            {statement}") + 1
    folder = project({"epochs": 1}, train_py=train_py)
    runner = CliRunner()
    assert runner.invoke(cli, ["train"]).exit_code == 0
    monkeypatch.setenv("FAIL_IN_VALIDATION", "1")  # the second batch (of two)
    failed = runner.invoke(cli, ["validate"])
    assert failed.exit_code == 1, failed.output  # sys.exit(0) used to make it exit 0
    assert failed.stderr == (
        "bz: error: validation failed at batch index 1 of val_loader: "
        f"{folder / 'train.py'}:{line_number}: {shown}\n"
    )
    assert "Traceback" in runner.invoke(cli, ["validate", "--traceback"]).stderr


_LOADER_RAISES = (
    TINY_TRAIN_PY.replace(
        "data = TensorDataset(inputs, targets)",
        "data = TensorDataset(inputs, targets)\n"
        "    val_data = Items(data) if os.environ.get('FAIL_AT_ITEM') else data",
    )
    .replace(
        "val_loader=DataLoader(data, batch_size=32)",
        "val_loader=DataLoader(val_data, batch_size=16)",
    )
    .replace(
        "import bz\n",
        "import bz\n\n\n"
        "class Items(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):\n"
        "    def __init__(self, data: TensorDataset) -> None:\n"
        "        self.data = data\n\n"
        "    def __len__(self) -> int:\n"
        "        return len(self.data)\n\n"
        "    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:\n"
        "        if index == int(os.environ['FAIL_AT_ITEM']):\n"
        "            raise IndexError(f'item {index} is unreadable')\n"
        "        return self.data[index]\n",
    )
    .replace("import torch\n", "import os\n\nimport torch\n", 1)
)


@pytest.mark.parametrize(("item", "batch"), [(0, 0), (35, 2), (63, 3)])
def test_an_exception_loading_a_validation_batch_names_that_batch(
    project: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, item: int, batch: int
) -> None:
    # Loading comes before the batch's hooks and forward: the failure is still that
    # batch's, not the one before it.
    folder = project({"epochs": 1}, train_py=_LOADER_RAISES)
    runner = CliRunner()
    assert runner.invoke(cli, ["train"]).exit_code == 0
    monkeypatch.setenv("FAIL_AT_ITEM", str(item))
    failed = runner.invoke(cli, ["validate"])
    assert failed.exit_code == 1, failed.output
    line_number = _LOADER_RAISES.splitlines().index(
        "            raise IndexError(f'item {index} is unreadable')"
    )
    assert failed.stderr == (
        f"bz: error: validation failed at batch index {batch} of val_loader: "
        f"{folder / 'train.py'}:{line_number + 1}: IndexError: item {item} is unreadable\n"
    )


def test_an_exception_in_setup_names_setup_not_a_batch(
    project: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    statement = "raise RuntimeError('no data here')"
    train_py = TINY_TRAIN_PY.replace(
        "    generator = ",
        f"    if os.environ.get('FAIL_IN_SETUP'):\n        {statement}\n    generator = ",
    ).replace("import torch\n", "import os\n\nimport torch\n", 1)
    line_number = train_py.splitlines().index(f"        {statement}") + 1
    folder = project({"epochs": 1}, train_py=train_py)
    runner = CliRunner()
    assert runner.invoke(cli, ["train"]).exit_code == 0
    monkeypatch.setenv("FAIL_IN_SETUP", "1")
    failed = runner.invoke(cli, ["validate"])
    assert failed.exit_code == 1, failed.output
    script = folder / "train.py"
    assert failed.stderr == (
        f"bz: error: {script}: setup failed: {script}:{line_number}: RuntimeError: no data here\n"
    )


def test_a_folder_that_is_no_sharded_checkpoint_is_refused_in_one_line(
    project: Callable[..., Path],
) -> None:
    folder = project({"epochs": 1})
    runner = CliRunner()
    assert runner.invoke(cli, ["train"]).exit_code == 0
    failed = runner.invoke(cli, ["validate", "--checkpoint", str(folder)])
    assert failed.exit_code == 2, failed.output
    assert failed.stderr == (
        f"bz: error: {folder}: a folder that holds no sharded checkpoint (no state.pt in it); "
        "pass a checkpoint file, model.pt, or a sharded checkpoint's .dcp folder\n"
    )  # not the FileNotFoundError of state.pt, nor a warning that it is unverified
