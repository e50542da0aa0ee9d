"""What ``"isolation": "process"`` costs: per hook call, per step, and end to end.

::

    .venv/bin/python benchmarks/isolation.py            # about a minute on a quiet CPU
    .venv/bin/python benchmarks/isolation.py --json out.json

* **hook**: one ``PluginSet.call("end_training_batch")`` with one no-op plugin, in the
  training process and in a process of its own (the snapshot pickled and posted; no
  wait). Posted in rounds of 32 (below the queue's 64) with the replies drained between
  rounds, outside the clock, so no call is dropped; the epoch-level call (``end_epoch``,
  which waits for the plugin's reply) is timed too.
* **step**: the tiny MLP of ``benchmarks/run.py`` (32 -> 64 -> 10, Adam, batches of 32)
  trained by ``Trainer.fit`` with no plugin, the no-op plugin in process, and in its own
  process, against a hand-written plain-torch loop over the same batches, in the same
  run. Time per step inside the training loops (``start_training_loop`` to
  ``end_training_loop``, so the plugin process's start-up is not in it).
* **digits**: ``bz train`` of ``examples/digits`` (3 epochs, CPU) with ``tensorboard`` in
  process and with ``"isolation": "process"``: wall time of the whole command.

Every number is the best of a few repetitions, with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import bz
from bz.config import PluginSpec, RunConfig
from bz.plugins._context import PluginContext
from bz.plugins._loader import load_plugins

if TYPE_CHECKING:
    from bz.plugins._sandbox import PluginSet

REPO = Path(__file__).resolve().parent.parent

NOOP_MODULE = '''
class Noop:
    """Does nothing in its hooks: the call itself is what is timed."""

    def __init__(self):
        self.name = "bench_noop"

    def end_training_batch(self, context):
        pass

    def end_epoch(self, context):
        pass
'''


def _install_noop(root: Path) -> None:
    """A ``bench_noop`` plugin installed through an entry point (a process plugin's
    process finds it as it finds any installed plugin)."""
    info = root / "bz_bench_noop-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bz-bench-noop\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[bz.plugins]\nbench_noop = bz_bench_noop:Noop\n")
    (root / "bz_bench_noop.py").write_text(NOOP_MODULE)
    sys.path.insert(0, str(root))


def _plugins(isolation: str | None, run_config: RunConfig) -> PluginSet:
    if isolation is None:
        return load_plugins([], run_config)
    spec = PluginSpec("bench_noop", {"isolation": isolation}, "plugins[0].bench_noop")
    return load_plugins([spec], run_config, policy="raise")


def _context(run_config: RunConfig) -> PluginContext:
    context = PluginContext(epochs=3)
    context.run_config = run_config
    context.extra["active_plugins"] = ["bench_noop"]
    context.last_loss = torch.tensor(0.5)
    return context


def hook_costs(run_config: RunConfig, rounds: int) -> dict[str, float]:
    """Microseconds per batch-level call (and per waiting end_epoch), both ways."""
    results: dict[str, float] = {}
    for isolation in ("in-process", "process"):
        plugins = _plugins(isolation, run_config)
        context = _context(run_config)
        best, best_epoch = float("inf"), float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            for step in range(32):
                context.global_step = step
                plugins.call("end_training_batch", context)
            best = min(best, (time.perf_counter() - started) / 32)
            started = time.perf_counter()
            plugins.call("end_epoch", context)  # waits for every reply: drains the queue
            best_epoch = min(best_epoch, time.perf_counter() - started)
        plugins.call("end_training_session", context)
        plugins.close()
        assert not plugins.faults, plugins.faults
        results[f"{isolation}_batch_hook_us"] = best * 1e6
        results[f"{isolation}_end_epoch_us"] = best_epoch * 1e6
    return results


class _Clock:
    """In process: seconds inside the training loops, and steps."""

    def __init__(self) -> None:
        self.name = "clock"
        self.seconds = 0.0
        self.steps = 0
        self._started = 0.0

    def start_training_loop(self, context: PluginContext) -> None:
        self._started = time.perf_counter()

    def end_training_loop(self, context: PluginContext) -> None:
        self.seconds += time.perf_counter() - self._started
        self.steps += context.training_batch_count


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(count * 32, 32, generator=generator)
    targets = torch.randint(0, 10, (count * 32,), generator=generator)
    return [(inputs[i : i + 32], targets[i : i + 32]) for i in range(0, len(inputs), 32)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def plain_step(batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: int) -> float:
    """Seconds per step of a hand-written loop over the same batches."""
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for _ in range(epochs):
        for inputs, targets in batches:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(inputs), targets).backward()
            optimizer.step()
    return (time.perf_counter() - started) / (epochs * len(batches))


def fit_step(
    batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: int, isolation: str | None
) -> float:
    """Seconds per step of ``Trainer.fit`` with the no-op plugin (or none)."""
    run_config = RunConfig(epochs=epochs, device="cpu", checkpoint_interval=0)
    plugins = _plugins(isolation, run_config)
    clock = _Clock()
    model = _model()
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_loader=batches,
    )
    bz.Trainer().fit(setup, run_config, [*plugins.active, clock])
    return clock.seconds / clock.steps


def step_costs(batches_per_epoch: int, epochs: int, rounds: int) -> dict[str, float]:
    """Microseconds per step: plain torch, and fit with no plugin / in process / process."""
    batches = _batches(batches_per_epoch)
    best: dict[str, float] = {}
    for _ in range(rounds):
        measured = {
            "plain_torch": plain_step(batches, epochs),
            "fit_no_plugin": fit_step(batches, epochs, None),
            "fit_in_process": fit_step(batches, epochs, "in-process"),
            "fit_process": fit_step(batches, epochs, "process"),
        }
        for key, seconds in measured.items():
            best[key] = min(best.get(key, float("inf")), seconds)
    return {f"{key}_step_us": seconds * 1e6 for key, seconds in best.items()} | {
        f"{key}_vs_plain": seconds / best["plain_torch"] for key, seconds in best.items()
    }


def digits(epochs: int, rounds: int) -> dict[str, float]:
    """Wall seconds of ``bz train`` on examples/digits with tensorboard, both ways."""
    results: dict[str, float] = {}
    for isolation in ("in-process", "process"):
        best = float("inf")
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as folder:
                project = Path(folder)
                shutil.copy(REPO / "examples" / "digits" / "train.py", project / "train.py")
                config = json.loads((REPO / "examples" / "digits" / "bzconfig.json").read_text())
                config.update(epochs=epochs, device="cpu", checkpoint_interval=0)
                config["plugins"] = [{"tensorboard": {"isolation": isolation}}]
                (project / "bzconfig.json").write_text(json.dumps(config))
                started = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "bz", "train"],
                    cwd=project,
                    capture_output=True,
                    text=True,
                    check=False,
                    env={k: v for k, v in os.environ.items() if k != "BZ_CONFIG"},
                )
                elapsed = time.perf_counter() - started
                if done.returncode != 0:
                    raise SystemExit(f"digits ({isolation}) failed:\n{done.stderr[-2000:]}")
                best = min(best, elapsed)
        results[f"digits_tensorboard_{isolation}_s"] = best
    results["digits_process_vs_in_process"] = (
        results["digits_tensorboard_process_s"] / results["digits_tensorboard_in-process_s"]
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=200, help="batches per epoch (step)")
    parser.add_argument("--digits-epochs", type=int, default=3)
    parser.add_argument("--no-digits", action="store_true", help="skip the digits example")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as site:
        _install_noop(Path(site))
        run_config = RunConfig(device="cpu")
        results: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
        results |= hook_costs(run_config, rounds=20 * args.rounds)
        results |= step_costs(args.batches, epochs=2, rounds=args.rounds)
    if not args.no_digits:
        results |= digits(args.digits_epochs, rounds=max(1, args.rounds - 1))
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"{key:<40} {shown}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
