"""Resuming FSDP runs where state other than the model's shards is involved.

A model with nested blocks of one class (at two depths), buffers, a frozen layer and a
scheduler, trained by two processes with ``early_stopping`` keeping its best weights:
those weights are sharded (``DTensor``s) on every process, and a checkpoint must hold
them whole, or a resumed run restores rank 0's shard on every process. Also: a
single-file checkpoint (one process, DDP) resumed by two FSDP processes; ``ema``'s
sharded average; tied weights; and the processes of a launcher killed with SIGKILL
stopping instead of training on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tests._support import bz_env, json_events, run_bz

from bz.training.checkpoint.sharded import load_model_shards

pytestmark = pytest.mark.slow

TRAIN = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import bz


    class Block(nn.Module):
        def __init__(self, width, inner):
            super().__init__()
            self.lin = nn.Linear(width, width)
            self.inner = Block(width, False) if inner else None
            self.register_buffer("scale", torch.full((width,), 0.5))

        def forward(self, x):
            x = torch.relu(self.lin(x)) * self.scale
            return self.inner(x) if self.inner is not None else x


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.frozen = nn.Linear(16, 16)
            self.frozen.requires_grad_(False)
            self.blocks = nn.Sequential(Block(16, True), Block(16, True))
            self.head = nn.Linear(16, 8)
            self.norm = nn.BatchNorm1d(16)

        def forward(self, x):
            return self.head(self.blocks(self.norm(self.frozen(self.embed(x)))))


    def setup(config):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 8, generator=g)
        y = (x @ torch.randn(8, 8, generator=g)).argmax(1)
        torch.manual_seed(0)
        model = Net()
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trained, lr=0.5, momentum=0.9)
        return bz.TrainingSetup(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=opt,
            train_loader=DataLoader(TensorDataset(x[:192], y[:192]), batch_size=16, shuffle=True),
            val_loader=DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64),
            scheduler=torch.optim.lr_scheduler.StepLR(opt, 2, 0.5),
        )
    """
)

CONFIG: dict[str, Any] = {
    "epochs": 4,
    "device": "cpu",
    "seed": 0,
    "keep_last": 10,
    "plugins": [{"early_stopping": {"monitor": "validation_loss", "patience": 100}}],
    "distributed": {"strategy": "fsdp", "fsdp": {"shard_modules": ["Block"]}},
}


def project(folder: Path, **changes: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(TRAIN, encoding="utf-8")
    (folder / "bzconfig.json").write_text(json.dumps({**CONFIG, **changes}), encoding="utf-8")
    return folder


def train(folder: Path, *args: str, processes: int = 2) -> list[dict[str, Any]]:
    launcher = ["--nproc-per-node", str(processes)] if processes > 1 else []
    done = run_bz(folder, "train", *launcher, "--log-format", "json", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return json_events(done.stdout)


def run_dir(folder: Path) -> Path:
    (found,) = (folder / ".bz" / "checkpoints").iterdir()
    return found


def net(folder: Path) -> torch.nn.Module:
    scope: dict[str, Any] = {}
    exec(compile(TRAIN, str(folder / "train.py"), "exec"), scope)  # the project's own class
    model: torch.nn.Module = scope["Net"]()
    return model


def test_best_weights_kept_by_early_stopping_survive_a_sharded_resume(tmp_path: Path) -> None:
    folder = project(tmp_path / "run")
    train(folder)  # epochs 1-4
    events = train(folder, "--epochs", "6")  # resumes after epoch 4
    assert [e for e in events if e["event"] == "resumed"]
    (restored,) = [e for e in events if e["event"] == "early_stopping_restored" and e["rank"] == 0]
    best = restored["epoch"]
    assert best <= 4, "the best weights must come from before the resume for this test"
    # model.pt (whole, for plain torch.load) holds exactly the best epoch's weights.
    final = net(folder)
    final.load_state_dict(
        torch.load(run_dir(folder) / "model.pt", weights_only=True)["model"], strict=True
    )
    expected = net(folder)
    load_model_shards(run_dir(folder) / f"epoch-{best:04d}.dcp", expected)
    # Buffers too (batch norm's running statistics): every process holds rank 0's, so
    # the checkpoint's copy (DCP keeps one process's) is the one model.pt has.
    whole = final.state_dict()
    for key, value in expected.state_dict().items():
        assert torch.equal(whole[key], value), f"{key} is not the best epoch's"


def test_ema_shards_resume_exactly(tmp_path: Path) -> None:
    # Under FSDP each process averages its own shards; checkpoints hold the average
    # whole and a resumed run shards it again. model.pt holds the average.
    ema = {"ema": {"decay": 0.9, "validate_with_ema": True, "apply_at_end": True}}
    whole = project(tmp_path / "whole", plugins=[ema])
    train(whole)
    split = project(tmp_path / "split", plugins=[ema], epochs=2)
    train(split)
    events = train(split, "--epochs", "4")
    assert [e for e in events if e["event"] == "resumed"]
    assert not [e for e in events if e["event"] == "plugin_failed"]

    def final(folder: Path) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = torch.load(
            run_dir(folder) / "model.pt", weights_only=True
        )["model"]
        return state

    resumed, reference = final(split), final(whole)
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), f"{key} differs after the resume"
    trained = net(whole)
    load_model_shards(run_dir(whole) / "epoch-0004.dcp", trained)
    assert not torch.equal(trained.state_dict()["head.weight"], reference["head.weight"])


def test_a_single_file_checkpoint_resumes_on_two_fsdp_processes(tmp_path: Path) -> None:
    folder = project(tmp_path / "run", epochs=2)
    train(folder, "--set", "distributed.strategy=ddp", processes=1)
    events = train(folder, "--epochs", "3")
    (resumed,) = [e for e in events if e["event"] == "resumed" and e["rank"] == 0]
    assert Path(resumed["path"]).name == "epoch-0002.pt"
    assert sorted(e["epoch"] for e in events if e["event"] == "epoch_finished") == [3]
    assert not [e for e in events if e["event"] == "plugin_failed"]


TIED = textwrap.dedent(
    """
    import torch
    from torch import nn

    import bz


    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(12, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 12, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.head(torch.relu(self.mid(self.embed(x))))


    def setup(config):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 12, (128,), generator=g)
        batches = [(x[i : i + 16], (x[i : i + 16] + 1) % 12) for i in range(0, 128, 16)]
        torch.manual_seed(0)
        model = Tied()
        return bz.TrainingSetup(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
            train_loader=batches,
            val_loader=batches[:2],
        )
    """
)


def test_tied_weights_are_sharded_by_the_root_and_stay_tied(tmp_path: Path) -> None:
    # Each direct child is a unit by default; the embedding and the output layer share
    # a weight, which fully_shard refuses to put in two units.
    folder = project(tmp_path / "run", epochs=1, plugins=[], distributed={"strategy": "fsdp"})
    (folder / "train.py").write_text(TIED, encoding="utf-8")
    train(folder)
    events = train(folder, "--epochs", "2")  # a sharded checkpoint of a tied model loads
    assert [e for e in events if e["event"] == "resumed"]
    weights = torch.load(run_dir(folder) / "model.pt", weights_only=True)["model"]
    assert torch.equal(weights["embed.weight"], weights["head.weight"])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_processes_stop_when_the_launcher_is_killed_with_sigkill(tmp_path: Path) -> None:
    # kill -9 on `bz train --nproc-per-node 2` (or a scheduler killing the launcher)
    # must not leave its processes training on, holding the run's lock.
    folder = project(tmp_path / "run", epochs=100000, plugins=[])
    env = bz_env()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "bz", "train", "--nproc-per-node", "2"],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        for _ in range(1200):  # until the first checkpoint: both processes train
            if list(folder.glob(".bz/checkpoints/*/epoch-0001.dcp.json")):
                break
            assert launcher.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.1)
        workers = children(launcher.pid)
        assert len(workers) == 2, workers
        launcher.kill()
        launcher.wait()
        for _ in range(1200):
            if not any(alive(pid) for pid in workers):
                break
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers), "orphaned processes train on"
    finally:
        launcher.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, 9)
