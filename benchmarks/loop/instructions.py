"""Instructions per step under callgrind: noise-free counts to set beside the timings.

Timing ratios on a shared machine move by 5 to 25% from run to run; instruction counts
do not. Each variant runs for N and for 2N steps in a fresh process of its own under
``valgrind --tool=callgrind`` (so the other variants cannot move its count), one that
sees the checkout only through links (``benchmarks.loop.links``: so its path barely can).
Callgrind writes a dump of its counts each time the process calls a marker C function
(``--dump-before``), and the process calls it just before and just after each run.
Whatever a run costs once (building the loop, the first and last hooks) is in both
runs, so ``(count(2N) - count(N)) / N`` is what one step costs.

The marker is a ``ctypes`` callback that does nothing: calling it enters ``_ctypes``'s
``closure_fcn``, a C function only ctypes callbacks run, which nothing in a training
loop uses. The parent checks that it got exactly the dumps it asked for, so a stray
call would be an error, not a wrong number.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.loop.links import isolated, links_folder

if TYPE_CHECKING:
    from benchmarks.loop.workloads import Batch, Workload

    Prepare = Callable[[Workload, list[Batch], Any], Callable[[], None]]

MARKER = "closure_fcn"
"""The C function whose calls make callgrind dump its counts (``--dump-before``): the
entry of every ``ctypes`` callback into Python."""

MARKS_PER_VARIANT = 4
"""Before N, after N, before 2N, after 2N: the dumps at the 2nd and 4th hold the runs."""


_TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.MULTILINE)


def valgrind() -> str | None:
    """The valgrind executable, or None where it is not installed."""
    return shutil.which("valgrind")


_MARK = ctypes.CFUNCTYPE(None)(lambda: None)


def mark() -> None:
    """Call the marker: callgrind dumps the counts since the last dump, then zeroes them."""
    _MARK()


def totals(dump: str) -> int:
    """The instructions (``Ir``) a callgrind dump file's text counts."""
    found = _TOTALS.search(dump)
    if found is None:
        raise ValueError("not a callgrind dump: no 'totals:' or 'summary:' line")
    return int(found.group(1))


MAIN_THREAD = "01"
"""Callgrind's number for the process's first thread (``--separate-threads=yes``)."""


def dump_files(out_file: Path) -> list[Path]:
    """The numbered dumps of the main thread that callgrind wrote for
    ``--callgrind-out-file=out_file`` (``callgrind.out.N-01``), in order."""
    numbered = []
    for path in out_file.parent.glob(f"{out_file.name}.*"):
        number, _, thread = path.name.rpartition(".")[2].partition("-")
        if number.isdigit() and thread == MAIN_THREAD:
            numbered.append((int(number), path))
    return [path for _, path in sorted(numbered)]


def per_step(counts: Sequence[int], steps: int) -> list[float]:
    """Instructions per step of each variant, from its dumps' counts in order.

    Each variant contributes ``MARKS_PER_VARIANT`` dumps: what ran before its N-step run
    (discarded), the N-step run, what ran between the runs (discarded), the 2N-step run.
    """
    if len(counts) % MARKS_PER_VARIANT:
        raise ValueError(f"expected a multiple of {MARKS_PER_VARIANT} dumps, got {len(counts)}")
    result = []
    for first in range(0, len(counts), MARKS_PER_VARIANT):
        single, double = counts[first + 1], counts[first + 3]
        result.append((double - single) / steps)
    return result


def callgrind(argv: Sequence[str], dumps: int, layout: int = 0) -> list[int]:
    """Run ``python argv...`` under callgrind; the instructions of each of its ``dumps``
    marked stretches (``mark``), in order.

    The process sees no path of this checkout (``isolated``), so its counts do not
    depend on where the checkout lies. ``layout`` > 0 moves its heap by that many steps
    (``shift_layout``): what the counts' residue is measured with.

    Raises ``RuntimeError`` with the process's last lines if it fails, or if it did not
    call the marker exactly ``dumps`` times. With ``BZ_CALLGRIND_KEEP=folder`` in the
    environment, the dumps are copied into a folder of their own there, named after the
    variant and layout (``bz-no-plugins-no-metrics-layout0/callgrind.out.N-01``: the 2nd
    and 4th hold its N- and 2N-step runs), to read with ``callgrind_annotate``.
    """
    executable = valgrind()
    if executable is None:
        raise RuntimeError("valgrind is not installed")
    with tempfile.TemporaryDirectory(prefix="bz-callgrind-") as folder:
        out_file = Path(folder) / "callgrind.out"
        python, env, cwd = isolated(links_folder(), executable)
        env[LAYOUT] = str(layout)
        command = [
            executable,
            "--tool=callgrind",
            # Imports, set-up and warm-up run uninstrumented (several times faster); the
            # child switches instrumentation on around its marked runs (instrumented).
            "--instr-atstart=no",
            # The training thread's counts only: bz's other threads (the plugin
            # watchdog) wake by the clock, not per step, and under callgrind's slowdown
            # a step lasts ~50 times longer, so they would count ~50 times what they
            # cost a step natively, and vary with the machine's load.
            "--separate-threads=yes",
            f"--dump-before={MARKER}",
            f"--callgrind-out-file={out_file}",
            python,
            "-S",  # no site: sys.path is PYTHONPATH's links only (see isolated)
            *argv,
        ]
        done = subprocess.run(
            command, env=env, cwd=cwd, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
            raise RuntimeError(f"callgrind run failed (exit {done.returncode}):\n{tail}")
        files = dump_files(out_file)
        counts = [totals(path.read_text(encoding="utf-8")) for path in files]
        keep = os.environ.get("BZ_CALLGRIND_KEEP")
        if keep:  # a folder: the dumps go there, for callgrind_annotate
            # One folder per process: every process names its dumps the same way.
            variant = argv[argv.index("--variant") + 1] if "--variant" in argv else "run"
            slug = "-".join(re.findall(r"[a-z0-9]+", variant.lower()))
            kept = Path(keep) / f"{slug}-layout{layout}"
            kept.mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copy(path, kept / path.name)
    if len(counts) != dumps:
        raise RuntimeError(
            f"expected {dumps} callgrind dumps, got {len(counts)}: the marker ({MARKER}) "
            "was called by something else, or callgrind cannot see it"
        )
    return counts


LAYOUT = "BZ_CALLGRIND_LAYOUT"
"""The environment variable that tells the child how far to move its heap."""


@dataclass(frozen=True)
class Counted:
    """One variant's instructions per step: the median over its processes, and the
    lowest and highest (equal where it ran in one process)."""

    variant: str
    per_step: float
    low: float = 0.0
    high: float = 0.0

    @property
    def spread(self) -> float:
        """Half the range, as a fraction of the median: how far a layout moves it."""
        return (self.high - self.low) / 2 / self.per_step if self.per_step else 0.0


def summarise(variant: str, values: Sequence[float]) -> Counted:
    """One variant's counts from several processes (layouts): median, lowest, highest."""
    if not values:
        raise ValueError(f"no counts for {variant}")
    return Counted(variant, statistics.median(values), min(values), max(values))


def warm_up(argv: Sequence[str], variants: Sequence[str]) -> None:
    """Run the child once without callgrind (two steps, every variant), so the modules it
    imports are compiled for the links' paths before any counted process starts: a
    process that compiles them first would not be laid out like one that loads them."""
    python, env, cwd = isolated(links_folder(), valgrind() or "valgrind")
    names = [arg for name in variants for arg in ("--variant", name)]
    done = subprocess.run(
        [python, "-S", *argv[:-2], "--steps", "2", "--no-callgrind", *names],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
        raise RuntimeError(f"the warm-up run failed (exit {done.returncode}):\n{tail}")


def count(
    workload: str,
    variants: Sequence[str],
    steps: int,
    layouts: int = 1,
    progress: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> list[Counted]:
    """Instructions per step of each of ``variants`` (by name) on ``workload``.

    Each variant runs in a fresh process of its own under callgrind, after the same
    preamble in every process (imports, the workload, nothing of the other variants),
    so a variant's count does not depend on which others are measured, or in which
    order. With ``layouts`` > 1, each variant runs in that many processes whose heaps
    start moved by different amounts (``shift_layout``); the median is reported, and
    the range is the residue that the heap's layout leaves. ``jobs`` processes run at
    a time (the counts do not depend on it). About a minute of CPU per process:
    everything runs 20 to 100 times slower under callgrind.
    """
    argv = ["-m", "benchmarks.loop.instructions", "--workload", workload, "--steps", str(steps)]

    def one(task: tuple[str, int]) -> float:
        name, layout = task
        value = per_step(callgrind([*argv, "--variant", name], MARKS_PER_VARIANT, layout), steps)
        if progress is not None:
            progress(f"{workload}: {name}, layout {layout}: {value[0] / 1e6:.4f} M per step")
        return value[0]

    warm_up(argv, variants)
    tasks = [(name, layout) for name in variants for layout in range(layouts)]
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        values = dict(zip(tasks, pool.map(one, tasks), strict=True))
    return [
        summarise(name, [values[name, layout] for layout in range(layouts)]) for name in variants
    ]


# -- the report --------------------------------------------------------------------------

STEPS = {"tiny": 64, "tiny-dataloader": 64, "medium": 8}
"""N per workload: the runs are N and 2N steps; medium's steps cost ~100× tiny's."""


def ratios(counts: dict[str, float], baselines: dict[str, str]) -> dict[str, float]:
    """Each variant's instructions per step / its baseline's (where both were counted)."""
    return {
        name: value / counts[baselines[name]]
        for name, value in counts.items()
        if baselines.get(name) in counts
    }


def ratio_spread(spreads: dict[str, float], baselines: dict[str, str], name: str) -> float | None:
    """How far a variant's ratio to its baseline may move with the heap's layout, as a
    fraction: the two counts' spreads added (None where either was not measured)."""
    base = baselines.get(name, name)
    if name not in spreads or base not in spreads:
        return None
    return spreads[name] + spreads[base] if base != name else 0.0


def markdown(
    workload: str,
    steps: int,
    counts: dict[str, float],
    baselines: dict[str, str],
    hand: str,
    spreads: dict[str, float] | None = None,
    layouts: int = 1,
) -> str:
    """The instructions table of one workload, counted with runs of ``steps`` and 2×.

    With ``spreads`` (each count's half range over ``layouts`` processes, as a fraction
    of it), every count and ratio shows ``±`` how far the heap's layout moved it.
    """
    ratio = ratios(counts, baselines)
    spreads = spreads or {}
    how = (
        "one fresh process per row"
        if layouts == 1
        else f"median of {layouts} fresh processes per row, ± half their range"
    )
    lines = [
        f"**{workload}, instructions** (callgrind, per step: (2N-step run - N-step run) / N,"
        f" N = {steps}, {how}, one thread)",
        "",
        "| variant | compared with | instructions per step | vs that row | vs hand loop |",
        "|---|---|---:|---:|---:|",
    ]
    for name, value in counts.items():
        base = baselines.get(name, name)
        same = base == name
        own = f" ± {spreads[name] * 100:.2f}%" if name in spreads else ""
        if same or name not in ratio:
            versus = "—"
        else:
            moved = ratio_spread(spreads, baselines, name)
            versus = f"{ratio[name]:.3f}×" + (
                "" if moved is None else f" ± {ratio[name] * moved:.3f}"
            )
        to_hand = f"{value / counts[hand]:.3f}×" if hand in counts else "—"
        lines.append(
            f"| {name} | {'—' if same else base} | {value / 1e6:.3f} M{own} | {versus} "
            f"| {to_hand} |"
        )
    return "\n".join(lines)


def last_line(
    counts: dict[str, float], baselines: dict[str, str], names: dict[str, str], plugins: int
) -> str:
    """``instructions: bare X.XXXx, accuracy X.XXXx, defaults X.XXXx, per no-op plugin P.PP%``.

    ``names`` maps ``bare``, ``accuracy``, ``defaults``, ``noop``, ``hand`` to the variants'
    names; what was not counted shows as ``n/a``.
    """
    ratio = ratios(counts, baselines)

    def of(key: str) -> str:
        name = names[key]
        return f"{ratio[name]:.3f}x" if name in ratio else "n/a"

    bare, noop, hand = names["bare"], names["noop"], names["hand"]
    if {bare, noop, hand} <= counts.keys():
        per_plugin = f"{(counts[noop] - counts[bare]) / plugins / counts[hand] * 100:.2f}%"
    else:
        per_plugin = "n/a"
    return (
        f"instructions: bare {of('bare')}, accuracy {of('accuracy')}, "
        f"defaults {of('defaults')}, per no-op plugin {per_plugin}"
    )


def spread_line(
    spreads: dict[str, float], baselines: dict[str, str], names: dict[str, str], layouts: int
) -> str:
    """How far the last line's ratios moved over ``layouts`` processes (± half the range
    of each count, the two counts of a ratio added), as percentages."""

    def of(key: str) -> str:
        moved = ratio_spread(spreads, baselines, names[key])
        return "n/a" if moved is None else f"±{moved * 100:.2f}%"

    return (
        f"instructions, moved by the heap's layout ({layouts} processes per row): "
        f"bare {of('bare')}, accuracy {of('accuracy')}, defaults {of('defaults')}"
    )


# -- the child: runs under callgrind -----------------------------------------------------


def _instrumentation(state: str) -> None:
    """Switch callgrind's instrumentation of this process ``on`` or ``off``.

    ``callgrind_control`` reaches the process through valgrind's gdbserver, which answers
    while the process runs, so this waits busily.
    """
    control = subprocess.Popen(
        ["callgrind_control", f"--instr={state}", str(os.getpid())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while control.poll() is None:
        pass
    if control.returncode != 0:
        raise RuntimeError(f"callgrind_control --instr={state} failed")


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Callgrind's instrumentation on inside, off again after (marks count only inside)."""
    _instrumentation("on")
    try:
        yield
    finally:
        _instrumentation("off")


def measured(make: Callable[[int], Callable[[], None]], steps: int, counted: bool = True) -> None:
    """Warm up, then run N and 2N steps between marks (see ``per_step``); with
    ``counted`` False, outside callgrind: the same runs, no instrumentation, no marks."""
    for _ in range(2):  # the first runs: lazy imports, caches, the interpreter's specialising
        make(max(steps // 4, 2))()
    single, double = make(steps), make(2 * steps)
    gc.collect()
    gc.freeze()  # collections then skip what already exists: no stray full collection
    with instrumented() if counted else contextlib.nullcontext():
        mark()
        single()
        mark()
        gc.collect()
        mark()
        double()
        mark()
    gc.unfreeze()


def shift_layout(amount: int) -> list[object]:
    """Objects to keep for the process's life, made before anything else: every later
    allocation lands elsewhere, by an amount that grows with ``amount`` (0: nothing).

    Small objects of many sizes (Python's allocator) and one block from ``malloc``:
    about what a longer path or a different preamble moves, on purpose.
    """
    kept: list[object] = [bytes(8 * (1 + i % 63)) for i in range(amount * 101)]
    if amount:
        kept.append(bytearray(amount * 4093))
    return kept


def _child(argv: Sequence[str] | None = None) -> int:
    """Under callgrind: measure each named variant in turn (``measured``)."""
    kept = shift_layout(int(os.environ.get(LAYOUT, "0")))
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--no-callgrind", dest="counted", action="store_false")
    args = parser.parse_args(argv)
    import torch
    from benchmarks.loop.variants import lightning_available, quiet, variants
    from benchmarks.loop.workloads import workloads

    torch.set_num_threads(1)
    quiet()
    device = torch.device("cpu")
    (base,) = [w for w in workloads(quick=False, dataloader=True) if w.name == args.workload]
    by_name = {v.name: v for v in variants(lightning_available(), with_bf16=True)}
    for name in args.variant:
        prepare = by_name[name].prepare

        def make(steps: int, prepare: Prepare = prepare) -> Callable[[], None]:
            workload = base.resized(batches=steps, epochs=1)
            return prepare(workload, workload.data(1, device), device)

        measured(make, args.steps, args.counted)
    del kept
    return 0


if __name__ == "__main__":
    sys.exit(_child())
