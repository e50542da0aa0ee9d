"""What verified checkpoints cost: bz's write and read against plain ``torch.save``/``load``.

bz hashes the bytes while writing them (XXH3-128, no second pass) and writes a small
sidecar with two renames and fsyncs; before writing, it gives back the page cache of
the file it replaces (as ``torch.save``'s truncating open does), so that the new file's
pages are memory just freed rather than memory free for long, which a virtual machine
may have handed back to its host (a host fault per page); reading verifies the
checksum in one pass over the file (through a memory map: the page cache, no copy)
before ``torch.load``. The bare
baseline is ``torch.save`` to an open file + fsync, and ``torch.load``. Prints the median
of ``--rounds`` per size, then, as its last line, the ratios at the largest size::

    .venv/bin/python benchmarks/checkpoint_io.py                # 100 MB and 1 GB
    .venv/bin/python benchmarks/checkpoint_io.py --megabytes 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bz.training.checkpoint.files import FORMAT, read_checkpoint
from bz.training.checkpoint.store import atomic_save


def _median(action: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(megabytes: int, rounds: int, folder: Path) -> tuple[float, float]:
    """Print the four timings for a state of ``megabytes`` MB; the write and read ratios."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "signature": "benchmark",
        "epoch": 1,
        "batch": 0,
        "global_step": 1,
        "model": {"weight": torch.randn(megabytes * 250_000)},
        "optimizer": {},
        "rng": {},
    }
    plain, verified = folder / "plain.pt", folder / "epoch-0001.pt"

    def plain_write() -> None:
        with open(plain, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())

    def plain_read() -> None:
        torch.load(plain, weights_only=True)

    def bz_write() -> None:
        atomic_save(payload, verified)

    def bz_read() -> None:
        read_checkpoint(verified)

    # Each kind in a run of its own: on a virtual disk, a write right after another
    # file's write lands on blocks the host must first allocate, whichever comes second.
    plain_write()
    pw = _median(plain_write, rounds)
    bz_write()
    bw = _median(bz_write, rounds)
    pr = _median(plain_read, rounds)
    br = _median(bz_read, rounds)
    print(f"{megabytes} MB, median of {rounds}:")
    print(f"  write: torch.save + fsync                  {pw:.3f} s")
    print(f"  write: bz (xxh3 while writing, sidecar)    {bw:.3f} s  ({bw / pw:.2f}x)")
    print(f"  read:  torch.load                          {pr:.3f} s")
    print(f"  read:  bz (verify in one pass, torch.load) {br:.3f} s  ({br / pr:.2f}x)")
    return bw / pw, br / pr


def main() -> None:
    """Measure each size, then print the largest size's ratios as the last line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bz-checkpoint-io-"))
    try:
        ratios = [measure(size, args.rounds, folder) for size in sorted(args.megabytes)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write, read = ratios[-1]
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"load average {load} (timings on a busy machine move; the ratios less)")
    print(f"write {write:.2f}x, read {read:.2f}x of bare torch")


if __name__ == "__main__":
    main()
