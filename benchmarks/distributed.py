"""bz's loop in two processes (DDP on gloo) against a hand-written DDP loop, same run.

::

    .venv/bin/python benchmarks/distributed.py              # 2 processes, 11 rounds
    .venv/bin/python benchmarks/distributed.py --repeats 21

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
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="Timed rounds (default 11).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats)
        return
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        __file__, "--worker", "--repeats", str(args.repeats),
    ]  # fmt: skip
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
