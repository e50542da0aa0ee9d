"""A minimal bz plugin: log the loss at the end of every epoch.

Install the package (``pip install .``) and list ``"simple_logger"`` in the
``plugins`` of ``bzconfig.json``. The entry point in ``pyproject.toml`` is::

    [project.entry-points."bz.plugins"]
    simple_logger = "simple_plugin_example:SimpleLoggerPlugin"
"""

from __future__ import annotations

from bz.plugins import Plugin, PluginContext


class SimpleLoggerPlugin(Plugin):
    """Logs each epoch's training and validation loss as a structured event."""

    name = "simple_logger"

    def __init__(self) -> None:
        super().__init__(name=self.name)

    def end_epoch(self, context: PluginContext) -> None:
        """One ``epoch_loss`` event per epoch (``self.logger`` adds ``plugin=...``)."""
        validation = context.validation_loss if context.validation_batch_count else None
        self.logger.info(
            "epoch_loss",
            epoch=context.epoch,
            training_loss=context.training_loss,
            validation_loss=validation,
        )
