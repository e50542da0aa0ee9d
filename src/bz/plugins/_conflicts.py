"""Options of two built-in plugins that contradict each other, refused before training.

``ema``'s ``validate_with_ema`` makes every validation pass run on the averaged weights,
so the epoch ``early_stopping`` finds best is the one whose *average* validated best;
``restore_best_weights`` would then put back the *trained* weights of that epoch, which
were never validated, and ``model.pt`` would hold them. The combination is refused
(a :class:`ConfigError`, exit 2) with what to set instead, both where the configuration
lists the plugins (``bz train``, ``bz check-config``) and for plugins created in Python
(``Trainer.fit``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bz._errors import ConfigError

if TYPE_CHECKING:
    from bz.config import PluginSpec

_DEFAULTS = {"validate_with_ema": False, "restore_best_weights": True}
"""The two options' defaults (``EmaConfig``, ``EarlyStoppingConfig``)."""


def _message(ema_at: str) -> str:
    return (
        f'cannot be true while ema validates its average ("validate_with_ema": true at '
        f"{ema_at}): the best epoch is chosen by the averaged weights, and restoring "
        'would put back trained weights that were never validated; set "restore_best_weights": '
        'false (with ema\'s "apply_at_end": true, model.pt holds the average), or '
        '"validate_with_ema": false'
    )


def conflicts(entries: Iterable[tuple[str, Mapping[str, Any], str]]) -> list[tuple[str, str]]:
    """The contradictions among ``entries`` (plugin name, options, where they were
    configured), as ``(path, problem)`` pairs for a :class:`ConfigError`."""
    found = {name: (options, path) for name, options, path in entries}
    ema, stopping = found.get("ema"), found.get("early_stopping")
    if ema is None or stopping is None:
        return []
    if _option(ema[0], "validate_with_ema") and _option(stopping[0], "restore_best_weights"):
        return [(f"{stopping[1]}.restore_best_weights", _message(ema[1]))]
    return []


def _option(options: Mapping[str, Any], name: str) -> bool:
    return options.get(name, _DEFAULTS[name]) is True


def check_specs(specs: Sequence[PluginSpec], path: Callable[[PluginSpec], str]) -> None:
    """Refuse contradicting options among the enabled ``specs`` (a :class:`ConfigError`
    naming the option to change); ``path`` says where a plugin's options sit."""
    problems = conflicts((spec.name, spec.options, path(spec)) for spec in specs if spec.enabled)
    if problems:
        raise ConfigError(problems)


def check_plugins(plugins: Iterable[object]) -> None:
    """:func:`check_specs` for plugins created in Python: bz's own, read from their
    ``config``."""
    entries = []
    for plugin in plugins:
        config = getattr(plugin, "config", None)
        name = getattr(plugin, "name", None)
        if type(plugin).__module__.startswith("bz.plugins.") and isinstance(name, str):
            options = {key: getattr(config, key) for key in _DEFAULTS if hasattr(config, key)}
            entries.append((name, options, f"plugins.{name}"))
    problems = conflicts(entries)
    if problems:
        raise ConfigError(problems)
