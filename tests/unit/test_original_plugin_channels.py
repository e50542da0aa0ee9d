"""A bz-cli 0.x style plugin talks back through the plugin guide's channels.

README ("Coming from bz-cli 0.x") and docs/plugin-guide.md ("Talking back"): a plugin
written in the original's style (``Plugin`` subclass, ``super().__init__()``, its own
``logging`` logger, ``create``) adds an entry to ``context.training_metrics``, shares
a value through ``context.extra`` with the plugin after it, and stops the run with
``should_stop_training`` in ``end_epoch``; all three reach the run's result.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

import bz
from bz.plugins import Plugin, PluginContext


def _setup() -> bz.TrainingSetup:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    batches = [(inputs[i : i + 8], targets[i : i + 8]) for i in range(0, 32, 8)]
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=batches,
        val_loader=batches,
    )


class StopAfter(Plugin):
    name = "stop_after"

    def __init__(self, epochs: int = 2) -> None:
        super().__init__()
        self.epochs = epochs
        self.logger = logging.getLogger(__name__)

    def end_training_loop(self, context: PluginContext) -> None:
        mean = context.training_loss_total / context.training_batch_count
        context.training_metrics["mean_batch_loss"] = float(mean)
        context.extra["stop_after_seen"] = context.epoch

    def end_epoch(self, context: PluginContext) -> None:
        if context.epoch + 1 >= self.epochs:
            self.logger.info("stopping after epoch %d", context.epoch)
            context.should_stop_training = True

    @staticmethod
    def create(config_data: dict[str, Any], training_config: object) -> StopAfter | None:
        return StopAfter(epochs=config_data.get("epochs", 2))


class Reader(Plugin):
    name = "reader"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def end_epoch(self, context: PluginContext) -> None:
        self.seen.append(context.extra.get("stop_after_seen"))


def test_metrics_extra_and_a_stop_request_reach_the_run() -> None:
    stopper = StopAfter.create({"epochs": 2}, None)
    assert stopper is not None
    reader = Reader()
    config = bz.RunConfig(epochs=5, device="cpu", seed=0, plugins=[])
    result = bz.Trainer().fit(_setup(), config, [stopper, reader])
    assert [report.fault for report in result.plugins] == [None, None]
    assert result.stopped_early
    assert result.epochs_completed == 2
    assert [sorted(record.training_metrics) for record in result.history] == [
        ["mean_batch_loss"],
        ["mean_batch_loss"],
    ]
    # Equal batches: the original's mean of batch losses is the epoch's loss.
    for record in result.history:
        assert abs(record.training_metrics["mean_batch_loss"] - record.training_loss) < 1e-6
    assert reader.seen == [0, 1]
