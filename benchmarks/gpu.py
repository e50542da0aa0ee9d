"""bz against a hand-written loop on one GPU, at 32, bf16-mixed and 16-mixed precision.

::

    benchmarks/gpu.sh                          # on a GPU machine: under 5 minutes
    .venv/bin/python benchmarks/gpu.py --dry-run   # anywhere: a CPU smoke run (seconds)

For each precision it records:

- the per-step time of bz (no plugins, no metrics; and with the five classification
  metrics) against the hand-written loop, on a small transformer classifier at batch
  256 (CUDA events around each run, runs of N and of 1 steps so that the per-step
  figure excludes what a run costs once, rounds in rotating order, the median);
- host synchronisations: a full epoch of bz with the metrics on, every batch of it under
  ``torch.cuda.set_sync_debug_mode("error")`` (passes or names the first sync), and the
  syncs counted under ``"warn"`` in epochs of N and 2N batches (per batch, per run);
- peak memory (``torch.cuda.max_memory_allocated``) of each variant;
- how batches reach the GPU: every host-to-device copy of a batch tensor made by bz,
  whether it came from pinned memory and was ``non_blocking``.

bz's rows at bf16-mixed and 16-mixed need ``RunConfig(precision=...)``; without it they
are reported as "skipped (needs precision support)". ``--dry-run`` runs every part that
does not need CUDA on the CPU with a tiny model (sync checks become host-read counts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest.mock import patch

import attrs
import structlog
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Run as a script, Python puts benchmarks/ on the path; the shared clock is imported as
# ``benchmarks.clock``, so the repository's root goes there too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.clock import compare, per_step, timed

import bz
from bz.config import MetricSpec
from bz.metrics import build_metrics
from bz.testing import count_host_reads

if TYPE_CHECKING:
    from bz.plugins import PluginContext

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
FIVE_METRICS = ("accuracy", "precision", "recall", "f1_score", "top_k_accuracy")
Run = Callable[[], None]


@dataclass(frozen=True)
class Shape:
    """The model and data of one benchmark run."""

    vocabulary: int
    width: int
    heads: int
    layers: int
    sequence: int
    classes: int
    batch_size: int
    batches: int

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"transformer classifier: {self.layers} encoder layer(s), width {self.width}, "
            f"{self.heads} heads, sequence {self.sequence}, vocabulary {self.vocabulary}, "
            f"{self.classes} classes; batch {self.batch_size}, {self.batches} batches"
        )


FULL = Shape(
    vocabulary=8192,
    width=512,
    heads=8,
    layers=2,
    sequence=128,
    classes=1000,
    batch_size=256,
    batches=40,
)
DRY = Shape(
    vocabulary=64, width=16, heads=2, layers=1, sequence=8, classes=10, batch_size=8, batches=6
)


class Classifier(nn.Module):
    """Token ids ``(B, L)`` → embeddings → encoder layers → mean over tokens → classes."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape.vocabulary, shape.width)
        layer = nn.TransformerEncoderLayer(
            shape.width, shape.heads, 4 * shape.width, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)
        self.head = nn.Linear(shape.width, shape.classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class scores ``(B, classes)``."""
        hidden: torch.Tensor = self.encoder(self.embed(tokens))
        scores: torch.Tensor = self.head(hidden.mean(dim=1))
        return scores


def model(shape: Shape, device: torch.device) -> nn.Module:
    """The same initial weights for every variant."""
    torch.manual_seed(0)
    return Classifier(shape).to(device)


def loader(shape: Shape, batches: int, device: torch.device) -> DataLoader[Any]:
    """Token ids and targets on the host, batched by a DataLoader that pins them on CUDA."""
    generator = torch.Generator().manual_seed(1)
    size = batches * shape.batch_size
    tokens = torch.randint(0, shape.vocabulary, (size, shape.sequence), generator=generator)
    targets = torch.randint(0, shape.classes, (size,), generator=generator)
    return DataLoader(
        TensorDataset(tokens, targets),
        batch_size=shape.batch_size,
        pin_memory=device.type == "cuda",
    )


def _optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=1e-4)


def _autocast(device: torch.device, precision: str) -> Callable[[], Any]:
    if precision == "32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def prepare_hand(shape: Shape, batches: int, device: torch.device, precision: str) -> Run:
    """The hand-written loop: pinned batches copied with ``non_blocking=True``, autocast
    for the mixed precisions, a ``GradScaler`` for 16-mixed."""
    net = model(shape, device)
    optimizer = _optimizer(net)
    loss_fn = nn.CrossEntropyLoss()
    data = loader(shape, batches, device)
    cast = _autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def run() -> None:
        net.train()
        for tokens, targets in data:
            tokens = tokens.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with cast():
                loss = loss_fn(net(tokens), targets)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

    return run


def precision_supported() -> bool:
    """Whether this bz's RunConfig has a ``precision`` field."""
    return "precision" in attrs.fields_dict(bz.RunConfig)


def bz_skip_reason(precision: str, device: torch.device) -> str | None:
    """Why bz cannot run at ``precision`` here, or None when it can."""
    if precision != "32" and not precision_supported():
        return "skipped (needs precision support)"
    if precision == "16-mixed" and device.type != "cuda":
        return "skipped (bz runs 16-mixed on CUDA only)"
    return None


def bz_config(device: torch.device, precision: str) -> bz.RunConfig:
    """One epoch on ``device`` at ``precision`` (the field only when it is not 32)."""
    options: dict[str, Any] = {} if precision == "32" else {"precision": precision}
    return bz.RunConfig(epochs=1, device=str(device), seed=None, plugins=(), **options)


def prepare_bz(
    shape: Shape,
    batches: int,
    device: torch.device,
    precision: str,
    metrics: Sequence[str] = (),
    plugins: Sequence[Any] = (),
) -> Run:
    """``bz.Trainer().fit`` on the same model, data and optimizer."""
    net = model(shape, device)
    setup = bz.TrainingSetup(
        model=net,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=_optimizer(net),
        train_loader=loader(shape, batches, device),
    )
    config = bz_config(device, precision)
    built = build_metrics([MetricSpec(name) for name in metrics])

    def run() -> None:
        bz.Trainer().fit(setup, config, plugins=list(plugins), metrics=built)

    return run


# -- timing ------------------------------------------------------------------------------


@dataclass
class Row:
    """One variant at one precision."""

    precision: str
    variant: str
    step_ms: float | None = None
    ratio: float | None = None
    """Per-step time / the hand-written loop's at the same precision (median of rounds)."""
    peak_mib: float | None = None
    note: str = ""


def _peak_mib(run: Run, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure(shape: Shape, device: torch.device, precision: str, rounds: int) -> list[Row]:
    """Hand-written loop, bz, bz + five metrics at one precision: per-step ratio, peak."""
    variants: dict[str, Callable[[int], Run]] = {
        "hand-written": lambda n: prepare_hand(shape, n, device, precision),
    }
    skipped = bz_skip_reason(precision, device)
    if skipped is None:
        variants["bz, no plugins, no metrics"] = lambda n: prepare_bz(shape, n, device, precision)
        variants["bz + 5 metrics"] = lambda n: prepare_bz(
            shape, n, device, precision, FIVE_METRICS
        )
    steps = shape.batches
    full = {name: make(steps) for name, make in variants.items()}
    one = {name: make(1) for name, make in variants.items()}
    for run in (*full.values(), *one.values()):
        timed(run, device)  # warm-up: kernels, allocator, autotuning
    steps_of: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            long, short = timed(full[name], device), timed(one[name], device)
            steps_of[name] += per_step([long], [short], steps)
    base = steps_of["hand-written"]
    rows = []
    for name in names:
        rows.append(
            Row(
                precision=precision,
                variant=name,
                step_ms=statistics.median(steps_of[name]) * 1e3,
                ratio=compare(steps_of[name], base).ratio,
                peak_mib=_peak_mib(full[name], device),
            )
        )
    if skipped is not None:
        for name in ("bz, no plugins, no metrics", "bz + 5 metrics"):
            rows.append(Row(precision, name, note=skipped))
    return rows


# -- host synchronisations ---------------------------------------------------------------


class SyncErrorsDuringBatches:
    """A plugin that sets ``torch.cuda.set_sync_debug_mode("error")`` for every batch of
    the epoch (fetching, moving, the step, metric updates, the hooks), and back to
    ``"default"`` after the last one, before the epoch's one read of loss and metrics."""

    name = "sync_errors_during_batches"

    def start_training_loop(self, context: PluginContext) -> None:
        """Any sync from here on raises."""
        torch.cuda.set_sync_debug_mode("error")

    def end_training_batch(self, context: PluginContext) -> None:
        """After the last batch, syncs are allowed again."""
        if context.batch_index + 1 == context.training_batches_per_epoch:
            torch.cuda.set_sync_debug_mode("default")


def epoch_under_sync_errors(shape: Shape, device: torch.device, precision: str) -> str:
    """``"passed"``, or the first synchronising call of an epoch with the five metrics."""
    # Plugin faults are fatal here: a sync inside the plugin must not pass quietly.
    config = attrs.evolve(bz_config(device, precision), plugin_errors="raise")
    net = model(shape, device)
    setup = bz.TrainingSetup(
        model=net,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=_optimizer(net),
        train_loader=loader(shape, shape.batches, device),
    )
    metrics = build_metrics([MetricSpec(name) for name in FIVE_METRICS])
    try:
        bz.Trainer().fit(setup, config, plugins=[SyncErrorsDuringBatches()], metrics=metrics)
    except Exception as error:  # the report names whatever it was
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "passed"


@contextlib.contextmanager
def counting_syncs(counter: Counter[str]) -> Iterator[None]:
    """Count synchronising CUDA calls (``set_sync_debug_mode("warn")``) by message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        text = str(warning.message)
        if "synchroniz" in text:
            counter[text.splitlines()[0][:80]] += 1


def _hand_of(shape: Shape, device: torch.device, precision: str) -> Callable[[int], Run]:
    return lambda batches: prepare_hand(shape, batches, device, precision)


def _bz_of(shape: Shape, device: torch.device, precision: str) -> Callable[[int], Run]:
    return lambda batches: prepare_bz(shape, batches, device, precision, FIVE_METRICS)


def syncs_per_batch(
    shape: Shape, device: torch.device, prepare: Callable[[int], Run]
) -> tuple[float, float]:
    """Syncs (CUDA) or host reads (CPU) per batch and per run: epochs of N and 2N."""
    totals = []
    for count in (shape.batches, 2 * shape.batches):
        run = prepare(count)
        counter: Counter[str] = Counter()
        watch = counting_syncs if device.type == "cuda" else count_host_reads
        with watch(counter):
            run()
        totals.append(sum(counter.values()))
    per_batch = (totals[1] - totals[0]) / shape.batches
    return per_batch, totals[0] - per_batch * shape.batches


# -- transfers ---------------------------------------------------------------------------


def transfers(shape: Shape, device: torch.device) -> str:
    """How bz copies batches to the device: from pinned memory, with ``non_blocking``?"""
    if device.type != "cuda":
        return "n/a on the CPU (no copies)"
    seen: Counter[str] = Counter()
    original = torch.Tensor.to

    def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(tensor, *args, **kwargs)
        if tensor.device.type == "cpu" and result.device.type == "cuda":
            pinned = "pinned" if tensor.is_pinned() else "pageable"
            blocking = "non_blocking" if kwargs.get("non_blocking") else "blocking"
            seen[f"{pinned}, {blocking}"] += 1
        return result

    run = prepare_bz(shape, shape.batches, device, "32", FIVE_METRICS)
    with patch.object(torch.Tensor, "to", recording):
        run()
    return ", ".join(f"{count} {kind}" for kind, count in sorted(seen.items())) or "none seen"


# -- main --------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--device", help="cuda (default) or cpu (implied by --dry-run).")
    parser.add_argument(
        "--dry-run", action="store_true", help="A tiny model, 1 round: check the script runs."
    )
    parser.add_argument("--rounds", type=int, help="Timed rounds (default 5; 1 with --dry-run).")
    parser.add_argument(
        "--precision", action="append", choices=PRECISIONS, help="Only these (repeatable)."
    )
    parser.add_argument("--json", dest="json_path", help="Also write the results here.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every part and print a Markdown report."""
    args = parse(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run (or --device cpu)", file=sys.stderr)
        return 2
    shape = DRY if args.dry_run else FULL
    rounds = args.rounds or (1 if args.dry_run else 5)
    precisions = args.precision or list(PRECISIONS)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# bz on {name}: {shape.describe()}")
    print(f"torch {torch.__version__}, bz {bz.__version__}, median of {rounds} round(s)")
    if not precision_supported():
        print("(bz rows at bf16-mixed and 16-mixed: skipped (needs precision support))")
    started = time.monotonic()
    rows: list[Row] = []
    for precision in precisions:
        rows += measure(shape, device, precision, rounds)
    print()
    print("| precision | variant | per step | vs hand-written | peak memory |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        if row.note:
            print(f"| {row.precision} | {row.variant} | {row.note} | | |")
            continue
        peak = "—" if row.peak_mib is None else f"{row.peak_mib:.0f} MiB"
        print(
            f"| {row.precision} | {row.variant} | {row.step_ms:.2f} ms | {row.ratio:.3f}× "
            f"| {peak} |"
        )
    print()
    what = "host syncs" if device.type == "cuda" else "host reads (CPU: no sync mode)"
    print(f"{what} per batch (per run), epochs of N and 2N batches:")
    syncs: dict[str, Any] = {}
    for precision in precisions:
        hand = syncs_per_batch(shape, device, _hand_of(shape, device, precision))
        line = f"- {precision}: hand-written loop {hand[0]:g} per batch ({hand[1]:g} per run)"
        syncs[precision] = {"hand_per_batch": hand[0], "hand_per_run": hand[1]}
        if bz_skip_reason(precision, device) is None:
            mine = syncs_per_batch(shape, device, _bz_of(shape, device, precision))
            verdict = (
                epoch_under_sync_errors(shape, device, precision)
                if device.type == "cuda"
                else "n/a (needs CUDA)"
            )
            syncs[precision].update(
                {"bz_per_batch": mine[0], "bz_per_run": mine[1], "error_mode": verdict}
            )
            line += (
                f"; bz + 5 metrics {mine[0]:g} per batch ({mine[1]:g} per run); a full "
                f'epoch of bz + 5 metrics under set_sync_debug_mode("error"): {verdict}'
            )
        print(line)
    moved = transfers(shape, device)
    print(f"\nbatch copies to the device by bz: {moved}")
    print(f"\ntotal time: {time.monotonic() - started:.0f} s")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as out:
            json.dump(
                {
                    "device": name,
                    "shape": asdict(shape),
                    "rows": [asdict(row) for row in rows],
                    "syncs": syncs,
                    "transfers": moved,
                },
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
