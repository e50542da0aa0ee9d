"""``checkpoint_interval: 0`` as the README and docs/checkpoints.md write it.

README's table: "`0`: none"; docs/training.md: with `checkpoint_every_steps` (or
`_seconds`) the run's last checkpoint is still written. And what the checkpoints page
now writes down: a run that writes no checkpoint at all writes nothing into the folder,
so with `--no-resume` ("`resume": false`) an earlier run's checkpoints and `model.pt`
stay (they are replaced only by the new run's first checkpoint), and are what `bz
validate` and a later resume find. In process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tests._support import tiny_setup

import bz


def _fit(folder: Path, **changes: Any) -> bz.FitResult:
    config = bz.RunConfig(epochs=2, device="cpu", plugins=[], **changes)
    return bz.Trainer().fit(tiny_setup(), config, [], checkpoint_dir=folder)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.pt")}


def test_zero_writes_no_checkpoint_and_no_model(tmp_path: Path) -> None:
    result = _fit(tmp_path, checkpoint_interval=0)
    assert result.checkpoint is None
    assert result.model is None
    assert _files(tmp_path) == {}


def test_zero_with_step_checkpoints_still_writes_the_last_and_model_pt(tmp_path: Path) -> None:
    result = _fit(tmp_path, checkpoint_interval=0, checkpoint_every_steps=3)
    assert result.checkpoint is not None
    assert result.checkpoint.name == "epoch-0002.pt"
    assert result.model is not None
    names = {Path(name).name for name in _files(tmp_path)}
    assert {"epoch-0000-batch-00003.pt", "epoch-0002.pt", "model.pt"} <= names
    assert "epoch-0001.pt" not in names


def test_a_run_over_without_checkpoints_leaves_the_earlier_runs_files(tmp_path: Path) -> None:
    first = _fit(tmp_path)
    assert first.model is not None
    before = _files(tmp_path)
    weights = torch.load(first.model, weights_only=True)["model"]
    again = _fit(tmp_path, checkpoint_interval=0, resume=False)
    assert again.model is None
    assert _files(tmp_path) == before  # untouched: the earlier run's model.pt is still there
    after = torch.load(first.model, weights_only=True)["model"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)
