"""On a GPU, no batch makes the host wait: torch's sync debug mode "error" proves it.

A plugin switches ``torch.cuda.set_sync_debug_mode("error")`` on when a training or
validation loop starts and off after its last batch, so every batch of the epoch (fetch
from a pinned DataLoader, copy, step, loss sum, the five classification metrics, the
hooks) runs under it; the one read at the end of each loop (loss and metrics) runs
after. Any synchronising call inside raises and fails the run. Skipped without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz
from bz.config import MetricSpec
from bz.metrics import build_metrics
from bz.plugins import PluginContext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FIVE = ("accuracy", "precision", "recall", "f1_score", "top_k_accuracy")


class SyncErrorsDuringBatches:
    """Sync debug mode "error" from each loop's start to the end of its last batch."""

    name = "sync_errors_during_batches"

    def __init__(self) -> None:
        self.batches_checked = 0

    def start_training_loop(self, context: PluginContext) -> None:
        torch.cuda.set_sync_debug_mode("error")

    def end_training_batch(self, context: PluginContext) -> None:
        self.batches_checked += 1
        if context.batch_index + 1 == context.training_batches_per_epoch:
            torch.cuda.set_sync_debug_mode("default")

    def start_validation_loop(self, context: PluginContext) -> None:
        torch.cuda.set_sync_debug_mode("error")

    def end_validation_batch(self, context: PluginContext) -> None:
        self.batches_checked += 1
        if context.batch_index + 1 == context.validation_batches_per_epoch:
            torch.cuda.set_sync_debug_mode("default")


def loader(batches: int, seed: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(32 * batches, 20, generator=generator)
    targets = torch.randint(0, 7, (32 * batches,), generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=32, pin_memory=True)


def test_an_epoch_with_metrics_never_synchronizes_per_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 7))
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        train_loader=loader(6, seed=1),
        val_loader=loader(3, seed=2),
    )
    # "raise": a fault in the checking plugin must fail the test, not be isolated.
    config = bz.RunConfig(epochs=2, device="cuda", plugins=(), plugin_errors="raise")
    checker = SyncErrorsDuringBatches()
    metrics = build_metrics([MetricSpec(name) for name in FIVE])
    try:
        result = bz.Trainer().fit(setup, config, plugins=[checker], metrics=metrics)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.epochs_completed == 2
    assert checker.batches_checked == 2 * (6 + 3)
    last = result.history[-1]
    for values in (last.training_metrics, last.validation_metrics):
        assert set(values) == {"accuracy", "precision", "recall", "f1_score", "top_5_accuracy"}
        assert all(0.0 <= value <= 1.0 and not math.isnan(value) for value in values.values())
