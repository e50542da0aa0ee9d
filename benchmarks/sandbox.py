"""What the sandbox's guarantees cost: the random fence per hook, a snapshot, a rewind.

::

    .venv/bin/python benchmarks/sandbox.py            # a few seconds
    .venv/bin/python benchmarks/sandbox.py --json out.json

* **fence**: one ``PluginSet.call`` of a batch hook with 1 and with 10 no-op plugins,
  with the fence on and with a fence that does nothing; the difference is what the
  fence costs per hook call (it is taken once per call, whatever the number of
  plugins). A hook no plugin implements returns before the fence: its cost is shown too.
* **snapshot** / **rewind**: ``bz.training.rewind.Snapshot`` taken and put back for the
  tiny MLP of ``benchmarks/run.py`` (32 → 64 → 10, Adam) and the medium one
  (512 → 512 → 512 → 10), with the bytes a snapshot holds (model, optimizer state).

Every number is the fastest of several ``timeit`` repetitions, with one torch thread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import sys
import timeit
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn

import bz
from bz.plugins._context import PluginContext
from bz.plugins._sandbox import PluginSet
from bz.training.loop import Run
from bz.training.rewind import Snapshot


class _Noop:
    def __init__(self, index: int) -> None:
        self.name = f"noop{index}"

    def end_training_batch(self, context: PluginContext) -> None:
        """Does nothing: the call itself is what is timed."""


class _NoFence:
    """A fence that marks and restores nothing: the baseline."""

    def mark(self) -> None:
        return None

    def put_back(self, mark: object) -> None:
        return None


def _per_call(function: Any, number: int, repeat: int) -> float:
    """Microseconds per call: the fastest repetition (on a shared machine the slower ones
    measure the neighbours)."""
    times = timeit.repeat(function, number=number, repeat=repeat)
    return min(times) / number * 1e6


def fence_costs(number: int, repeat: int) -> dict[str, float]:
    """Microseconds per hook call, fenced and not, for 1 and 10 plugins."""
    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)
    context = PluginContext()
    results: dict[str, float] = {}
    for count in (1, 10):
        plugins = PluginSet([(_Noop(i), ("end_training_batch",)) for i in range(count)])
        plugins.call("end_training_batch", context)  # builds the fence and the view

        def call(plugins: PluginSet = plugins) -> None:
            plugins.call("end_training_batch", context)

        # Fenced and bare alternate, so a noisy neighbour slows both alike.
        fence = plugins._fence
        fenced_times, bare_times = [], []
        for _ in range(repeat):
            plugins._fence = fence
            fenced_times.append(_per_call(call, number, 1))
            plugins._fence = _NoFence()  # type: ignore[assignment]  # the baseline: same path, no fence
            bare_times.append(_per_call(call, number, 1))
        fenced, bare = min(fenced_times), min(bare_times)
        results[f"{count}_plugins_fenced_us"] = fenced
        results[f"{count}_plugins_unfenced_us"] = bare
        results[f"{count}_plugins_fence_us"] = fenced - bare
    # For scale: torch's own get_state + set_state, which the fence cannot avoid.
    generator = torch.default_generator
    results["torch_get_set_state_us"] = _per_call(
        lambda: generator.set_state(generator.get_state()), number, repeat
    )
    empty = PluginSet([(_Noop(0), ("end_training_batch",))])
    results["unimplemented_hook_us"] = _per_call(
        lambda: empty.call("after_backward", context), number, repeat
    )
    return results


def _setup(sizes: tuple[int, ...]) -> bz.TrainingSetup:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(sizes):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs = torch.randn(64, sizes[0])
    targets = torch.randint(0, sizes[-1], (64,))
    batches = [(inputs[i : i + 32], targets[i : i + 32]) for i in (0, 32)]
    return bz.TrainingSetup(
        model=model, loss_fn=nn.CrossEntropyLoss(), optimizer=optimizer, train_loader=batches
    )


def _state_bytes(snapshot: Snapshot) -> int:
    model, optimizer = snapshot.training.model, snapshot.training.optimizer
    assert model is not None  # captured whole
    assert optimizer is not None
    total: int = sum(t.numel() * t.element_size() for t in model.values())
    for state in optimizer["state"].values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += int(value.numel() * value.element_size())
    return total


def snapshot_costs(repeat: int) -> dict[str, dict[str, float]]:
    """Milliseconds to take and to put back a snapshot, and its size, per model."""
    results: dict[str, dict[str, float]] = {}
    for label, sizes in (("tiny_mlp", (32, 64, 10)), ("medium_mlp", (512, 512, 512, 10))):
        setup = _setup(sizes)
        config = bz.RunConfig(epochs=1, device="cpu", plugins=())
        # One epoch first, so the optimizer holds its state (Adam's two moments).
        bz.Trainer().fit(setup, config, [])
        run = Run(setup, config, PluginSet(), {})
        snapshot = Snapshot(run)
        take = _per_call(lambda run=run: Snapshot(run), 10, repeat) / 1000
        put_back = _per_call(lambda s=snapshot, r=run: s.put_back(r), 10, repeat) / 1000
        results[label] = {
            "parameters": float(sum(p.numel() for p in setup.model.parameters())),
            "snapshot_ms": take,
            "rewind_ms": put_back,
            "snapshot_mib": _state_bytes(snapshot) / 2**20,
        }
    return results


def main(argv: list[str] | None = None) -> None:
    """Print the table (and write JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--number", type=int, default=20_000, help="calls per repetition")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fence = fence_costs(args.number, args.repeat)
    snapshots = snapshot_costs(args.repeat)
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, python {sys.version.split()[0]}")
    print(f"torch {torch.__version__}, numpy {numpy.__version__}")
    print()
    print("per call of a batch hook          fenced   no fence   the fence")
    for count in (1, 10):
        fenced, bare = fence[f"{count}_plugins_fenced_us"], fence[f"{count}_plugins_unfenced_us"]
        print(
            f"  {count:>2} no-op plugin(s)            {fenced:6.2f} µs {bare:6.2f} µs"
            f"  {fenced - bare:6.2f} µs"
        )
    print(f"  a hook no plugin implements     {fence['unimplemented_hook_us']:6.2f} µs (no fence)")
    scale = fence["torch_get_set_state_us"]
    print(f"  for scale: torch get_state + set_state alone {scale:6.2f} µs")
    print()
    print("rewind                    parameters   snapshot    rewind    memory")
    for label, numbers in snapshots.items():
        print(
            f"  {label:<22} {numbers['parameters']:>11,.0f} {numbers['snapshot_ms']:8.3f} ms"
            f" {numbers['rewind_ms']:7.3f} ms {numbers['snapshot_mib']:7.2f} MiB"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"fence": fence, "snapshot": snapshots}, indent=2), encoding="utf-8"
        )


if __name__ == "__main__":
    main()
