"""``PluginContext``: what the training loop shows its plugins."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from bz.config import RunConfig


FOLD_EVERY = 256
"""Pending scalars a :class:`DeviceSum` keeps before folding them into its total."""


class DeviceSum:
    """A weighted sum of per-batch device scalars that reaches the host only when read.

    The loop appends each batch's detached mean loss with the batch's sample count as
    its weight (no host sync: the count comes from shapes); reading ``value()`` folds
    everything pending into one device tensor and converts it once. Every
    :data:`FOLD_EVERY` additions the pending scalars are folded on the device (a few
    kernels, no sync, no host-to-device copy: equal weights are summed together and
    multiplied by a Python number), so a long epoch holds a bounded number of tensors.
    The total is kept in float64 (float32 on MPS, which has no float64).
    """

    __slots__ = ("_folded", "_pending", "_weights")

    def __init__(self, initial: float = 0.0) -> None:
        self._pending: list[torch.Tensor] = []
        self._weights: list[int] = []
        self._folded: torch.Tensor | float = initial

    def add(self, value: torch.Tensor, weight: int = 1) -> None:
        """Record ``value * weight`` for one device scalar; never synchronises."""
        pending = self._pending
        pending.append(value)
        self._weights.append(weight)
        if len(pending) >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        import torch

        # Batches of one epoch share a size except (usually) the last: one or two groups.
        groups: dict[int, list[torch.Tensor]] = {}
        for value, weight in zip(self._pending, self._weights, strict=True):
            groups.setdefault(weight, []).append(value)
        total = self._folded
        for weight, values in groups.items():
            stacked = torch.stack(values)
            dtype = torch.float32 if stacked.device.type == "mps" else torch.float64
            total = total + stacked.sum(dtype=dtype) * weight
        self._folded = total
        self._pending.clear()
        self._weights.clear()

    def value(self) -> float:
        """The sum so far, as a Python float (one device-to-host read)."""
        if self._pending:
            self._fold()
        return float(self._folded)


class PluginContext:
    """The state of the run as plugins see it.

    The training loop owns the real state and refreshes this object from it before
    calling hooks, so a plugin that overwrites ``epoch`` or a loss total changes only
    what other plugins read, never what the loop does. Plugins talk back through
    ``should_stop_training``, by adding entries to ``training_metrics`` /
    ``validation_metrics``, and through ``extra`` (data shared between plugins).

    ``PluginContext()`` with no arguments is valid, which is handy in plugin tests.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        device: torch.device | None = None,
        hyperparameters: dict[str, Any] | None = None,
        epochs: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.epoch: int = 0
        """Zero-based index of the current epoch."""
        self.epochs: int = epochs
        """Number of epochs the run is configured for."""
        self.global_step: int = 0
        """Optimizer steps taken since the run began (survives resume)."""
        self.batch_index: int = 0
        """Zero-based index of the current batch within its loop."""
        self.training_batch_count: int = 0
        """Training batches seen so far in this epoch."""
        self.training_sample_count: int = 0
        """Training samples seen so far in this epoch (first dimension of the inputs)."""
        self.validation_batch_count: int = 0
        """Validation batches seen so far in this epoch."""
        self.validation_sample_count: int = 0
        """Validation samples seen so far in this epoch."""
        self.training_batches_per_epoch: int | None = None
        """``len(train_loader)`` when the loader has a length."""
        self.validation_batches_per_epoch: int | None = None
        """``len(val_loader)`` when there is one and it has a length."""
        self.training_metrics: dict[str, float] = {}
        """Training metrics of this epoch, filled after the training loop."""
        self.validation_metrics: dict[str, float] = {}
        """Validation metrics of this epoch, filled after the validation loop."""
        self.run_config: RunConfig | None = None
        """The whole configuration of the run (None outside a run)."""
        self.hyperparameters: dict[str, Any] = dict(hyperparameters or {})
        """The ``hyperparameters`` table of the configuration."""
        self.extra: dict[str, Any] = {}
        """Free-form data shared between plugins (``active_plugins`` lists them)."""
        self.should_stop_training: bool = False
        """Set to True to ask the loop to stop after the current training step (several
        processes stop after the same step; see ``docs/training.md``)."""
        self.model = model
        """The model being trained (acting on it is allowed; breaking it is not)."""
        self.optimizer = optimizer
        """The optimizer."""
        self.scheduler: object | None = None
        """The learning-rate scheduler, if ``train.py`` returned one."""
        self.device = device
        """The device training runs on."""
        self.rank: int = rank
        """This process's rank (0 when not distributed)."""
        self.world_size: int = world_size
        """Number of training processes (1 when not distributed)."""
        self.checkpoint_path: Path | None = None
        """The checkpoint just saved or loaded, during the checkpoint hooks."""
        self.exception: BaseException | None = None
        """The error that is ending training, during ``on_exception``."""
        self.last_loss: torch.Tensor | None = None
        """The latest training batch's loss, detached, as a device tensor (reading its
        value syncs; avoid per batch)."""
        self.batch: tuple[Any, Any] | None = None
        """The current batch as ``(inputs, targets)`` on the training device, in the
        per-batch hooks (a reference, not a copy); None elsewhere."""
        self.outputs: Any = None
        """The model's outputs for the current batch, from ``after_backward`` (training)
        or ``end_validation_batch`` (validation) to the end of the batch; None elsewhere."""
        self.loss: torch.Tensor | None = None
        """The current batch's loss as computed (unscaled, still attached to the graph in
        ``after_backward``), where ``outputs`` is set; reading its value syncs."""
        self._training_loss = DeviceSum()
        self._validation_loss = DeviceSum()
        self._gradient_norm: torch.Tensor | None = None

    @property
    def is_main_process(self) -> bool:
        """True on rank 0, where logging and checkpointing plugins run."""
        return self.rank == 0

    @property
    def training_loss_total(self) -> float:
        """Sum of the training loss over this epoch's samples: each batch's (mean) loss
        times its sample count (one device read when accessed)."""
        return self._training_loss.value()

    @training_loss_total.setter
    def training_loss_total(self, value: float) -> None:
        self._training_loss = DeviceSum(float(value))

    @property
    def validation_loss_total(self) -> float:
        """Sum of the validation loss over this epoch's samples, like
        ``training_loss_total`` (one device read when accessed)."""
        return self._validation_loss.value()

    @validation_loss_total.setter
    def validation_loss_total(self, value: float) -> None:
        self._validation_loss = DeviceSum(float(value))

    @property
    def training_loss(self) -> float:
        """Training loss this epoch, weighted by batch sizes: the mean over the samples
        seen so far (``nan`` before the first batch). One device read when accessed."""
        return _mean(self.training_loss_total, self.training_sample_count)

    @property
    def validation_loss(self) -> float:
        """Validation loss this epoch, weighted by batch sizes: the mean over the samples
        seen so far (``nan`` before the first batch). One device read when accessed."""
        return _mean(self.validation_loss_total, self.validation_sample_count)

    @property
    def gradient_norm(self) -> float | None:
        """The total gradient norm before clipping, in ``before_optimizer_step`` and
        ``end_training_batch`` of a step that clips by norm (``gradient_clip.max_norm``);
        None otherwise. Kept on the device: one device read when accessed."""
        norm = self._gradient_norm
        return None if norm is None else float(norm)


def _mean(total: float, count: int) -> float:
    return total / count if count else float("nan")
