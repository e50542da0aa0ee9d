"""Time to the first new step when resuming in the middle of a long epoch.

An epoch of ``--batches`` batches (100,000) from a map-style dataset whose
``__getitem__`` costs 1 ms (a sleep: the disk or decoding a real dataset waits on), a
shuffled ``DataLoader`` of batch size 1, a tiny model. Mid-epoch checkpoints are made at
10% and at 90% of the epoch (a one-step checkpoint rewritten as if further in: training
90,000 steps to get there would take longer than all that is measured), then each is
resumed twice, timed from ``Trainer.fit`` to the first ``start_training_batch``:

* ``replay``: the loader is put in place by reading the batches already trained and
  dropping them (what bz did before it repositioned loaders, and still does for an
  iterable dataset without state);
* ``reposition``: bz's repositioning at the sampler (nothing fetched).

``fresh`` is the same from the start of an epoch, for scale. The replays run once (they
are the slow part); the repositioning resumes and the fresh start ``--rounds`` times each
(median), since one resume takes a fraction of a second and a busy machine moves it by
as much. The load average is printed with the results. Run::

    .venv/bin/python benchmarks/resume.py                  # about 2 minutes of replay
    .venv/bin/python benchmarks/resume.py --batches 20000  # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import bz
from bz.training import position
from bz.training.checkpoint.files import FINAL_MODEL, checkpoint_name, read_checkpoint
from bz.training.checkpoint.store import CheckpointStore

if TYPE_CHECKING:
    from bz.plugins import PluginContext

COST = {"seconds": 0.0}
"""What one ``__getitem__`` waits (set to 1 ms for the timed resumes)."""


class SlowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``length`` samples, each costing ``COST["seconds"]`` to read."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if COST["seconds"]:
            time.sleep(COST["seconds"])
        return torch.full((4,), float(index % 7)), torch.zeros(1)


class FirstStep:
    """Records when the first training batch starts (and nothing else)."""

    name = "first_step"

    def __init__(self) -> None:
        self.at: float | None = None

    def start_training_batch(self, context: PluginContext) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def _setup(batches: int) -> bz.TrainingSetup:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_loader=DataLoader(SlowDataset(batches), batch_size=1, shuffle=True),
    )


def _fit(folder: Path, batches: int, max_steps: int, plugins: list[Any]) -> None:
    config = bz.RunConfig(epochs=1, device="cpu", seed=1, max_steps=max_steps, plugins=())
    bz.Trainer().fit(_setup(batches), config, plugins, checkpoint_dir=folder)


def _checkpoint_at(folder: Path, batches: int, step: int) -> Path:
    """A folder whose newest checkpoint is ``step`` batches into the first epoch.

    Training ``step`` steps to get there would take longer than everything measured, so
    one step is trained and its checkpoint rewritten, by bz's own store, as if it stood
    ``step`` batches in (its random states are those after the first step: a resume
    from it is as costly as from a real one)."""
    _fit(folder, batches, 1, [])
    (run,) = folder.iterdir()
    first = run / checkpoint_name(0, 1)
    payload = read_checkpoint(first)
    payload["batch"] = payload["global_step"] = step
    store = CheckpointStore(run)
    store.save(payload, 0, step)
    store.delete(first)
    (run / FINAL_MODEL).unlink()
    (run / f"{FINAL_MODEL}.json").unlink()
    return folder


def _time_resume(template: Path, batches: int, step: int, *, replay: bool) -> float:
    folder = Path(tempfile.mkdtemp(prefix="bz-resume-"))
    shutil.rmtree(folder)
    shutil.copytree(template, folder)
    original = position._map_style
    if replay:  # as before repositioning: the loader is read up to where it was
        position._map_style = lambda loader: False  # the benchmark's switch
    COST["seconds"] = 0.001
    first = FirstStep()
    try:
        started = time.perf_counter()
        _fit(folder, batches, step + 1, [first])
    finally:
        COST["seconds"] = 0.0
        position._map_style = original
        shutil.rmtree(folder, ignore_errors=True)
    assert first.at is not None
    return first.at - started


def main() -> None:
    """Make the two checkpoints, time the resumes, print one line each and the verdict."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    batches, rounds = args.batches, args.rounds
    root = Path(tempfile.mkdtemp(prefix="bz-resume-bench-"))
    try:
        points = {"10%": batches // 10, "90%": batches * 9 // 10}
        templates = {
            label: _checkpoint_at(root / label, batches, step) for label, step in points.items()
        }
        (root / "empty").mkdir()
        fresh = statistics.median(
            _time_resume(root / "empty", batches, 0, replay=False) for _ in range(rounds)
        )
        print(f"fresh epoch (for scale)        {fresh:8.3f} s")
        now = {}
        for label, step in points.items():
            today = _time_resume(templates[label], batches, step, replay=True)
            now[label] = statistics.median(
                _time_resume(templates[label], batches, step, replay=False) for _ in range(rounds)
            )
            print(
                f"resume at {label} ({step} batches): replay {today:8.3f} s, "
                f"reposition {now[label]:6.3f} s"
            )
        ratio = max(now.values()) / min(now.values())
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        print(f"load average {load}; reposition medians of {rounds}")
        print(f"reposition: {now['10%']:.3f} s at 10%, {now['90%']:.3f} s at 90% ({ratio:.2f}x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
