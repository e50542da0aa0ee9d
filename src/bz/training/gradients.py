"""Gradients outside the step's own lines: the total norm (asked for by plugins, or to
clip by), clipping by it, and the parameters' gradient accumulators the loop holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bz.config import GradientClip, RunConfig


def group_size(accumulate: int, batches: int | None, index: int, micro: int) -> int:
    """Batches in the accumulation group of batch ``index`` (``micro`` of the group
    done): an epoch's last group may be shorter when the loader has a length
    (``batches``), and its loss is scaled by its size."""
    if accumulate == 1:
        return 1
    if batches is None:
        return accumulate
    return min(accumulate, batches - index + micro)


def gradient_accumulators(model: torch.nn.Module, config: RunConfig) -> list[object]:
    """The autograd node that adds into each trainable parameter's ``.grad``.

    A parameter holds its node weakly: the graph of a step keeps it alive, and when the
    step ends with its graph freed (as bz's does) the next forward makes a new one
    (about 18 k instructions a step for the 4 parameters of the tiny benchmark MLP,
    1.5% of its step). Holding the nodes changes nothing else:
    gradients, hooks and graphs are the same. Not under FSDP, whose parameters are
    sharded (and whose graph reaches them through its own functions).
    """
    if config.distributed.strategy == "fsdp":
        return []
    with torch.enable_grad():
        views = [p.view_as(p) for p in model.parameters() if p.requires_grad]
    return [view.grad_fn.next_functions[0][0] for view in views if view.grad_fn is not None]


def total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of all gradients together, on the device (no host read)."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, norm_type)
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(grad, norm_type) for grad in grads]
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    return total


def clip_norm(
    parameters: list[torch.nn.Parameter], clip: GradientClip, norm: torch.Tensor | None
) -> torch.Tensor:
    """Clip by the total norm (``norm``: this step's, computed already) and return it,
    whole on every process: under FSDP ``clip_grad_norm_`` returns a norm of sharded
    gradients, which rank 0 alone could not read without hanging. Making it whole is the
    one collective clipping needs anyway: the clipping then uses the whole norm."""
    assert clip.max_norm is not None
    if _CLIP_WITH_NORM is None:  # torch < 2.6
        return whole(torch.nn.utils.clip_grad_norm_(parameters, clip.max_norm, clip.norm_type))
    if norm is None:
        norm = whole(
            total_norm([p.grad for p in parameters if p.grad is not None], clip.norm_type)
        )
    _CLIP_WITH_NORM(parameters, clip.max_norm, norm)
    return norm


_CLIP_WITH_NORM = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
"""``torch.nn.utils.clip_grads_with_norm_`` (torch >= 2.6), else None."""


def whole(norm: torch.Tensor) -> torch.Tensor:
    """A norm over FSDP's sharded gradients made whole (a collective every process
    makes on the same steps), so that rank 0 alone can read it."""
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm
