"""The validation pass: one pass of a model over validation data, as the loop validates
and as ``bz validate`` evaluates a checkpoint (one function for both, so they agree).

Per batch: move it to the device and prepare it as the setup's way of computing a loss
takes it (:meth:`ValidationPass.prepared`: ``(inputs, targets)`` for pairs), compute the
loss under the run's autocast (:meth:`ValidationPass.computed`: the same
:class:`~bz.training.forward.Forward` training uses: pairs, ``model(**batch)`` or the
user's step), then the loss is added weighted by the batch's samples and the metrics are
updated (in float32 under mixed precision). The loss reported is the mean over samples,
so a smaller last batch weighs what its samples weigh. Nothing is read back to the host
per batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import torch

from bz._errors import BzError, UsageError, add_validation_context
from bz.metrics._set import MetricSet
from bz.plugins._faults import RewindRequested
from bz.training.device import resolve_device, to_device
from bz.training.forward import Computed, Forward, forward_for
from bz.training.position import started
from bz.training.precision import Precision, precision_for
from bz.training.state import Totals

if TYPE_CHECKING:
    from bz._setup import TrainingSetup
    from bz.config import RunConfig
    from bz.metrics import Metric


class BatchWatcher(Protocol):
    """What the loop does around each validation batch (its hooks)."""

    def validation_batch_started(self, index: int, batch: Any) -> None:
        """Batch ``index`` is prepared (on the device); its forward pass comes next."""

    def validation_batch_ended(self, outputs: Any, loss: torch.Tensor) -> None:
        """The batch's loss and metrics are counted."""


@attrs.frozen
class ValidationPass:
    """One pass over validation data: the loop's validation and ``bz validate``."""

    model: torch.nn.Module
    """The model as training calls it (DDP-wrapped, compiled)."""
    batches: Forward
    """How a batch becomes a loss (the setup's way, for ``val_loader``)."""
    precision: Precision
    device: torch.device | None = None
    """Where batches are moved; None leaves them where the loader puts them (CPU)."""
    limit: int | None = None
    """At most this many batches (``--smoke``)."""
    watcher: BatchWatcher | None = None

    def run(self, loader: Iterable[Any], metrics: MetricSet, totals: Totals) -> None:
        """Count every batch of ``loader`` into ``totals`` and ``metrics`` (without
        gradients); the caller puts the model in eval mode and resets the metrics.

        An exception from the user's loader, model, loss or metric leaves as itself,
        naming the batch it belongs to (:func:`~bz._errors.add_validation_context`):
        the one being loaded, moved or computed.
        """
        one = self._batch
        failing = 0  # loading a batch comes before its index is known
        try:
            with torch.no_grad():
                for index, batch in enumerate(limited(started(loader), self.limit)):
                    failing = index
                    one(batch, index, metrics, totals)
                    failing = index + 1
        except (BzError, KeyboardInterrupt, RewindRequested):
            raise  # bz's own verdicts (a metric's bad input, a plugin's fault), a signal
        except BaseException as exc:
            add_validation_context(exc, batch=failing)
            raise

    def _batch(self, batch: Any, index: int, metrics: MetricSet, totals: Totals) -> None:
        # A frame of its own: outputs die before the next batch is fetched.
        batch = self.prepared(batch)
        watcher = self.watcher
        if watcher is not None:
            watcher.validation_batch_started(index, batch)
        loss, outputs, predictions, targets, samples = self.computed(batch)
        totals.add(loss, samples)
        if metrics.active:
            metrics.update(for_metrics(predictions, self.precision), targets)
        if watcher is not None:
            watcher.validation_batch_ended(outputs, loss)

    def prepared(self, batch: Any) -> Any:
        """One batch as the loss is computed from it: on the device, and for pairs split
        into ``(inputs, targets)``."""
        if self.device is not None:
            batch = to_device(batch, self.device)
        return self.batches.prepare(batch)

    def computed(self, batch: Any) -> Computed:
        """What one batch computes (loss, outputs, predictions, targets, samples), under
        autocast."""
        autocast = self.precision.autocast
        if autocast is None:
            return self.batches.compute(self.model, batch)
        with autocast():
            return self.batches.compute(self.model, batch)


def for_metrics(outputs: Any, precision: Precision) -> Any:
    """Outputs as metrics take them: detached, and float32 under mixed precision."""
    if isinstance(outputs, torch.Tensor):
        outputs = outputs.detach()
        if precision.mixed and outputs.is_floating_point():
            outputs = outputs.float()
    return outputs


def limited(iterator: Iterator[Any], limit: int | None) -> Iterator[Any]:
    """At most ``limit`` items of ``iterator`` (all of them for None)."""
    return iterator if limit is None else itertools.islice(iterator, limit)


@attrs.frozen
class Evaluation:
    """What ``bz validate`` reports: the validation loss and metrics of a model."""

    loss: float
    metrics: dict[str, float]
    batches: int
    weights: str = "model"
    """Which weights: ``model`` (the file's) or ``ema`` (the average the run's
    validation ran on, under ``validate_with_ema``)."""


def evaluate(setup: TrainingSetup, config: RunConfig, metrics: Mapping[str, Metric]) -> Evaluation:
    """Run ``setup.model`` over ``setup.val_loader`` once, as the loop's validation does:
    the same device, precision, weighting by samples and metric inputs."""
    if setup.val_loader is None:
        raise UsageError("setup() returned no val_loader; there is nothing to validate on")
    device = resolve_device(config.device)
    precision = precision_for(config.precision, device)
    model = setup.model.to(device)
    tracked = MetricSet({**metrics, **setup.metrics})
    tracked.to(device)
    tracked.reset()
    totals = Totals()
    model.eval()
    moves = device if device.type != "cpu" else None
    batches = forward_for(setup, "val_loader", metrics=tracked.active)
    ValidationPass(model, batches, precision, moves).run(setup.val_loader, tracked, totals)
    return Evaluation(totals.mean(), tracked.compute(), totals.batches)
