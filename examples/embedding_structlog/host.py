"""A program that embeds bz and renders bz's events with its own structlog set-up.

The host configures structlog once (JSON lines on stdout, each tagged ``app="host"``);
bz adds no handler and no renderer of its own, so its events (``run_started``,
``epoch_finished``, ``plugin_summary``, a plugin's own events, ``run_finished``) arrive
through the host's processors like the host's own. An exception raised by the host's
code during training comes back as itself, with bz's note attached.

Run it: ``python examples/embedding_structlog/host.py``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import structlog
import torch
from torch import nn

import bz
from bz.plugins import Plugin, PluginContext

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger


def tag_app(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """The host's own processor: every event, bz's included, passes through it."""
    event["app"] = "host"
    return event


def configure_logging() -> None:
    """What the host does at start-up, before (or after) importing bz."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            tag_app,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
    )


def make_setup(*, failing_loss: bool = False) -> bz.TrainingSetup:
    """A tiny classifier on random points; ``failing_loss`` makes the host's loss raise."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    batches = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, 64, 16)]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    cross_entropy = nn.CrossEntropyLoss()

    def loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if failing_loss:
            raise ValueError("the host's loss refuses these labels")
        result: torch.Tensor = cross_entropy(outputs, labels)
        return result

    return bz.TrainingSetup(
        model=model,
        loss_fn=loss,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=batches,
        val_loader=batches[:2],
    )


class EpochNote(Plugin):
    """A plugin of the host's: its events carry ``plugin="epoch_note"``."""

    name = "epoch_note"

    def end_epoch(self, context: PluginContext) -> None:
        self.logger.info("epoch_note", epoch=context.epoch, loss=context.training_loss)


def main() -> None:
    """Train once, then fail once on purpose and catch the host's own exception."""
    configure_logging()
    log = structlog.get_logger("host")
    config = bz.RunConfig(epochs=2, device="cpu", plugins=[], metrics=["accuracy"])
    result = bz.Trainer().fit(make_setup(), config, [EpochNote()])
    log.info("host_trained", epochs=result.epochs_completed, steps=result.global_step)
    try:
        bz.Trainer().fit(make_setup(failing_loss=True), config)
    except ValueError as exc:  # the host's exception type, not a bz wrapper
        log.warning("host_caught", error=str(exc), notes=getattr(exc, "__notes__", []))


if __name__ == "__main__":
    main()
