"""bz's loop in two processes (DDP on gloo) against a hand-written DDP loop, same run.

::

    .venv/bin/python benchmarks/distributed.py              # 2 processes, 11 rounds
    .venv/bin/python benchmarks/distributed.py --repeats 21
    .venv/bin/python benchmarks/distributed.py --checkpoints  # DDP / FSDP, sync / async

``--checkpoints`` compares, each in a fresh pair of processes, DDP and FSDP with
synchronous and background (``checkpoint_async``) checkpoints on a larger MLP (5.3 M
parameters, Adam): time per step, how long training waits per checkpoint (the time
spent in the checkpoint call, including waiting for the previous background write),
peak resident memory per rank, and the parameter + optimizer-state bytes each rank holds.

Run without torchrun, it starts itself under ``torch.distributed.run --standalone`` with
two processes. Each process times, in alternating rounds on the same process group:

- a hand-written loop: DDP-wrapped tiny MLP, ``zero_grad(set_to_none=True)``, forward,
  loss, backward, step, over this process's half of the batches;
- ``bz.Trainer().fit`` on the same model, data and seed (no plugins, no metrics), which
  adds bz's distributed work: the sharded loader, global loss sums at the end of each
  epoch, and the interrupt votes that let Ctrl-C stop every process after the same step;
- the vote alone (``vote_across``), many times.

Wall time per round (both processes train together), median of the rounds; rank 0
prints the table. Timings on a 2-core machine include both processes competing for the
cores, as they do in real use there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bz
from bz._distributed import vote_across
from bz.training.interrupts import InterruptVote

BATCHES = 200  # per epoch, over both processes
EPOCHS = 2
BATCH_SIZE = 32
Batch = tuple[torch.Tensor, torch.Tensor]


def make_batches() -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH_SIZE, 32, generator=generator), torch.randint(0, 10, (BATCH_SIZE,)))
        for _ in range(BATCHES)
    ]


def make_setup(batches: list[Batch]) -> bz.TrainingSetup:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return bz.TrainingSetup(
        model=model, loss_fn=nn.CrossEntropyLoss(), optimizer=optimizer, train_loader=batches
    )


def hand_written(batches: list[Batch]) -> None:
    setup = make_setup(batches)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = batches[rank::world]  # what bz deals this process
    model = DistributedDataParallel(setup.model)
    loss_fn, optimizer = setup.loss_fn, setup.optimizer
    assert loss_fn is not None
    for _ in range(EPOCHS):
        for inputs, targets in mine:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            torch.autograd.backward(loss)
            optimizer.step()


def with_bz(batches: list[Batch]) -> None:
    config = bz.RunConfig(epochs=EPOCHS, device="cpu", seed=None, plugins=())
    bz.Trainer().fit(make_setup(batches), config, metrics={})


def timed(run: Callable[[list[Batch]], None], batches: list[Batch]) -> float:
    dist.barrier()
    started = time.perf_counter()
    run(batches)
    dist.barrier()
    return time.perf_counter() - started


def vote_seconds(count: int) -> float:
    dist.barrier()
    started = time.perf_counter()
    for _ in range(count):
        vote_across((False,), 0.0, None)
    return (time.perf_counter() - started) / count


def worker(repeats: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    batches = make_batches()
    variants: dict[str, Callable[[list[Batch]], None]] = {
        "hand-written DDP": hand_written,
        "bz, no plugins": with_bz,
    }
    for run in variants.values():  # warm-up
        timed(run, batches)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(timed(run, batches))
    vote = statistics.median(vote_seconds(500) for _ in range(5))
    if dist.get_rank() == 0:
        report(times, vote, dist.get_world_size())
    dist.destroy_process_group()


def report(times: dict[str, list[float]], vote: float, world: int) -> None:
    steps = EPOCHS * BATCHES // world  # per process
    base = statistics.median(times["hand-written DDP"])
    print(f"# bz in {world} processes (gloo), tiny MLP 32 → 64 → 10, batch {BATCH_SIZE}")
    print(f"torch {torch.__version__}, {os.cpu_count()} logical CPUs, 1 torch thread each")
    print(f"{steps} steps per process per round, median of {len(times[next(iter(times))])}")
    print()
    print("| variant | run (median) | vs hand-written | per step | overhead per step |")
    print("|---|---:|---:|---:|---:|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(
            f"| {name} | {median * 1e3:.1f} ms | {median / base:.3f}× | "
            f"{median / steps * 1e6:.1f} µs | {(median - base) / steps * 1e6:+.1f} µs |"
        )
    print()
    interval = InterruptVote.INTERVAL_S  # seconds of training between votes
    print(f"interrupt vote (one all_reduce of two numbers on the CPU group): {vote * 1e6:.1f} µs")
    print(f"at one vote per {interval} s of training: {vote / interval:.2%} of the time")


# -- strategies and checkpoints ---------------------------------------------------------

VARIANTS = {
    "ddp, sync checkpoints": ("ddp", False),
    "ddp, async checkpoints": ("ddp", True),
    "fsdp, sync checkpoints": ("fsdp", False),
    "fsdp, async checkpoints": ("fsdp", True),
}
BIG_STEPS = 60  # per process
CHECKPOINT_EVERY = 10


def big_setup() -> bz.TrainingSetup:
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(BATCH_SIZE, 512, generator=generator), torch.randint(0, 10, (BATCH_SIZE,)))
        for _ in range(2 * BIG_STEPS)
    ]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return bz.TrainingSetup(
        model=model, loss_fn=nn.CrossEntropyLoss(), optimizer=optimizer, train_loader=batches
    )


def held_bytes(setup: bz.TrainingSetup) -> int:
    """Parameter and optimizer-state bytes this process holds (its shards under FSDP)."""
    from bz.training.fsdp import local_parameter_bytes

    total = local_parameter_bytes(setup.model)
    for state in setup.optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def strategy_worker(variant: str) -> None:
    from bz.training.checkpoint.policy import CheckpointPolicy

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # joined here, so that fit leaves it for the report
    strategy, background = VARIANTS[variant]
    waits: list[float] = []
    save = CheckpointPolicy.save

    def timed_save(
        self: CheckpointPolicy, epoch: int, batch: int, *, stopped: bool = False
    ) -> None:
        started = time.perf_counter()
        save(self, epoch, batch, stopped=stopped)
        waits.append(time.perf_counter() - started)

    CheckpointPolicy.save = timed_save  # type: ignore[method-assign]  # measuring it
    config = bz.RunConfig(
        epochs=1,
        device="cpu",
        seed=0,
        plugins=(),
        distributed={"strategy": strategy},
        checkpoint_every_steps=CHECKPOINT_EVERY,
        checkpoint_async=background,
        keep_last=2,
    )
    setup = big_setup()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        bz.Trainer().fit(setup, config, metrics={}, checkpoint_dir=Path(folder))
        seconds = time.perf_counter() - started
        held = held_bytes(setup)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    row = {"seconds": seconds, "waits": waits, "rss": rss, "held": held}
    rows: list[dict[str, object]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print("BZ-ROW " + json.dumps(rows))
    dist.destroy_process_group()


def strategies() -> None:
    print(
        "# DDP and FSDP, sync and async checkpoints: 2 processes (gloo), "
        f"torch {torch.__version__}"
    )
    print(
        f"MLP 512 → 2048 → 2048 → 10 (5.3 M parameters), Adam, batch {BATCH_SIZE}; "
        f"{BIG_STEPS} steps per process, a checkpoint every {CHECKPOINT_EVERY} and at the end"
    )
    print()
    print(
        "| variant | per step | waits per checkpoint | peak RSS per rank "
        "| params + Adam state per rank |"
    )
    print("|---|---:|---:|---:|---:|")
    for variant in VARIANTS:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", __file__, "--worker", "--variant", variant,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("BZ-ROW ")]
        if done.returncode != 0 or not lines:
            print(f"| {variant} | failed: {done.stderr.strip().splitlines()[-1:]} | | | |")
            continue
        rows = json.loads(lines[0].removeprefix("BZ-ROW "))
        seconds = max(row["seconds"] for row in rows)
        waits = [wait for row in rows for wait in row["waits"]]
        rss = "/".join(f"{row['rss'] / 2**20:.0f}" for row in rows)
        held = "/".join(f"{row['held'] / 2**20:.1f}" for row in rows)
        print(
            f"| {variant} | {seconds / BIG_STEPS * 1e3:.1f} ms | "
            f"{statistics.median(waits) * 1e3:.1f} ms | {rss} MiB | {held} MiB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="Timed rounds (default 11).")
    parser.add_argument(
        "--checkpoints", action="store_true", help="DDP/FSDP with sync/async checkpoints."
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker and args.variant:
        strategy_worker(args.variant)
        return
    if args.worker:
        worker(args.repeats)
        return
    if args.checkpoints:
        strategies()
        return
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        __file__, "--worker", "--repeats", str(args.repeats),
    ]  # fmt: skip
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
