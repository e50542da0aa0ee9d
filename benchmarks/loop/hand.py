"""The hand-written loops: plain torch, never bz's classes; each bz row's baseline."""

from __future__ import annotations

import torch
from benchmarks.loop.workloads import Batch, Run, Workload, make_loader, make_optimizer
from torch import nn


def hand_loop(
    workload: Workload,
    batches: list[Batch],
    device: torch.device,
    metrics: HandMetrics | None = None,
    autocast: torch.dtype | None = None,
) -> Run:
    """The loop everyone writes: zero_grad, forward, loss, backward, step.

    With ``metrics``, it also counts them on the device per batch and reads them back
    once per epoch; with ``autocast``, forward and loss run under ``torch.autocast``.
    """
    model = workload.model(0).to(device)
    optimizer = make_optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    loader = make_loader(workload, batches)
    epochs = workload.epochs

    def run() -> None:
        for _ in range(epochs):
            model.train()
            if metrics is not None:
                metrics.reset()
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                # Without autocast no context at all, as one writes it by hand (a `with
                # nullcontext():` per step would cost the baseline what bz does not pay).
                if autocast is None:
                    outputs = model(inputs)
                    loss = loss_fn(outputs, targets)
                else:
                    with torch.autocast(device_type=device.type, dtype=autocast):
                        outputs = model(inputs)
                        loss = loss_fn(outputs, targets)
                loss.backward()
                optimizer.step()
                if metrics is not None:
                    metrics.update(outputs.detach(), targets)
            if metrics is not None:
                metrics.compute()

    return run


class HandAccuracy:
    """Accuracy as one writes it by hand: ``correct += (outputs.argmax(1) == y).sum()``."""

    def __init__(self, classes: int, device: torch.device) -> None:
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.total = 0

    def reset(self) -> None:
        """Zero the counts (each epoch)."""
        self.correct.zero_()
        self.total = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch: argmax, compare, sum, add."""
        self.correct += (outputs.argmax(1) == targets).sum()
        self.total += targets.shape[0]

    def compute(self) -> list[float]:
        """The one host read of the epoch."""
        return [float((self.correct / max(self.total, 1)).item())]


class HandFiveMetrics:
    """Accuracy, macro precision, recall and F1, and top-5 accuracy, written by hand.

    Per batch, on the device: a confusion matrix by ``bincount`` (accuracy, precision,
    recall and F1 all come from it) and top-k hits by ``topk``. Once per epoch, the
    five numbers are computed and read back together.
    """

    def __init__(self, classes: int, device: torch.device, k: int = 5) -> None:
        self.classes, self.k = classes, k
        self.confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)
        self.hits = torch.zeros((), dtype=torch.int64, device=device)
        self.total = 0

    def reset(self) -> None:
        """Zero the counts (each epoch)."""
        self.confusion.zero_()
        self.hits.zero_()
        self.total = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch: one argmax and bincount, one topk."""
        predicted = outputs.argmax(1)
        classes = self.classes
        self.confusion += torch.bincount(targets * classes + predicted, minlength=classes**2)
        self.hits += (outputs.topk(self.k, 1).indices == targets[:, None]).any(1).sum()
        self.total += targets.shape[0]

    def compute(self) -> list[float]:
        """The five results, with one host read."""
        confusion = self.confusion.view(self.classes, self.classes).double()
        true_positive = confusion.diagonal()
        precision = true_positive / confusion.sum(0).clamp(min=1)
        recall = true_positive / confusion.sum(1).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        total = max(self.total, 1)
        values = torch.stack(
            [
                true_positive.sum() / total,
                precision.mean(),
                recall.mean(),
                f1.mean(),
                self.hits / total,
            ]
        )
        return [float(value) for value in values.tolist()]


HandMetrics = HandAccuracy | HandFiveMetrics


def prepare_hand_written(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """The plain hand-written loop."""
    return hand_loop(workload, batches, device)


def prepare_hand_accuracy(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """The hand-written loop with hand-written accuracy."""
    metrics = HandAccuracy(workload.classes, device)
    return hand_loop(workload, batches, device, metrics)


def prepare_hand_five(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """The hand-written loop with hand-written equivalents of the five metrics."""
    metrics = HandFiveMetrics(workload.classes, device)
    return hand_loop(workload, batches, device, metrics)


def prepare_hand_bf16(workload: Workload, batches: list[Batch], device: torch.device) -> Run:
    """The hand-written loop under ``torch.autocast(device_type, dtype=torch.bfloat16)``."""
    return hand_loop(workload, batches, device, autocast=torch.bfloat16)
