"""``loss_printer``: the plugin guide's style, a subclass of ``Plugin`` with ``create``.

Subclassing :class:`bz.plugins.Plugin` gives a ``logger`` and no-op hooks, and lets
mypy check every hook this class overrides against the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bz.plugins import CreatingPluginClass, Plugin, PluginContext

if TYPE_CHECKING:
    from bz.config import RunConfig


class LossPrinter(Plugin):
    """Prints the training loss every ``log_interval`` epochs."""

    name = "loss_printer"

    def __init__(self, log_interval: int = 10) -> None:
        super().__init__(name=self.name)
        self.log_interval = log_interval

    def end_epoch(self, context: PluginContext) -> None:
        """Print the epoch's mean training loss (one device read)."""
        if context.epoch % self.log_interval == 0:
            print(f"Epoch {context.epoch}: loss = {context.training_loss:.4f}")

    @staticmethod
    def load_config(config_data: dict[str, Any]) -> dict[str, Any]:
        """The options with their defaults filled in."""
        return {
            "enabled": config_data.get("enabled", True),
            "log_interval": config_data.get("log_interval", 10),
        }

    @staticmethod
    def create(config_data: dict[str, Any], training_config: RunConfig) -> LossPrinter | None:
        """Create the plugin from its JSON options (``None`` when disabled)."""
        config = LossPrinter.load_config(config_data)
        if not config["enabled"]:
            return None
        interval = config["log_interval"]
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            # Raised inside bz's sandbox: reported with the plugin's name, never a crash.
            raise ValueError(f"log_interval must be a positive integer, got {interval!r}")
        return LossPrinter(log_interval=interval)


_contract: CreatingPluginClass = LossPrinter
