"""``Trainer``: the public front of the loop (what ``bz train`` and embedders call)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bz._loader import plugin_set
from bz._sandbox import PluginSet
from bz.config import RunConfig
from bz.training.device import seed_everything
from bz.training.loop import Run
from bz.training.result import EpochRecord, FitResult

if TYPE_CHECKING:
    from bz._plugin import NamedPlugin
    from bz._setup import TrainingSetup
    from bz.metrics import Metric


class Trainer:
    """Trains a :class:`~bz.TrainingSetup` with plugins; what ``bz train`` runs.

    ::

        result = Trainer().fit(setup, RunConfig(epochs=5), plugins=[MyPlugin()])

    ``plugins`` are plugin objects (or a :class:`PluginSet` from the loader). Every call
    into them goes through the sandbox with ``config.plugin_errors`` as the policy.
    """

    def fit(
        self,
        setup: TrainingSetup,
        config: RunConfig | None = None,
        plugins: Sequence[NamedPlugin] | PluginSet = (),
        *,
        metrics: Mapping[str, Metric] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> FitResult:
        """Train for ``config.epochs`` epochs (or until a plugin asks to stop).

        ``metrics`` overrides the metrics built from ``config.metrics``; the setup's own
        ``metrics`` are always added.

        Before training, Python's, NumPy's and torch's global generators are seeded
        with ``config.seed`` (``RunConfig(seed=None)`` leaves them alone).

        ``checkpoint_dir`` turns checkpoints on: the run's files go to
        ``<checkpoint_dir>/<signature>/`` every ``config.checkpoint_interval`` epochs,
        and with ``config.resume`` training continues from the newest one (``bz train``
        passes ``checkpoint_dir`` from the config; in code it is off unless given).
        Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and raises
        :class:`~bz.TrainingInterrupted`.
        """
        config = config or RunConfig()
        if config.seed is not None:
            seed_everything(config.seed)
        return fit_seeded(setup, config, plugins, metrics=metrics, checkpoint_dir=checkpoint_dir)


def fit_seeded(
    setup: TrainingSetup,
    config: RunConfig,
    plugins: Sequence[NamedPlugin] | PluginSet = (),
    *,
    metrics: Mapping[str, Metric] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    limit_batches: int | None = None,
) -> FitResult:
    """:meth:`Trainer.fit` for a caller that has seeded already (``bz.run`` seeds once,
    before ``setup()`` builds the model). ``limit_batches`` caps every loop (``--smoke``)."""
    if not isinstance(plugins, PluginSet):
        plugins = plugin_set(list(plugins), config.plugin_errors)
    if metrics is None:
        from bz.metrics import build_metrics

        metrics = build_metrics(config.metrics)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    all_metrics = {**metrics, **setup.metrics}
    return Run(setup, config, plugins, all_metrics, folder, limit_batches=limit_batches).fit()


__all__ = ["EpochRecord", "FitResult", "Trainer", "fit_seeded"]
