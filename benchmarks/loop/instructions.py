"""Instructions per step under callgrind: noise-free counts to set beside the timings.

Timing ratios on a shared machine move by 5 to 25% from run to run; instruction counts
do not. Each variant runs for N and for 2N steps in one process under ``valgrind
--tool=callgrind``; callgrind writes a dump of its counts each time the process calls a
marker C function (``--dump-before``), and the process calls it just before and just
after each run. Whatever a run costs once (building the loop, the first and last hooks)
is in both runs, so ``(count(2N) - count(N)) / N`` is what one step costs.

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
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.loop.workloads import Batch, Workload

    Prepare = Callable[[Workload, list[Batch], Any], Callable[[], None]]

MARKER = "closure_fcn"
"""The C function whose calls make callgrind dump its counts (``--dump-before``): the
entry of every ``ctypes`` callback into Python."""

MARKS_PER_VARIANT = 4
"""Before N, after N, before 2N, after 2N: the dumps at the 2nd and 4th hold the runs."""

ROOT = Path(__file__).resolve().parents[2]

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


def dump_files(out_file: Path) -> list[Path]:
    """The numbered dumps callgrind wrote for ``--callgrind-out-file=out_file``, in order."""
    numbered = []
    for path in out_file.parent.glob(f"{out_file.name}.*"):
        suffix = path.name.rpartition(".")[2]
        if suffix.isdigit():
            numbered.append((int(suffix), path))
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


@dataclass(frozen=True)
class Counted:
    """One variant's instructions per step."""

    variant: str
    per_step: float


def callgrind(argv: Sequence[str], dumps: int) -> list[int]:
    """Run ``python argv...`` under callgrind; the instructions of each of its ``dumps``
    marked stretches (``mark``), in order.

    Raises ``RuntimeError`` with the process's last lines if it fails, or if it did not
    call the marker exactly ``dumps`` times. With ``BZ_CALLGRIND_KEEP=folder`` in the
    environment, the dumps are copied there (``callgrind.out.N``: per variant, the 2nd
    and 4th hold its N- and 2N-step runs), to read with ``callgrind_annotate``.
    """
    executable = valgrind()
    if executable is None:
        raise RuntimeError("valgrind is not installed")
    with tempfile.TemporaryDirectory(prefix="bz-callgrind-") as folder:
        out_file = Path(folder) / "callgrind.out"
        command = [
            executable,
            "--tool=callgrind",
            # Imports, set-up and warm-up run uninstrumented (several times faster); the
            # child switches instrumentation on around its marked runs (instrumented).
            "--instr-atstart=no",
            f"--dump-before={MARKER}",
            f"--callgrind-out-file={out_file}",
            sys.executable,
            *argv,
        ]
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            PYTHONHASHSEED="0",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
            raise RuntimeError(f"callgrind run failed (exit {done.returncode}):\n{tail}")
        files = dump_files(out_file)
        counts = [totals(path.read_text(encoding="utf-8")) for path in files]
        keep = os.environ.get("BZ_CALLGRIND_KEEP")
        if keep:  # a folder: the dumps go there, for callgrind_annotate
            Path(keep).mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copy(path, Path(keep) / path.name)
    if len(counts) != dumps:
        raise RuntimeError(
            f"expected {dumps} callgrind dumps, got {len(counts)}: the marker ({MARKER}) "
            "was called by something else, or callgrind cannot see it"
        )
    return counts


def count(workload: str, variants: Sequence[str], steps: int) -> list[Counted]:
    """Instructions per step of each of ``variants`` (by name) on ``workload``.

    One child process under callgrind measures them all in turn (minutes: everything
    runs 20 to 100 times slower there).
    """
    argv = ["-m", "benchmarks.loop.instructions", "--workload", workload, "--steps", str(steps)]
    argv += [arg for name in variants for arg in ("--variant", name)]
    counts = callgrind(argv, MARKS_PER_VARIANT * len(variants))
    return [
        Counted(name, value) for name, value in zip(variants, per_step(counts, steps), strict=True)
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


def markdown(
    workload: str, steps: int, counts: dict[str, float], baselines: dict[str, str], hand: str
) -> str:
    """The instructions table of one workload, counted with runs of ``steps`` and 2×."""
    ratio = ratios(counts, baselines)
    lines = [
        f"**{workload}, instructions** (callgrind, per step: (2N-step run - N-step run) / N,"
        f" N = {steps}, one process, one thread)",
        "",
        "| variant | compared with | instructions per step | vs that row | vs hand loop |",
        "|---|---|---:|---:|---:|",
    ]
    for name, value in counts.items():
        base = baselines.get(name, name)
        same = base == name
        versus = "—" if same or name not in ratio else f"{ratio[name]:.3f}×"
        to_hand = f"{value / counts[hand]:.3f}×" if hand in counts else "—"
        lines.append(
            f"| {name} | {'—' if same else base} | {value / 1e6:.3f} M | {versus} | {to_hand} |"
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


def measured(make: Callable[[int], Callable[[], None]], steps: int) -> None:
    """Warm up, then run N and 2N steps between marks (see ``per_step``)."""
    for _ in range(2):  # the first runs: lazy imports, caches, the interpreter's specialising
        make(max(steps // 4, 2))()
    single, double = make(steps), make(2 * steps)
    gc.collect()
    gc.freeze()  # collections then skip what already exists: no stray full collection
    with instrumented():
        mark()
        single()
        mark()
        gc.collect()
        mark()
        double()
        mark()
    gc.unfreeze()


def _child(argv: Sequence[str] | None = None) -> int:
    """Under callgrind: measure each named variant in turn (``measured``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--variant", action="append", default=[])
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

        measured(make, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
