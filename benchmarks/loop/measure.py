"""Timing the variants in rotating rounds, counting host reads, and the report's tables."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.clock import compare, per_step, timed
from benchmarks.loop.variants import (
    BZ,
    BZ_ACCURACY,
    BZ_BF16,
    BZ_BUILTINS,
    BZ_DEFAULTS,
    BZ_FIVE,
    BZ_NOOP,
    HAND,
    HAND_ACCURACY,
    HAND_BF16,
    HAND_FIVE,
    NOOP_PLUGINS,
    PER_BATCH_HOOKS,
    Variant,
)

from bz.testing import count_host_reads

if TYPE_CHECKING:
    import torch
    from benchmarks.loop.workloads import Workload


def measure(
    workload: Workload,
    chosen: list[Variant],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> None:
    """Fill each variant's ``times`` (full runs) and ``short_times`` (one-step runs).

    Each round runs every variant once, in an order that rotates from round to round.
    """
    batches = workload.data(1, device)
    for round_index in range(warmup + repeats):
        shift = round_index % len(chosen)
        for variant in chosen[shift:] + chosen[:shift]:
            seconds = timed(variant.prepare(workload, batches, device), device)
            if round_index >= warmup:
                variant.times.append(seconds)
    # The fixed cost of a run (setup, the first and last hooks, the summary), from runs
    # of a single step.
    one = workload.resized(batches=1, epochs=1)
    one_batch = one.data(1, device)
    for round_index in range(repeats):
        shift = round_index % len(chosen)
        for variant in chosen[shift:] + chosen[:shift]:
            variant.short_times.append(timed(variant.prepare(one, one_batch, device), device))


# -- host reads --------------------------------------------------------------------------


@dataclass(frozen=True)
class HostReads:
    """Reads per batch (the slope) and per run (the rest), with the kinds seen."""

    per_batch: float
    per_run: float
    kinds: dict[str, int]


def host_reads(workload: Workload, variant: Variant, device: torch.device) -> HostReads:
    """Run one epoch of N and of 2N batches; the difference is what batches cost."""
    size = max(workload.batches // 4, 4)
    totals = []
    kinds: Counter[str] = Counter()
    for count in (size, 2 * size):
        short = workload.resized(batches=count, epochs=1)
        run = variant.prepare(short, short.data(1, device), device)
        counter: Counter[str] = Counter()
        with count_host_reads(counter):
            run()
        totals.append(sum(counter.values()))
        kinds = counter
    per_batch = (totals[1] - totals[0]) / size
    return HostReads(per_batch, totals[0] - per_batch * size, dict(kinds))


# -- report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One variant's line in the table."""

    variant: str
    baseline: str
    median_s: float
    fixed_ms: float
    """What a run costs beyond its baseline's once, whatever its length."""
    step_us: float
    """Microseconds per step, the fixed cost excluded."""
    overhead_us_per_step: float
    """Microseconds per step beyond the baseline's (same rounds), the fixed cost excluded."""
    step_ratio: float
    """Per-step time / the baseline's (the fixed cost excluded)."""
    step_ratio_iqr: float
    """Half the interquartile range of the per-round ratios: how noisy the ratio is."""
    hand_ratio: float
    """Per-step time / the plain hand-written loop's."""
    fastest_step_us: float
    """Per step from the fastest N-step and fastest 1-step runs: noise on a shared
    machine only ever adds time, so the fastest runs are the least disturbed ones."""
    fastest_ratio: float
    """``fastest_step_us`` / the baseline's."""
    reads_per_batch: float | None
    reads_per_run: float | None


def _per_step(variant: Variant, steps: int) -> list[float]:
    return per_step(variant.times, variant.short_times, steps)


def rows(workload: Workload, chosen: list[Variant], reads: dict[str, HostReads]) -> list[Row]:
    """The table, each variant compared with its hand-written match in the same rounds.

    A run of N steps costs ``fixed + N * step``; one-step runs give ``fixed + step``,
    so each round gives a per-step time, and the ratio to the baseline is the median of
    the per-round ratios.
    """
    by_name = {variant.name: variant for variant in chosen}
    steps = workload.steps
    step_of = {variant.name: statistics.median(_per_step(variant, steps)) for variant in chosen}
    fastest = {
        variant.name: (min(variant.times) - min(variant.short_times)) / (steps - 1)
        for variant in chosen
    }
    table = []
    for variant in chosen:
        base = by_name[variant.baseline]
        mine, theirs = _per_step(variant, steps), _per_step(base, steps)
        comparison = compare(mine, theirs)
        overhead = comparison.overhead
        fixed = statistics.median(
            [v - b for v, b in zip(variant.short_times, base.short_times, strict=True)]
        )
        read = reads.get(variant.name)
        table.append(
            Row(
                variant=variant.name,
                baseline=variant.baseline,
                median_s=statistics.median(variant.times),
                fixed_ms=(fixed - overhead) * 1e3,
                step_us=step_of[variant.name] * 1e6,
                overhead_us_per_step=overhead * 1e6,
                step_ratio=comparison.ratio,
                step_ratio_iqr=comparison.spread,
                hand_ratio=step_of[variant.name] / step_of[HAND],
                fastest_step_us=fastest[variant.name] * 1e6,
                fastest_ratio=fastest[variant.name] / fastest[variant.baseline],
                reads_per_batch=read.per_batch if read else None,
                reads_per_run=read.per_run if read else None,
            )
        )
    return table


def markdown(workload: Workload, table: list[Row]) -> str:
    """The table as Markdown."""
    lines = [
        f"**{workload.name}**: {workload.describe()}",
        "",
        "| variant | compared with | per step | vs that row | vs hand loop "
        "| overhead per step | fixed cost per run | fastest: per step, vs that row "
        "| host reads per batch (per run) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        reads = (
            "—"
            if row.reads_per_batch is None or row.reads_per_run is None
            else f"{row.reads_per_batch:g} ({row.reads_per_run:g})"
        )
        same = row.baseline == row.variant
        lines.append(
            f"| {row.variant} | {'—' if same else row.baseline} | {row.step_us:.1f} µs "
            f"| {'—' if same else f'{row.step_ratio:.3f}× ± {row.step_ratio_iqr:.3f}'} "
            f"| {row.hand_ratio:.3f}× | {'—' if same else f'{row.overhead_us_per_step:+.1f} µs'} "
            f"| {'—' if same else f'{row.fixed_ms:+.1f} ms'} "
            f"| {row.fastest_step_us:.1f} µs, {row.fastest_ratio:.3f}× | {reads} |"
        )
    return "\n".join(lines)


def _versus(row: Row, target: float | None = None) -> str:
    goal = "" if target is None else f" (target: at most {target:.2f}×)"
    return (
        f"{row.step_ratio:.3f}× ± {row.step_ratio_iqr:.3f}, "
        f"{row.overhead_us_per_step:+.1f} µs per step; fastest runs: "
        f"{row.fastest_ratio:.3f}×{goal}"
    )


def summary(name: str, table: list[Row], dispatch: dict[int, float]) -> str:
    """The issue's targets, checked against one workload's rows (fixed cost excluded);
    a target whose rows were not run (``--only``) is left out."""
    by_name = {row.variant: row for row in table}
    plain_target = 1.02 if name.startswith("tiny") else 1.01
    lines = [f"Targets ({name}, per step, same rounds, fixed cost per run excluded):"]
    targets: tuple[tuple[str, str, float | None], ...] = (
        (BZ, HAND, plain_target),
        (BZ_ACCURACY, HAND_ACCURACY, 1.02),
        (BZ_FIVE, HAND_FIVE, 1.05),
        (BZ_DEFAULTS, HAND, None),
        (BZ_BUILTINS, HAND_FIVE, None),
        (BZ_BF16, HAND_BF16, 1.02),
    )
    for mine, theirs, target in targets:
        if mine in by_name:
            lines.append(f"- {mine} vs {theirs}: {_versus(by_name[mine], target)}")
    if HAND_BF16 in by_name and BZ_BF16 not in by_name:
        lines.append(f"- {BZ_BF16}: skipped (needs precision support)")
    for bz_row, hand_row in ((BZ_ACCURACY, HAND_ACCURACY), (BZ_FIVE, HAND_FIVE)):
        if {bz_row, hand_row, BZ, HAND} <= by_name.keys():
            in_bz = by_name[bz_row].step_us - by_name[BZ].step_us
            by_hand = by_name[hand_row].step_us - by_name[HAND].step_us
            lines.append(
                f"- what the metrics add per step: {bz_row} - {BZ} = {in_bz:+.1f} µs; "
                f"{hand_row} - {HAND} = {by_hand:+.1f} µs"
            )
    if {BZ_NOOP, BZ} <= by_name.keys():
        per_plugin = (by_name[BZ_NOOP].step_us - by_name[BZ].step_us) / NOOP_PLUGINS
        lines.append(
            f"- each no-op plugin on every hook: {per_plugin:+.2f} µs per step (target: 1)"
        )
    if dispatch:
        per_call = (dispatch[NOOP_PLUGINS] - dispatch[0]) / NOOP_PLUGINS
        lines.append(
            "- the sandbox alone (PluginSet.call, fastest of 15 × 20,000 calls): "
            f"{dispatch[0]:.2f} µs with no plugin, {dispatch[NOOP_PLUGINS]:.2f} µs with "
            f"{NOOP_PLUGINS}: {per_call:.2f} µs per plugin per hook, × {len(PER_BATCH_HOOKS)} "
            f"per-batch hooks = {per_call * len(PER_BATCH_HOOKS):.2f} µs per plugin per step"
        )
    reads = [row.reads_per_batch for row in table if row.variant.startswith("bz")]
    lines.append(f"- host reads per batch in bz: {max(r or 0.0 for r in reads):g} (target: 0)")
    return "\n".join(lines)
