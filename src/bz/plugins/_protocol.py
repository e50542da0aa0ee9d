"""The plugin protocols."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast, runtime_checkable

if TYPE_CHECKING:
    import logging
    from collections.abc import Mapping

    import torch
    from structlog.typing import FilteringBoundLogger

    from bz.plugins._context import PluginContext

    StdlibLogger: TypeAlias = logging.Logger | logging.LoggerAdapter[Any]


_OWN_LOGGER = "_bz_own_logger"
"""Where an assigned ``Plugin.logger`` lives on the instance."""


class Plugin(Protocol):
    """A bz plugin: a ``name`` and any subset of the hook methods.

    Implement it structurally (any class with ``name: str`` and some hooks, no base
    class at all) or subclass it explicitly, as the plugin guide does::

        class MyPlugin(Plugin):
            name = "my_plugin"

            def __init__(self, log_interval: int = 10):
                super().__init__(name=self.name)
                self.log_interval = log_interval

    Explicit subclasses inherit a no-op for every hook they do not define, and a
    structlog ``logger`` bound to the plugin's name. Only hooks a plugin defines
    itself are ever called by the loop.
    """

    name: str

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    @property
    def logger(self) -> FilteringBoundLogger:
        """A structlog-style logger bound to ``plugin=<name>`` (see :func:`plugin_logger`).

        Events follow the host: its structlog processors, else stdlib records on
        ``bz.plugin.<name>``. A plugin may assign its own (``self.logger =
        logging.getLogger(__name__)``, as the original bz-cli's examples do): the
        plugin's own logger wins, and under ``bz train`` its records reach the console
        like bz's events (see ``docs/plugin-guide.md``).
        """
        own = self.__dict__.get(_OWN_LOGGER)
        if own is not None:
            return cast("FilteringBoundLogger", own)
        # Imported here, not at the top: `bz --help` should not pay for structlog.
        from bz._logging import plugin_logger

        return plugin_logger(self)

    @logger.setter
    def logger(self, value: FilteringBoundLogger | StdlibLogger) -> None:
        self.__dict__[_OWN_LOGGER] = value

    def start_training_session(self, context: PluginContext) -> None:
        """Once, before the first epoch."""
        return

    def load_checkpoint(self, context: PluginContext) -> None:
        """After a checkpoint was restored."""
        return

    def start_epoch(self, context: PluginContext) -> None:
        """At the start of every epoch."""
        return

    def start_training_loop(self, context: PluginContext) -> None:
        """Before the first training batch of an epoch."""
        return

    def start_training_batch(self, context: PluginContext) -> None:
        """Before the forward pass of each training batch."""
        return

    def after_backward(self, context: PluginContext) -> None:
        """After ``loss.backward()``."""
        return

    def before_optimizer_step(self, context: PluginContext) -> None:
        """Just before ``optimizer.step()``."""
        return

    def end_training_batch(self, context: PluginContext) -> None:
        """After the optimizer step of each training batch."""
        return

    def end_training_loop(self, context: PluginContext) -> None:
        """After the last training batch of an epoch."""
        return

    def start_validation_loop(self, context: PluginContext) -> None:
        """Before the first validation batch."""
        return

    def start_validation_batch(self, context: PluginContext) -> None:
        """Before the forward pass of each validation batch."""
        return

    def end_validation_batch(self, context: PluginContext) -> None:
        """After the forward pass of each validation batch."""
        return

    def end_validation_loop(self, context: PluginContext) -> None:
        """After the last validation batch."""
        return

    def save_checkpoint(self, context: PluginContext) -> None:
        """After a checkpoint was written."""
        return

    def end_epoch(self, context: PluginContext) -> None:
        """At the end of every epoch."""
        return

    def end_training_session(self, context: PluginContext) -> None:
        """Once, after the last epoch."""
        return

    def on_rewind(self, context: PluginContext) -> None:
        """Training went back to a consistent state after a plugin's fault; mark the replay."""
        return

    def on_exception(self, context: PluginContext) -> None:
        """Training is failing; flush what you hold."""
        return


@runtime_checkable
class NamedPlugin(Protocol):
    """The least a plugin must be: an object with a ``name``.

    This is what ``Trainer`` accepts, so structural plugins that implement only the
    hooks they need type-check without inheriting anything.
    """

    name: str


@runtime_checkable
class StatefulPlugin(Protocol):
    """A plugin whose state is saved in checkpoints and restored on resume."""

    name: str

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state, made of tensors and plain Python values."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        ...


# -- typed access to what the training hooks can rely on ----------------------------------
#
# PluginContext types `model`, `optimizer`, `device` and `last_loss` as optional because a
# context exists before training and in tests. From `start_training_session` to
# `end_training_session` the loop always sets the first three, and `last_loss` once a
# training batch has ended; these accessors say so to mypy and fail with a clear message
# when called elsewhere.


class ContextNotReady(RuntimeError):
    """A context value read where the loop does not set it (e.g. outside training)."""


def _require(context: PluginContext, attribute: str, where: str) -> Any:
    value = getattr(context, attribute)
    if value is None:
        raise ContextNotReady(f"context.{attribute} is not set here; it is set {where}")
    return value


def model_of(context: PluginContext) -> torch.nn.Module:
    """``context.model``, typed as set: it is, in every hook from
    ``start_training_session`` to ``end_training_session`` (the unwrapped model, not DDP's
    wrapper)."""
    model: torch.nn.Module = _require(context, "model", "in every training hook")
    return model


def optimizer_of(context: PluginContext) -> torch.optim.Optimizer:
    """``context.optimizer``, typed as set (every training hook)."""
    optimizer: torch.optim.Optimizer = _require(context, "optimizer", "in every training hook")
    return optimizer


def device_of(context: PluginContext) -> torch.device:
    """``context.device``, typed as set (every training hook)."""
    device: torch.device = _require(context, "device", "in every training hook")
    return device


def loss_of(context: PluginContext) -> torch.Tensor:
    """The loss of the last finished training batch (``context.last_loss``), a detached
    device tensor: reading it costs no host sync until you call ``.item()``.

    In ``end_training_batch`` it is the batch just trained; in the batch's earlier hooks
    it is still the previous batch's (unset before the first batch ends), just as
    ``context.global_step`` counts optimizer steps *finished*: 0 in the first batch's
    ``after_backward``, 1 in its ``end_training_batch``.
    """
    loss: torch.Tensor = _require(context, "last_loss", "once the first training batch ends")
    return loss
