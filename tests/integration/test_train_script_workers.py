"""A ``Dataset`` defined in train.py reaches DataLoader workers started by ``spawn`` or
``forkserver`` (macOS's and Windows' default, Linux's from Python 3.14): they unpickle it
by the module name bz imported train.py under, which they must be able to import too."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from tests._support import quick_first

import bz
from bz._setup import load_setup_function

TRAIN_PY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    import bz


    class Squares(Dataset[tuple[torch.Tensor, int]]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.full((2,), float(index * index)), index % 2


    def setup(config: bz.RunConfig) -> bz.TrainingSetup:
        model = nn.Linear(2, 2)
        loader = DataLoader(
            Squares(), batch_size=4, num_workers=1, multiprocessing_context="{context}"
        )
        return bz.TrainingSetup(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_loader=loader,
        )
    """
)


@pytest.mark.parametrize("context", quick_first("spawn", "forkserver"))
def test_a_dataset_of_train_py_loads_in_spawned_workers(context: str, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN_PY.format(context=context), encoding="utf-8")
    setup = load_setup_function(script)(bz.RunConfig(epochs=1, plugins=[]))
    # It failed in the worker: ModuleNotFoundError: No module named '_bz_train_script_...'.
    firsts = [inputs[:, 0].tolist() for inputs, _ in setup.train_loader]
    assert firsts == [[0.0, 1.0, 4.0, 9.0], [16.0, 25.0, 36.0, 49.0]]
    assert torch.equal(next(iter(setup.train_loader))[1], torch.tensor([0, 1, 0, 1]))
