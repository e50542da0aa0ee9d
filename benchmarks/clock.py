"""The one clock of the benchmarks: how long a run takes, on a CPU or a GPU, and the
per-step comparison of two variants timed in the same rounds."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def timed(run: Callable[[], None], device: torch.device) -> float:
    """Seconds ``run`` takes.

    On CUDA: CUDA events (one sync, at the end). On a CPU: the CPU time of this thread,
    which is where all the work happens with one torch thread and no loader workers,
    so that other processes on a shared machine do not inflate the numbers. Garbage is
    collected first, so that no run pays for the one before it.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # torch.cuda.Event's constructor carries no annotations in torch's stubs.
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        run()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000.0
    started = time.thread_time()
    run()
    return time.thread_time() - started


def per_step(full: Sequence[float], one: Sequence[float], steps: int) -> list[float]:
    """Each round's seconds per step: (N-step run - 1-step run) / (N - 1).

    A run of N steps costs ``fixed + N * step``; a run of one step costs ``fixed + step``,
    so the difference leaves out what a run costs once (set-up, the first and last hooks).
    """
    return [(long - short) / (steps - 1) for long, short in zip(full, one, strict=True)]


@dataclass(frozen=True)
class Comparison:
    """One variant's per-step times against its baseline's, round by round."""

    ratio: float
    """The median of the per-round ratios."""
    spread: float
    """Half the interquartile range of the per-round ratios: how noisy ``ratio`` is."""
    overhead: float
    """The median of the per-round differences, in seconds per step."""


def compare(mine: Sequence[float], theirs: Sequence[float]) -> Comparison:
    """``mine`` against ``theirs``, both per step and from the same rounds."""
    ratios = [m / t for m, t in zip(mine, theirs, strict=True)]
    if len(ratios) < 2:
        low = high = ratios[0]
    else:
        low, _, high = statistics.quantiles(ratios, n=4)
    return Comparison(
        ratio=statistics.median(ratios),
        spread=(high - low) / 2,
        overhead=statistics.median(m - t for m, t in zip(mine, theirs, strict=True)),
    )
