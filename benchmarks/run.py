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
import gc
import importlib
import importlib.util
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
import timeit
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from torch import nn

import bz
from bz.config import MetricSpec
from bz.metrics import build_metrics
from bz.plugins import HOOK_NAMES, HOOKS, PluginContext
from bz.plugins.console_out import ConsoleOut, ConsoleOutConfig
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig
from bz.testing import count_host_reads

Batch = tuple[torch.Tensor, torch.Tensor]
Run = Callable[[], None]

# The built-in metrics that apply to a classifier's (N, C) scores and (N,) targets.
# mean_squared_error and mean_absolute_error need predictions shaped like the
# targets, so a classifier cannot use them.
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1_score", "top_k_accuracy")


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
    """The tiny (overhead-bound) and medium (compute-bound) MLPs.

    Runs are short (a fraction of a second) so that many alternating repetitions fit:
    on a shared machine, noise comes in bursts, and pairing each run with the
    hand-written run next to it cancels most of it.
    """
    scale = 2 if quick else 1
    chosen = [
        Workload("tiny", 32, (64,), 10, 32, 100 // scale, 2),
        Workload("medium", 512, (512, 512), 10, 128, 20 // scale, 2),
    ]
    if dataloader:
        chosen.append(
            Workload("tiny-dataloader", 32, (64,), 10, 32, 100 // scale, 2, "dataloader")
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
    """A way of training: ``prepare`` builds everything (untimed) and returns the run."""

    name: str
    prepare: Callable[[Workload, list[Batch], torch.device], Run]
    counts_reads: bool = True
    times: list[float] = field(default_factory=list)
    short_times: list[float] = field(default_factory=list)


def prepare_hand_written(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """(a) The loop everyone writes: zero_grad, forward, loss, backward, step."""
    model = workload.model(0).to(device)
    optimizer = _optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    loader = _loader(workload, batches)
    epochs = workload.epochs

    def run() -> None:
        for _ in range(epochs):
            model.train()
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                optimizer.step()

    return run


def _bz_run(
    workload: Workload,
    batches: list[Batch],
    device: torch.device,
    plugins: Sequence[Any],
    metrics: dict[str, Any],
) -> Run:
    model = workload.model(0).to(device)
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=_optimizer(model),
        train_loader=_loader(workload, batches),
    )
    # seed=None: the model is already seeded; every variant starts from the same weights.
    config = bz.RunConfig(epochs=workload.epochs, device=str(device), seed=None, plugins=())

    def run() -> None:
        bz.Trainer().fit(setup, config, plugins=plugins, metrics=metrics)

    return run


def prepare_bz(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """(b) bz with no plugins and no metrics."""
    return _bz_run(workload, batches, device, [], {})


def builtin_metrics() -> dict[str, Any]:
    """Every built-in metric that applies to a classifier (fresh objects)."""
    return build_metrics([MetricSpec(name) for name in CLASSIFICATION_METRICS])


def prepare_bz_builtins(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """(c) bz with console_out (to a null stream), early_stopping and the metrics."""
    plugins = [
        ConsoleOut(ConsoleOutConfig(), stream=io.StringIO()),
        # Large patience so it never stops; training_loss since there is no validation.
        EarlyStopping(EarlyStoppingConfig(monitor="training_loss", patience=10**9)),
    ]
    return _bz_run(workload, batches, device, plugins, builtin_metrics())


def prepare_hand_written_metrics(
    workload: Workload, batches: list[Batch], device: torch.device
) -> Run:
    """(a') The hand-written loop updating the same metric objects as (c), computed once."""
    model = workload.model(0).to(device)
    optimizer = _optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    loader = _loader(workload, batches)
    epochs = workload.epochs
    metrics = list(builtin_metrics().values())

    def run() -> None:
        for _ in range(epochs):
            model.train()
            for metric in metrics:
                metric.reset()
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                outputs = model(inputs)
                loss = loss_fn(outputs, targets)
                loss.backward()
                optimizer.step()
                detached = outputs.detach()
                for metric in metrics:
                    metric.update(detached, targets)
            torch.stack([metric.compute().double() for metric in metrics]).tolist()

    return run


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


NOOP_PLUGINS = 10
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
    plugin_set = bz.PluginSet([(NoOpPlugin(i), HOOK_NAMES) for i in range(plugins)])
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


def variants(with_lightning: bool) -> list[Variant]:
    """The variants, the baseline first."""
    chosen = [
        Variant("hand-written", prepare_hand_written),
        Variant("hand-written + same metrics", prepare_hand_written_metrics),
        Variant("bz, no plugins", prepare_bz),
        Variant("bz, built-ins + metrics", prepare_bz_builtins),
        Variant(f"bz, {NOOP_PLUGINS} no-op plugins", prepare_bz_noop),
    ]
    if with_lightning:
        chosen.append(Variant("PyTorch Lightning", prepare_lightning))
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
    median_s: float
    ratio: float
    """Median over rounds of this variant's run time / the hand-written loop's, same round."""
    ratio_iqr: float
    """Half the interquartile range of those ratios: how noisy ``ratio`` is."""
    fixed_ms: float
    """What a run costs beyond the hand-written loop's once, whatever its length."""
    step_us: float
    """Microseconds per step, the fixed cost excluded."""
    overhead_us_per_step: float
    """Microseconds per step beyond the hand-written loop's, the fixed cost excluded."""
    step_ratio: float
    """Per-step time / the hand-written loop's (the fixed cost excluded)."""
    reads_per_batch: float | None
    reads_per_run: float | None


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4)
    return low, high


def _paired(variant: list[float], base: list[float]) -> list[float]:
    return [t - b for t, b in zip(variant, base, strict=True)]


def rows(workload: Workload, chosen: list[Variant], reads: dict[str, HostReads]) -> list[Row]:
    """The table, each variant compared with the hand-written run of the same round.

    A run of N steps costs ``fixed + N * step``; one-step runs give ``fixed + step``,
    so the per-step cost is their difference over N - 1.
    """
    base = chosen[0]
    steps = workload.steps
    base_step = (statistics.median(base.times) - statistics.median(base.short_times)) / (steps - 1)
    table = []
    for variant in chosen:
        ratios = [t / b for t, b in zip(variant.times, base.times, strict=True)]
        low, high = _quartiles(ratios)
        extra_run = statistics.median(_paired(variant.times, base.times))
        extra_fixed_and_step = statistics.median(_paired(variant.short_times, base.short_times))
        overhead = (extra_run - extra_fixed_and_step) / (steps - 1)
        read = reads.get(variant.name)
        table.append(
            Row(
                variant=variant.name,
                median_s=statistics.median(variant.times),
                ratio=statistics.median(ratios),
                ratio_iqr=(high - low) / 2,
                fixed_ms=(extra_fixed_and_step - overhead) * 1e3,
                step_us=(base_step + overhead) * 1e6,
                overhead_us_per_step=overhead * 1e6,
                step_ratio=(base_step + overhead) / base_step,
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
        "| variant | run (median) | run vs hand-written | per step | per step vs hand-written "
        "| overhead per step | fixed cost per run | host reads per batch (per run) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        reads = (
            "—"
            if row.reads_per_batch is None or row.reads_per_run is None
            else f"{row.reads_per_batch:g} ({row.reads_per_run:g})"
        )
        lines.append(
            f"| {row.variant} | {row.median_s * 1e3:.1f} ms "
            f"| {row.ratio:.3f}× ± {row.ratio_iqr:.3f} | {row.step_us:.1f} µs "
            f"| {row.step_ratio:.3f}× | {row.overhead_us_per_step:+.1f} µs "
            f"| {row.fixed_ms:+.1f} ms | {reads} |"
        )
    return "\n".join(lines)


def summary(tiny: list[Row], dispatch: dict[int, float]) -> str:
    """The issue's targets, checked against the tiny-MLP numbers (fixed cost excluded)."""
    by_name = {row.variant: row for row in tiny}
    plain = by_name["bz, no plugins"]
    builtins = by_name["bz, built-ins + metrics"]
    with_metrics = by_name["hand-written + same metrics"]
    noop = by_name[f"bz, {NOOP_PLUGINS} no-op plugins"]
    per_plugin = (noop.overhead_us_per_step - plain.overhead_us_per_step) / NOOP_PLUGINS
    versus_metrics = builtins.step_us / with_metrics.step_us
    per_call = (dispatch[NOOP_PLUGINS] - dispatch[0]) / NOOP_PLUGINS
    reads = [row.reads_per_batch for row in tiny if row.variant.startswith("bz")]
    return "\n".join(
        [
            "Targets (tiny MLP, per step, fixed cost per run excluded):",
            f"- bz, no plugins vs hand-written: {(plain.step_ratio - 1) * 100:+.1f}% "
            f"({plain.overhead_us_per_step:+.1f} µs)",
            "- bz with built-ins vs hand-written with the same metrics: "
            f"{(versus_metrics - 1) * 100:+.1f}% (target: within 3%)",
            f"- bz with built-ins vs plain hand-written: {(builtins.step_ratio - 1) * 100:+.1f}% "
            "(the difference is the metrics' own arithmetic)",
            f"- each no-op plugin on every hook: {per_plugin:+.2f} µs/step (target: < 2)",
            "- the sandbox alone (PluginSet.call, fastest of 15 × 20,000 calls): "
            f"{dispatch[0]:.2f} µs with no plugin, {dispatch[1]:.2f} µs with 1, "
            f"{dispatch[NOOP_PLUGINS]:.2f} µs with {NOOP_PLUGINS}: {per_call:.2f} µs per plugin "
            f"per hook, × {len(PER_BATCH_HOOKS)} per-batch hooks = "
            f"{per_call * len(PER_BATCH_HOOKS):.2f} µs per plugin per step",
            f"- host reads per batch in bz: {max(r or 0.0 for r in reads):g} (target: 0)",
        ]
    )


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
    parser.add_argument("--repeats", type=int, help="Timed rounds (default 21; 5 with --quick).")
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
    parser.add_argument("--json", dest="json_path", help="Also write the results here.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print Markdown tables."""
    args = parse(argv)
    _quiet()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 21)
    with_lightning = not args.no_lightning and lightning_available()
    env = environment(device)
    print(f"# bz loop benchmark on {env['device']}")
    print(f"python {env['python']}, torch {env['torch']}, bz {env['bz']}, {env['platform']}")
    print(f"median of {repeats} alternating repetitions after {args.warmup} warm-up round(s)")
    if not with_lightning:
        print("(PyTorch Lightning not installed: pip install 'bz-cli[bench]' to include it)")
    results: dict[str, Any] = {"environment": env, "repeats": repeats, "workloads": {}}
    tiny_rows: list[Row] | None = None
    for workload in workloads(args.quick, args.dataloader):
        if args.workload and workload.name not in args.workload:
            continue
        chosen = variants(with_lightning)
        measure(workload, chosen, device, repeats, args.warmup)
        reads = {v.name: host_reads(workload, v, device) for v in chosen if v.counts_reads}
        table = rows(workload, chosen, reads)
        print()
        print(markdown(workload, table))
        sys.stdout.flush()
        if workload.name == "tiny":
            tiny_rows = table
        results["workloads"][workload.name] = {
            "description": workload.describe(),
            "rows": [row.__dict__ for row in table],
            "times": {v.name: v.times for v in chosen},
            "host_read_kinds": {name: r.kinds for name, r in reads.items()},
        }
    dispatch = {count: dispatch_cost(count) for count in (0, 1, NOOP_PLUGINS)}
    results["dispatch_us_per_hook_call"] = dispatch
    if tiny_rows is not None:
        print()
        print(summary(tiny_rows, dispatch))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
