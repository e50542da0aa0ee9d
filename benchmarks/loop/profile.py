"""Counts that noise cannot touch (Python calls, aten ops per step); metric updates alone."""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import timeit
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from benchmarks.loop.hand import (
    HandAccuracy,
    HandFiveMetrics,
    prepare_hand_accuracy,
    prepare_hand_bf16,
    prepare_hand_five,
    prepare_hand_written,
)
from benchmarks.loop.variants import (
    BZ,
    BZ_ACCURACY,
    BZ_BF16,
    BZ_FIVE,
    HAND,
    HAND_ACCURACY,
    HAND_BF16,
    HAND_FIVE,
    builtin_metrics,
    precision_supported,
    prepare_bz,
    prepare_bz_accuracy,
    prepare_bz_bf16,
    prepare_bz_five,
)

if TYPE_CHECKING:
    from benchmarks.loop.workloads import Workload
from torch.utils._python_dispatch import TorchDispatchMode

# -- the metric updates alone ------------------------------------------------------------


def metric_update_costs(workload: Workload, number: int = 2000, rounds: int = 15) -> str:
    """Microseconds one batch's metric update costs, bz against hand-written, alone.

    No model, no loop: the same (N, C) scores and targets fed to each update, the
    fastest of 3 timings per round, the median over rounds that alternate.
    """
    from bz.metrics._fused import batch_update

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(workload.batch_size, workload.classes, generator=generator)
    targets = torch.randint(0, workload.classes, (workload.batch_size,), generator=generator)
    accuracy = batch_update(builtin_metrics(["accuracy"]).values())
    five = batch_update(builtin_metrics().values())
    updates: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
        "hand-written accuracy": HandAccuracy(workload.classes, scores.device).update,
        "bz accuracy": accuracy,
        "hand-written 5 metrics": HandFiveMetrics(workload.classes, scores.device).update,
        "bz 5 metrics": five,
    }
    for update in updates.values():
        update(scores, targets)  # the first batch sets bz's counts up
    timings: dict[str, list[float]] = {name: [] for name in updates}
    for _ in range(rounds):
        for name, update in updates.items():
            timings[name].append(_fastest(update, scores, targets, number) * 1e6)
    lines = [
        f"Metric updates alone ({workload.name}: scores {workload.batch_size} × "
        f"{workload.classes}), µs per batch, median of {rounds} rounds:"
    ]
    lines += [f"- {name}: {statistics.median(values):.1f} µs" for name, values in timings.items()]
    return "\n".join(lines)


def _fastest(
    update: Callable[[torch.Tensor, torch.Tensor], None],
    scores: torch.Tensor,
    targets: torch.Tensor,
    number: int,
) -> float:
    """Seconds per call, the fastest of three timings of ``number`` calls."""
    return min(timeit.repeat(lambda: update(scores, targets), number=number, repeat=3)) / number


# -- a profile of the loop ---------------------------------------------------------------


class _OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it untyped
    """Counts the aten operations run below autograd (forward, backward, optimizer, metrics)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        self.count = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _function_key(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    parts = filename.split("/")
    short = "/".join(parts[parts.index("bz") :]) if "bz" in parts else parts[-1]
    return f"{short}:{line}({name})"


def profile(workload: Workload, device: torch.device, top: int = 15) -> str:
    """Where bz's time goes per step, against the hand-written loops doing the same work.

    Counts that noise cannot touch: Python function calls (cProfile) and aten operations
    (a dispatch mode) per step, for each pair; then the functions bz calls that the
    hand-written loop does not, with their own time per step (cProfile's clock, which
    adds its own overhead to every call: read the times as proportions).
    """
    batches = workload.data(1, device)
    steps = workload.steps
    out = io.StringIO()
    pairs = [
        (HAND, prepare_hand_written, BZ, prepare_bz),
        (HAND_ACCURACY, prepare_hand_accuracy, BZ_ACCURACY, prepare_bz_accuracy),
        (HAND_FIVE, prepare_hand_five, BZ_FIVE, prepare_bz_five),
    ]
    if precision_supported():
        pairs.append((HAND_BF16, prepare_hand_bf16, BZ_BF16, prepare_bz_bf16))
    out.write("| variant | Python calls per step | aten ops per step |\n|---|---:|---:|\n")
    stats: dict[str, pstats.Stats] = {}
    for names_and_runs in pairs:
        for name, prepare in (names_and_runs[:2], names_and_runs[2:]):
            run = prepare(workload, batches, device)
            run()  # warm-up, and the first batch that sets bz's metric counts up
            profiler = cProfile.Profile()
            profiler.enable()
            run()
            profiler.disable()
            stats[name] = pstats.Stats(profiler)
            counter = _OpCounter()
            with counter:
                run()
            calls = sum(entry[1] for entry in stats[name].stats.values())  # type: ignore[attr-defined]  # pstats keeps its table untyped
            out.write(f"| {name} | {calls / steps:.1f} | {counter.count / steps:.1f} |\n")
    hand = {_function_key(k): v for k, v in stats[HAND].stats.items()}  # type: ignore[attr-defined]  # as above
    extra = []
    for key, entry in stats[BZ].stats.items():  # type: ignore[attr-defined]  # as above
        name = _function_key(key)
        calls = entry[1] - (hand[name][1] if name in hand else 0)
        if calls > 0:
            extra.append((entry[2] / steps * 1e6, calls / steps, name))
    extra.sort(reverse=True)
    out.write(
        f"\nFunctions {BZ!r} calls more often than {HAND!r}, by own time "
        "(cProfile, µs per step):\n\n| function | extra calls per step | own time per step |"
        "\n|---|---:|---:|\n"
    )
    for own, calls, name in extra[:top]:
        out.write(f"| `{name}` | {calls:.2f} | {own:.1f} µs |\n")
    return out.getvalue()
