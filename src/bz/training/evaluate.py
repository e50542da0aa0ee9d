"""The validation pass: one pass of a model over validation data, as the loop validates
and as ``bz validate`` evaluates a checkpoint (one function for both, so they agree).

Per batch: move it to the device, unpack ``(inputs, targets)``
(:meth:`ValidationPass.inputs_and_targets`), forward and loss under the run's autocast
(:meth:`ValidationPass.outputs_and_loss`: what one batch computes), then the loss is
added weighted by the batch's samples and the metrics are updated (in float32 under
mixed precision). The loss reported is the mean over samples, so a smaller last batch
weighs what its samples weigh. Nothing is read back to the host per batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import torch

from bz._errors import UsageError
from bz.metrics._set import MetricSet
from bz.training.device import resolve_device, sample_count, to_device, unpack
from bz.training.precision import Precision, precision_for
from bz.training.state import Totals

if TYPE_CHECKING:
    from bz._setup import TrainingSetup
    from bz.config import RunConfig
    from bz.metrics import Metric


class BatchWatcher(Protocol):
    """What the loop does around each validation batch (its hooks)."""

    def validation_batch_started(self, index: int, inputs: Any, targets: Any) -> None:
        """Batch ``index`` is unpacked; its forward pass comes next."""

    def validation_batch_ended(self, outputs: Any, loss: torch.Tensor) -> None:
        """The batch's loss and metrics are counted."""


@attrs.frozen
class ValidationPass:
    """One pass over validation data: the loop's validation and ``bz validate``."""

    forward: Callable[[Any], Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    precision: Precision
    device: torch.device | None = None
    """Where batches are moved; None leaves them where the loader puts them (CPU)."""
    limit: int | None = None
    """At most this many batches (``--smoke``)."""
    watcher: BatchWatcher | None = None

    def run(self, loader: Iterable[Any], metrics: MetricSet, totals: Totals) -> None:
        """Count every batch of ``loader`` into ``totals`` and ``metrics`` (without
        gradients); the caller puts the model in eval mode and resets the metrics."""
        one = self._batch
        with torch.no_grad():
            for index, batch in enumerate(limited(iter(loader), self.limit)):
                one(batch, index, metrics, totals)

    def _batch(self, batch: Any, index: int, metrics: MetricSet, totals: Totals) -> None:
        # A frame of its own: outputs die before the next batch is fetched.
        inputs, targets = self.inputs_and_targets(batch)
        watcher = self.watcher
        if watcher is not None:
            watcher.validation_batch_started(index, inputs, targets)
        outputs, loss = self.outputs_and_loss(inputs, targets)
        totals.add(loss.detach(), sample_count(inputs, targets))
        metrics.update(for_metrics(outputs, self.precision), targets)
        if watcher is not None:
            watcher.validation_batch_ended(outputs, loss)

    def inputs_and_targets(self, batch: Any) -> tuple[Any, Any]:
        """One batch as the model takes it: on the device, split into inputs and targets."""
        if self.device is not None:
            batch = to_device(batch, self.device)
        return unpack(batch, "val_loader")

    def outputs_and_loss(self, inputs: Any, targets: Any) -> tuple[Any, torch.Tensor]:
        """What one batch computes: the forward pass and the loss, under autocast."""
        with self.precision.autocast():
            outputs = self.forward(inputs)
            loss = self.loss_fn(outputs, targets)
        return outputs, loss


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
    ValidationPass(model, setup.loss_fn, precision, moves).run(setup.val_loader, tracked, totals)
    return Evaluation(totals.mean(), tracked.compute(), totals.batches)
