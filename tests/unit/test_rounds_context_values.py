"""What a plugin reads in the per-batch hooks is where the loop stands at that moment.

The plain training loop keeps the context current as it goes (it shows the loop's
state once per epoch and writes the batch index, the step and the counts as they
change) instead of copying the whole state in before every hook round. These tests
record, in every per-batch hook, what the context says, and compare it with the values
worked out from the batch and epoch alone: with validation between epochs, with
validation every step (the loop's own work between two steps, no plugin hook in it).
"""

from __future__ import annotations

from typing import Any

import pytest
from tests._support import tiny_setup

import bz
from bz.config import RunConfig
from bz.plugins import PluginContext

BATCHES, SIZE, EPOCHS = 4, 16, 3
PER_BATCH = (
    "start_training_batch",
    "after_backward",
    "before_optimizer_step",
    "end_training_batch",
)


class Reading:
    """Writes down what the context says in each training batch hook."""

    name = "reading"

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def _note(self, hook: str, context: PluginContext) -> None:
        self.seen.append(
            (
                hook,
                context.epoch,
                context.global_step,
                context.batch_index,
                context.training_batch_count,
                context.training_sample_count,
                context.validation_batch_count,
                context.validation_sample_count,
            )
        )

    def start_training_batch(self, context: PluginContext) -> None:
        self._note("start_training_batch", context)

    def after_backward(self, context: PluginContext) -> None:
        self._note("after_backward", context)

    def before_optimizer_step(self, context: PluginContext) -> None:
        self._note("before_optimizer_step", context)

    def end_training_batch(self, context: PluginContext) -> None:
        self._note("end_training_batch", context)


def expected(validate_every_step: bool) -> list[tuple[Any, ...]]:
    rows = []
    for epoch in range(EPOCHS):
        for index in range(BATCHES):
            step = epoch * BATCHES + index
            # Validation every step leaves its counts (2 batches of 16) from the step
            # before; between epochs, a new epoch starts them at 0.
            val = (2, 2 * SIZE) if validate_every_step and index > 0 else (0, 0)
            for hook in PER_BATCH:
                done = 1 if hook == "end_training_batch" else 0
                rows.append(
                    (hook, epoch, step + done, index, index + done, (index + done) * SIZE, *val)
                )
    return rows


@pytest.mark.parametrize("validate_every_step", [False, True])
def test_each_per_batch_hook_reads_where_the_loop_stands(validate_every_step: bool) -> None:
    reading = Reading()
    config = RunConfig(
        epochs=EPOCHS,
        device="cpu",
        plugins=(),
        validate_every_steps=1 if validate_every_step else None,
    )
    bz.Trainer().fit(tiny_setup(batches=BATCHES), config, plugins=[reading])
    assert reading.seen == expected(validate_every_step)
