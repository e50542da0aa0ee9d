"""Kill storms: ``bz train`` started again and again, each time stopped by a random
signal after a random delay, then resumed to the end; the final ``model.pt`` must equal
an uninterrupted run's (``torch.equal`` per tensor).

The project trained is small and has every ingredient of a real one that a resume can
get wrong: a shuffled loader, dropout, a cosine schedule, validation, and
``early_stopping`` with ``restore_best_weights`` (patience 100: it never stops the run,
so the best weights are put back only at the end of the session, into ``model.pt``).

Each attempt is logged in one block: the signal, when it was sent, the exit code, the
last events the process wrote before the signal (``--log-format json``, plus a
``storm_mark`` per hook from a marker plugin, so the log says which part of the loop it
was in), the events that followed, and what the checkpoint folder held afterwards.

Run many storms outside the test suite (one at a time; they are timing-dependent)::

    python -m tests.kill_storm --storms 50            # seeds 1..50
    python -m tests.kill_storm --seed 17              # replay storm 17
    python -m tests.kill_storm --storms 20 --epochs 40 --attempts 30 --verbose

It exits 1 at the first storm whose weights differ, after printing that storm's log and
its seed. ``tests/integration/test_kill_storm.py`` runs a short storm in the suite
(``BZ_STORM_SEED`` replays a seed there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import torch

from bz.plugins import PluginContext, hook, plugin_logger

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED_ENV = "BZ_STORM_SEED"
"""A storm's seed, to replay a failure (the suite's storm and this script read it)."""

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
HANG_SECONDS = 300.0
"""How long a signalled process may take to end before the attempt counts as hung."""

TRAIN_PY = '''\
"""Noisy 4-class blobs: an MLP with dropout that overfits, so early stopping's best
epoch is not the last one and restoring it changes the weights."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(480, 16, generator=generator)
    targets = (inputs[:, :4].argmax(dim=1) + (torch.rand(480, generator=generator) < 0.3)) % 4
    train = TensorDataset(inputs[:320], targets[:320])
    val = TensorDataset(inputs[320:], targets[320:])
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-4)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        train_loader=DataLoader(train, batch_size=32, shuffle=True),
        val_loader=DataLoader(val, batch_size=80),
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs),
    )
'''

MARK_HOOKS = (
    "start_training_session",
    "load_checkpoint",
    "start_epoch",
    "end_training_loop",
    "start_validation_loop",
    "end_validation_loop",
    "end_epoch",
    "save_checkpoint",
    "end_training_session",
    "on_exception",
)


class StormMarks:
    """Logs ``storm_mark`` at each hook of :data:`MARK_HOOKS`: where the loop was."""

    def __init__(self) -> None:
        self.name = "storm_marks"

    def _mark(self, name: str, context: PluginContext) -> None:
        plugin_logger(self).info("storm_mark", hook=name, epoch=context.epoch + 1)


def _mark_method(name: str) -> Any:
    @hook
    def method(self: StormMarks, context: PluginContext) -> None:
        self._mark(name, context)

    method.__name__ = name
    return method


for _name in MARK_HOOKS:
    setattr(StormMarks, _name, _mark_method(_name))


def _install_marks(folder: Path) -> None:
    """A ``*.dist-info`` registering :class:`StormMarks` as plugin ``storm_marks``."""
    info = folder / "bz_storm_marks-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bz-storm-marks\nVersion: 0.0.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[bz.plugins]\nstorm_marks = tests.kill_storm:StormMarks\n", encoding="utf-8"
    )


# -- a project ---------------------------------------------------------------------------


@attrs.frozen
class Shape:
    """What a storm trains and how hard it is hit."""

    epochs: int = 40
    attempts: int = 30
    min_delay: float = 0.0
    """Seconds after the start at which a signal may come, at the earliest..."""
    max_delay: float | None = None
    """...and at the latest (None: the uninterrupted run's duration)."""


def make_project(folder: Path, epochs: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    config = {
        "epochs": epochs,
        "device": "cpu",
        "seed": 0,
        "checkpoint_interval": 1,
        "plugins": [
            "storm_marks",
            {
                "early_stopping": {
                    "monitor": "validation_loss",
                    "patience": 100,
                    "restore_best_weights": True,
                }
            },
        ],
    }
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    _install_marks(folder / "site")
    return folder


def _env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BZ_")}
    paths = [str(REPO_ROOT), str(folder / "site"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Started:
    """A ``bz train --log-format json`` in a project, its output going to files (a pipe
    nobody reads until the end would stall a long run on a full pipe)."""

    def __init__(self, folder: Path) -> None:
        self.out = folder / "stdout.log"
        self.err = folder / "stderr.log"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bz", "train", "--log-format", "json"],
                cwd=folder,
                env=_env(folder),
                stdout=out,
                stderr=err,
                # Ctrl-C as in a terminal, even when this runs in the background (where
                # the shell has the children ignore SIGINT).
                preexec_fn=_default_sigint,
            )

    def wait(self, timeout: float) -> tuple[str, str]:
        """Its stdout and stderr once it has ended (raises ``TimeoutExpired``)."""
        self.process.wait(timeout=timeout)
        return self.output()

    def output(self) -> tuple[str, str]:
        return self.out.read_text(encoding="utf-8"), self.err.read_text(encoding="utf-8")


def run_dir(folder: Path) -> Path | None:
    root = folder / ".bz" / "checkpoints"
    found = sorted(root.iterdir()) if root.is_dir() else []
    return found[0] if found else None


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    where = run_dir(folder)
    assert where is not None, f"no checkpoint folder under {folder}"
    payload = torch.load(where / "model.pt", map_location="cpu", weights_only=True)
    return dict(payload["model"])


def differing(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that are not ``torch.equal`` (all of them if keys differ)."""
    if left.keys() != right.keys():
        return sorted({*left, *right})
    return [key for key in left if not torch.equal(left[key], right[key])]


# -- what an attempt left behind ----------------------------------------------------------


def _events(stdout: str) -> list[dict[str, Any]]:
    events = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:  # a line cut short by SIGKILL
                events.append({"event": "(cut line)", "raw": line[:80]})
    return events


def _when(event: dict[str, Any]) -> float | None:
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


_SHOWN = ("hook", "epoch", "batch", "step", "path", "outcome", "exit_code", "signal", "error")


def describe_event(event: dict[str, Any]) -> str:
    parts = [str(event.get("event"))]
    for key in _SHOWN:
        if key in event and event[key] is not None:
            value = event[key]
            if key == "path":
                value = Path(str(value)).name
            parts.append(f"{key}={value}")
    return " ".join(parts)


def folder_listing(folder: Path) -> list[str]:
    """The run's checkpoint folder: each file, with its sidecar's position when it has one."""
    where = run_dir(folder)
    if where is None:
        return ["(no checkpoint folder)"]
    lines = []
    for path in sorted(where.iterdir()):
        if path.name.endswith(".json") and path.with_name(path.name[:-5]).exists():
            continue  # shown with its file
        note = ""
        side = path.with_name(path.name + ".json")
        if side.exists():
            try:
                meta = json.loads(side.read_text(encoding="utf-8"))
                note = f" [epoch {meta['epoch']} batch {meta['batch']} step {meta['step']}]"
            except (OSError, ValueError, KeyError):
                note = " [sidecar unreadable]"
        elif not path.name.startswith("."):
            note = " [no sidecar]"
        lines.append(f"{path.name} {path.stat().st_size}B{note}")
    return lines


@attrs.frozen
class Attempt:
    """One ``bz train`` of a storm and where the signal found it."""

    number: int
    signal: str | None
    """The signal sent (None: the process had exited before the delay ran out)."""
    delay: float
    code: int
    before: list[str]
    """The last events written before the signal (newest last)."""
    after: list[str]
    """The events written after it (how the process ended)."""
    listing: list[str]
    hung: bool = False
    """The process did not end after the signal (killed after ``hang_after`` seconds)."""

    def report(self) -> str:
        sent = f"{self.signal} after {self.delay:.2f}s" if self.signal else "no signal"
        state = "HUNG, killed" if self.hung else f"exit {self.code}"
        lines = [f"attempt {self.number}: {sent}, {state}"]
        lines += [f"    before: {line}" for line in self.before] or ["    before: (nothing)"]
        lines += [f"    after:  {line}" for line in self.after]
        lines += [f"    folder: {line}" for line in self.listing]
        return "\n".join(lines)


def attempt(
    folder: Path,
    number: int,
    rng: random.Random,
    delays: tuple[float, float],
    hang_after: float = HANG_SECONDS,
) -> Attempt:
    """Start ``bz train``, send a random signal after a random delay, wait for its end."""
    chosen = rng.choice(SIGNALS)
    delay = rng.uniform(*delays)
    started = Started(folder)
    process = started.process
    deadline = time.monotonic() + delay
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    sent_at = time.time()
    sent: str | None = None
    if process.poll() is None:
        process.send_signal(chosen)
        sent = chosen.name
    try:
        stdout, stderr = started.wait(hang_after)
    except subprocess.TimeoutExpired:  # a process that never ends is a window too
        process.kill()
        stdout, stderr = started.wait(60)
        stderr += f"\n(HUNG: still running {hang_after:.0f}s after the signal; killed)"
    events = _events(stdout)
    before = [e for e in events if (_when(e) or 0.0) <= sent_at] if sent else events
    after = [e for e in events if (_when(e) or 0.0) > sent_at] if sent else []
    hung = "(HUNG" in stderr
    if hung or process.returncode not in (0, -9, 130, 143):
        after.append({"event": "stderr", "error": stderr[-2000:]})
    return Attempt(
        number=number,
        signal=sent,
        delay=delay,
        code=process.returncode,
        before=[describe_event(e) for e in before[-4:]],
        after=[describe_event(e) for e in after[:6]],
        listing=folder_listing(folder),
        hung=hung,
    )


def finish(folder: Path) -> tuple[int, str]:
    """``bz train`` left alone until it ends: exit code and the last events."""
    started = Started(folder)
    stdout, stderr = started.wait(900)
    events = [describe_event(e) for e in _events(stdout)[-6:]]
    return started.process.returncode, "\n".join([*events, stderr[-2000:]])


# -- storms --------------------------------------------------------------------------------


@attrs.frozen
class Reference:
    """An uninterrupted run: its final weights and how long it took."""

    weights: dict[str, torch.Tensor]
    seconds: float
    best_epoch: int | None


def reference(folder: Path, epochs: int) -> Reference:
    project = make_project(folder, epochs)
    started = time.monotonic()
    code, tail = finish(project)
    seconds = time.monotonic() - started
    assert code == 0, f"the uninterrupted run failed ({code}):\n{tail}"
    best = None
    for line in tail.splitlines():
        if line.startswith("early_stopping_restored") and "epoch=" in line:
            best = int(line.split("epoch=")[1].split()[0])
    return Reference(final_weights(project), seconds, best)


@attrs.frozen
class Outcome:
    seed: int
    attempts: list[Attempt]
    differs: list[str]
    final: str

    def report(self) -> str:
        lines = [a.report() for a in self.attempts]
        lines.append(f"final run:\n{self.final}")
        verdict = f"DIFFERENT ({', '.join(self.differs)})" if self.differs else "equal"
        lines.append(f"storm seed {self.seed}: final model.pt {verdict}")
        if self.differs:
            lines.append(
                f"replay: {SEED_ENV}={self.seed} or python -m tests.kill_storm --seed {self.seed}"
            )
        return "\n".join(lines)


def storm(folder: Path, seed: int, shape: Shape, ref: Reference) -> Outcome:
    """One storm in a fresh project under ``folder``."""
    project = make_project(folder, shape.epochs)
    rng = random.Random(seed)
    longest = shape.max_delay if shape.max_delay is not None else ref.seconds
    delays = (shape.min_delay, max(shape.min_delay, longest))
    attempts = [attempt(project, n + 1, rng, delays) for n in range(shape.attempts)]
    hung = [f"(attempt {a.number} hung)" for a in attempts if a.hung]
    code, tail = finish(project)
    if hung:
        return Outcome(seed, attempts, hung, tail)
    if code != 0:
        return Outcome(seed, attempts, [f"(final bz train exited {code})"], tail)
    return Outcome(seed, attempts, differing(final_weights(project), ref.weights), tail)


def storms(seeds: Sequence[int], shape: Shape, *, verbose: bool = False) -> Iterator[Outcome]:
    """Storms one after another (each in a temporary folder), after one reference run."""
    with tempfile.TemporaryDirectory(prefix="bz-storm-") as tmp:
        root = Path(tmp)
        ref = reference(root / "reference", shape.epochs)
        if verbose:
            print(
                f"reference: {ref.seconds:.1f}s, best epoch {ref.best_epoch} of {shape.epochs}",
                flush=True,
            )
        for seed in seeds:
            folder = root / f"storm-{seed}"
            outcome = storm(folder, seed, shape, ref)
            yield outcome
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kill_storm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--storms", type=int, default=10, help="how many storms (default 10)")
    parser.add_argument("--first-seed", type=int, default=1, help="seed of the first storm")
    parser.add_argument("--seed", type=int, help="run only this storm (a replay)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--attempts", type=int, default=30, help="signals per storm")
    parser.add_argument("--min-delay", type=float, default=0.0)
    parser.add_argument(
        "--max-delay", type=float, help="seconds (default: an uninterrupted run's duration)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every storm's log")
    args = parser.parse_args(argv)
    seeds = (
        [args.seed] if args.seed is not None else [args.first_seed + i for i in range(args.storms)]
    )
    shape = Shape(args.epochs, args.attempts, args.min_delay, args.max_delay)
    done = 0
    for outcome in storms(seeds, shape, verbose=True):
        done += 1
        landed = sum(1 for a in outcome.attempts if a.signal)
        print(
            f"storm {done}/{len(seeds)} seed {outcome.seed}: {landed} signals, "
            f"{'DIFFERENT' if outcome.differs else 'equal'}",
            flush=True,
        )
        if args.verbose or outcome.differs:
            print(outcome.report(), flush=True)
        if outcome.differs:
            return 1
    print(f"{done} storm(s), all equal", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
