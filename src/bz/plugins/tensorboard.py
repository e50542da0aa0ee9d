"""``tensorboard``: losses, metrics, learning rate and epoch time as TensorBoard scalars.

Needs the ``tensorboard`` extra (``pip install 'bz-cli[tensorboard]'``); the events are
written by ``torch.utils.tensorboard.SummaryWriter``. Tags are those of
:mod:`bz.plugins._scalars` (``loss/training``, ``accuracy/validation``, ``lr``, ...),
one point per epoch, on an x-axis that counts epochs from 1 as the console does. With
``step_interval`` the step scalars (``step/loss``, ``step/grad_norm``, ``step/lr``) are
written every that many optimizer steps, on an x-axis of global steps.

With ``histogram_interval`` the weights and gradients of every parameter are logged as
histograms every that many epochs (the gradients are those of the epoch's last batch,
still held by the model at ``end_epoch``; copying them to the host costs one transfer
per parameter, which is why it is off by default).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import attrs

from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, Order, hook
from bz.plugins._run_dir import run_directory
from bz.plugins._scalars import LoggerClock, step_scalars

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch.utils.tensorboard import SummaryWriter

    from bz.plugins._context import PluginContext


@attrs.frozen
class TensorBoardConfig:
    """Options of ``tensorboard``."""

    log_dir: str | None = None
    """Folder for the event files; default: the run directory (``runs/<timestamp>``)."""
    histogram_interval: int | None = attrs.field(default=None, validator=at_least(1))
    """Log weight and gradient histograms every this many epochs (null: never)."""
    flush_secs: float = attrs.field(default=30.0, validator=at_least(0.0))
    """Seconds between flushes of pending events to disk (always flushed at the end)."""
    step_interval: int | None = attrs.field(default=None, validator=at_least(1))
    """Also log the batch loss, gradient norm and learning rate every N steps (null: never)."""


class TensorBoard:
    """Writes per-epoch scalars (and optional histograms) for TensorBoard; rank 0 only.

    On other ranks of a distributed run it writes nothing. Open the result with
    ``tensorboard --logdir runs``.
    """

    Config = TensorBoardConfig
    order = Order(last=True)
    """It reports the epoch: after every other plugin, so it sees the metrics they add."""

    def __init__(self, config: TensorBoardConfig | None = None) -> None:
        # Checked here (cheaply: no import) so that a missing extra is reported when the
        # plugins are loaded, by `bz check-config` too, rather than once training runs.
        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError(
                "the tensorboard plugin needs TensorBoard: pip install 'bz-cli[tensorboard]'"
            )
        self.name = "tensorboard"
        self.config = config or TensorBoardConfig()
        self.log_dir: str | None = None
        """Where the event files go (set when training starts, on rank 0)."""
        self._writer: SummaryWriter | None = None
        self._clock = LoggerClock(self, self.config.step_interval, self._log_step)

    @property
    def needs_training_process(self) -> str | None:
        """Why ``"isolation": "process"`` is refused with these options (None: it is not)."""
        return (
            "histogram_interval reads the model's weights"
            if self.config.histogram_interval is not None
            else None
        )

    end_training_batch: Callable[[PluginContext], None]
    """The step scalars; present only with ``step_interval``."""
    gradient_norm_every: int
    """Asks the loop for the gradient norm on the steps written (with ``step_interval``)."""

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Open the event file (rank 0 only)."""
        if not context.is_main_process:
            return
        # Imported here: importing tensorboard takes seconds, and a missing extra then
        # quarantines this plugin with a clear ImportError instead of breaking `bz`.
        from torch.utils.tensorboard import SummaryWriter

        path = run_directory(context, self.config.log_dir)
        self.log_dir = str(path)
        self._writer = SummaryWriter(log_dir=str(path), flush_secs=self.config.flush_secs)

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Start the epoch's clock; note the learning rate the epoch trains with."""
        if self._writer is None:
            return
        self._clock.start_epoch(context)

    def _log_step(self, context: PluginContext) -> None:
        """Every ``step_interval`` steps, the step scalars (the only per-step host reads)."""
        writer = self._writer
        if writer is None or not self._clock.due(context):
            return
        for tag, value in step_scalars(context).items():
            writer.add_scalar(tag, value, global_step=context.global_step)

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """Write the epoch's scalars (and histograms when due)."""
        writer = self._writer
        if writer is None:
            return
        step = context.epoch + 1
        for tag, value in self._clock.epoch_scalars(context).items():
            writer.add_scalar(tag, value, global_step=step)
        interval = self.config.histogram_interval
        if interval is not None and step % interval == 0 and context.model is not None:
            self._histograms(writer, context.model, step)

    @staticmethod
    def _histograms(writer: SummaryWriter, model: torch.nn.Module, step: int) -> None:
        for name, parameter in model.named_parameters():
            writer.add_histogram(f"weights/{name}", parameter.detach(), global_step=step)
            if parameter.grad is not None:
                writer.add_histogram(f"gradients/{name}", parameter.grad, global_step=step)

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """Flush and close the event file."""
        self._close()

    @hook
    def on_exception(self, context: PluginContext) -> None:
        """Keep what was logged before the failure."""
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as TensorBoard(TensorBoardConfig(**options)).
_: ConfiguredPluginClass[TensorBoardConfig] = TensorBoard
