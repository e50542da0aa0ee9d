"""A program that embeds bz and uses only the standard library's ``logging``.

The host never touches structlog. bz then sends each event as a
:class:`logging.LogRecord` on the ``bz`` logger hierarchy (``bz`` for the loop,
``bz.plugin.<name>`` for plugins): the event name is ``record.bz["event"]``, every field
is an attribute of the record (``record.epoch``) and all of them are in ``record.bz``.
The host's handlers and levels decide what is shown; here a handler prints one line per
record with the fields the host cares about.

It also shows how a host keeps its random state: ``RunConfig(seed=None)`` stops bz from
reseeding the global generators, and ``torch.random.fork_rng()`` keeps the draws
training makes (shuffling, initialisation) from moving torch's generator.

Run it: ``python examples/embedding_stdlib/host.py``.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from typing import Any

import torch
from torch import nn

import bz
from bz.plugins import PluginContext, hook, plugin_logger


class FieldsHandler(logging.Handler):
    """Prints ``logger level event {fields}`` for each record, as a host might."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = dict(getattr(record, "bz", {"event": record.getMessage()}))
        event = fields.pop("event")
        line = f"{record.name} {record.levelname} {event} {json.dumps(fields, default=str)}"
        print(line, file=sys.stdout)


def configure_logging() -> None:
    """The host's set-up: bz's INFO records and above, through the host's handler."""
    logging.getLogger("bz").setLevel(logging.INFO)
    logging.getLogger().addHandler(FieldsHandler())


def make_setup() -> bz.TrainingSetup:
    """A tiny classifier on random points (drawn from the host's own generator)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    batches = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, 64, 16)]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=batches,
        val_loader=batches[:2],
    )


class LossWatch:
    """A plugin without a base class: it asks for its logger by name."""

    name = "loss_watch"

    def __init__(self) -> None:
        self.logger = plugin_logger(self)  # records on `bz.plugin.loss_watch`

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        self.logger.info("loss_seen", epoch=context.epoch, loss=context.training_loss)


def main() -> None:
    """Train with the host's generators left alone, and say whether they were."""
    configure_logging()
    random.seed(1234)
    torch.manual_seed(1234)
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    config = bz.RunConfig(epochs=2, device="cpu", seed=None)
    with torch.random.fork_rng():
        result = bz.Trainer().fit(make_setup(), config, [LossWatch()])
    unchanged = random.getstate() == python_state and torch.equal(
        torch.get_rng_state(), torch_state
    )
    print(f"host: trained {result.epochs_completed} epochs; generators unchanged: {unchanged}")


if __name__ == "__main__":
    main()
