"""What happens between two optimizer steps: validation, checkpoints, stopping.

After every optimizer step (not after every batch of an accumulation group: gradients
half-accumulated cannot be saved or stopped on) the loop asks :class:`StepControl`
whether to stop (Ctrl-C or SIGTERM, a plugin's ``should_stop_training``, ``max_steps``,
``max_time``), to validate (``validate_every_steps``) or to write a checkpoint
(``checkpoint_every_steps`` / ``checkpoint_every_seconds``).

Step counts are the same on every process, so step-based decisions need no talk. What
only one process can know (a signal, a plugin's request on rank 0, its clock) is put to
the vote (:class:`~bz.training.interrupts.InterruptVote`) every ~0.1 s of training, so
all processes act after the same step. Nothing here reads a device value.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import attrs

from bz._errors import ConfigError

if TYPE_CHECKING:
    from bz.config import RunConfig
    from bz.plugins._context import PluginContext
    from bz.training.interrupts import InterruptGuard, InterruptVote

EndReason = Literal["plugin", "max_steps", "max_time"]
"""Why a run ends before its last epoch (``FitResult.stopped_by``)."""


@attrs.frozen
class Decision:
    """What to do after a step (validate before checkpointing; a stop comes alone)."""

    interrupt: bool = False
    """Ctrl-C or SIGTERM: write a checkpoint and leave."""
    stop: EndReason | None = None
    validate: bool = False
    checkpoint: bool = False


_NOTHING = Decision()
_INTERRUPT = Decision(interrupt=True)
_PLUGIN_STOP = Decision(stop="plugin")


def check_validation_steps(config: RunConfig, validates: bool) -> None:
    """Refuse, before training, ``validate_every_steps`` in a run without validation data
    (``validates``: the setup has a ``val_loader``): there is nothing to validate."""
    if config.validate_every_steps is not None and not validates:
        raise ConfigError(
            [
                (
                    "validate_every_steps",
                    f"{config.validate_every_steps}, and setup() returns no val_loader: "
                    "nothing to validate (give TrainingSetup a val_loader, or "
                    "leave validate_every_steps out)",
                )
            ]
        )


class StepControl:
    """Decides, after each optimizer step, what the loop does before the next one."""

    def __init__(
        self,
        config: RunConfig,
        interrupt: InterruptGuard,
        context: PluginContext,
        vote: InterruptVote | None,
        started: float,
    ) -> None:
        self.interrupt = interrupt
        self.context = context
        self.vote = vote
        self.max_steps = config.max_steps
        self.validate_every = config.validate_every_steps or 0
        self.checkpoint_every = config.checkpoint_every_steps or 0
        self.deadline = None if config.max_time is None else started + config.max_time
        self.checkpoint_seconds = config.checkpoint_every_seconds
        self.next_checkpoint_time = (
            None if self.checkpoint_seconds is None else started + self.checkpoint_seconds
        )
        self._clocked = self.deadline is not None or self.next_checkpoint_time is not None
        self.idle = not (
            self._clocked
            or vote is not None
            or self.max_steps is not None
            or self.validate_every
            or self.checkpoint_every
        )
        """Nothing to decide after a step but a Ctrl-C / SIGTERM or a plugin's stop request
        (the loop tests those two itself, and asks :meth:`after_step` when one is set)."""
        self.checkpoint_at_epoch_end = False
        """A step-based checkpoint fell on an epoch's last step: the epoch's end writes it."""

    def after_step(self, step: int, last_in_epoch: bool) -> Decision:
        """What to do now that optimizer step ``step`` is done.

        On an epoch's last step nothing happens here: the epoch ends as usual and
        :meth:`at_epoch_end` has the say (a stop then takes effect after the epoch).
        """
        interrupted = self.interrupt.requested
        stop_requested = self.context.should_stop_training
        if self.idle:  # the common case, decided once: nothing but requests to look at
            if last_in_epoch or not (interrupted or stop_requested):
                return _NOTHING
            return _INTERRUPT if interrupted else _PLUGIN_STOP
        time_up = checkpoint_time = False
        if self._clocked:
            now = time.perf_counter()
            time_up = self.deadline is not None and now >= self.deadline
            checkpoint_time = (
                self.next_checkpoint_time is not None and now >= self.next_checkpoint_time
            )
        vote = self.vote
        if vote is not None:
            if not vote.due() or last_in_epoch:
                interrupted = stop_requested = time_up = checkpoint_time = False
            else:
                interrupted, stop_requested, time_up, checkpoint_time = vote(
                    interrupted, stop_requested, time_up, checkpoint_time
                )
        checkpoint = checkpoint_time or (
            self.checkpoint_every > 0 and step % self.checkpoint_every == 0
        )
        if last_in_epoch:
            self.checkpoint_at_epoch_end |= checkpoint
            return _NOTHING
        if interrupted:
            return Decision(interrupt=True)
        stop = self._stop_reason(step, stop_requested, time_up)
        if stop is not None:
            return Decision(stop=stop)
        validate = self.validate_every > 0 and step % self.validate_every == 0
        if not (validate or checkpoint):
            return _NOTHING
        return Decision(validate=validate, checkpoint=checkpoint)

    def _stop_reason(self, step: int, requested: bool, time_up: bool) -> EndReason | None:
        if self.max_steps is not None and step >= self.max_steps:
            return "max_steps"
        if requested:
            return "plugin"
        if time_up:
            return "max_time"
        return None

    def at_epoch_end(self, step: int, stop_requested: bool, time_up: bool) -> EndReason | None:
        """Why the run stops after this epoch (flags already agreed between processes)."""
        return self._stop_reason(step, stop_requested, time_up)

    def time_flags(self) -> tuple[bool, bool]:
        """This process's view of the clock: (``max_time`` is up, a timed checkpoint is due)."""
        if not self._clocked:
            return False, False
        now = time.perf_counter()
        return (
            self.deadline is not None and now >= self.deadline,
            self.next_checkpoint_time is not None and now >= self.next_checkpoint_time,
        )

    def checkpoint_written(self) -> None:
        """Restart the clock of ``checkpoint_every_seconds`` (any checkpoint counts)."""
        self.checkpoint_at_epoch_end = False
        if self.checkpoint_seconds is not None:
            self.next_checkpoint_time = time.perf_counter() + self.checkpoint_seconds
