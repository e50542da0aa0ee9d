"""Instructions per step of the per-batch plugin rounds alone (issue #30).

::

    .venv/bin/python benchmarks/rounds.py                # 10 no-op plugins, a few minutes
    .venv/bin/python benchmarks/rounds.py --plugins 1 --no-hand

The four per-batch hooks' rounds (``start_training_batch``, ``after_backward``,
``before_optimizer_step``, ``end_training_batch``) of ``--plugins`` no-op plugins, called
through ``PluginSet.callers`` as the plain loop calls them, N and 2N times in one
process under callgrind (the difference over N is one step's rounds), with torch and
NumPy imported so that the fence covers what a run's covers. No model, no loop and no
watchdog thread: the count repeats to the instruction from run to run, where the
10-plugin row of ``benchmarks/run.py --instructions`` moves with the watchdog thread's
timing (docs/performance.md, "Per plugin, fifth round"). What the loop does per step
for its plugins besides the rounds (writing the context's four changing fields) is not
counted here.

Per plugin, the rounds are set against the hand-written step of the tiny MLP, counted
in the same invocation as ``benchmarks/run.py --instructions`` counts it (``--no-hand``
skips it). Needs valgrind, as ``--instructions`` does.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

HOOKS = ("start_training_batch", "after_backward", "before_optimizer_step", "end_training_batch")
STEPS = 2000
"""N: the runs are N and 2N steps of four rounds each."""


def _child(plugins: int, steps: int) -> None:
    """Under callgrind: the rounds, N and 2N steps between marks."""
    import numpy  # noqa: F401  # the fence covers NumPy's generator where it is imported
    import torch
    from benchmarks.loop.instructions import instrumented, mark
    from benchmarks.loop.variants import NoOpPlugin

    from bz.plugins._context import PluginContext
    from bz.plugins._sandbox import PluginSet

    torch.set_num_threads(1)
    # run.py's no-op plugin, which implements every hook: given these four only.
    plugin_set = PluginSet([(NoOpPlugin(index), HOOKS) for index in range(plugins)])
    context = PluginContext()
    plugin_set.call(HOOKS[1], context)  # the fence and the view, as a run's first round
    callers = plugin_set.callers

    def run(count: int) -> None:
        for _ in range(count):
            for hook in HOOKS:
                callers[hook](context)

    run(200)  # the interpreter's specialising, the generated rounds
    gc.collect()
    gc.freeze()
    with instrumented():
        mark()
        run(steps)
        mark()
        gc.collect()
        mark()
        run(2 * steps)
        mark()


def main(argv: list[str] | None = None) -> int:
    """Count the rounds (and the hand step) and print them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugins", type=int, default=10)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--no-hand", dest="hand", action="store_false")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.plugins, args.steps)
        return 0
    # Run as a script (not the counted child, which sees the checkout through links):
    # the modules import each other as ``benchmarks.*``, so the repository's root goes
    # on the path, as benchmarks/run.py does.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.loop.instructions import (
        MARKS_PER_VARIANT,
        callgrind,
        count,
        per_step,
        valgrind,
    )
    from benchmarks.loop.instructions import (
        STEPS as LOOP_STEPS,
    )
    from benchmarks.loop.variants import HAND

    if valgrind() is None:
        print("rounds: skipped (valgrind is not installed)")
        return 0
    argv_child = ["-m", "benchmarks.rounds", "--child", "--plugins", str(args.plugins)]
    counts = callgrind([*argv_child, "--steps", str(args.steps)], MARKS_PER_VARIANT)
    (rounds,) = per_step(counts, args.steps)
    print(
        f"rounds of {args.plugins} no-op plugins, 4 per-batch hooks: {rounds:,.0f} "
        f"instructions per step ({rounds / 4:,.0f} per round)"
    )
    if args.hand:
        (hand,) = count("tiny", [HAND], LOOP_STEPS["tiny"])
        share = rounds / args.plugins / hand.per_step * 100
        print(f"hand-written tiny step: {hand.per_step / 1e6:.4f} M; per plugin {share:.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
