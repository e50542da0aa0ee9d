"""What a plugin in its own process sees of the run: plain values, never the model.

:mod:`bz.plugins._isolated` sends these snapshots of the loop's context to the plugin's
process at each hook: the counters always; the step's loss, gradient norm and learning
rates on the steps the plugin asked for; the losses, metrics, ``extra``'s plain entries,
hyperparameters, checkpoint path and the failing exception at the hooks that wait.
Nothing here is a tensor, the model, the optimizer or the batch.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bz.plugins._context import PluginContext

COUNTERS = (
    "epoch",
    "epochs",
    "global_step",
    "batch_index",
    "training_batch_count",
    "training_sample_count",
    "validation_batch_count",
    "validation_sample_count",
    "training_batches_per_epoch",
    "validation_batches_per_epoch",
    "rank",
    "world_size",
    "should_stop_training",
)
"""Plain fields of the context every snapshot carries."""


def plain(value: Any) -> bool:
    """Whether ``value`` can travel to and from a plugin's process: JSON-like data."""
    if value is None or isinstance(value, (bool, int, float, str, Path)):
        return True
    if isinstance(value, (list, tuple)):
        return all(plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    return False


def plain_entries(table: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``table`` whose values are plain (the rest stays where it is)."""
    return {key: value for key, value in table.items() if plain(value)}


def source_of(context: PluginContext) -> PluginContext:
    # The loop's context behind the sandbox's read-only view (a test's own context as is).
    try:
        source: PluginContext = object.__getattribute__(context, "_source")
    except AttributeError:
        return context
    return source


def step_values(source: PluginContext) -> dict[str, Any]:
    """The step's loss, gradient norm and learning rates: host reads, on due steps only."""
    loss = source.last_loss
    return {
        "last_loss": None if loss is None else float(loss),
        "gradient_norm": source.gradient_norm,
        "param_groups": _param_groups(source),
    }


def epoch_values(source: PluginContext) -> dict[str, Any]:
    """What epoch-level hooks see beyond the counters (one device read per loss)."""
    training, validation = source._training_loss, source._validation_loss
    values = step_values(source)
    exception = source.exception
    values.update(
        extra=plain_entries(source.extra),
        training_metrics=dict(source.training_metrics),
        validation_metrics=dict(source.validation_metrics),
        hyperparameters=source.hyperparameters if plain(source.hyperparameters) else {},
        losses=(
            training.value(),
            training.batch_sum(),
            validation.value(),
            validation.batch_sum(),
        ),
        checkpoint_path=source.checkpoint_path,
        device=None if source.device is None else str(source.device),
        exception=None if exception is None else _portable(exception),
    )
    return values


def _param_groups(source: PluginContext) -> list[dict[str, Any]]:
    optimizer = source.optimizer
    if optimizer is None:
        return []
    return [
        {key: _number(value) for key, value in group.items() if key != "params"}
        for group in optimizer.param_groups
    ]


def _number(value: Any) -> Any:
    # A capturable optimizer keeps lr as a tensor: one read, as learning_rates() does.
    return value if plain(value) else float(value) if hasattr(value, "item") else None


def _portable(exception: BaseException) -> BaseException:
    """``exception`` as it pickles, or a RuntimeError that describes it."""
    try:
        copy: BaseException = pickle.loads(pickle.dumps(exception))
    except Exception:
        return RuntimeError(f"{type(exception).__name__}: {exception}")
    return copy


__all__ = ["COUNTERS", "epoch_values", "plain", "plain_entries", "source_of", "step_values"]
