"""From a batch to its loss, the three ways a ``TrainingSetup`` can say (chosen once per run).

- pairs: ``loss_fn(model(inputs), targets)`` over ``(inputs, targets)`` batches;
- the Hugging Face convention: no ``loss_fn``, no ``step``, mapping batches:
  ``model(**batch)``, its ``loss``; metrics see its ``logits`` and ``batch["labels"]``;
- a user's ``step(model, batch)``: the loss tensor or a :class:`bz.StepResult`.

Which way is decided from the setup alone, before the first batch; the loop then calls
one :class:`Forward`'s two functions per batch and never looks at the kind again. Every
check here reads shapes and types only, never a device value.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import torch

from bz._errors import UsageError
from bz._setup import StepResult
from bz.training.device import count_samples, samples_of_pair, uncountable, unpack

if TYPE_CHECKING:
    from bz._setup import TrainingSetup

Computed = tuple[torch.Tensor, Any, Any, Any, int]
"""One batch's ``(loss, outputs, predictions, targets, samples)``: the loss to train on,
what plugins see as ``outputs``, what metrics see, and the batch's sample count."""


@attrs.frozen
class Forward:
    """How one loader's batches become losses.

    ``prepare`` turns a batch (already on the device) into what plugins see as
    ``context.batch`` and ``compute`` receives; ``compute`` runs under autocast (and,
    in training, with gradients) and returns a :data:`Computed`.
    """

    kind: str
    """``pairs``, ``mapping`` or ``step`` (for messages and tests)."""
    prepare: Callable[[Any], Any]
    compute: Callable[[torch.nn.Module, Any], Computed]
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    """The setup's ``loss_fn`` for ``pairs`` (the training step inlines ``compute``)."""


def forward_for(setup: TrainingSetup, loader: str, *, metrics: bool) -> Forward:
    """The :class:`Forward` for ``setup``'s batches from ``loader`` (``train_loader`` or
    ``val_loader``); ``metrics``: whether metrics will read predictions and targets."""
    if setup.step is not None:
        return Forward("step", _same, _step_compute(setup.step, loader, metrics))
    if setup.loss_fn is not None:
        loss_fn = setup.loss_fn

        def prepare(batch: Any) -> tuple[Any, Any]:
            # A plain pair is already what unpack would build (a tuple of the two).
            if type(batch) is tuple and len(batch) == 2:
                return batch
            return unpack(batch, loader)

        def compute(model: torch.nn.Module, batch: tuple[Any, Any]) -> Computed:
            inputs, targets = batch
            outputs = model(inputs)
            # samples_of_pair's first rule inline (a tensor's first dimension): it runs
            # for every batch, and a call and two tensor attributes are measurable.
            if isinstance(inputs, torch.Tensor) and (shape := inputs.shape):
                samples: int = shape[0]
            else:
                samples = samples_of_pair(inputs, targets, loader)
            return loss_fn(outputs, targets), outputs, outputs, targets, samples

        return Forward("pairs", prepare, compute, loss_fn)
    return Forward("mapping", _same, _mapping_compute(loader, metrics))


def _same(batch: Any) -> Any:
    return batch


def _mapping_compute(loader: str, metrics: bool) -> Callable[[torch.nn.Module, Any], Computed]:
    def compute(model: torch.nn.Module, batch: Any) -> Computed:
        if not isinstance(batch, Mapping):
            raise UsageError(
                f"{loader} yielded {type(batch).__name__}; with neither loss_fn nor step bz "
                "calls model(**batch), which needs mapping batches: give TrainingSetup a "
                "loss_fn for (inputs, targets) pairs, or a step(model, batch)"
            )
        outputs = model(**batch)
        loss = output_field(outputs, "loss")
        if not isinstance(loss, torch.Tensor):
            raise _no_loss(outputs, batch, loader)
        check_scalar(loss, "model(**batch).loss")
        predictions = targets = None
        if metrics:
            predictions, targets = output_field(outputs, "logits"), batch.get("labels")
            if not isinstance(predictions, torch.Tensor) or not isinstance(targets, torch.Tensor):
                missing = (
                    "the output has no logits"
                    if predictions is None
                    else "the batch has no labels"
                )
                raise UsageError(
                    "metrics read the output's 'logits' and the batch's 'labels', and "
                    f"{missing} ({loader}): give TrainingSetup a step that returns "
                    "bz.StepResult(loss, predictions=..., targets=...), or drop the metrics"
                )
        samples = count_samples(batch)
        if samples is None:
            raise uncountable(batch, loader)
        return loss, outputs, predictions, targets, samples

    return compute


def _no_loss(outputs: Any, batch: Mapping[str, Any], loader: str) -> UsageError:
    """``model(**batch)`` gave no loss: why, as far as the output and the batch say."""
    start = (
        f"model(**batch) returned {type(outputs).__name__} without a loss (no 'loss' "
        f"attribute or key) for a batch of {loader}"
    )
    if isinstance(outputs, tuple | list):
        why = (
            "a Hugging Face model returns a tuple when built with return_dict=False; "
            "build it with return_dict=True (the default)"
        )
    elif "labels" in batch:
        why = (
            "the batch has 'labels', but the model computed no loss from them: a model "
            "without a task head (BertModel rather than BertForSequenceClassification) "
            "ignores them; use one with a head"
        )
    else:
        why = (
            "put the targets in the batch as 'labels' (Hugging Face models then compute "
            "their loss)"
        )
    return UsageError(f"{start}: {why}, or give TrainingSetup a loss_fn or a step")


def _step_compute(
    step: Callable[[torch.nn.Module, Any], torch.Tensor | StepResult], loader: str, metrics: bool
) -> Callable[[torch.nn.Module, Any], Computed]:
    where = defined_at(step)

    def compute(model: torch.nn.Module, batch: Any) -> Computed:
        result = step(model, batch)
        if isinstance(result, torch.Tensor):
            check_scalar(result, "step", where)
            if metrics:
                raise _no_predictions(loader, where)
            samples = count_samples(batch)
            if samples is None:
                raise uncountable(batch, loader)
            return result, None, None, None, samples
        if not isinstance(result, StepResult):
            raise UsageError(
                f"{where}step returned {type(result).__name__}; it must return the loss as a "
                "scalar tensor, or a bz.StepResult"
            )
        loss, predictions, targets = result.loss, result.predictions, result.targets
        if not isinstance(loss, torch.Tensor):
            raise UsageError(
                f"{where}step returned a StepResult whose loss is {type(loss).__name__}; it must "
                "be a scalar tensor"
            )
        check_scalar(loss, "step", where)
        if metrics and (predictions is None or targets is None):
            raise _no_predictions(loader, where)
        samples = result.samples
        if samples is None:
            samples = count_samples(batch)
            if samples is None:
                raise uncountable(batch, loader)
        elif type(samples) is not int:
            raise UsageError(
                f"{where}step returned StepResult(samples=...) of type {type(samples).__name__}; "
                "it must be a Python int (reading a tensor would stall the device every batch)"
            )
        return loss, predictions, predictions, targets, samples

    return compute


def _no_predictions(loader: str, where: str) -> UsageError:
    return UsageError(
        f"{where}metrics are configured but step gave them nothing to read ({loader}): return "
        "bz.StepResult(loss, predictions=..., targets=...) from it"
    )


def check_scalar(loss: torch.Tensor, what: str, where: str = "") -> None:
    """Refuse a loss that is not one number, or that backward cannot start from
    (metadata only: no device read). ``where`` (``train.py:12: ``) prefixes the error."""
    if loss.ndim != 0:
        raise UsageError(
            f"{where}{what} returned a loss of shape {tuple(loss.shape)}; it must be a "
            "scalar: reduce it (loss.mean(), loss.sum())"
        )
    # Training only: validation computes the same loss without gradients, on purpose.
    if not loss.requires_grad and torch.is_grad_enabled():
        raise UsageError(
            f"{where}{what} returned a loss that does not require grad: it must be the "
            "loss computed from the model's forward, not detached, not a new tensor, not "
            "computed under torch.no_grad() (or every parameter has requires_grad=False)"
        )


def explain_backward(forward: Forward, loss: torch.Tensor) -> None:
    """After backward raised: a pairs loss that is not one number, or has no graph, is
    the setup's ``loss_fn``'s fault (torch's own message names only torch's file). The
    other ways check each loss before backward; this one would pay for that per batch."""
    if forward.loss_fn is not None:
        check_scalar(loss, "loss_fn")


def defined_at(function: object) -> str:
    """``file:line: `` where ``function`` is defined (empty for other callables)."""
    code = getattr(inspect.unwrap(function), "__code__", None)  # type: ignore[arg-type]  # any callable
    if code is None:
        return ""
    return f"{code.co_filename}:{code.co_firstlineno}: "


def output_field(outputs: Any, name: str) -> Any:
    """``outputs.<name>`` or ``outputs[name]`` (Hugging Face outputs have both), or None."""
    value = getattr(outputs, name, None)
    if value is None and isinstance(outputs, Mapping):
        value = outputs.get(name)
    return value
