"""The command line of ``benchmarks/run.py``: what to run, and the report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch
from benchmarks.loop import instructions
from benchmarks.loop.measure import Row, host_reads, markdown, measure, rows, summary
from benchmarks.loop.profile import metric_update_costs, profile
from benchmarks.loop.variants import (
    BZ,
    BZ_ACCURACY,
    BZ_BF16,
    BZ_DEFAULTS,
    BZ_NOOP,
    HAND,
    HAND_BF16,
    KEYS,
    NOOP_PLUGINS,
    Variant,
    dispatch_cost,
    lightning_available,
    only,
    precision_supported,
    quiet,
    variants,
)
from benchmarks.loop.workloads import Workload, workloads

import bz

DESCRIPTION = "Time bz's training loop against a hand-written PyTorch loop, in one process."

LAST_LINE = {
    "bare": BZ,
    "accuracy": BZ_ACCURACY,
    "defaults": BZ_DEFAULTS,
    "noop": BZ_NOOP,
    "hand": HAND,
}
"""The variants the last line of ``--instructions`` reports (tiny workload)."""


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What the benchmark ran on, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs), 1 torch thread"


def environment(device: torch.device) -> dict[str, str]:
    """Versions and the machine, for the report."""
    return {
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bz": bz.__version__,
        "platform": platform.platform(),
    }


# -- main --------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="Fewer steps and repetitions.")
    parser.add_argument("--repeats", type=int, help="Timed rounds (default 9; 3 with --quick).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N].")
    parser.add_argument(
        "--workload",
        action="append",
        choices=["tiny", "medium", "tiny-dataloader"],
        help="Run only these (repeatable).",
    )
    parser.add_argument(
        "--dataloader", action="store_true", help="Also time the tiny MLP fed by a DataLoader."
    )
    parser.add_argument("--no-lightning", action="store_true", help="Skip PyTorch Lightning.")
    parser.add_argument("--no-bf16", action="store_true", help="Skip the bf16 autocast rows.")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Only print a cProfile of bz (no plugins) and of the hand loop, per workload.",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="Also count instructions per step under valgrind's callgrind (CPU, minutes).",
    )
    parser.add_argument(
        "--no-timing",
        action="store_true",
        help="Skip the timed rounds (with --instructions: only the counts).",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        choices=list(KEYS),
        help="Only this variant and the hand-written loop it compares with (repeatable).",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="N for --instructions: runs of N and 2N steps (default: 64 tiny, 8 medium).",
    )
    parser.add_argument(
        "--layouts",
        type=int,
        default=1,
        help="With --instructions: count each row in this many processes with differently "
        "moved heaps and show the median ± half the range (default 1; each adds a process "
        "per row).",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="With --instructions: callgrind processes at a time (default: 2, or 1 on one "
        "CPU; the counts do not depend on it).",
    )
    parser.add_argument("--json", dest="json_path", help="Also write the results here.")
    args = parser.parse_args(argv)
    for name in ("layouts", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print Markdown tables."""
    args = parse(argv)
    quiet()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 9)
    with_lightning = not args.no_lightning and lightning_available()
    chosen_workloads = [
        w
        for w in workloads(args.quick, args.dataloader)
        if not args.workload or w.name in args.workload
    ]
    if args.profile:
        for workload in chosen_workloads:
            print(f"## {workload.name}: {workload.describe()}")
            print(profile(workload, device))
        return 0
    env = environment(device)
    print(f"# bz loop benchmark on {env['device']}")
    print(f"python {env['python']}, torch {env['torch']}, bz {env['bz']}, {env['platform']}")
    if not args.no_timing:
        print(
            f"median of {repeats} rounds in rotating order after {args.warmup} warm-up "
            f"round(s); clock: {'CUDA events' if device.type == 'cuda' else 'thread CPU time'}"
        )
    if not with_lightning:
        print("(PyTorch Lightning not installed: pip install 'bz-cli[bench]' to include it)")
    if not args.no_bf16 and not precision_supported():
        print(f"({BZ_BF16}: skipped (needs precision support))")
    counting = args.instructions and instructions.valgrind() is not None
    results: dict[str, Any] = {"environment": env, "repeats": repeats, "workloads": {}}
    summaries = []
    counted: dict[str, dict[str, float]] = {}
    spreads: dict[str, dict[str, float]] = {}
    for workload in chosen_workloads:
        chosen = only(variants(with_lightning, with_bf16=not args.no_bf16), args.only)
        if counting:
            counted[workload.name], spreads[workload.name] = _count(
                workload.name, chosen, args.steps, args.layouts, args.jobs
            )
            results["workloads"].setdefault(workload.name, {}).update(
                instructions_per_step=counted[workload.name],
                instructions_spread=spreads[workload.name],
            )
        if args.no_timing:
            continue
        measure(workload, chosen, device, repeats, args.warmup)
        reads = {v.name: host_reads(workload, v, device) for v in chosen if v.counts_reads}
        table = rows(workload, chosen, reads)
        print()
        print(markdown(workload, table))
        sys.stdout.flush()
        summaries.append((workload, table))
        results["workloads"].setdefault(workload.name, {}).update(
            {
                "description": workload.describe(),
                "rows": [row.__dict__ for row in table],
                "times": {v.name: v.times for v in chosen},
                "short_times": {v.name: v.short_times for v in chosen},
                "host_read_kinds": {name: r.kinds for name, r in reads.items()},
            }
        )
    if summaries:
        _summaries(summaries, results)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    if args.instructions and not counting:
        print()
        print("instructions: skipped (valgrind is not installed; it is what counts them)")
    if "tiny" in counted:
        tiny, baselines = counted["tiny"], _baselines(variants(True, True))
        print()
        if BZ_BF16 in tiny and HAND_BF16 in tiny:
            print(f"instructions: {BZ_BF16} {tiny[BZ_BF16] / tiny[HAND_BF16]:.3f}x {HAND_BF16}")
        if args.layouts > 1:
            print(instructions.spread_line(spreads["tiny"], baselines, LAST_LINE, args.layouts))
        print(instructions.last_line(tiny, baselines, LAST_LINE, NOOP_PLUGINS))
    return 0


def _summaries(summaries: list[tuple[Workload, list[Row]]], results: dict[str, Any]) -> None:
    dispatch = {count: dispatch_cost(count) for count in (0, 1, NOOP_PLUGINS)}
    results["dispatch_us_per_hook_call"] = dispatch
    for workload, table in summaries:
        print()
        print(summary(workload.name, table, dispatch if workload.name == "tiny" else {}))
    for workload, _ in summaries[:1]:
        print()
        costs = metric_update_costs(workload)
        print(costs)
        results["metric_update_costs"] = costs


def _baselines(chosen: list[Variant]) -> dict[str, str]:
    return {variant.name: variant.baseline for variant in chosen}


def _count(
    workload: str, chosen: list[Variant], steps: int | None, layouts: int, jobs: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Instructions per step of ``chosen`` on ``workload`` and their spreads (fractions),
    and their table printed."""
    names = [variant.name for variant in chosen]
    steps = steps or instructions.STEPS[workload]
    counts = instructions.count(
        workload,
        names,
        steps,
        layouts,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        jobs=jobs,
    )
    by_name = {counted.variant: counted.per_step for counted in counts}
    spreads = {counted.variant: counted.spread for counted in counts} if layouts > 1 else {}
    print()
    print(
        instructions.markdown(workload, steps, by_name, _baselines(chosen), HAND, spreads, layouts)
    )
    sys.stdout.flush()
    return by_name, spreads
