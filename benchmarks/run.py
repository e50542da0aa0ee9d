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

See docs/performance.md for the method and the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import importlib
import importlib.util
import io
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import time
import timeit
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import attrs
import structlog
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bz
from bz.config import MetricSpec
from bz.metrics import build_metrics
from bz.plugins import HOOK_NAMES, HOOKS, PluginContext
from bz.plugins._sandbox import PluginSet
from bz.plugins.console_out import ConsoleOut, ConsoleOutConfig
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig
from bz.testing import count_host_reads

Batch = tuple[torch.Tensor, torch.Tensor]
Run = Callable[[], None]

# The built-in metrics that apply to a classifier's (N, C) scores and (N,) targets.
# mean_squared_error and mean_absolute_error need predictions shaped like the
# targets, so a classifier cannot use them.
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1_score", "top_k_accuracy")

NOOP_PLUGINS = 10

# The variants, by name.
HAND = "hand loop"
HAND_ACCURACY = "hand loop + accuracy (hand-written)"
HAND_FIVE = "hand loop + 5 metrics (hand-written)"
HAND_BF16 = "hand loop, bf16 autocast"
BZ = "bz, no plugins, no metrics"
BZ_ACCURACY = "bz + accuracy"
BZ_FIVE = "bz + 5 metrics"
BZ_BUILTINS = "bz + console_out + early_stopping + 5 metrics"
BZ_NOOP = f"bz, {NOOP_PLUGINS} no-op plugins"
BZ_BF16 = "bz, bf16-mixed"
LIGHTNING = "PyTorch Lightning"


# -- workloads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A classifier MLP, its data, and how long to train it."""

    name: str
    features: int
    hidden: tuple[int, ...]
    classes: int
    batch_size: int
    batches: int
    epochs: int
    loader: str = "list"
    """``list``: pre-made tensors; ``dataloader``: a ``DataLoader`` over a ``TensorDataset``."""

    @property
    def steps(self) -> int:
        """Optimizer steps in one run."""
        return self.batches * self.epochs

    def describe(self) -> str:
        """One line for the report."""
        widths = " → ".join(str(w) for w in (self.features, *self.hidden, self.classes))
        data = "DataLoader(TensorDataset)" if self.loader == "dataloader" else "in-memory list"
        return (
            f"MLP {widths}, batch {self.batch_size}, {self.batches} batches × "
            f"{self.epochs} epochs = {self.steps} steps, SGD(momentum=0.9), "
            f"cross-entropy, {data}"
        )

    def model(self, seed: int) -> nn.Module:
        """The same initial weights for every variant."""
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = self.features
        for hidden in self.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, self.classes))
        return nn.Sequential(*layers)

    def data(self, seed: int, device: torch.device, batches: int | None = None) -> list[Batch]:
        """``batches`` (default: all) pre-made ``(inputs, targets)`` pairs on ``device``."""
        count = self.batches if batches is None else batches
        generator = torch.Generator().manual_seed(seed)
        size = count * self.batch_size
        inputs = torch.randn(size, self.features, generator=generator)
        targets = torch.randint(0, self.classes, (size,), generator=generator)
        inputs, targets = inputs.to(device), targets.to(device)
        return [
            (inputs[i : i + self.batch_size], targets[i : i + self.batch_size])
            for i in range(0, size, self.batch_size)
        ]


def workloads(quick: bool, dataloader: bool) -> list[Workload]:
    """The tiny (overhead-bound) and medium (compute-bound) MLPs of issue #16.

    Runs are short (about a second) so that many alternating repetitions fit: on a
    shared machine, noise comes in bursts, and pairing each run with the hand-written
    run of the same round cancels most of it.
    """
    scale = 4 if quick else 1
    chosen = [
        Workload("tiny", 64, (64,), 10, 64, 1000 // scale, 2),
        Workload("medium", 784, (512,), 10, 128, 150 // scale, 2),
    ]
    if dataloader:
        chosen.append(
            Workload("tiny-dataloader", 64, (64,), 10, 64, 1000 // scale, 2, "dataloader")
        )
    return chosen


def _loader(workload: Workload, batches: list[Batch]) -> Any:
    if workload.loader == "list":
        return batches
    from torch.utils.data import DataLoader, TensorDataset

    inputs = torch.cat([inputs for inputs, _ in batches])
    targets = torch.cat([targets for _, targets in batches])
    return DataLoader(TensorDataset(inputs, targets), batch_size=workload.batch_size)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


# -- variants ----------------------------------------------------------------------------


@dataclass
class Variant:
    """A way of training: ``prepare`` builds everything (untimed) and returns the run.

    ``baseline`` names the hand-written variant this one is compared with: bz's rows
    against the hand-written loop doing the same work, never against bz itself.
    """

    name: str
    prepare: Callable[[Workload, list[Batch], torch.device], Run]
    baseline: str = HAND
    counts_reads: bool = True
    times: list[float] = field(default_factory=list)
    short_times: list[float] = field(default_factory=list)


def _hand_loop(
    workload: Workload,
    batches: list[Batch],
    device: torch.device,
    metrics: HandMetrics | None = None,
    autocast: torch.dtype | None = None,
) -> Run:
    """The loop everyone writes: zero_grad, forward, loss, backward, step.

    With ``metrics``, it also counts them on the device per batch and reads them back
    once per epoch; with ``autocast``, forward and loss run under ``torch.autocast``.
    """
    model = workload.model(0).to(device)
    optimizer = _optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    loader = _loader(workload, batches)
    epochs = workload.epochs
    cast = (
        contextlib.nullcontext
        if autocast is None
        else lambda: torch.autocast(device_type=device.type, dtype=autocast)
    )

    def run() -> None:
        for _ in range(epochs):
            model.train()
            if metrics is not None:
                metrics.reset()
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                with cast():
                    outputs = model(inputs)
                    loss = loss_fn(outputs, targets)
                loss.backward()
                optimizer.step()
                if metrics is not None:
                    metrics.update(outputs.detach(), targets)
            if metrics is not None:
                metrics.compute()

    return run


class HandAccuracy:
    """Accuracy as one writes it by hand: ``correct += (outputs.argmax(1) == y).sum()``."""

    def __init__(self, classes: int, device: torch.device) -> None:
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.total = 0

    def reset(self) -> None:
        """Zero the counts (each epoch)."""
        self.correct.zero_()
        self.total = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch: argmax, compare, sum, add."""
        self.correct += (outputs.argmax(1) == targets).sum()
        self.total += targets.shape[0]

    def compute(self) -> list[float]:
        """The one host read of the epoch."""
        return [float((self.correct / max(self.total, 1)).item())]


class HandFiveMetrics:
    """Accuracy, macro precision, recall and F1, and top-5 accuracy, written by hand.

    Per batch, on the device: a confusion matrix by ``bincount`` (accuracy, precision,
    recall and F1 all come from it) and top-k hits by ``topk``. Once per epoch, the
    five numbers are computed and read back together.
    """

    def __init__(self, classes: int, device: torch.device, k: int = 5) -> None:
        self.classes, self.k = classes, k
        self.confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)
        self.hits = torch.zeros((), dtype=torch.int64, device=device)
        self.total = 0

    def reset(self) -> None:
        """Zero the counts (each epoch)."""
        self.confusion.zero_()
        self.hits.zero_()
        self.total = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch: one argmax and bincount, one topk."""
        predicted = outputs.argmax(1)
        classes = self.classes
        self.confusion += torch.bincount(targets * classes + predicted, minlength=classes**2)
        self.hits += (outputs.topk(self.k, 1).indices == targets[:, None]).any(1).sum()
        self.total += targets.shape[0]

    def compute(self) -> list[float]:
        """The five results, with one host read."""
        confusion = self.confusion.view(self.classes, self.classes).double()
        true_positive = confusion.diagonal()
        precision = true_positive / confusion.sum(0).clamp(min=1)
        recall = true_positive / confusion.sum(1).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        total = max(self.total, 1)
        values = torch.stack(
            [
                true_positive.sum() / total,
                precision.mean(),
                recall.mean(),
                f1.mean(),
                self.hits / total,
            ]
        )
        return [float(value) for value in values.tolist()]


HandMetrics = HandAccuracy | HandFiveMetrics


def prepare_hand_written(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """The plain hand-written loop."""
    return _hand_loop(workload, batches, device)


def prepare_hand_accuracy(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """The hand-written loop with hand-written accuracy."""
    metrics = HandAccuracy(workload.classes, device)
    return _hand_loop(workload, batches, device, metrics)


def prepare_hand_five(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """The hand-written loop with hand-written equivalents of the five metrics."""
    metrics = HandFiveMetrics(workload.classes, device)
    return _hand_loop(workload, batches, device, metrics)


def prepare_hand_bf16(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """The hand-written loop under ``torch.autocast(device_type, dtype=torch.bfloat16)``."""
    return _hand_loop(workload, batches, device, autocast=torch.bfloat16)


def precision_supported() -> bool:
    """Whether this bz's RunConfig has a ``precision`` field (bf16-mixed, 16-mixed)."""
    return "precision" in attrs.fields_dict(bz.RunConfig)


def _bz_run(
    workload: Workload,
    batches: list[Batch],
    device: torch.device,
    plugins: Sequence[Any],
    metrics: dict[str, Any],
    **options: Any,
) -> Run:
    model = workload.model(0).to(device)
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=_optimizer(model),
        train_loader=_loader(workload, batches),
    )
    # seed=None: the model is already seeded; every variant starts from the same weights.
    config = bz.RunConfig(
        epochs=workload.epochs, device=str(device), seed=None, plugins=(), **options
    )

    def run() -> None:
        bz.Trainer().fit(setup, config, plugins=plugins, metrics=metrics)

    return run


def prepare_bz(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """bz with no plugins and no metrics."""
    return _bz_run(workload, batches, device, [], {})


def builtin_metrics(names: Sequence[str] = CLASSIFICATION_METRICS) -> dict[str, Any]:
    """Built-in metrics by name (fresh objects)."""
    return build_metrics([MetricSpec(name) for name in names])


def prepare_bz_accuracy(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """bz with ``accuracy``."""
    return _bz_run(workload, batches, device, [], builtin_metrics(["accuracy"]))


def prepare_bz_five(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """bz with the five classification metrics."""
    return _bz_run(workload, batches, device, [], builtin_metrics())


def prepare_bz_builtins(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """bz with console_out (to a null stream), early_stopping and the five metrics."""
    plugins = [
        ConsoleOut(ConsoleOutConfig(), stream=io.StringIO()),
        # Large patience so it never stops; training_loss since there is no validation.
        EarlyStopping(EarlyStoppingConfig(monitor="training_loss", patience=10**9)),
    ]
    return _bz_run(workload, batches, device, plugins, builtin_metrics())


def prepare_bz_bf16(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """bz with ``precision="bf16-mixed"``."""
    return _bz_run(workload, batches, device, [], {}, precision="bf16-mixed")


class NoOpPlugin:
    """A plugin that implements every hook and does nothing in any of them."""

    def __init__(self, index: int) -> None:
        self.name = f"noop_{index}"

    def start_training_session(self, context: PluginContext) -> None:
        """No-op."""

    def load_checkpoint(self, context: PluginContext) -> None:
        """No-op."""

    def start_epoch(self, context: PluginContext) -> None:
        """No-op."""

    def start_training_loop(self, context: PluginContext) -> None:
        """No-op."""

    def start_training_batch(self, context: PluginContext) -> None:
        """No-op."""

    def after_backward(self, context: PluginContext) -> None:
        """No-op."""

    def before_optimizer_step(self, context: PluginContext) -> None:
        """No-op."""

    def end_training_batch(self, context: PluginContext) -> None:
        """No-op."""

    def end_training_loop(self, context: PluginContext) -> None:
        """No-op."""

    def start_validation_loop(self, context: PluginContext) -> None:
        """No-op."""

    def start_validation_batch(self, context: PluginContext) -> None:
        """No-op."""

    def end_validation_batch(self, context: PluginContext) -> None:
        """No-op."""

    def end_validation_loop(self, context: PluginContext) -> None:
        """No-op."""

    def save_checkpoint(self, context: PluginContext) -> None:
        """No-op."""

    def end_epoch(self, context: PluginContext) -> None:
        """No-op."""

    def end_training_session(self, context: PluginContext) -> None:
        """No-op."""

    def on_rewind(self, context: PluginContext) -> None:
        """No-op."""

    def on_exception(self, context: PluginContext) -> None:
        """No-op."""


# The benchmark is only meaningful if the no-op plugin really implements every hook.
assert all(callable(getattr(NoOpPlugin, hook, None)) for hook in HOOK_NAMES)


def prepare_bz_noop(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """(d) bz with 10 plugins implementing every hook as a no-op."""
    plugins = [NoOpPlugin(i) for i in range(NOOP_PLUGINS)]
    return _bz_run(workload, batches, device, plugins, {})


PER_BATCH_HOOKS = tuple(spec.name for spec in HOOKS if spec.phase == "train" and spec.per_batch)
"""The hooks every training step calls."""


def dispatch_cost(plugins: int, number: int = 20_000, repeats: int = 15) -> float:
    """Microseconds one hook call costs through the sandbox with ``plugins`` no-op plugins.

    The fastest of ``repeats`` timings of ``number`` calls: unlike a whole training run,
    this is the sandbox alone, and the fastest timing is the least disturbed one.
    """
    plugin_set = PluginSet([(NoOpPlugin(i), HOOK_NAMES) for i in range(plugins)])
    call, context = plugin_set.call, PluginContext()
    timings = timeit.repeat(lambda: call("after_backward", context), number=number, repeat=repeats)
    return min(timings) / number * 1e6


def lightning_available() -> bool:
    """Whether PyTorch Lightning is installed (``pip install 'bz-cli[bench]'``)."""
    return importlib.util.find_spec("pytorch_lightning") is not None


def prepare_lightning(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """(e) PyTorch Lightning, with its extras (logger, checkpoints, progress bar) off."""
    # Imported by name: Lightning is optional, so the benchmark type-checks without it.
    pl: Any = importlib.import_module("pytorch_lightning")
    model = workload.model(0).to(device)
    loss_fn = nn.CrossEntropyLoss()

    class Module(pl.LightningModule):  # type: ignore[misc]  # pl is Any (see above)
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Batch, batch_index: int) -> torch.Tensor:
            inputs, targets = batch
            loss: torch.Tensor = loss_fn(self.model(inputs), targets)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _optimizer(self.model)

    module = Module()
    trainer = pl.Trainer(
        max_epochs=workload.epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = _loader(workload, batches)
    # Lightning reads a list as a list of loaders; hand it the batches as one iterable.
    iterable = _Batches(loader) if isinstance(loader, list) else loader

    def run() -> None:
        trainer.fit(module, train_dataloaders=iterable)

    return run


class _Batches:
    """A list of batches seen as one iterable with a length."""

    def __init__(self, batches: list[Batch]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def variants(with_lightning: bool, with_bf16: bool) -> list[Variant]:
    """The variants, the plain hand-written loop first; each names its hand-written match."""
    chosen = [
        Variant(HAND, prepare_hand_written),
        Variant(HAND_ACCURACY, prepare_hand_accuracy),
        Variant(HAND_FIVE, prepare_hand_five),
        Variant(BZ, prepare_bz),
        Variant(BZ_ACCURACY, prepare_bz_accuracy, baseline=HAND_ACCURACY),
        Variant(BZ_FIVE, prepare_bz_five, baseline=HAND_FIVE),
        Variant(BZ_BUILTINS, prepare_bz_builtins, baseline=HAND_FIVE),
        Variant(BZ_NOOP, prepare_bz_noop),
    ]
    if with_bf16:
        chosen.append(Variant(HAND_BF16, prepare_hand_bf16))
        if precision_supported():
            chosen.append(Variant(BZ_BF16, prepare_bz_bf16, baseline=HAND_BF16))
    if with_lightning:
        chosen.append(Variant(LIGHTNING, prepare_lightning))
    return chosen


# -- timing ------------------------------------------------------------------------------


def _timed(run: Run, device: torch.device) -> float:
    """Seconds ``run`` takes.

    On CUDA: CUDA events (one sync, at the end). On CPU: the CPU time of this thread,
    which is where all the work happens with one torch thread and no loader workers,
    so that other processes on a shared machine do not inflate the numbers.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # torch.cuda.Event's constructor carries no annotations in torch's stubs.
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        run()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000.0
    started = time.thread_time()
    run()
    return time.thread_time() - started


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
            seconds = _timed(variant.prepare(workload, batches, device), device)
            if round_index >= warmup:
                variant.times.append(seconds)
    # The fixed cost of a run (setup, the first and last hooks, the summary), from runs
    # of a single step.
    one = Workload(workload.name, *_shape(workload), batches=1, epochs=1, loader=workload.loader)
    one_batch = one.data(1, device)
    for round_index in range(repeats):
        shift = round_index % len(chosen)
        for variant in chosen[shift:] + chosen[:shift]:
            variant.short_times.append(_timed(variant.prepare(one, one_batch, device), device))


def _shape(workload: Workload) -> tuple[int, tuple[int, ...], int, int]:
    return workload.features, workload.hidden, workload.classes, workload.batch_size


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
        short = Workload(
            workload.name, *_shape(workload), batches=count, epochs=1, loader=workload.loader
        )
        run = variant.prepare(short, short.data(1, device), device)
        counter: Counter[str] = Counter()
        with count_host_reads(counter):
            run()
        totals.append(sum(counter.values()))
        kinds = counter
    per_batch = (totals[1] - totals[0]) / size
    return HostReads(per_batch, totals[0] - per_batch * size, dict(kinds))


# -- report ------------------------------------------------------------------------------


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


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4)
    return low, high


def _per_step(variant: Variant, steps: int) -> list[float]:
    """Each round's per-step time: (N-step run - 1-step run) / (N - 1)."""
    return [
        (full - short) / (steps - 1)
        for full, short in zip(variant.times, variant.short_times, strict=True)
    ]


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
        ratios = [m / t for m, t in zip(mine, theirs, strict=True)]
        low, high = _quartiles(ratios)
        overhead = statistics.median([m - t for m, t in zip(mine, theirs, strict=True)])
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
                step_ratio=statistics.median(ratios),
                step_ratio_iqr=(high - low) / 2,
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
    """The issue's targets, checked against one workload's rows (fixed cost excluded)."""
    by_name = {row.variant: row for row in table}
    plain_target = 1.02 if name.startswith("tiny") else 1.01
    lines = [
        f"Targets ({name}, per step, same rounds, fixed cost per run excluded):",
        f"- {BZ} vs {HAND}: {_versus(by_name[BZ], plain_target)}",
        f"- {BZ_ACCURACY} vs {HAND_ACCURACY}: {_versus(by_name[BZ_ACCURACY], 1.02)}",
        f"- {BZ_FIVE} vs {HAND_FIVE}: {_versus(by_name[BZ_FIVE], 1.05)}",
        f"- {BZ_BUILTINS} vs {HAND_FIVE}: {_versus(by_name[BZ_BUILTINS])}",
    ]
    hand, plain = by_name[HAND], by_name[BZ]
    for bz_row, hand_row in ((BZ_ACCURACY, HAND_ACCURACY), (BZ_FIVE, HAND_FIVE)):
        own = by_name[bz_row].step_us - plain.step_us
        theirs = by_name[hand_row].step_us - hand.step_us
        lines.append(
            f"- what the metrics add per step: {bz_row} - {BZ} = {own:+.1f} µs; "
            f"{hand_row} - {HAND} = {theirs:+.1f} µs"
        )
    noop = by_name[BZ_NOOP]
    per_plugin = (noop.step_us - plain.step_us) / NOOP_PLUGINS
    lines.append(f"- each no-op plugin on every hook: {per_plugin:+.2f} µs per step (target: 1)")
    if BZ_BF16 in by_name:
        lines.append(f"- {BZ_BF16} vs {HAND_BF16}: {_versus(by_name[BZ_BF16], 1.02)}")
    elif HAND_BF16 in by_name:
        lines.append(f"- {BZ_BF16}: skipped (needs precision support)")
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


# -- the metric updates alone ------------------------------------------------------------


def metric_update_costs(workload: Workload, number: int = 2000, rounds: int = 15) -> str:
    """Microseconds one batch's metric update costs, bz against hand-written, alone.

    No model, no loop: the same (N, C) scores and targets fed to each update, the
    fastest of 3 timings per round, the median over rounds that alternate.
    """
    from bz.metrics._fused import batch_update

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(workload.batch_size, workload.classes, generator=generator)
    targets = torch.randint(0, workload.classes, (workload.batch_size,), generator=generator)
    accuracy = batch_update(builtin_metrics(["accuracy"]).values())
    five = batch_update(builtin_metrics().values())
    updates: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
        "hand-written accuracy": HandAccuracy(workload.classes, scores.device).update,
        "bz accuracy": accuracy,
        "hand-written 5 metrics": HandFiveMetrics(workload.classes, scores.device).update,
        "bz 5 metrics": five,
    }
    for update in updates.values():
        update(scores, targets)  # the first batch sets bz's counts up
    timings: dict[str, list[float]] = {name: [] for name in updates}
    for _ in range(rounds):
        for name, update in updates.items():
            timings[name].append(_fastest(update, scores, targets, number) * 1e6)
    lines = [
        f"Metric updates alone ({workload.name}: scores {workload.batch_size} × "
        f"{workload.classes}), µs per batch, median of {rounds} rounds:"
    ]
    lines += [f"- {name}: {statistics.median(values):.1f} µs" for name, values in timings.items()]
    return "\n".join(lines)


def _fastest(
    update: Callable[[torch.Tensor, torch.Tensor], None],
    scores: torch.Tensor,
    targets: torch.Tensor,
    number: int,
) -> float:
    """Seconds per call, the fastest of three timings of ``number`` calls."""
    return min(timeit.repeat(lambda: update(scores, targets), number=number, repeat=3)) / number


# -- a profile of the loop ---------------------------------------------------------------


class _OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it untyped
    """Counts the aten operations run below autograd (forward, backward, optimizer, metrics)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        self.count = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _function_key(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    parts = filename.split("/")
    short = "/".join(parts[parts.index("bz") :]) if "bz" in parts else parts[-1]
    return f"{short}:{line}({name})"


def profile(workload: Workload, device: torch.device, top: int = 15) -> str:
    """Where bz's time goes per step, against the hand-written loops doing the same work.

    Counts that noise cannot touch: Python function calls (cProfile) and aten operations
    (a dispatch mode) per step, for each pair; then the functions bz calls that the
    hand-written loop does not, with their own time per step (cProfile's clock, which
    adds its own overhead to every call: read the times as proportions).
    """
    batches = workload.data(1, device)
    steps = workload.steps
    out = io.StringIO()
    pairs = [
        (HAND, prepare_hand_written, BZ, prepare_bz),
        (HAND_ACCURACY, prepare_hand_accuracy, BZ_ACCURACY, prepare_bz_accuracy),
        (HAND_FIVE, prepare_hand_five, BZ_FIVE, prepare_bz_five),
    ]
    if precision_supported():
        pairs.append((HAND_BF16, prepare_hand_bf16, BZ_BF16, prepare_bz_bf16))
    out.write("| variant | Python calls per step | aten ops per step |\n|---|---:|---:|\n")
    stats: dict[str, pstats.Stats] = {}
    for names_and_runs in pairs:
        for name, prepare in (names_and_runs[:2], names_and_runs[2:]):
            run = prepare(workload, batches, device)
            run()  # warm-up, and the first batch that sets bz's metric counts up
            profiler = cProfile.Profile()
            profiler.enable()
            run()
            profiler.disable()
            stats[name] = pstats.Stats(profiler)
            counter = _OpCounter()
            with counter:
                run()
            calls = sum(entry[1] for entry in stats[name].stats.values())  # type: ignore[attr-defined]  # pstats keeps its table untyped
            out.write(f"| {name} | {calls / steps:.1f} | {counter.count / steps:.1f} |\n")
    hand = {_function_key(k): v for k, v in stats[HAND].stats.items()}  # type: ignore[attr-defined]  # as above
    extra = []
    for key, entry in stats[BZ].stats.items():  # type: ignore[attr-defined]  # as above
        name = _function_key(key)
        calls = entry[1] - (hand[name][1] if name in hand else 0)
        if calls > 0:
            extra.append((entry[2] / steps * 1e6, calls / steps, name))
    extra.sort(reverse=True)
    out.write(
        f"\nFunctions {BZ!r} calls more often than {HAND!r}, by own time "
        "(cProfile, µs per step):\n\n| function | extra calls per step | own time per step |"
        "\n|---|---:|---:|\n"
    )
    for own, calls, name in extra[:top]:
        out.write(f"| `{name}` | {calls:.2f} | {own:.1f} µs |\n")
    return out.getvalue()


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


def _quiet() -> None:
    # The benchmark is an application: it decides that bz's events go nowhere.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if lightning_available():
        importlib.import_module("pytorch_lightning")  # creates its loggers, quietened here
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("pytorch_lightning", "lightning")):
                logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
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
    parser.add_argument("--json", dest="json_path", help="Also write the results here.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print Markdown tables."""
    args = parse(argv)
    _quiet()
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
    print(
        f"median of {repeats} rounds in rotating order after {args.warmup} warm-up round(s); "
        f"clock: {'CUDA events' if device.type == 'cuda' else 'thread CPU time'}"
    )
    if not with_lightning:
        print("(PyTorch Lightning not installed: pip install 'bz-cli[bench]' to include it)")
    if not args.no_bf16 and not precision_supported():
        print(f"({BZ_BF16}: skipped (needs precision support))")
    results: dict[str, Any] = {"environment": env, "repeats": repeats, "workloads": {}}
    summaries = []
    for workload in chosen_workloads:
        chosen = variants(with_lightning, with_bf16=not args.no_bf16)
        measure(workload, chosen, device, repeats, args.warmup)
        reads = {v.name: host_reads(workload, v, device) for v in chosen if v.counts_reads}
        table = rows(workload, chosen, reads)
        print()
        print(markdown(workload, table))
        sys.stdout.flush()
        summaries.append((workload, table))
        results["workloads"][workload.name] = {
            "description": workload.describe(),
            "rows": [row.__dict__ for row in table],
            "times": {v.name: v.times for v in chosen},
            "short_times": {v.name: v.short_times for v in chosen},
            "host_read_kinds": {name: r.kinds for name, r in reads.items()},
        }
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
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
