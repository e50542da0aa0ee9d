"""A model's size at a glance: parameters (total, trainable), bytes, per top-level module.

``run_started`` carries it as ``model`` (:meth:`ModelSummary.as_dict`) and
``console_out`` prints it when training starts. Counting reads shapes only (no device
read, nothing copied); a parameter shared by several modules counts once in the totals.
Bytes are those of the parameters and buffers as they are stored now (their dtype),
the size of the weights in a checkpoint, not the memory training needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch


@attrs.frozen
class ModuleSummary:
    """One top-level module (a direct child of the model)."""

    name: str
    type: str
    parameters: int
    trainable: int
    bytes: int


@attrs.frozen
class ModelSummary:
    """The model's totals and its top-level modules, in definition order."""

    type: str
    parameters: int
    trainable: int
    bytes: int
    modules: tuple[ModuleSummary, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a log event (``run_started``'s ``model``)."""
        return {
            "type": self.type,
            "parameters": self.parameters,
            "trainable": self.trainable,
            "bytes": self.bytes,
            "modules": [attrs.asdict(module) for module in self.modules],
        }


def _lazy(tensor: torch.Tensor) -> bool:
    """A lazy module's parameter or buffer, whose shape is not known yet."""
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    lazy: tuple[type, ...] = (UninitializedParameter, UninitializedBuffer)
    return isinstance(tensor, lazy)


def _counts(module: torch.nn.Module) -> tuple[int, int, int]:
    """(parameters, trainable, bytes of parameters and buffers); lazy ones count 0."""
    parameters = trainable = size = 0
    for parameter in module.parameters():  # shared parameters are yielded once
        if _lazy(parameter):
            continue
        count = parameter.numel()
        parameters += count
        trainable += count if parameter.requires_grad else 0
        size += count * parameter.element_size()
    for buffer in module.buffers():
        if not _lazy(buffer):
            size += buffer.numel() * buffer.element_size()
    return parameters, trainable, size


def summarize(model: torch.nn.Module) -> ModelSummary:
    """The summary of ``model`` (shapes and dtypes only)."""
    modules = tuple(
        ModuleSummary(name, type(child).__name__, *_counts(child))
        for name, child in model.named_children()
    )
    return ModelSummary(type(model).__name__, *_counts(model), modules)


def format_count(count: int) -> str:
    """``1234567`` as ``1.23M``: three significant digits, like the console's rates."""
    if count < 1000:
        return str(count)
    value = float(count)
    for unit in ("k", "M", "B"):
        value /= 1000
        text = f"{value:.3g}"
        if float(text) < 1000:  # 999.7k is written 1M, not 1e+03k
            return f"{text}{unit}"
    return f"{value / 1000:.3g}T"


def format_bytes(size: int) -> str:
    """``size`` in B, KiB, MiB, GiB or TiB, one decimal."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if round(value, 1) < 1024:  # 1023.97 KiB is written 1.0 MiB
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def summary_lines(summary: ModelSummary, *, max_modules: int = 20) -> list[str]:
    """The summary as console lines: the totals, then one line per top-level module."""
    frozen = summary.parameters - summary.trainable
    lines = [
        f"model {summary.type}: {format_count(summary.parameters)} parameters "
        f"({format_count(summary.trainable)} trainable"
        + (f", {format_count(frozen)} frozen" if frozen else "")
        + f"), {format_bytes(summary.bytes)}"
    ]
    shown = summary.modules[:max_modules]
    if shown:
        name_width = max(len(m.name) for m in shown)
        type_width = max(len(m.type) for m in shown)
        for module in shown:
            lines.append(
                f"  {module.name:<{name_width}}  {module.type:<{type_width}}  "
                f"{format_count(module.parameters):>6} parameters  {format_bytes(module.bytes)}"
            )
    hidden = len(summary.modules) - len(shown)
    if hidden > 0:
        lines.append(f"  ... and {hidden} more")
    return lines
