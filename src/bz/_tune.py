"""``bz tune``: a hyperparameter search with Optuna, each trial a full ``bz.run``.

The search is declared by the ``optuna`` entry of ``bzconfig.json``'s plugin list (see
:mod:`bz.plugins.optuna_search`). Every trial samples the search space, puts the values
into ``hyperparameters`` and trains with the run's own plugins, the ``optuna`` plugin
among them, which reports each epoch's value and asks the loop to stop when the pruner
says so. At the end: a results table, and the best values (and a complete config with
them) written next to ``bzconfig.json``.

With a ``storage`` (``sqlite:///tune.db``) the study survives the process: running
``bz tune`` again continues it until ``n_trials`` trials have finished.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from bz._errors import ConfigError, TrainingError, UsageError
from bz._logging import get_logger
from bz.config import RunConfig, find_config_file, structure, unstructure
from bz.plugins._run_dir import RUNS_ROOT, run_dir_hint
from bz.plugins.optuna_search import (
    OptunaConfig,
    SearchDimension,
    TrialLink,
    current_trial,
    monitored,
)

if TYPE_CHECKING:
    import optuna

    from bz.plugins._sandbox import ErrorPolicy
    from bz.training.result import EpochRecord, FitResult

_log = get_logger("bz")

PLUGIN_NAME = "optuna"

TRIAL_OVERRIDES: dict[str, Any] = {"resume": False, "checkpoint_interval": 0}
"""Every trial starts afresh and leaves no checkpoints: two trials that sample the same
values would otherwise share a run signature, and the second would resume the first."""


@attrs.frozen
class TrialRow:
    """One trial of the study, as the results table shows it."""

    number: int
    state: str
    """``complete``, ``pruned``, ``fail`` or ``running``."""
    value: float | None
    params: dict[str, Any]
    intermediate_values: dict[int, float]
    """The monitored value after each epoch, as reported to Optuna."""
    seconds: float | None


@attrs.frozen
class TuneResult:
    """What :func:`tune` found."""

    study_name: str
    direction: str
    monitor: str
    trials: tuple[TrialRow, ...]
    best: TrialRow | None
    written: tuple[Path, ...]
    """Files written: best parameters, best config, study."""


def search_settings(
    run_config: RunConfig, source: str | None = None
) -> tuple[OptunaConfig, dict[str, SearchDimension], str]:
    """The ``optuna`` plugin's options from ``run_config``, its search space and its path."""
    for spec in run_config.plugins:
        if spec.name != PLUGIN_NAME:
            continue
        if not spec.enabled:
            raise UsageError(f"{spec.path}: the optuna plugin is disabled; bz tune needs it")
        options = {k: v for k, v in spec.options.items() if k != "enabled"}
        try:
            settings = structure(options, OptunaConfig, spec.path)
        except ConfigError as exc:
            raise (exc.with_source(source) if source else exc) from None
        space = settings.search_space()
        if not space:
            raise UsageError(
                f"{spec.path}.hyperparameters: the search space is empty; declare what to "
                'search, e.g. {"lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": true}}'
            )
        _check_targets(run_config, space, spec.path)
        return settings, space, spec.path
    raise UsageError(
        "bz tune needs an optuna entry in the plugins list of bzconfig.json, e.g. "
        '{"optuna": {"n_trials": 20, "hyperparameters": {"lr": {"type": "float", '
        '"low": 1e-4, "high": 0.1, "log": true}}}} (see docs/integrations.md)'
    )


def _check_targets(run_config: RunConfig, space: Mapping[str, SearchDimension], path: str) -> None:
    # A dotted name reaches into a nested table of hyperparameters, which must exist.
    for name in space:
        table: Any = run_config.hyperparameters
        parents = name.split(".")[:-1]
        for depth, part in enumerate(parents):
            table = table.get(part) if isinstance(table, dict) else None
            if not isinstance(table, dict):
                missing = ".".join(parents[: depth + 1])
                raise ConfigError(
                    [
                        (
                            f"{path}.hyperparameters.{name}",
                            f"hyperparameters.{missing} is not a table to put this value in",
                        )
                    ]
                )


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401  # only checking that the extra is installed
    except ImportError:
        raise UsageError("bz tune needs Optuna: pip install 'bz-cli[optuna]'") from None


def _sampler(settings: OptunaConfig, seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(settings: OptunaConfig, run_config: RunConfig) -> optuna.pruners.BasePruner:
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.pruner_startup_trials,
            n_warmup_steps=settings.pruner_warmup_epochs,
        )
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=run_config.epochs)
    return optuna.pruners.NopPruner()


def _history_values(monitor: str, history: Sequence[EpochRecord]) -> list[float]:
    values = []
    for record in history:
        value = monitored(
            monitor,
            training_loss=record.training_loss,
            validation_loss=record.validation_loss,
            training_metrics=record.training_metrics,
            validation_metrics=record.validation_metrics,
        )
        if value is not None and not math.isnan(value):
            values.append(value)
    return values


def _row(trial: optuna.trial.FrozenTrial) -> TrialRow:
    duration = trial.duration
    return TrialRow(
        number=trial.number,
        state=trial.state.name.lower(),
        value=trial.value,
        params=dict(trial.params),
        intermediate_values={int(k): float(v) for k, v in trial.intermediate_values.items()},
        seconds=duration.total_seconds() if duration is not None else None,
    )


def tune(
    config: RunConfig | str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    plugin_errors: ErrorPolicy | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> TuneResult:
    """Run the search the config's ``optuna`` entry declares; arguments override it.

    Trials whose training fails are recorded as failed and the search goes on; if no
    trial finishes, the first failure is raised. Bad configuration raises at once.
    """
    from bz._run import config_and_base, run

    run_config, base = config_and_base(config, overrides, base_dir)
    source = None if isinstance(config, RunConfig) else str(find_config_file(config))
    settings, space, entry = search_settings(run_config, source)
    settings = attrs.evolve(
        settings,
        n_trials=n_trials if n_trials is not None else settings.n_trials,
        timeout=timeout if timeout is not None else settings.timeout,
        study_name=study_name if study_name is not None else settings.study_name,
        storage=storage if storage is not None else settings.storage,
    )
    _require_optuna()
    import optuna

    seed = settings.seed if settings.seed is not None else run_config.seed
    try:
        study = optuna.create_study(
            storage=settings.storage,
            sampler=_sampler(settings, seed),
            pruner=_pruner(settings, run_config),
            study_name=settings.study_name,
            direction=settings.direction,
            load_if_exists=True,
        )
    except (ValueError, ImportError) as exc:  # a bad URL, a direction clash, no driver
        raise UsageError(f"optuna storage {settings.storage!r}: {exc}") from None
    existing = len(study.get_trials(deepcopy=False))
    if existing and seed is not None:
        # A resumed study with a seeded sampler would replay the values of its first
        # trials; moving the seed on keeps it reproducible without repeating itself.
        study.sampler = _sampler(settings, seed + existing)
    failures: list[BaseException] = []

    def objective(trial: optuna.Trial) -> float:
        values = {name: dim.suggest(trial, name) for name, dim in space.items()}
        link = TrialLink(trial)
        trial_token = current_trial.set(link)
        dir_token = run_dir_hint.set(RUNS_ROOT / settings.study_name / f"trial-{trial.number}")
        _log.info("trial_started", trial=trial.number, params=values)
        try:
            result: FitResult = run(
                run_config,
                overrides={
                    **TRIAL_OVERRIDES,
                    **{f"hyperparameters.{name}": v for name, v in values.items()},
                },
                plugin_errors=plugin_errors,
                base_dir=base,
            )
        except ConfigError as exc:  # the plugins' checks in run(): named from the file
            raise (exc.with_source(source) if source and exc.source is None else exc) from None
        except UsageError:
            raise
        except Exception as exc:
            # A failed trial: bz's TrainingError, or the user's own exception, which
            # bz.run lets through as itself. Either way the study goes on.
            failures.append(exc)
            _log.warning("trial_failed", trial=trial.number, error=str(exc))
            if isinstance(exc, TrainingError):
                raise
            raise TrainingError(f"trial {trial.number} failed: {exc}") from exc
        finally:
            current_trial.reset(trial_token)
            run_dir_hint.reset(dir_token)
        if link.pruned_epoch is not None:
            _log.info("trial_pruned", trial=trial.number, epoch=link.pruned_epoch)
            raise optuna.TrialPruned(f"pruned after epoch {link.pruned_epoch}")
        history = _history_values(settings.monitor, result.history)
        if not history:
            final = result.final
            available = ["training_loss", "validation_loss"]
            if final is not None:
                available += [*final.validation_metrics, *final.training_metrics]
            where = f"{source}: " if source else ""
            raise UsageError(
                f"{where}{entry}.monitor: {settings.monitor!r} was never produced by the run "
                f"(available: {', '.join(dict.fromkeys(available))})"
            )
        pick = min if settings.direction == "minimize" else max
        value = pick(history) if settings.objective == "best" else history[-1]
        _log.info("trial_finished", trial=trial.number, value=value, params=values)
        return value

    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = len(study.get_trials(deepcopy=False, states=finished_states))
    remaining = settings.n_trials - finished
    if remaining > 0:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=settings.timeout,
            catch=(TrainingError,),
        )
    else:
        _log.info("study_already_finished", study=settings.study_name, trials=finished)

    rows = tuple(_row(t) for t in study.get_trials(deepcopy=False))
    completed = [r for r in rows if r.state == "complete" and r.value is not None]
    if not completed:
        if failures:
            raise TrainingError(
                f"all trials failed; the first failure: {failures[0]}"
            ) from failures[0]
        raise TrainingError("no trial completed (all were pruned or the timeout came first)")
    best = _row(study.best_trial)
    written = _write_outputs(settings, run_config, base, best, rows)
    return TuneResult(
        study_name=settings.study_name,
        direction=settings.direction,
        monitor=settings.monitor,
        trials=rows,
        best=best,
        written=written,
    )


def _write_outputs(
    settings: OptunaConfig,
    run_config: RunConfig,
    base: Path,
    best: TrialRow,
    rows: Sequence[TrialRow],
) -> tuple[Path, ...]:
    from bz._run import apply_overrides

    written = []
    best_hyperparameters = apply_overrides(
        run_config, {f"hyperparameters.{k}": v for k, v in best.params.items()}
    )
    if settings.save_best_params is not None:
        path = base / settings.save_best_params
        _write_json(
            path,
            {
                "study": settings.study_name,
                "trial": best.number,
                "monitor": settings.monitor,
                "direction": settings.direction,
                "value": best.value,
                "params": best.params,
                "hyperparameters": best_hyperparameters.hyperparameters,
            },
        )
        written.append(path)
    if settings.save_best_config is not None:
        path = base / settings.save_best_config
        _write_json(path, unstructure(best_hyperparameters))
        written.append(path)
    if settings.save_study is not None:
        path = base / settings.save_study
        _write_json(path, {"study": settings.study_name, "trials": [_row_json(r) for r in rows]})
        written.append(path)
    return tuple(written)


def _row_json(row: TrialRow) -> dict[str, Any]:
    data: dict[str, Any] = attrs.asdict(row)
    data["intermediate_values"] = {str(k): v for k, v in row.intermediate_values.items()}
    return data


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
