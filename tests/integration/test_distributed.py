"""Several processes on torch.distributed (gloo on CPU), started the way users start them."""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs
from tests._support import json_events, run_bz
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bz
from bz._distributed import Topology, choose_backend, shard_loader, topology_from_env

# -- units -----------------------------------------------------------------------------


def test_topology_comes_from_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert topology_from_env() == Topology(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert topology_from_env() == Topology(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(bz.UsageError, match="invalid RANK=4 / WORLD_SIZE=4"):
        topology_from_env()


def test_backend_follows_the_device() -> None:
    assert choose_backend("auto", torch.device("cpu")) == "gloo"
    assert choose_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert choose_backend("gloo", torch.device("cuda", 0)) == "gloo"


def test_a_data_loader_gets_a_distributed_sampler_that_keeps_its_settings() -> None:
    data = TensorDataset(torch.arange(20.0))
    loader = DataLoader(data, batch_size=4, shuffle=True, drop_last=True)
    shards = [
        shard_loader(loader, Topology(rank, 2, rank), seed=5, training=True) for rank in (0, 1)
    ]
    for shard in shards:
        assert isinstance(shard, DataLoader)
        assert isinstance(shard.sampler, DistributedSampler)
        assert shard.batch_size == 4
        assert shard.drop_last
    seen = [torch.cat([b[0] for b in shard]).tolist() for shard in shards]
    assert not set(seen[0]) & set(seen[1]), "ranks see disjoint samples"
    assert sorted(seen[0] + seen[1]) == sorted(set(seen[0] + seen[1]))


def test_a_list_of_batches_is_dealt_out_evenly() -> None:
    batches = list(range(7))
    shards = [list(shard_loader(batches, Topology(r, 3, r), 0, training=True)) for r in range(3)]
    assert shards == [[0, 3], [1, 4], [2, 5]]


@pytest.mark.parametrize("training", [True, False])
def test_batches_a_list_leaves_out_are_said_once_by_the_first_process(training: bool) -> None:
    # 7 batches over 3 processes: batch 6 is trained (or validated) by no one.
    with capture_logs() as events:
        for rank in range(3):
            shard_loader(list(range(7)), Topology(rank, 3, rank), 0, training=training)
        shard_loader(list(range(6)), Topology(0, 3, 0), 0, training=training)
    left_out = [e for e in events if e["event"] == "batches_left_out"]
    assert [(e["loader"], e["left_out"], e["batches"]) for e in left_out] == [
        ("train_loader" if training else "val_loader", 1, 7)
    ]


def test_alone_nothing_changes() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(4)), batch_size=2)
    assert shard_loader(loader, Topology(), 0, training=True) is loader


def test_distributed_settings_are_validated() -> None:
    with pytest.raises(bz.ConfigError, match='did you mean "gloo"'):
        bz.config.structure({"distributed": {"backend": "glo"}}, bz.RunConfig)


# -- two processes -----------------------------------------------------------------------

TRAIN_PY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import bz


    def setup(config: bz.RunConfig) -> bz.TrainingSetup:
        generator = torch.Generator().manual_seed(1)
        inputs = torch.randn(96, 4, generator=generator)
        targets = (inputs.sum(dim=1) > 0).long()
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        batch = config.hyperparameters["batch_size"]
        data = TensorDataset(inputs, targets)
        return bz.TrainingSetup(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_loader=DataLoader(data, batch_size=batch, shuffle=False),
            val_loader=DataLoader(data, batch_size=batch),
        )
    """
)

PROBES = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path


    class RankZeroProbe:
        name = "rank_zero_probe"

        def end_training_session(self, context):
            Path(f"rank_zero_probe-{context.rank}").write_text(str(context.world_size))


    class EveryRankProbe:
        name = "every_rank_probe"
        every_rank = True

        def end_training_session(self, context):
            Path(f"every_rank_probe-{context.rank}").write_text(str(context.world_size))


    class FailsOnRankOne:
        name = "fails_on_rank_one"
        every_rank = True

        def __init__(self):
            self.calls = 0

        def end_epoch(self, context):
            self.calls += 1
            Path(f"fails_on_rank_one-{context.rank}-{context.epoch}").write_text("")
            if context.rank == 1:
                raise RuntimeError("only rank 1 breaks")


    class StopsOnRankOne:
        name = "stops_on_rank_one"
        every_rank = True

        def end_epoch(self, context):
            if context.rank == 1:
                context.should_stop_training = True


    class StopsMidEpochOnRankOne:
        name = "stops_mid_epoch_on_rank_one"
        every_rank = True

        def end_training_batch(self, context):
            time.sleep(0.15)  # slow steps: the processes vote after every one
            if context.rank == 1 and context.global_step == 3:
                context.should_stop_training = True

        def end_training_session(self, context):
            Path(f"stopped_at-{context.rank}").write_text(str(context.global_step))


    class SlowSteps:
        name = "slow_steps"
        every_rank = True

        def end_training_batch(self, context):
            if context.rank == 0 and context.global_step == 7:
                Path("slow_steps-marker").write_text("")
            time.sleep(0.2)


    class KillsRankOne:
        name = "kills_rank_one"
        every_rank = True

        def end_epoch(self, context):
            if context.rank == 1 and context.epoch == 1:
                os.kill(os.getpid(), 9)


    class PoisonsRankOne:
        name = "poisons_rank_one"
        every_rank = True

        def after_backward(self, context):
            # After DDP's all-reduce: only rank 1's gradients (and norm) are nan.
            if context.rank == 1 and context.global_step == 6:
                next(context.model.parameters()).grad.fill_(float("nan"))
    """
)


def make_project(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """A project plus a fake distribution registering the probe plugins; its env."""
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    base = {"epochs": 2, "device": "cpu", "checkpoint_interval": 1}
    (folder / "bzconfig.json").write_text(json.dumps({**base, **config}), encoding="utf-8")
    site = folder / "site"
    site.mkdir()
    (site / "bz_probes.py").write_text(PROBES, encoding="utf-8")
    info = site / "bz_probes-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bz-probes\nVersion: 0.0.0\n")
    names = [
        "RankZeroProbe",
        "EveryRankProbe",
        "FailsOnRankOne",
        "StopsOnRankOne",
        "StopsMidEpochOnRankOne",
        "SlowSteps",
        "KillsRankOne",
        "PoisonsRankOne",
    ]
    lines = [f"{_snake(n)} = bz_probes:{n}" for n in names]
    (info / "entry_points.txt").write_text("[bz.plugins]\n" + "\n".join(lines) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env.pop("BZ_CONFIG", None)
    return env


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def launch(folder: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_bz(folder, "train", "--nproc-per-node", "2", *args, env=env)


def launch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bz", "train", "--nproc-per-node", "2", *args]


def run_alone(folder: Path) -> bz.FitResult:
    """The two-process runs' training in one process with their global batch (2 x 8)."""
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    config = bz.RunConfig(
        epochs=2,
        device="cpu",
        plugins=(),
        hyperparameters={"batch_size": 16},
        metrics=(bz.config.MetricSpec("accuracy"),),
        checkpoint_interval=0,
    )
    return bz.run(config, base_dir=folder)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path: Path) -> None:
    plugins = ["rank_zero_probe", "every_rank_probe", "fails_on_rank_one"]
    env = make_project(
        tmp_path,
        {"hyperparameters": {"batch_size": 8}, "plugins": plugins, "metrics": ["accuracy"]},
    )
    done = launch(tmp_path, env, "--log-format", "json")
    assert done.returncode == 0, done.stderr
    ddp = [e for e in json_events(done.stdout) if e["event"] == "epoch_finished"]
    assert [e["rank"] for e in ddp] == [0, 0], "only rank 0 logs at info level"

    # The same run alone, with the global batch (2 processes x 8 = 16).
    alone = run_alone(tmp_path / "single")
    for record, event in zip(alone.history, ddp, strict=True):
        assert event["training_loss"] == pytest.approx(record.training_loss, rel=1e-5)
        assert event["validation_loss"] == pytest.approx(record.validation_loss, rel=1e-5)
        assert event["validation_metrics"] == pytest.approx(record.validation_metrics)

    # Plugins run on rank 0 unless they opt in; checkpoints come from rank 0 alone.
    assert sorted(p.name for p in tmp_path.glob("rank_zero_probe-*")) == ["rank_zero_probe-0"]
    assert sorted(p.name for p in tmp_path.glob("every_rank_probe-*")) == [
        "every_rank_probe-0",
        "every_rank_probe-1",
    ]
    (folder,) = (tmp_path / ".bz" / "checkpoints").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lock",  # rank 0's, the only writer
        "epoch-0001.pt",
        "epoch-0001.pt.json",
        "epoch-0002.pt",
        "epoch-0002.pt.json",
        "model.pt",
        "model.pt.json",
    ]

    # A plugin that failed on rank 1 is quarantined on rank 0 too, from the next epoch.
    ran = sorted(p.name for p in tmp_path.glob("fails_on_rank_one-*"))
    assert ran == ["fails_on_rank_one-0-0", "fails_on_rank_one-1-0"]
    (summary,) = [e for e in json_events(done.stdout) if e["event"] == "plugin_summary"]
    assert summary["plugins"]["fails_on_rank_one"]["status"] == "quarantined"

    # Started again, the finished run has nothing to train: said once, not once per rank.
    again = launch(tmp_path, env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("nothing to train") == 1, again.stderr


@pytest.mark.slow
def test_a_stop_request_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    env = make_project(
        tmp_path,
        {"epochs": 4, "hyperparameters": {"batch_size": 8}, "plugins": ["stops_on_rank_one"]},
    )
    done = launch(tmp_path, env, "--log-format", "json")
    assert done.returncode == 0, done.stderr
    finished = [e for e in json_events(done.stdout) if e["event"] == "epoch_finished"]
    assert [e["epoch"] for e in finished] == [1]


@pytest.mark.slow
def test_a_mid_epoch_stop_request_ends_every_process_after_the_same_step(
    tmp_path: Path,
) -> None:
    env = make_project(
        tmp_path,
        {
            "epochs": 4,
            "hyperparameters": {"batch_size": 8},  # 6 steps per epoch on each process
            "plugins": ["stops_mid_epoch_on_rank_one"],
        },
    )
    done = launch(tmp_path, env, "--log-format", "json")
    assert done.returncode == 0, done.stderr
    steps = [(tmp_path / f"stopped_at-{rank}").read_text() for rank in (0, 1)]
    assert steps == ["3", "3"], "both processes stop right after the step of the request"
    (stop,) = [e for e in json_events(done.stdout) if e["event"] == "stop_requested"]
    assert stop["reason"] == "plugin"


@pytest.mark.slow
def test_accumulation_on_two_processes_matches_one_process_with_the_whole_batch(
    tmp_path: Path,
) -> None:
    # 2 processes x batches of 8 x 2 accumulated = 32 samples per optimizer step.
    env = make_project(
        tmp_path,
        {"hyperparameters": {"batch_size": 8}, "accumulate_grad_batches": 2, "plugins": []},
    )
    done = launch(tmp_path, env, "--log-format", "json")
    assert done.returncode == 0, done.stderr
    ddp = [e for e in json_events(done.stdout) if e["event"] == "epoch_finished"]
    single = tmp_path / "single"
    single.mkdir()
    (single / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    config = bz.RunConfig(
        epochs=2,
        device="cpu",
        plugins=(),
        hyperparameters={"batch_size": 32},
        checkpoint_interval=0,
    )
    alone = bz.run(config, base_dir=single)
    assert [e["step"] for e in ddp] == [3, 6]
    assert alone.global_step == 6
    for record, event in zip(alone.history, ddp, strict=True):
        assert event["training_loss"] == pytest.approx(record.training_loss, rel=1e-5)
        assert event["validation_loss"] == pytest.approx(record.validation_loss, rel=1e-5)


@pytest.mark.slow
def test_a_killed_process_ends_the_job_with_a_clear_message(tmp_path: Path) -> None:
    env = make_project(
        tmp_path,
        {"epochs": 50, "hyperparameters": {"batch_size": 8}, "plugins": ["kills_rank_one"]},
    )
    done = launch(tmp_path, env)
    assert done.returncode == 1
    assert "bz: error: process rank 1 exited with code -9 (killed by SIGKILL)" in done.stderr
    assert "Traceback" not in done.stderr.split("bz: error:")[-1]


@pytest.mark.slow
def test_check_finite_step_stops_every_process_at_the_same_batch(tmp_path: Path) -> None:
    config = {
        "epochs": 3,
        "hyperparameters": {"batch_size": 8},  # 6 steps an epoch
        "plugins": ["poisons_rank_one"],
        "check_finite": "step",
        "gradient_clip": {"max_norm": 100.0},
        "checkpoint_every_steps": 2,
    }
    done = launch(tmp_path, make_project(tmp_path, config))
    assert done.returncode == 1
    assert (
        "bz: error: the gradient norm is nan in one of the processes at step 7 "
        "(epoch 2, batch index 0): stopped before the optimizer update" in done.stderr
    )
    (run_dir,) = (tmp_path / ".bz" / "checkpoints").iterdir()
    steps = [torch.load(p, weights_only=True)["global_step"] for p in run_dir.glob("*.pt")]
    assert max(steps) == 6


def _final_model(folder: Path, epochs: int) -> dict[str, torch.Tensor]:
    (run_dir,) = (folder / ".bz" / "checkpoints").iterdir()
    payload = torch.load(run_dir / f"epoch-{epochs:04d}.pt", map_location="cpu", weights_only=True)
    model: dict[str, torch.Tensor] = payload["model"]
    return model


@pytest.mark.slow
def test_ctrl_c_stops_every_process_after_the_same_step_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    config = {
        "epochs": 3,
        "hyperparameters": {"batch_size": 8},  # 6 steps per epoch on each process
        "plugins": ["slow_steps"],
        "metrics": ["accuracy"],
    }
    clean_folder, folder = tmp_path / "clean", tmp_path / "interrupted"
    clean_folder.mkdir()
    folder.mkdir()
    clean_env, env = make_project(clean_folder, config), make_project(folder, config)
    args = ("--log-format", "json")

    # Ctrl-C in a terminal reaches the launcher, which passes SIGINT on to the processes.
    process = subprocess.Popen(
        launch_command(*args),
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        marker = folder / "slow_steps-marker"  # written after step 7, early in epoch 1
        for _ in range(2400):
            if marker.exists() or process.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), "the run never reached step 7"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("bz: ")]
    assert len(lines) == 1, "rank 0 alone says where the checkpoint is"
    assert lines[0].startswith("bz: interrupted; checkpoint ")
    interrupted = [e for e in json_events(stdout) if e["event"] == "training_interrupted"]
    assert sorted(e["rank"] for e in interrupted) == [0, 1]
    (where,) = {(e["epoch"], e["step"]) for e in interrupted}  # the same step everywhere
    assert where[0] == 2, "the second epoch, counted from 1 as the console does"
    (checkpoint,) = [Path(e["checkpoint"]) for e in interrupted if e["rank"] == 0]
    assert "-batch-" in checkpoint.name, "stopped in the middle of epoch 1"

    resumed = launch(folder, env, *args)
    assert resumed.returncode == 0, resumed.stderr
    (event,) = [e for e in json_events(resumed.stdout) if e["event"] == "resumed"]
    assert event["path"] == str(checkpoint)
    clean = launch(clean_folder, clean_env, *args)
    assert clean.returncode == 0, clean.stderr

    # The interrupted epoch reports the numbers of the whole epoch, and training ends
    # with exactly the weights of the run that was never interrupted.
    finished = {
        e["epoch"]: e for e in json_events(resumed.stdout) if e["event"] == "epoch_finished"
    }
    reference = {
        e["epoch"]: e for e in json_events(clean.stdout) if e["event"] == "epoch_finished"
    }
    assert sorted(finished) == [2, 3]
    for epoch in (2, 3):
        got, expected = finished[epoch], reference[epoch]
        assert got["training_loss"] == pytest.approx(expected["training_loss"], rel=1e-6)
        assert got["training_metrics"] == pytest.approx(expected["training_metrics"])
        assert got["validation_loss"] == expected["validation_loss"]
    final, reference_final = _final_model(folder, 3), _final_model(clean_folder, 3)
    assert all(torch.equal(final[name], reference_final[name]) for name in reference_final)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.slow
def test_two_nodes_meet_through_torchruns_rendezvous(tmp_path: Path) -> None:
    """Two torchrun agents, as on two machines, one process each (LOCAL_RANK 0 on both)."""
    env = make_project(
        tmp_path,
        {
            "hyperparameters": {"batch_size": 8},
            "plugins": ["rank_zero_probe", "every_rank_probe"],
            "metrics": ["accuracy"],
        },
    )
    endpoint = f"127.0.0.1:{_free_port()}"
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "bz"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
        "--nproc-per-node", "1", *rendezvous, "-m", "bz", "train", "--log-format", "json",
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr
    epochs = [
        [e for e in json_events(stdout) if e["event"] == "epoch_finished"] for stdout, _ in outputs
    ]
    assert sorted(len(found) for found in epochs) == [0, 2], "one node has rank 0 and logs"
    (logged,) = [found for found in epochs if found]

    # The same numbers as one process with the global batch, as on one machine.
    alone = run_alone(tmp_path / "single")
    for record, event in zip(alone.history, logged, strict=True):
        assert event["training_loss"] == pytest.approx(record.training_loss, rel=1e-5)
        assert event["validation_metrics"] == pytest.approx(record.validation_metrics)
    assert sorted(p.name for p in tmp_path.glob("rank_zero_probe-*")) == ["rank_zero_probe-0"]
    assert len(list(tmp_path.glob("every_rank_probe-*"))) == 2
    (folder,) = (tmp_path / ".bz" / "checkpoints").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lock",  # rank 0's, the only writer
        "epoch-0001.pt",
        "epoch-0001.pt.json",
        "epoch-0002.pt",
        "epoch-0002.pt.json",
        "model.pt",
        "model.pt.json",
    ]


def _init_worker(worker: int) -> None:
    torch.manual_seed(worker)


def _collate(batch: list[Any]) -> list[Any]:
    return batch


def test_a_sharded_data_loader_keeps_every_setting_it_was_built_with() -> None:
    generator = torch.Generator().manual_seed(7)
    context = multiprocessing.get_context("spawn")
    settings: dict[str, Any] = {
        "batch_size": 3,
        "drop_last": True,
        "num_workers": 2,
        "collate_fn": _collate,
        "pin_memory": True,
        "timeout": 30.0,
        "worker_init_fn": _init_worker,
        "multiprocessing_context": context,
        "generator": generator,
        "prefetch_factor": 5,
        "persistent_workers": True,
        "pin_memory_device": "cpu",
        "in_order": False,
    }
    parameters = set(inspect.signature(DataLoader.__init__).parameters)
    sampling = {"self", "dataset", "shuffle", "sampler", "batch_sampler"}
    # A DataLoader argument this test does not set would go unchecked.
    assert parameters - sampling <= set(settings)
    settings = {name: value for name, value in settings.items() if name in parameters}
    loader = DataLoader(TensorDataset(torch.arange(20.0)), shuffle=True, **settings)
    shard = shard_loader(loader, Topology(1, 2, 1), seed=5, training=True)
    assert isinstance(shard, DataLoader)
    assert isinstance(shard.sampler, DistributedSampler)
    for name, value in settings.items():
        assert getattr(shard, name) is value or getattr(shard, name) == value, name
