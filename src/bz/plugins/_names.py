"""The names of the values a run produces, as plugins and the console name them.

Every epoch a run produces its two losses and one value per metric for each phase.
Plugins that watch a value (``early_stopping``'s ``monitor``) accept these names:

- ``training_loss`` / ``validation_loss``, and the console's ``loss`` / ``val_loss``;
- a metric's bare name (``accuracy``: the validation value when there is validation
  data, else the training one);
- ``training_<metric>`` / ``validation_<metric>``, and the console's ``val_<metric>``
  (the console prints training metrics bare and validation ones with ``val_``).

Without validation data (no ``val_loader``) the validation names are not in the set. One
rule for every watcher: ``early_stopping``'s ``monitor`` and ``keep_best.monitor`` accept
the same names (:func:`run_value_names`), find their value the same way
(:func:`find_value`) and are refused with the same message (:func:`monitor_problem`).

A watched name outside this set would never be found: it is refused before training
(:func:`check_monitors`), with the names it could be. Only bz's own plugins are known
to add no metric of their own; when another plugin is active, a name outside the set may
be one it adds (the plugin guide's ``context.training_metrics["my_custom_metric"]``),
so the check is left to the watching plugin at the end of the first epoch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Literal

from bz._converter import nearest
from bz._errors import ConfigError

if TYPE_CHECKING:
    from bz.plugins._context import PluginContext

__all__ = [
    "check_monitors",
    "find_value",
    "monitor_problem",
    "resolve",
    "run_value_names",
]

Phase = Literal["training", "validation"]
_VALIDATION_PREFIXES = ("validation_", "val_")


def run_value_names(metrics: Iterable[str], *, validates: bool = True) -> list[str]:
    """Every name a run with ``metrics`` produces, in the order people read them
    (``validates``: the run has validation data)."""
    if not validates:
        names = ["training_loss", "loss"]
        for metric in metrics:
            names += [metric, f"training_{metric}"]
        return names
    names = ["validation_loss", "training_loss", "val_loss", "loss"]
    for metric in metrics:
        names += [metric, f"validation_{metric}", f"training_{metric}", f"val_{metric}"]
    return names


def monitor_problem(monitor: str, names: Collection[str]) -> str | None:
    """Why the watched name ``monitor`` is none of ``names`` (:func:`run_value_names`),
    or None: the one message of every watcher, with the nearest name and the choices."""
    if monitor in names:
        return None
    if "validation_loss" not in names and monitor.startswith(_VALIDATION_PREFIXES):
        return (
            f"{monitor!r} is a validation value and this run has no val_loader; "
            f"it could be one of: {', '.join(names)}"
        )
    hint = nearest(monitor, names)
    suggestion = f'did you mean "{hint}"? ' if hint else ""
    return (
        f"{monitor!r} is no value this run produces; {suggestion}"
        f"it could be one of: {', '.join(names)}"
    )


def find_value(name: str, context: PluginContext) -> float | None:
    """The value ``name`` stands for at the end of an epoch, as :func:`resolve` finds it,
    or None when the run did not produce it (a NaN is returned as it is)."""
    for phase, key in resolve(name):
        if key == "loss":
            if phase == "validation":
                return context.validation_loss if context.validation_batch_count else None
            return context.training_loss if context.training_batch_count else None
        table = context.validation_metrics if phase == "validation" else context.training_metrics
        if key in table:
            return float(table[key])
    return None


def resolve(name: str) -> list[tuple[Phase, str]]:
    """Where ``name`` may be found, in order: ``(phase, "loss" or metric name)`` pairs."""
    aliases: dict[str, Phase] = {
        "validation_": "validation",
        "val_": "validation",
        "training_": "training",
    }
    if name in ("loss", "training_loss"):
        return [("training", "loss")]
    if name in ("val_loss", "validation_loss"):
        return [("validation", "loss")]
    found: list[tuple[Phase, str]] = []
    for prefix, phase in aliases.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            found.append((phase, name[len(prefix) :]))
    return [*found, ("validation", name), ("training", name)]


def check_monitors(
    plugins: Iterable[object],
    metrics: Collection[str],
    *,
    validates: bool = True,
    paths: Mapping[str, str] | None = None,
) -> None:
    """Refuse plugins watching a value the run never produces (a :class:`ConfigError`).

    A plugin takes part by having a ``config`` with a ``monitor_problem(names)`` method
    that returns ``(field, why)`` when a watched name is not among ``names`` (or None).
    Nothing is refused while a plugin that is not bz's own is active: it may add the name.
    ``validates``: the run has validation data (without it, no validation name is).
    ``paths``: where each plugin's options sit, by plugin name (``plugins[1].early_stopping``,
    what the loader's structuring errors name); a plugin created in code, or missing
    from it, is named ``plugins.<name>``, as :func:`bz.plugins._conflicts.check_plugins`
    names it. A plugin in a process of its own (its proxy) counts as not bz's own: the
    caller puts :class:`ConfiguredOptions` in the place of bz's own plugins run so.
    """
    plugins = list(plugins)
    if not all(_own(plugin) for plugin in plugins):
        return
    names = run_value_names(metrics, validates=validates)
    problems: list[tuple[str, str]] = []
    for plugin in plugins:
        check = getattr(getattr(plugin, "config", None), "monitor_problem", None)
        if not callable(check):
            continue
        problem = check(names)
        if problem is not None:
            field, message = problem
            name = str(getattr(plugin, "name", type(plugin).__name__))
            where = (paths or {}).get(name, f"plugins.{name}")
            problems.append((f"{where}.{field}", message))
    if problems:
        raise ConfigError(problems)


def _own(plugin: object) -> bool:
    """Whether ``plugin`` is one of bz's own, known to add no metric of its own."""
    module = type(plugin).__module__
    return module.startswith("bz.") and module != _PROXIES


_PROXIES = "bz.plugins._isolated"
"""The module of the proxies of plugins in processes of their own, whatever the plugin."""


class ConfiguredOptions:
    """A plugin's checked options standing in for the plugin where it is not at hand
    (``bz check-config`` creates none; a plugin in a process of its own is a proxy)."""

    def __init__(self, name: str, config: object) -> None:
        self.name = name
        self.config = config
