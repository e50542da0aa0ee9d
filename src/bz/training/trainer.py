"""``Trainer``: the public front of the loop (what ``bz train`` and embedders call)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bz._errors import describe_exception
from bz._logging import get_logger
from bz._model_summary import summarize
from bz.config import RunConfig
from bz.plugins._conflicts import check_plugins
from bz.plugins._loader import plugin_set
from bz.plugins._names import check_monitors
from bz.plugins._sandbox import PluginSet
from bz.training.control import check_validation_steps
from bz.training.device import deterministic_algorithms, seed_everything
from bz.training.interrupts import TrainingInterrupted
from bz.training.loop import Run
from bz.training.result import EpochRecord, FitResult

if TYPE_CHECKING:
    from bz._setup import TrainingSetup
    from bz.metrics import Metric
    from bz.plugins._protocol import NamedPlugin

_log = get_logger("bz")


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
        plugins: Sequence[NamedPlugin] = (),
        *,
        metrics: Mapping[str, Metric] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> FitResult:
        """Train for ``config.epochs`` epochs (or until a plugin asks to stop).

        ``metrics`` overrides the metrics built from ``config.metrics``; the setup's own
        ``metrics`` are always added.

        Before training, Python's, NumPy's and torch's global generators are seeded
        with ``config.seed`` (default 0). A host that keeps its own random state passes
        ``RunConfig(seed=None)``: the generators are then left exactly as they are.

        An exception raised by your code (model, loss, data) propagates as itself, with
        a note naming the epoch and step; bz's own failures are ``bz.*`` classes
        (:class:`~bz.PluginFailure` under ``plugin_errors="raise"``). Every call logs a
        ``run_started`` and a ``run_finished`` event (``outcome``: ``completed``,
        ``stopped_early``, ``already_complete``, ``failed`` or ``interrupted``);
        ``run_started`` carries the model's summary as ``model`` (parameters, trainable
        ones, bytes, and the same per top-level module).

        ``checkpoint_dir`` turns checkpoints on: the run's files go to
        ``<checkpoint_dir>/<signature>/`` every ``config.checkpoint_interval`` epochs,
        and with ``config.resume`` training continues from the newest one (``bz train``
        passes ``checkpoint_dir`` from the config; in code it is off unless given).
        Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and raises
        :class:`~bz.TrainingInterrupted`.
        """
        config = config or RunConfig()
        _check_arguments(config, plugins)
        if config.seed is not None:
            seed_everything(config.seed)
        return fit_seeded(setup, config, plugins, metrics=metrics, checkpoint_dir=checkpoint_dir)


def _check_arguments(config: object, plugins: object) -> None:
    """What a host passes by mistake (a dict for the config, one plugin unlisted) is a
    ``TypeError`` naming the argument, not an ``AttributeError`` from inside bz."""
    if not isinstance(config, RunConfig):
        raise TypeError(
            f"fit: config must be a bz.RunConfig, got {type(config).__name__} "
            "(RunConfig(**options) takes what bzconfig.json does)"
        )
    if isinstance(plugins, (str, bytes)) or not isinstance(plugins, (Iterable, PluginSet)):
        raise TypeError(
            f"fit: plugins must be a list of plugin objects, got {type(plugins).__name__}"
        )


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
    # Options of two plugins that contradict each other, and a plugin watching a value
    # the run never produces (it would never act): refused now.
    check_plugins(plugins.active)
    check_monitors(
        plugins.active, [*metrics, *setup.metrics], validates=setup.val_loader is not None
    )
    check_validation_steps(config, setup.val_loader is not None)
    # run_started / run_finished frame every fit, library or CLI, whatever its outcome,
    # so a host reading bz's events always sees how a run ended.
    _log.info(
        "run_started",
        epochs=config.epochs,
        device=config.device,
        seed=config.seed,
        plugins=plugins.active_names,
        metrics=sorted({*metrics, *setup.metrics}),
        checkpoints=str(folder) if folder is not None else None,
        model=summarize(setup.model).as_dict(),
    )
    started = time.perf_counter()
    try:
        all_metrics = {**metrics, **setup.metrics}
        run = Run(setup, config, plugins, all_metrics, folder, limit_batches=limit_batches)
        with deterministic_algorithms(config.deterministic):
            result = run.fit()
    except TrainingInterrupted as exc:
        _log.warning(
            "run_finished",
            outcome="interrupted",
            signal=exc.signal.name,
            checkpoint=str(exc.checkpoint) if exc.checkpoint else None,
            seconds=round(time.perf_counter() - started, 6),
        )
        raise
    except BaseException as exc:
        _log.error(
            "run_finished",
            outcome="failed",
            error=describe_exception(exc),
            seconds=round(time.perf_counter() - started, 6),
        )
        raise
    _log.info(
        "run_finished",
        outcome=_outcome(result),
        stopped_by=result.stopped_by,
        epochs_completed=result.epochs_completed,
        global_step=result.global_step,
        seconds=round(result.seconds, 6),
        model=str(result.model) if result.model is not None else None,
    )
    return result


def _outcome(result: FitResult) -> str:
    if result.already_complete:
        return "already_complete"
    return "stopped_early" if result.stopped_early else "completed"


__all__ = ["EpochRecord", "FitResult", "Trainer", "fit_seeded"]
