"""A failure in the validation ``bz train`` runs (each epoch, or every
``validate_every_steps``) names the epoch, the step and the validation batch, as
``bz validate`` names the batch: one line, exit 1, the user's own file and line.

The validation data is 64 samples in batches of 16 (batch indices 0 to 3); training has
4 steps per epoch, so the second epoch's validation runs at step 8.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tests._support import TINY_TRAIN_PY, json_events

import bz
from bz.commands import cli

_TRAIN_PY = (
    TINY_TRAIN_PY.replace(
        "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))",
        "model = Model()",
    )
    .replace(
        "val_loader=DataLoader(data, batch_size=32)",
        "val_loader=DataLoader(Items(data), batch_size=16)",
    )
    .replace(
        "import bz\n",
        "import bz\n\n"
        "FAIL = os.environ.get('FAIL', '')  # where: load, forward\n"
        "EPOCH = int(os.environ.get('FAIL_EPOCH', '-1'))  # the validation pass, from 0\n"
        "BATCH = int(os.environ.get('FAIL_BATCH', '-1'))\n"
        "passes = -1\n\n\n"
        "class Items(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):\n"
        "    def __init__(self, data: TensorDataset) -> None:\n"
        "        self.data = data\n\n"
        "    def __len__(self) -> int:\n"
        "        return len(self.data)\n\n"
        "    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:\n"
        "        global passes\n"
        "        passes += index == 0\n"
        "        if FAIL == 'load' and passes == EPOCH and index // 16 == BATCH:\n"
        "            raise IndexError(f'item {index} is unreadable')\n"
        "        return self.data[index]\n\n\n"
        "class Model(nn.Linear):\n"
        "    def __init__(self) -> None:\n"
        "        super().__init__(4, 2)\n"
        "        self.batch = 0\n\n"
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "        batch, self.batch = self.batch, (self.batch + 1 if not self.training else 0)\n"
        "        failing = FAIL == 'forward' and passes == EPOCH and batch == BATCH\n"
        "        if failing and not self.training:\n"
        "            raise ValueError('bad batch')\n"
        "        return super().forward(x)\n",
    )
    .replace("import torch\n", "import os\n\nimport torch\n", 1)
)


def _line_of(text: str) -> int:
    return _TRAIN_PY.splitlines().index(text) + 1


_WHERE = {
    "load": (
        _line_of("            raise IndexError(f'item {index} is unreadable')"),
        "IndexError: item {item} is unreadable",
    ),
    "forward": (_line_of("            raise ValueError('bad batch')"), "ValueError: bad batch"),
}


def _train(
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    fail: str,
    epoch: int,
    batch: int,
    **config: object,
) -> tuple[Path, Result]:
    folder = project({"epochs": 2, **config}, train_py=_TRAIN_PY)
    monkeypatch.setenv("FAIL", fail)
    monkeypatch.setenv("FAIL_EPOCH", str(epoch))
    monkeypatch.setenv("FAIL_BATCH", str(batch))
    return folder, CliRunner().invoke(cli, ["train", "--log-format", "json"])


@pytest.mark.parametrize(
    ("fail", "epoch", "batch"),
    [("load", 0, 0), ("load", 1, 3), ("forward", 0, 2), ("forward", 1, 0)],
)
def test_a_failure_in_the_epochs_validation_names_its_epoch_step_and_batch(
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    fail: str,
    epoch: int,
    batch: int,
) -> None:
    # Loading comes before the batch's hooks and forward: the failure is still that
    # batch's, not the one before it.
    folder, result = _train(project, monkeypatch, fail, epoch, batch)
    assert result.exit_code == 1, result.output
    line, message = _WHERE[fail]
    error = message.format(item=batch * 16)
    expected = (
        f"validation failed at epoch {epoch + 1}, step {4 * (epoch + 1)}, batch index "
        f"{batch} of val_loader: {folder / 'train.py'}:{line}: {error}"
    )
    assert result.stderr == f"bz: error: {expected}\n"
    (exit_event,) = [e for e in json_events(result.stdout) if e["event"] == "exit"]
    assert (exit_event["exit_code"], exit_event["error"]) == (1, expected)


def test_a_failure_in_a_validation_inside_the_epoch_names_its_step_and_batch(
    project: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # validate_every_steps: 2 validates after steps 2 and 4 (the epoch's end); the
    # second pass is the one that fails.
    folder, result = _train(project, monkeypatch, "forward", 1, 2, validate_every_steps=2)
    assert result.exit_code == 1, result.output
    line, _ = _WHERE["forward"]
    assert result.stderr == (
        "bz: error: validation failed at epoch 1, step 4, batch index 2 of val_loader: "
        f"{folder / 'train.py'}:{line}: ValueError: bad batch\n"
    )


def test_a_failure_in_a_training_step_still_names_training(
    project: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A training batch's failure says nothing of validation, even after a validation ran.
    train_py = _TRAIN_PY.replace(
        "        batch, self.batch =",
        "        if self.training and FAIL == 'train' and passes == EPOCH:\n"
        "            raise ValueError('bad training batch')\n"
        "        batch, self.batch =",
    )
    folder = project({"epochs": 2}, train_py=train_py)
    monkeypatch.setenv("FAIL", "train")
    monkeypatch.setenv("FAIL_EPOCH", "0")
    result = CliRunner().invoke(cli, ["train", "--log-format", "json"])
    assert result.exit_code == 1, result.output
    line = train_py.splitlines().index("            raise ValueError('bad training batch')") + 1
    assert result.stderr == (
        "bz: error: training failed at epoch 2, step 4: "
        f"{folder / 'train.py'}:{line}: ValueError: bad training batch\n"
    )


def test_the_note_on_the_exception_names_the_batch_for_fit_callers(
    project: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `except ValueError` around Trainer.fit still catches it; the notes say where.
    folder = project({"epochs": 2}, train_py=_TRAIN_PY)
    monkeypatch.setenv("FAIL", "forward")
    monkeypatch.setenv("FAIL_EPOCH", "0")
    monkeypatch.setenv("FAIL_BATCH", "3")
    spec = importlib.util.spec_from_file_location("_failing_train", folder / "train.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = bz.RunConfig(epochs=1, device="cpu")
    with pytest.raises(ValueError, match="bad batch") as caught:
        bz.Trainer().fit(module.setup(config), config, checkpoint_dir=folder / "ck")
    assert caught.value.__notes__ == [
        "bz: validation failed at batch index 3 of val_loader",
        "bz: training failed at epoch 1, step 4 (in the training loop)",
    ]
    assert json.dumps(caught.value.__notes__)  # plain text
