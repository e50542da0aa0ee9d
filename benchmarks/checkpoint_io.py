"""What verified checkpoints cost: bz's write and read against plain ``torch.save``/``load``.

bz hashes the bytes while writing them (SHA-256, no second pass) and writes a small
sidecar; reading verifies the checksum (one extra pass over the file) before
``torch.load``. Prints the median of ``--rounds`` for a state of ``--megabytes`` MB::

    .venv/bin/python benchmarks/checkpoint_io.py --megabytes 100
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    """Time the four operations and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    payload: dict[str, Any] = {
        "format": FORMAT,
        "signature": "benchmark",
        "epoch": 1,
        "batch": 0,
        "global_step": 1,
        "model": {"weight": torch.randn(args.megabytes * 250_000)},
        "optimizer": {},
        "rng": {},
    }
    folder = Path(tempfile.mkdtemp(prefix="bz-checkpoint-io-"))
    plain, verified = folder / "plain.pt", folder / "epoch-0001.pt"

    def plain_write() -> None:
        with open(plain, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())

    rows = [
        ("write: torch.save + fsync", lambda: plain_write()),
        ("write: bz (sha256, sidecar, renames)", lambda: atomic_save(payload, verified)),
        ("read: torch.load", lambda: torch.load(plain, weights_only=True)),
        ("read: bz (verify, then torch.load)", lambda: read_checkpoint(verified)),
    ]
    for name, action in rows:
        print(f"{name:<40} {_median(action, args.rounds):.3f} s  ({args.megabytes} MB)")


if __name__ == "__main__":
    main()
