"""torchdata's ``StatefulDataLoader`` under ``bz train --nproc-per-node 2``.

Each process's share of the data is the user's loader class rebuilt around a
``DistributedSampler``: still a ``StatefulDataLoader``, whose ``state_dict()`` every
checkpoint keeps for every rank and whose ``load_state_dict()`` puts it back on resume,
as in one process. A run killed in the middle of its second epoch and resumed reads no
sample it had trained already and ends with exactly the weights of a run never killed.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tests._support import bz_env, json_events, run_bz
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import bz
from bz._distributed import Topology, shard_loader

TRAIN_PY = '''
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import bz

SAMPLES = 96


class Recorded(Dataset):
    """Appends each index it reads to reads-<rank>; with kill-armed present, the
    process of rank 1 kills itself at its 81st read (the first batch of step 11)."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.inputs = torch.randn(SAMPLES, 4, generator=generator)
        self.targets = (self.inputs.sum(dim=1) > 0).long()
        self.reads = 0

    def __len__(self):
        return SAMPLES

    def __getitem__(self, index):
        rank = os.environ.get("RANK", "0")
        self.reads += 1
        armed = Path("kill-armed")
        if rank == "1" and self.reads == 81 and armed.exists():
            armed.unlink()
            os.kill(os.getpid(), 9)
        with open(f"reads-{rank}", "a", encoding="utf-8") as record:
            record.write(f"{index}\\n")
        return self.inputs[index], self.targets[index]


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    data = Recorded()
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=StatefulDataLoader(data, batch_size=8, shuffle=True),
        val_loader=DataLoader(TensorDataset(data.inputs, data.targets), batch_size=16),
    )
'''

CONFIG = {"epochs": 2, "device": "cpu", "seed": 5, "plugins": [], "checkpoint_every_steps": 4}
"""Six steps an epoch on each process: checkpoints at steps 4, 6 (the epoch's end), 8."""


def test_a_stateful_data_loader_stays_one_with_its_settings() -> None:
    data = TensorDataset(torch.arange(20.0))
    loader: StatefulDataLoader[Any] = StatefulDataLoader(
        data, batch_size=4, shuffle=True, snapshot_every_n_steps=3
    )
    shards = [shard_loader(loader, Topology(r, 2, r), seed=5, training=True) for r in (0, 1)]
    for shard in shards:
        assert type(shard) is StatefulDataLoader
        assert isinstance(shard.sampler, DistributedSampler)
        assert (shard.batch_size, shard.snapshot_every_n_steps) == (4, 3)
    # Its state resumes it: a batch in, a copy given the state goes on from there.
    shard = shards[1]
    assert isinstance(shard, StatefulDataLoader)
    batches = iter(shard)
    next(batches)
    state = shard.state_dict()
    rest = [batch[0].tolist() for batch in batches]
    again = shard_loader(loader, Topology(1, 2, 1), seed=5, training=True)
    assert isinstance(again, StatefulDataLoader)
    again.load_state_dict(state)
    assert [batch[0].tolist() for batch in again] == rest


def test_a_subclass_argument_that_cannot_be_read_back_is_refused() -> None:
    class Renamed(StatefulDataLoader[Any]):
        def __init__(self, dataset: Any, every: int = 1, **settings: Any) -> None:
            super().__init__(dataset, **settings)
            self.kept = every

    assert "every" in inspect.signature(Renamed.__init__).parameters
    loader = Renamed(TensorDataset(torch.arange(8.0)), every=2, batch_size=2)
    with pytest.raises(bz.UsageError, match="its argument 'every' is not kept"):
        shard_loader(loader, Topology(0, 2, 0), seed=0, training=True)


def _project(folder: Path) -> dict[str, str]:
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    (folder / "bzconfig.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    return bz_env()


def _train(folder: Path, env: dict[str, str]) -> tuple[int, str]:
    done = run_bz(folder, "train", "--nproc-per-node", "2", "--log-format", "json", env=env)
    return done.returncode, done.stdout + done.stderr


def _reads(folder: Path, rank: int) -> list[int]:
    return [int(line) for line in (folder / f"reads-{rank}").read_text().split()]


def _final(folder: Path) -> dict[str, torch.Tensor]:
    (run_dir,) = (folder / ".bz" / "checkpoints").iterdir()
    payload = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model: dict[str, torch.Tensor] = payload["model"]
    return model


@pytest.mark.slow
def test_killed_in_its_second_epoch_it_resumes_without_reading_again(tmp_path: Path) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    env = _project(clean)
    code, output = _train(clean, env)
    assert code == 0, output[-3000:]

    _project(killed)
    (killed / "kill-armed").write_text("", encoding="utf-8")
    code, output = _train(killed, env)
    assert code != 0, "rank 1 killed itself"
    assert not (killed / "kill-armed").exists()
    (run_dir,) = (killed / ".bz" / "checkpoints").iterdir()
    newest = run_dir / "epoch-0001-batch-00002.pt"  # step 8: two batches into epoch 2
    payload = torch.load(newest, map_location="cpu", weights_only=True)
    # Every rank's StatefulDataLoader state, each its own.
    assert len(payload["loaders"]) == 2
    assert all(state["_num_yielded"] == 2 for state in payload["loaders"])
    for rank in (0, 1):
        os.replace(killed / f"reads-{rank}", killed / f"reads-{rank}-killed")

    code, output = _train(killed, env)
    assert code == 0, output[-3000:]
    (resumed,) = [e for e in json_events(output) if e["event"] == "resumed"]
    assert (resumed["epoch"], resumed["batch"]) == (2, 2)
    for rank in (0, 1):
        # From step 9 on, each process read exactly what the clean run read there:
        # nothing trained before the checkpoint was read again.
        assert _reads(killed, rank) == _reads(clean, rank)[8 * 8 :], rank
    final, reference = _final(killed), _final(clean)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in reference)
