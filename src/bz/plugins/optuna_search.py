"""``optuna``: the search that ``bz tune`` runs, and pruning inside each trial.

The entry in ``bzconfig.json``'s plugin list holds everything about the search::

    {"optuna": {
        "n_trials": 20,
        "monitor": "validation_loss", "direction": "minimize",
        "hyperparameters": {
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": true},
            "hidden": {"type": "int", "low": 16, "high": 128, "step": 16},
            "batch_size": [16, 32, 64]
        }
    }}

Keys of ``hyperparameters`` name entries of the config's ``hyperparameters`` table
(dotted for nested tables); each trial is a full ``bz.run`` with the sampled values put
there. A list is shorthand for ``{"type": "categorical", "choices": [...]}``.

Under ``bz train`` the plugin does nothing. Under ``bz tune`` it reports the monitored
value to the trial after every epoch and, when the pruner says so, sets
``context.should_stop_training`` — the same signal ``early_stopping`` uses — so a
pruned trial ends like an early-stopped run and its plugins finish normally.
Importing this module does not import Optuna: ``bz check-config`` validates the search
space without the extra installed.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

import attrs

from bz._errors import ConfigError
from bz.config import ConfigValueError, at_least, structure
from bz.plugins import ConfiguredPluginClass, hook
from bz.plugins._names import monitor_problem, resolve

if TYPE_CHECKING:
    import optuna

    from bz.plugins._context import PluginContext

Choice = None | bool | int | float | str

_MAX_GRID_POINTS = 1e12


@attrs.frozen
class SearchDimension:
    """One hyperparameter's range: ``float``, ``int`` or ``categorical``."""

    type: Literal["float", "int", "categorical"]
    """The kind of value sampled."""
    low: float | None = None
    """Smallest value (float and int)."""
    high: float | None = None
    """Largest value, included (float and int)."""
    step: float | None = None
    """Sample on a grid of this step (float and int; not with ``log``)."""
    log: bool = False
    """Sample uniformly in log space (``low`` must be > 0)."""
    choices: tuple[Any, ...] | None = None
    """The values to choose from (categorical): strings, numbers, booleans or null."""

    def __attrs_post_init__(self) -> None:
        if self.type == "categorical":
            self._check_categorical()
        else:
            self._check_range()

    def _check_categorical(self) -> None:
        if not self.choices:
            raise ConfigValueError("choices", "a categorical dimension needs a non-empty list")
        for value in self.choices:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise ConfigValueError(
                    "choices", f"choices must be strings, numbers, booleans or null, got {value!r}"
                )
        for field in ("low", "high", "step"):
            if getattr(self, field) is not None:
                raise ConfigValueError(field, "not used by a categorical dimension")

    def _check_range(self) -> None:
        if self.low is None:
            raise ConfigValueError("low", f"a {self.type} dimension needs low and high")
        if self.high is None:
            raise ConfigValueError("high", f"a {self.type} dimension needs low and high")
        if self.choices is not None:
            raise ConfigValueError("choices", f"not used by a {self.type} dimension")
        if self.high < self.low:
            raise ConfigValueError("high", f"must be >= low ({self.low}), got {self.high}")
        if self.log and self.low <= 0:
            raise ConfigValueError("low", f"must be > 0 with log: true, got {self.low}")
        if self.log and self.step is not None:
            raise ConfigValueError("step", "cannot be combined with log: true")
        if self.step is not None and self.step <= 0:
            raise ConfigValueError("step", f"must be > 0, got {self.step}")
        if self.step is not None and (self.high - self.low) / self.step > _MAX_GRID_POINTS:
            # Optuna counts grid points with 28-digit decimals and fails past that.
            raise ConfigValueError(
                "step", f"{self.step} is too small for the range (over 1e12 grid points)"
            )
        if self.type == "int":
            for field in ("low", "high", "step"):
                value = getattr(self, field)
                if value is not None and not float(value).is_integer():
                    raise ConfigValueError(field, f"must be a whole number, got {value}")

    def suggest(self, trial: optuna.Trial, name: str) -> Choice:
        """Ask ``trial`` for a value of this dimension."""
        if self.type == "categorical":
            assert self.choices is not None
            chosen: Choice = trial.suggest_categorical(name, list(self.choices))
            return chosen
        assert self.low is not None
        assert self.high is not None
        if self.type == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


def parse_space(raw: Mapping[str, Any]) -> dict[str, SearchDimension]:
    """The search space of JSON ``raw``; a :class:`ConfigError` with paths if it is bad."""
    space: dict[str, SearchDimension] = {}
    problems: list[tuple[str, str]] = []
    for name, spec in raw.items():
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        try:
            space[name] = structure(spec, SearchDimension, name)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return space


_CHOICES = {
    "type": "array",
    "minItems": 1,
    "items": {"type": ["null", "boolean", "number", "string"]},
}
_NULL = {"type": "null"}


@attrs.frozen
class _SearchSpace:
    """The validator of ``hyperparameters``: :func:`parse_space`, and its rules as a
    JSON Schema (all but two that compare fields: ``high >= low``, and at most 1e12
    grid points)."""

    def __call__(self, _instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        try:
            parse_space(value)
        except ConfigError as exc:
            problems = [(f"{attribute.name}.{path}", m) for path, m in exc.problems]
            raise ConfigError(problems) from None

    def json_schema(self) -> dict[str, Any]:
        from bz._options import object_schema

        ranged = {
            "properties": {
                "low": {"type": "number"},
                "high": {"type": "number"},
                "choices": _NULL,
            },
            "required": ["low", "high"],
            "allOf": [
                {"properties": {"step": {"anyOf": [_NULL, {"exclusiveMinimum": 0}]}}},
                {  # log: true samples in log space: positive, and no grid
                    "if": {"properties": {"log": {"const": True}}, "required": ["log"]},
                    "then": {"properties": {"low": {"exclusiveMinimum": 0}, "step": _NULL}},
                },
                {  # an int dimension has whole bounds and step
                    "if": {"properties": {"type": {"const": "int"}}},
                    "then": {
                        "properties": {
                            key: {"anyOf": [_NULL, {"multipleOf": 1}]}
                            for key in ("low", "high", "step")
                        }
                    },
                },
            ],
        }
        categorical = {
            "properties": {"choices": _CHOICES, "low": _NULL, "high": _NULL, "step": _NULL},
            "required": ["choices"],
        }
        dimension = {
            **object_schema(SearchDimension),
            "if": {"properties": {"type": {"const": "categorical"}}},
            "then": categorical,
            "else": ranged,
        }
        # A list is short for {"type": "categorical", "choices": [...]}.
        return {"additionalProperties": {"anyOf": [_CHOICES, dimension]}}


_check_space = _SearchSpace()


@attrs.frozen
class OptunaConfig:
    """Options of ``optuna``: the search ``bz tune`` runs."""

    hyperparameters: dict[str, Any] = attrs.field(factory=dict, validator=_check_space)
    """Search space: name -> {"type": "float"|"int"|"categorical", ...} or a list of choices."""
    monitor: str = "validation_loss"
    """What a trial is judged by: a loss or a metric name, as for ``early_stopping``."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether smaller or larger ``monitor`` values are better."""
    objective: Literal["best", "last"] = "best"
    """A trial's value: its best epoch's ``monitor``, or its last epoch's."""
    n_trials: int = attrs.field(default=20, validator=at_least(1))
    """Trials the study should have finished (resumed studies run only what is missing)."""
    timeout: float | None = attrs.field(default=None, validator=at_least(0))
    """Stop starting new trials after this many seconds."""
    study_name: str = "bz"
    """The study's name (the key of a resumable study in ``storage``)."""
    storage: str | None = None
    """Optuna storage URL; ``sqlite:///tune.db`` makes the study resumable."""
    sampler: Literal["tpe", "random"] = "tpe"
    """How trials choose values: Optuna's TPE or uniform random."""
    seed: int | None = None
    """Sampler seed (default: the config's ``seed``)."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stop unpromising trials early: median rule, Hyperband, or never."""
    pruner_startup_trials: int = attrs.field(default=5, validator=at_least(0))
    """Median pruner: trials that run to the end before any is pruned."""
    pruner_warmup_epochs: int = attrs.field(default=1, validator=at_least(0))
    """Median pruner: epochs of each trial that are never pruned."""
    save_best_params: str | None = "best_params.json"
    """JSON file with the best trial's values (relative to the config's folder)."""
    save_best_config: str | None = "bzconfig.best.json"
    """A complete config with the best values, for ``bz train --config`` (null: none)."""
    save_study: str | None = None
    """JSON file listing every trial: state, value, values per epoch, parameters."""

    def search_space(self) -> dict[str, SearchDimension]:
        """The validated search space."""
        return parse_space(self.hyperparameters)

    def monitor_problem(self, names: Collection[str]) -> tuple[str, str] | None:
        """``("monitor", why)`` when ``monitor`` is none of ``names`` (what the run
        produces), or None: refused before a trial trains, as ``early_stopping``'s is."""
        problem = monitor_problem(self.monitor, names)
        return None if problem is None else ("monitor", problem)


def monitored(
    key: str,
    *,
    training_loss: float | None,
    validation_loss: float | None,
    training_metrics: Mapping[str, float],
    validation_metrics: Mapping[str, float],
) -> float | None:
    """The value ``key`` names, as ``early_stopping``'s ``monitor`` reads it
    (:func:`bz.plugins._names.resolve`): ``validation_loss``, ``training_loss``,
    ``validation_<metric>``, ``training_<metric>``, a bare metric name (the validation
    value when there is one), or the console's ``val_loss``, ``loss``, ``val_<metric>``.
    """
    for phase, name in resolve(key):
        if name == "loss":
            return validation_loss if phase == "validation" else training_loss
        table = validation_metrics if phase == "validation" else training_metrics
        if name in table:
            return float(table[name])
    return None


@attrs.define
class TrialLink:
    """What ``bz tune`` hands the plugin of the trial being run."""

    trial: optuna.Trial
    pruned_epoch: int | None = None
    """The epoch after which the trial was pruned, if it was."""


current_trial: ContextVar[TrialLink | None] = ContextVar("bz_optuna_trial", default=None)
"""The trial ``bz tune`` is running now (None under ``bz train``)."""


class OptunaSearch:
    """Reports ``monitor`` to the running Optuna trial each epoch; stops pruned trials.

    Idle under ``bz train``. ``bz tune`` runs trials in one process, so there is no rank
    but 0 to worry about; in a distributed trial only rank 0 would hold a trial.
    """

    Config = OptunaConfig

    def __init__(self, config: OptunaConfig | None = None) -> None:
        self.name = "optuna"
        self.config = config or OptunaConfig()
        self.link: TrialLink | None = None

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Find the trial ``bz tune`` is running, if any."""
        self.link = current_trial.get() if context.is_main_process else None

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """Report the epoch's value; request a stop when the pruner says so."""
        link = self.link
        if link is None:
            return
        value = monitored(
            self.config.monitor,
            training_loss=context.training_loss if context.training_batch_count else None,
            validation_loss=context.validation_loss if context.validation_batch_count else None,
            training_metrics=context.training_metrics,
            validation_metrics=context.validation_metrics,
        )
        if value is None or math.isnan(value):
            return
        link.trial.report(value, step=context.epoch)
        if link.trial.should_prune():
            link.pruned_epoch = context.epoch
            context.should_stop_training = True


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as OptunaSearch(OptunaConfig(**options)).
_: ConfiguredPluginClass[OptunaConfig] = OptunaSearch
