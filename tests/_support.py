"""Helpers shared by the tests: a tiny deterministic setup, weight comparison, and
starting ``bz`` as a user does (its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import torch
from _pytest.mark import ParameterSet
from torch import nn

import bz


def linear_train_py(samples: int) -> str:
    """A train.py training ``nn.Linear(3, 2)`` on ``samples`` seeded samples, batches of 8
    (no validation): the smallest real run, for tests about what happens around it."""
    return textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        import bz


        def setup(config: bz.RunConfig) -> bz.TrainingSetup:
            inputs = torch.randn({samples}, 3, generator=torch.Generator().manual_seed(0))
            model = nn.Linear(3, 2)
            data = TensorDataset(inputs, (inputs[:, 0] > 0).long())
            return bz.TrainingSetup(
                model=model,
                loss_fn=nn.CrossEntropyLoss(),
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                train_loader=DataLoader(data, batch_size=8),
            )
        """
    )


TINY_TRAIN_PY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import bz


    def setup(config: bz.RunConfig) -> bz.TrainingSetup:
        generator = torch.Generator().manual_seed(1)
        inputs = torch.randn(64, 4, generator=generator)
        targets = (inputs.sum(dim=1) > 0).long()
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        data = TensorDataset(inputs, targets)
        return bz.TrainingSetup(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_loader=DataLoader(data, batch_size=16, shuffle=True),
            val_loader=DataLoader(data, batch_size=32),
        )
    """
)


def tiny_setup(seed: int = 0, *, validation: bool = True, batches: int = 4) -> bz.TrainingSetup:
    """A two-layer classifier on 16 * ``batches`` random points; same seed, same setup."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(16 * batches, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    train = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, len(inputs), 16)]
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=train,
        val_loader=train[:2] if validation else None,
    )


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor in the model's state."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    """Bit-identical: same keys, same dtypes, equal tensors."""
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), f"{key} differs"


TRAINING_DIED = 1
"""What ``bz train`` exits with when its training process died without finishing (a
test's SIGKILL in the middle of training): the supervising process reports it."""


Events = list[MutableMapping[str, Any]]
"""What the ``events`` fixture yields: structlog's captured event dicts."""


def bz_env() -> dict[str, str]:
    """The test's environment less ``BZ_CONFIG`` (which would pick another config): what
    a ``bz`` started by a test sees."""
    return {key: value for key, value in os.environ.items() if key != "BZ_CONFIG"}


def run_bz(
    folder: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``python -m bz ARGS`` in ``folder``, in its own process, output captured. Without
    ``env``: :func:`bz_env`."""
    if env is None:
        env = bz_env()
    return subprocess.run(
        [sys.executable, "-m", "bz", *args],
        cwd=folder,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def json_events(stdout: str) -> list[dict[str, Any]]:
    """The events of a ``--log-format json`` stdout (one JSON object per line)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def quick_first(*cases: Any) -> list[Any]:
    """A parametrize list whose first case runs in ``make quick`` and the rest are marked
    slow (``make check`` runs them all): for matrices of similar cases costing a training
    run each, the quick loop keeps one witness per test."""
    first, *rest = cases
    return [first, *(_slow(case) for case in rest)]


def _slow(case: Any) -> Any:
    if isinstance(case, ParameterSet):
        return pytest.param(*case.values, marks=[*case.marks, pytest.mark.slow], id=case.id)
    return pytest.param(case, marks=pytest.mark.slow)
