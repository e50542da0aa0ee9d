"""Finding metrics (entry points in group ``bz.metrics``) and building them from the config.

Built-in metrics are registered in bz's own ``pyproject.toml`` exactly as a third-party
package would register its own, so there is one path; discovery and the rule for two
packages registering one name are shared with plugins (:mod:`bz._entry_points`).
:data:`BUILTIN_METRICS` is the same table, used as a fallback when the installed
metadata predates it (an editable install that was not refreshed) and to build a config
that names only built-ins without scanning every installed distribution.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from bz._converter import nearest
from bz._entry_points import EntrySource, builtin_sources, discover, duplicate_message
from bz._errors import ConfigError
from bz._logging import get_logger
from bz.config import structure
from bz.metrics._options import MetricOption, describe_options
from bz.metrics._protocol import Metric

if TYPE_CHECKING:
    from bz.config import MetricSpec

__all__ = [
    "BUILTIN_METRICS",
    "ENTRY_POINT_GROUP",
    "MetricInfo",
    "available_metrics",
    "build_metrics",
]

ENTRY_POINT_GROUP = "bz.metrics"
"""The entry-point group metrics are discovered in."""

BUILTIN_METRICS: Mapping[str, str] = {
    "accuracy": "bz.metrics:Accuracy",
    "f1_score": "bz.metrics:F1Score",
    "mean_absolute_error": "bz.metrics:MeanAbsoluteError",
    "mean_squared_error": "bz.metrics:MeanSquaredError",
    "precision": "bz.metrics:Precision",
    "recall": "bz.metrics:Recall",
    "top_k_accuracy": "bz.metrics:TopKAccuracy",
}
"""Entry-point name -> ``module:attribute`` of every built-in metric."""

_logger = get_logger("bz.metrics")


@attrs.frozen
class MetricInfo:
    """What ``bz list-metrics`` shows about one metric, loaded or not.

    ``factory`` is called with the structured options as keyword arguments and returns
    the metric. It is ``None`` when loading failed, and ``error`` says why.
    """

    name: str
    """The entry-point name, as written in ``bzconfig.json``."""
    source: str
    """Where the factory lives, ``module:attribute``."""
    distribution: str | None = None
    """The distribution (package) that registered it, when known."""
    version: str | None = None
    """That distribution's version, when known."""
    factory: Callable[..., Metric] | None = None
    """The metric class (or function), once loaded."""
    config: type[Any] | None = None
    """The attrs class its JSON options are structured into; ``None``: no options."""
    doc: str = ""
    """The factory's docstring."""
    error: str | None = None
    """Why the metric could not be loaded, if it could not."""

    @property
    def builtin(self) -> bool:
        """Whether bz itself ships this metric."""
        return BUILTIN_METRICS.get(self.name) == self.source

    @property
    def summary(self) -> str:
        """The first line of the docstring."""
        return self.doc.partition("\n")[0]

    @property
    def options(self) -> tuple[MetricOption, ...]:
        """The options (JSON keys) it accepts, with types and defaults."""
        return () if self.config is None else describe_options(self.config)


def available_metrics() -> dict[str, MetricInfo]:
    """Every metric that can be named in ``bzconfig.json``, by name, sorted.

    Loads each entry point. One that fails to load is listed with its ``error`` (and no
    ``factory``); it never stops the others.
    """
    return {name: _load(entry) for name, entry in _entry_points().items()}


def build_metrics(specs: Sequence[MetricSpec]) -> dict[str, Metric]:
    """Create the metrics the config asks for, keyed by the name their results go under.

    Each spec's options are structured into the metric's ``Config`` class. Unknown
    names (with the nearest valid one suggested), bad options, metrics that fail to load
    or to be created, and two metrics reporting under one name are all collected into
    one :class:`~bz.ConfigError` whose lines carry the JSON paths.
    """
    entries = (
        _entry_points()
        if _names_beyond_builtins(specs)
        else builtin_sources(ENTRY_POINT_GROUP, BUILTIN_METRICS)
    )
    metrics: dict[str, Metric] = {}
    reported_at: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for index, spec in enumerate(specs):
        path = spec.path or _default_path(index, spec)
        try:
            metric = _build_one(spec, path, entries)
        except ConfigError as error:
            problems.extend(error.problems)
            continue
        name = _display_name(metric, spec.name)
        if name in metrics:
            problems.append((path, f'reports "{name}", as {reported_at[name]} already does'))
            continue
        metrics[name] = metric
        reported_at[name] = path
    if problems:
        raise ConfigError(problems)
    return metrics


# -- discovery ------------------------------------------------------------------------


def _entry_points() -> dict[str, EntrySource]:
    """The metrics of group ``bz.metrics`` by name, sorted (built-ins always included).

    Clashes follow the one rule of :mod:`bz._entry_points` (bz's own first, then the
    distribution first in alphabetical order); each ignored entry is logged.
    """
    discovery = discover(ENTRY_POINT_GROUP, BUILTIN_METRICS)
    for name, ignored in discovery.duplicates.items():
        kept = discovery.sources[name]
        hint = duplicate_message("metric", name, kept, ignored)
        for loser in ignored:
            _logger.warning(
                "metric_name_taken",
                metric=name,
                ignored=loser.value,
                distribution=loser.distribution,
                kept=kept.value,
                hint=hint,
            )
    return discovery.sources


def _names_beyond_builtins(specs: Sequence[MetricSpec]) -> bool:
    # Built-in names cannot be taken by other packages, so a config naming only
    # built-ins needs no scan of every installed distribution (tens of milliseconds).
    return any(spec.name not in BUILTIN_METRICS for spec in specs)


def _load(entry: EntrySource) -> MetricInfo:
    """Import one entry point and check it can make metrics; failures become ``error``."""
    info = MetricInfo(
        name=entry.name,
        source=entry.value,
        distribution=entry.distribution,
        version=entry.version,
    )
    try:
        factory = entry.load()
    except Exception as error:  # any import-time failure of a third-party package
        return attrs.evolve(info, error=f"{type(error).__name__}: {error}")
    if not callable(factory):
        return attrs.evolve(
            info, error=f"{entry.value} is a {type(factory).__name__}, not callable"
        )
    config = getattr(factory, "Config", None)
    problem = _config_problem(config)
    if problem is not None:
        return attrs.evolve(info, error=f"{entry.value}.Config {problem}")
    return attrs.evolve(info, factory=factory, config=config, doc=inspect.getdoc(factory) or "")


def _config_problem(config: object) -> str | None:
    """Why ``config`` cannot describe a metric's options, or ``None`` when it can."""
    if config is None:
        return None
    if not (isinstance(config, type) and attrs.has(config)):
        return "must be an attrs class"
    try:
        # Resolved once here so that structuring and listing see real types.
        attrs.resolve_types(config)
    except Exception as error:  # NameError, or anything a broken annotation raises
        return f"has annotations that cannot be resolved: {type(error).__name__}: {error}"
    return None


# -- building -------------------------------------------------------------------------


def _default_path(index: int, spec: MetricSpec) -> str:
    """The JSON path of a spec made in Python rather than read from a file."""
    return f"metrics[{index}].{spec.name}" if spec.options else f"metrics[{index}]"


def _build_one(spec: MetricSpec, path: str, entries: Mapping[str, EntrySource]) -> Metric:
    entry = entries.get(spec.name)
    if entry is None:
        raise ConfigError([(path, _unknown_name(spec.name, entries))])
    info = _load(entry)
    if info.factory is None:
        raise ConfigError(
            [(path, f'metric "{spec.name}" could not be loaded from {info.source}: {info.error}')]
        )
    options = _structure_options(info, spec.options, path)
    try:
        # Typed as an object: a third-party factory may return anything at all.
        metric: object = info.factory(**options)
    except Exception as error:  # a third-party factory refusing valid options
        raise ConfigError(
            [(path, f'could not create metric "{spec.name}": {type(error).__name__}: {error}')]
        ) from error
    if not isinstance(metric, Metric):
        kind = type(metric).__name__
        message = f"{info.source} returned an object of type {kind}, which is not a metric"
        raise ConfigError([(path, f"{message} (it needs update, compute and reset)")])
    return metric


def _unknown_name(name: str, entries: Mapping[str, object]) -> str:
    hint = nearest(name, entries)
    if hint is not None:
        return f'unknown metric "{name}" (did you mean "{hint}"?)'
    return f'unknown metric "{name}" (available: {", ".join(entries)})'


def _structure_options(info: MetricInfo, options: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The factory's keyword arguments: ``options`` checked against its ``Config``."""
    if info.config is None:
        return _no_options(info.name, options, path)
    config = structure(dict(options), info.config, path)
    return attrs.asdict(config, recurse=False)


def _no_options(name: str, options: Mapping[str, Any], path: str) -> dict[str, Any]:
    if options:
        raise ConfigError(
            [(f"{path}.{key}", f"unknown key ({name} takes no options)") for key in options]
        )
    return {}


def _display_name(metric: Metric, fallback: str) -> str:
    name = getattr(metric, "display_name", None)
    return name if isinstance(name, str) and name else fallback
