"""The names of the values a run produces, as plugins and the console name them.

Every epoch a run produces its two losses and one value per metric for each phase.
Plugins that watch a value (``early_stopping``'s ``monitor``) accept these names:

- ``training_loss`` / ``validation_loss``, and the console's ``loss`` / ``val_loss``;
- a metric's bare name (``accuracy``: the validation value when there is validation
  data, else the training one);
- ``training_<metric>`` / ``validation_<metric>``, and the console's ``val_<metric>``
  (the console prints training metrics bare and validation ones with ``val_``).

A watched name outside this set would never be found: it is refused before training
(:func:`check_monitors`), with the names it could be. Only bz's own plugins are known
to add no metric of their own; when another plugin is active, a name outside the set may
be one it adds (the plugin guide's ``context.training_metrics["my_custom_metric"]``),
so the check is left to the watching plugin at the end of the first epoch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Literal

from bz._errors import ConfigError

__all__ = ["check_monitors", "resolve", "run_value_names"]

Phase = Literal["training", "validation"]


def run_value_names(metrics: Iterable[str]) -> list[str]:
    """Every name a run with ``metrics`` produces, in the order people read them."""
    names = ["validation_loss", "training_loss", "val_loss", "loss"]
    for metric in metrics:
        names += [metric, f"validation_{metric}", f"training_{metric}", f"val_{metric}"]
    return names


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


def check_monitors(plugins: Iterable[object], metrics: Collection[str]) -> None:
    """Refuse plugins watching a value the run never produces (a :class:`ConfigError`).

    A plugin takes part by having a ``config`` with a ``monitor_problem(names)`` method
    that returns why a watched name is not among ``names`` (or None). Nothing is
    refused while a plugin that is not bz's own is active: it may add the name.
    """
    plugins = list(plugins)
    if any(not type(plugin).__module__.startswith("bz.") for plugin in plugins):
        return
    names = run_value_names(metrics)
    problems: list[tuple[str, str]] = []
    for plugin in plugins:
        check = getattr(getattr(plugin, "config", None), "monitor_problem", None)
        if not callable(check):
            continue
        problem = check(names)
        if isinstance(problem, str):
            problems.append((f"{getattr(plugin, 'name', type(plugin).__name__)}", problem))
    if problems:
        raise ConfigError(problems)
