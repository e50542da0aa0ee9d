"""Helpers for the integration-plugin tests: a tiny deterministic setup and project."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz
from bz.config import RunConfig, structure

TRAIN_PY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import bz


    def setup(config: bz.RunConfig) -> bz.TrainingSetup:
        hp = config.hyperparameters
        generator = torch.Generator().manual_seed(1)
        inputs = torch.randn(64, 4, generator=generator)
        targets = (inputs.sum(dim=1) > 0).long()
        hidden = int(hp.get("hidden", 8))
        model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        data = TensorDataset(inputs, targets)
        return bz.TrainingSetup(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=float(hp.get("lr", 0.1))),
            train_loader=DataLoader(data, batch_size=16),
            val_loader=DataLoader(data, batch_size=32),
        )
    """
)


def tiny_setup(*, seed: int = 0, validation: bool = True, lr: float = 0.1) -> bz.TrainingSetup:
    """A small classifier on 64 random points, 4 batches of 16 per epoch."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = TensorDataset(inputs, targets)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        train_loader=DataLoader(data, batch_size=16),
        val_loader=DataLoader(data, batch_size=32) if validation else None,
    )


def run_config(**values: Any) -> RunConfig:
    """A CPU run with accuracy as a metric and no plugins unless given."""
    data: dict[str, Any] = {"epochs": 3, "device": "cpu", "metrics": ["accuracy"], "plugins": []}
    data.update(values)
    return structure(data, RunConfig)


def write_project(folder: Path, config: dict[str, Any]) -> Path:
    """``train.py`` and ``bzconfig.json`` in ``folder``; returns the config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    data: dict[str, Any] = {"epochs": 2, "device": "cpu", "plugins": []}
    data.update(config)
    path = folder / "bzconfig.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON-lines file, parsed strictly (NaN and Infinity are errors)."""

    def reject(constant: str) -> Any:
        raise ValueError(f"non-standard JSON constant {constant}")

    return [
        json.loads(line, parse_constant=reject)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def fails_in_second_epoch() -> bz.TrainingSetup:
    """:func:`tiny_setup` whose loss raises after the first epoch (4 + 2 batches)."""
    setup = tiny_setup()
    calls = 0

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 6:
            raise RuntimeError("boom")
        return torch.nn.functional.cross_entropy(outputs, targets)

    return attrs.evolve(setup, loss_fn=loss_fn)
