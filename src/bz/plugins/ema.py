"""``ema``: an exponential moving average of the model's weights.

After every ``every_n_steps``-th optimizer step the average moves towards the weights::

    average = decay_n * average + (1 - decay_n) * weights

where ``decay_n`` is ``decay``, or, with ``warmup`` (the default), the smaller of
``decay`` and ``(1 + n) / (10 + n)``, ``n`` counting the updates done before this one:
early updates follow the weights closely, so the average does not stay near the random
initial weights for thousands of steps. The average starts as the weights the training
session starts with.

The update is one fused operation on the model's device per parameter group of
tensors (``torch._foreach_lerp_``); the decay is computed on the host from counters,
so no step reads a value back from the device. Only parameters are averaged: buffers
(batch norm's running statistics) are the model's own.

* ``validate_with_ema``: every validation pass (after each epoch, and every
  ``validate_every_steps``) runs on the averaged weights; the model's own are put back
  after it, bit for bit.
* ``apply_at_end``: a run that finishes ends with the averaged weights in the model,
  so ``model.pt`` holds them (and the model ``train.py`` built, in a program that calls
  ``Trainer.fit``). Checkpoints keep the trained weights, so that raising ``epochs``
  continues where the run stood.

The average is the plugin's state: checkpoints hold it, and a resumed run (after
``kill -9`` too) continues it exactly. It runs in every process: under DDP each holds
the same average; under FSDP each holds the shards of its own parameters, gathered
whole into checkpoints and sharded again on resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from bz.config import at_least, between
from bz.plugins import ConfiguredPluginClass, hook, model_of, plugin_logger

if TYPE_CHECKING:
    import torch  # noqa: TC004  # bound at run time by _import_torch, when an Ema is created
    from structlog.typing import FilteringBoundLogger

    from bz.config import PluginSpec
    from bz.plugins._context import PluginContext


@attrs.frozen
class EmaConfig:
    """Options of ``ema``."""

    decay: float = attrs.field(default=0.999, validator=between(0.0, 1.0))
    """How much of the average each update keeps (0.999: the average spans about the
    last thousand updates)."""
    warmup: bool = True
    """Use ``min(decay, (1 + n) / (10 + n))`` at the n-th update (n from 0): a short
    memory early in training, growing to ``decay``."""
    every_n_steps: int = attrs.field(default=1, validator=at_least(1))
    """Update the average after every this many optimizer steps."""
    validate_with_ema: bool = False
    """Run validation on the averaged weights (the model's own come back after it)."""
    apply_at_end: bool = False
    """At the end of a finished run, copy the averaged weights into the model:
    ``model.pt`` then holds them."""


class Ema:
    """Keeps an exponential moving average of the weights; stateful across resumes."""

    Config = EmaConfig
    every_rank = True
    """Runs in every process: each averages (and, under FSDP, holds the shards of) the
    weights it has, and each validates with them."""

    needs_training_process = "it keeps an average of the model's weights"
    """``"isolation": "process"`` is refused: the plugin works on the model."""

    def __init__(self, config: EmaConfig | None = None) -> None:
        _import_torch()
        self.name = "ema"
        self.config = config or EmaConfig()
        self.updates = 0
        """Updates of the average done so far."""
        self.last_step = 0
        """The optimizer step (``context.global_step``) of the last update."""
        self.weights: dict[str, torch.Tensor] | None = None
        """The averaged parameters by name (None before the session starts)."""
        self._saved: list[torch.Tensor] | None = None
        """The model's own weights while validation runs on the average."""
        self._restored = False
        """State was loaded since the last ``load_checkpoint`` (a resume restores it)."""

    def decay_at(self, update: int) -> float:
        """The decay of update number ``update`` (counted from 0)."""
        decay = self.config.decay
        return min(decay, (1 + update) / (10 + update)) if self.config.warmup else decay

    # -- hooks ---------------------------------------------------------------------------

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Start the average at the weights the session starts with (a resumed run's
        checkpoint replaces it right after)."""
        self._start(context)

    @hook
    def load_checkpoint(self, context: PluginContext) -> None:
        """A checkpoint without an average (``ema`` added to a run that had started
        without it): the average starts at the weights resumed from."""
        if not self._restored:
            self._start(context)
            self.logger.info("ema_started", step=context.global_step)
        self._restored = False

    @hook
    def end_training_batch(self, context: PluginContext) -> None:
        """Update the average when an optimizer step due for it has just been taken."""
        self._update_if_due(context)

    @hook
    def end_training_loop(self, context: PluginContext) -> None:
        """A loader without a length may end inside an accumulation group: its optimizer
        step comes after the last ``end_training_batch``."""
        self._update_if_due(context)

    @hook
    def start_validation_loop(self, context: PluginContext) -> None:
        """With ``validate_with_ema``: validate on the averaged weights."""
        if not self.config.validate_with_ema or self.weights is None or self._saved is not None:
            return
        averaged, params = self._pairs(model_of(context))
        with torch.no_grad():
            self._saved = [param.clone() for param in params]
            torch._foreach_copy_(params, averaged)

    @hook
    def end_validation_loop(self, context: PluginContext) -> None:
        """Put the model's own weights back after validation."""
        self._put_back(context)

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """With ``apply_at_end``: a finished run ends with the averaged weights."""
        self._put_back(context)
        if not self.config.apply_at_end or context.exception is not None or self.weights is None:
            return
        averaged, params = self._pairs(model_of(context))
        with torch.no_grad():
            torch._foreach_copy_(params, averaged)
        self.logger.info("ema_applied", updates=self.updates, step=self.last_step)

    @hook
    def on_exception(self, context: PluginContext) -> None:
        """A run failing during validation keeps its own weights, not the average."""
        self._put_back(context)

    # -- the average ---------------------------------------------------------------------

    def _start(self, context: PluginContext) -> None:
        with torch.no_grad():
            self.weights = {
                name: param.detach().clone()
                for name, param in model_of(context).named_parameters()
                if param.is_floating_point()
            }
        self.updates = 0
        self.last_step = context.global_step

    def _update_if_due(self, context: PluginContext) -> None:
        step = context.global_step
        if step == self.last_step or step % self.config.every_n_steps or self.weights is None:
            return
        averaged, params = self._pairs(model_of(context))
        with torch.no_grad():
            torch._foreach_lerp_(averaged, params, 1.0 - self.decay_at(self.updates))
        self.updates += 1
        self.last_step = step

    def _pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The averaged tensors and the parameters they follow, in the same order.

        Under FSDP both are sharded alike (``DTensor``): the pairs are their local
        shards, views the updates write through (DTensor has no sharding rule for every
        fused op, and each process only ever needs its own shard). An average read from
        a checkpoint (on the CPU) moves to its parameter's device the first time it is
        used.
        """
        weights = self.weights
        assert weights is not None
        averaged: list[torch.Tensor] = []
        params: list[torch.Tensor] = []
        for name, param in model.named_parameters():
            average = weights.get(name)
            if average is None:
                continue
            if average.device != param.device:
                average = weights[name] = average.to(param.device)
            averaged.append(_local(average))
            params.append(_local(param.detach()))
        return averaged, params

    def _put_back(self, context: PluginContext) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        _, params = self._pairs(model_of(context))
        with torch.no_grad():
            torch._foreach_copy_(params, saved)

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the counters that decide the next update."""
        return {"updates": self.updates, "last_step": self.last_step, "weights": self.weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the average exactly where :meth:`state_dict` left it."""
        self.updates = int(state["updates"])
        self.last_step = int(state["last_step"])
        weights = state["weights"]
        self.weights = None if weights is None else dict(weights)
        self._restored = True

    @property
    def logger(self) -> FilteringBoundLogger:
        """Events carry ``plugin=ema`` and follow the host's logging set-up."""
        return plugin_logger(self)


# -- what bz validate evaluates ----------------------------------------------------------


def validates_with_average(specs: Iterable[PluginSpec]) -> bool:
    """Whether a configuration's ``plugins`` run validation on ``ema``'s average."""
    return any(
        spec.name == "ema" and spec.enabled and spec.options.get("validate_with_ema") is True
        for spec in specs
    )


def saved_average(states: Mapping[str, Any] | None) -> dict[str, torch.Tensor] | None:
    """``ema``'s average in a checkpoint's plugin states (whole, by parameter name), or
    None when the checkpoint holds none."""
    state = (states or {}).get("ema")
    weights = state.get("weights") if isinstance(state, Mapping) else None
    if not isinstance(weights, Mapping):
        return None
    return {str(name): tensor for name, tensor in weights.items()}


def load_average(model: torch.nn.Module, average: Mapping[str, torch.Tensor]) -> None:
    """Put ``average`` into ``model``'s parameters, as a validation pass on it does
    (buffers stay the model's own)."""
    _import_torch()
    with torch.no_grad():
        for name, param in model.named_parameters():
            saved = average.get(name)
            if saved is not None:
                param.copy_(saved)


def _import_torch() -> None:
    """Bind ``torch`` here when the plugin is created, not when its module is imported:
    ``bz list-plugins --verbose`` imports this module to describe the plugin, and
    importing torch would cost it seconds. (A module global, so that the hooks that run
    every step look it up as cheaply as a top-level import.)"""
    global torch  # bound once; every later call finds it bound
    import torch


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor`` (a view of it), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)  # DTensor, without importing it here
    local: torch.Tensor = to_local() if to_local is not None else tensor
    return local


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as Ema(EmaConfig(**options)).
_: ConfiguredPluginClass[EmaConfig] = Ema
