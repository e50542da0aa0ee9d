"""``wandb``: the same per-epoch scalars as ``tensorboard``, and the run's config, in W&B.

Needs the ``wandb`` extra (``pip install 'bz-cli[wandb]'``). Online runs need
``wandb login`` (or ``WANDB_API_KEY``); ``mode: "offline"`` writes everything locally
for a later ``wandb sync``, and ``mode: "disabled"`` turns W&B into a no-op. Without a
``mode`` option W&B decides (``WANDB_MODE``, then online).

Each epoch is one ``run.log`` call with the tags of :mod:`bz.plugins._scalars` plus
``epoch`` (counted from 1), which is declared as the x-axis of every other tag. With
``step_interval`` every that many optimizer steps one more ``run.log`` call carries the
step scalars (``step/loss``, ``step/grad_norm``, ``step/lr``) and ``global_step``, their
x-axis. The config holds ``hyperparameters`` and ``run`` (epochs, device, world size).

The module is called ``wandb_logger`` so that it never shadows the ``wandb`` package.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any, Literal

import attrs

from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, Order, hook
from bz.plugins._run_dir import run_directory
from bz.plugins._scalars import LoggerClock, step_scalars

if TYPE_CHECKING:
    from collections.abc import Callable

    from wandb.sdk.wandb_run import Run

    from bz.plugins._context import PluginContext


@attrs.frozen
class WandbConfig:
    """Options of ``wandb``."""

    project_name: str = "bz"
    """The W&B project runs are logged to."""
    entity: str | None = None
    """Team or user that owns the project (default: your W&B default entity)."""
    mode: Literal["online", "offline", "disabled"] | None = None
    """``online``, ``offline`` (sync later with ``wandb sync``) or ``disabled``."""
    run_name: str | None = None
    """Display name of the run (default: W&B picks one)."""
    group: str | None = None
    """Group runs together in the W&B UI (e.g. one study of ``bz tune``)."""
    tags: tuple[str, ...] = ()
    """Tags attached to the run."""
    notes: str | None = None
    """A longer description of the run."""
    dir: str | None = None
    """Where W&B keeps its local files (default: ``$WANDB_DIR``, else the run directory)."""
    step_interval: int | None = attrs.field(default=None, validator=at_least(1))
    """Also log the batch loss, gradient norm and learning rate every N steps (null: never)."""


class Wandb:
    """Logs per-epoch scalars and the configuration to Weights & Biases; rank 0 only.

    Other ranks of a distributed run create no W&B run.
    """

    Config = WandbConfig
    order = Order(last=True)
    """It reports the epoch: after every other plugin, so it sees the metrics they add."""

    def __init__(self, config: WandbConfig | None = None) -> None:
        # Checked here (cheaply: no import) so that a missing extra is reported when the
        # plugins are loaded, by `bz check-config` too, rather than once training runs.
        if importlib.util.find_spec("wandb") is None:
            raise ImportError("the wandb plugin needs W&B: pip install 'bz-cli[wandb]'")
        self.name = "wandb"
        self.config = config or WandbConfig()
        self.run: Run | None = None
        """The W&B run (set when training starts, on rank 0)."""
        self._epochs_done = 0
        self._step_tags: set[str] = set()
        self._clock = LoggerClock(self, self.config.step_interval, self._log_step)

    end_training_batch: Callable[[PluginContext], None]
    """The step scalars; present only with ``step_interval``."""
    gradient_norm_every: int
    """Asks the loop for the gradient norm on the steps logged (with ``step_interval``)."""

    def _directory(self, context: PluginContext) -> str | None:
        if self.config.dir is not None:
            return str(run_directory(context, self.config.dir))
        if os.environ.get("WANDB_DIR"):
            return None  # W&B reads it itself
        return str(run_directory(context))

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Start the W&B run with the configuration (rank 0 only)."""
        if not context.is_main_process:
            return
        import wandb

        config = self.config
        run_config: dict[str, Any] = {
            "hyperparameters": dict(context.hyperparameters),
            "run": {
                "epochs": context.epochs,
                "device": str(context.device) if context.device is not None else None,
                "world_size": context.world_size,
                "plugins": list(context.extra.get("active_plugins", [])),
            },
        }
        run = wandb.init(
            project=config.project_name,
            entity=config.entity,
            mode=config.mode,
            name=config.run_name,
            group=config.group,
            tags=list(config.tags) or None,
            notes=config.notes,
            dir=self._directory(context),
            config=run_config,
            # One W&B run per bz run, even when several run in one process (bz tune)
            # or the embedding program has a run of its own.
            reinit="create_new",
        )
        run.define_metric("epoch")
        run.define_metric("*", step_metric="epoch")
        self._step_tags = set()
        self.run = run

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Start the epoch's clock; note the learning rate the epoch trains with."""
        if self.run is None:
            return
        self._clock.start_epoch(context)

    def _log_step(self, context: PluginContext) -> None:
        """Every ``step_interval`` steps, the step scalars (the only per-step host reads)."""
        run = self.run
        if run is None or not self._clock.due(context):
            return
        scalars: dict[str, Any] = step_scalars(context)
        if not self._step_tags:
            run.define_metric("global_step")
        for tag in scalars.keys() - self._step_tags:
            # Named, so that the "*" glob's epoch axis does not apply to them.
            run.define_metric(tag, step_metric="global_step")
            self._step_tags.add(tag)
        scalars["global_step"] = context.global_step
        run.log(scalars)

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """Log the epoch's scalars."""
        if self.run is None:
            return
        scalars: dict[str, Any] = {"epoch": context.epoch + 1}
        scalars.update(self._clock.epoch_scalars(context))
        self.run.log(scalars)
        self._epochs_done = context.epoch + 1

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """Record how the run ended and finish it."""
        run = self.run
        if run is None:
            return
        run.summary["epochs_completed"] = self._epochs_done
        run.summary["stopped_early"] = (
            context.should_stop_training and self._epochs_done < context.epochs
        )
        self.run = None
        run.finish()

    @hook
    def on_exception(self, context: PluginContext) -> None:
        """Mark the W&B run as failed and finish it, keeping what was logged."""
        run = self.run
        if run is None:
            return
        self.run = None
        run.finish(exit_code=1)


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as Wandb(WandbConfig(**options)).
_: ConfiguredPluginClass[WandbConfig] = Wandb
