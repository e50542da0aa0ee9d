"""Time bz's training loop against a hand-written PyTorch loop, in one process.

::

    .venv/bin/python benchmarks/run.py                 # the full run (a few minutes)
    .venv/bin/python benchmarks/run.py --quick         # a smoke run (under a minute)
    .venv/bin/python benchmarks/run.py --json out.json --device cuda

Every variant trains the same model (same seed, same initial weights) on the same
in-memory batches (a list of tensors made beforehand, so no loader cost hides the
loop's), with ``torch.set_num_threads(1)``. Repetitions alternate between the variants
(the order rotates each round) so that a noisy neighbour slows them all alike; the
median of each variant is reported, with its ratio to the hand-written loop and the
microseconds it adds per optimizer step.

Host read-backs (``item``, ``tolist``, ``bool(t)``, ``.cpu()``...) are counted in a
separate, untimed run with those methods wrapped: once with N batches and once with
2N, so the difference divided by N is what each batch costs and the rest is per run.

The code lives in ``benchmarks/loop/`` (workloads, the hand-written loops, bz's variants,
timing, instruction counts, the profile). See docs/performance.md for the method and
the numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts benchmarks/ on the path; the modules import each other
# as ``benchmarks.*``, so the repository's root goes there too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loop.cli import main

if __name__ == "__main__":
    sys.exit(main())
