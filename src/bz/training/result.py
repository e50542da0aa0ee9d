"""What a call of :meth:`bz.Trainer.fit` returns."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import attrs

if TYPE_CHECKING:
    from bz.plugins._sandbox import PluginReport


@attrs.frozen
class EpochRecord:
    """What one epoch produced."""

    epoch: int
    """Zero-based index, as ``PluginContext.epoch`` (events and the console say
    ``epoch + 1``)."""
    training_loss: float
    validation_loss: float | None
    training_metrics: dict[str, float]
    validation_metrics: dict[str, float]
    seconds: float
    partial: bool = False
    """The epoch ended early: a stop (``max_steps``, ``max_time``, a plugin) came in the
    middle of it. Its numbers cover the batches trained."""


@attrs.frozen
class FitResult:
    """The outcome of :meth:`Trainer.fit`.

    ``epochs_completed`` counts the run's epochs, resumed ones included; ``history``
    holds only the epochs this call trained.
    """

    epochs_completed: int
    global_step: int
    stopped_early: bool
    history: tuple[EpochRecord, ...]
    plugins: tuple[PluginReport, ...]
    seconds: float
    resumed_from: Path | None = None
    """The checkpoint this call resumed from (None for a fresh start)."""
    checkpoint: Path | None = None
    """The newest checkpoint written (or, when already complete, read) by this call."""
    already_complete: bool = False
    """The run had already finished when this call resumed it; nothing was trained."""
    stopped_by: Literal["plugin", "max_steps", "max_time"] | None = None
    """Why the run stopped before its last epoch: a plugin's ``should_stop_training``
    (``early_stopping``), ``max_steps`` or ``max_time`` (None: it ran every epoch)."""
    model: Path | None = None
    """The file with the weights the run ended with (``model.pt`` beside the checkpoints;
    None when checkpoints are off, the run did not finish, or the write failed)."""
    checkpoints_lost: int = 0
    """Checkpoints (``model.pt`` included) this call failed to write; ``bz train`` then
    exits 1 although training finished."""
    model_rebuilt: bool = False
    """The run had finished but its ``model.pt`` was missing, damaged or older than its
    last checkpoint; this call rebuilt it from that checkpoint without training."""

    @property
    def final(self) -> EpochRecord | None:
        """The last completed epoch."""
        return self.history[-1] if self.history else None
