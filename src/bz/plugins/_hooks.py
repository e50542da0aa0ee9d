"""The hook table: every point of the training loop a plugin can attach to.

This table is the single source of truth. The trainer calls hooks by these names, the
loader uses it to find which hooks a plugin implements, ``bz list-plugins --verbose``
prints it, and the docs are generated from it.
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

Phase = Literal["session", "epoch", "train", "validation", "checkpoint", "failure"]


@attrs.frozen
class HookSpec:
    """One hook: its method name, where in the loop it fires, and what it is for."""

    name: str
    phase: Phase
    per_batch: bool
    doc: str


HOOKS: Final[tuple[HookSpec, ...]] = (
    HookSpec(
        "start_training_session",
        "session",
        False,
        "Once, before the first epoch. Model, optimizer and device are in the context.",
    ),
    HookSpec(
        "load_checkpoint",
        "checkpoint",
        False,
        "After a checkpoint was restored; `context.checkpoint_path` names it.",
    ),
    HookSpec("start_epoch", "epoch", False, "At the start of every epoch."),
    HookSpec("start_training_loop", "train", False, "Before the first training batch."),
    HookSpec(
        "start_training_batch",
        "train",
        True,
        "Before the forward pass of each training batch.",
    ),
    HookSpec(
        "after_backward",
        "train",
        True,
        "After `loss.backward()`; gradients are populated.",
    ),
    HookSpec(
        "before_optimizer_step",
        "train",
        True,
        "Just before `optimizer.step()` (clip or inspect gradients here).",
    ),
    HookSpec(
        "end_training_batch",
        "train",
        True,
        "After the optimizer step of each training batch.",
    ),
    HookSpec(
        "end_training_loop",
        "train",
        False,
        "After the last training batch; `training_metrics` are computed.",
    ),
    HookSpec(
        "start_validation_loop",
        "validation",
        False,
        "Before the first validation batch (only when there is validation data).",
    ),
    HookSpec(
        "start_validation_batch",
        "validation",
        True,
        "Before the forward pass of each validation batch.",
    ),
    HookSpec(
        "end_validation_batch",
        "validation",
        True,
        "After the forward pass of each validation batch.",
    ),
    HookSpec(
        "end_validation_loop",
        "validation",
        False,
        "After the last validation batch; `validation_metrics` are computed.",
    ),
    HookSpec(
        "end_epoch",
        "epoch",
        False,
        "At the end of every epoch, after validation. Set `should_stop_training` here.",
    ),
    HookSpec(
        "save_checkpoint",
        "checkpoint",
        False,
        "After a checkpoint was written (after `end_epoch`, every `checkpoint_interval` "
        "epochs, the last epoch, and on Ctrl-C or SIGTERM); `context.checkpoint_path` names it.",
    ),
    HookSpec(
        "end_training_session",
        "session",
        False,
        "Once, after the last epoch, whether training stopped early or not.",
    ),
    HookSpec(
        "on_rewind",
        "failure",
        False,
        "A plugin failed and training went back to its last consistent state, to replay "
        'without it; `context.extra["rewind"]` says which plugin and where to.',
    ),
    HookSpec(
        "on_exception",
        "failure",
        False,
        "Training is failing (or was interrupted); flush what you hold. "
        "`context.exception` holds the error.",
    ),
)

HOOK_NAMES: Final[tuple[str, ...]] = tuple(spec.name for spec in HOOKS)
"""Hook method names in the order the loop first reaches them."""
