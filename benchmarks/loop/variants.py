"""The variants: bz's configurations and PyTorch Lightning, each with its hand-written match.

Each ``prepare`` builds everything (untimed, uncounted) and returns the run to measure.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import timeit
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import attrs
import structlog
import torch
from benchmarks.loop.hand import (
    prepare_hand_accuracy,
    prepare_hand_bf16,
    prepare_hand_five,
    prepare_hand_written,
)
from benchmarks.loop.workloads import (
    CLASSIFICATION_METRICS,
    Batch,
    Run,
    Workload,
    make_loader,
    make_optimizer,
)
from torch import nn

import bz
from bz.config import MetricSpec
from bz.metrics import build_metrics
from bz.plugins import HOOK_NAMES, HOOKS, PluginContext
from bz.plugins._sandbox import PluginSet
from bz.plugins.console_out import ConsoleOut, ConsoleOutConfig
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig

NOOP_PLUGINS = 10

# The variants, by name.
HAND = "hand loop"
HAND_ACCURACY = "hand loop + accuracy (hand-written)"
HAND_FIVE = "hand loop + 5 metrics (hand-written)"
HAND_BF16 = "hand loop, bf16 autocast"
BZ = "bz, no plugins, no metrics"
BZ_ACCURACY = "bz + accuracy"
BZ_FIVE = "bz + 5 metrics"
BZ_DEFAULTS = "bz + console_out + early_stopping"
BZ_BUILTINS = "bz + console_out + early_stopping + 5 metrics"
BZ_NOOP = f"bz, {NOOP_PLUGINS} no-op plugins"
BZ_BF16 = "bz, bf16-mixed"
LIGHTNING = "PyTorch Lightning"

KEYS = {
    "hand": HAND,
    "hand-accuracy": HAND_ACCURACY,
    "hand-five": HAND_FIVE,
    "hand-bf16": HAND_BF16,
    "bare": BZ,
    "accuracy": BZ_ACCURACY,
    "five": BZ_FIVE,
    "defaults": BZ_DEFAULTS,
    "builtins": BZ_BUILTINS,
    "noop": BZ_NOOP,
    "bf16": BZ_BF16,
    "lightning": LIGHTNING,
}
"""Short names for ``--only``: each variant by what it adds."""


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
        optimizer=make_optimizer(model),
        train_loader=make_loader(workload, batches),
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


def builtin_plugins() -> list[Any]:
    """console_out (to a null stream) and early_stopping (never stopping): ``bz init``'s."""
    return [
        ConsoleOut(ConsoleOutConfig(), stream=io.StringIO()),
        # Large patience so it never stops; training_loss since there is no validation.
        EarlyStopping(EarlyStoppingConfig(monitor="training_loss", patience=10**9)),
    ]


def prepare_bz_defaults(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """bz with console_out and early_stopping, no metrics."""
    return _bz_run(workload, batches, device, builtin_plugins(), {})


def prepare_bz_builtins(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """bz with console_out, early_stopping and the five metrics."""
    return _bz_run(workload, batches, device, builtin_plugins(), builtin_metrics())


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
            return make_optimizer(self.model)

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
    loader = make_loader(workload, batches)
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
        Variant(BZ_DEFAULTS, prepare_bz_defaults),
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


def only(chosen: list[Variant], keys: Sequence[str]) -> list[Variant]:
    """The variants ``keys`` (see ``KEYS``) name, with the hand-written ones they compare
    with, in their usual order; all of them when ``keys`` is empty."""
    if not keys:
        return chosen
    names = {KEYS[key] for key in keys}
    names |= {variant.baseline for variant in chosen if variant.name in names}
    return [variant for variant in chosen if variant.name in names]


def quiet() -> None:
    """Silence bz's events and Lightning's chatter: the benchmark is the application."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if lightning_available():
        importlib.import_module("pytorch_lightning")  # creates its loggers, quietened here
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("pytorch_lightning", "lightning")):
                logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
