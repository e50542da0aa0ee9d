"""Where a plugin's entry sits in the configuration, and its configuration errors named
from there.

Every configuration error about a plugin's options names the plugin's entry the way
structuring its options does, whichever check finds it: ``plugins[1].early_stopping.
patince`` (an unknown key), ``plugins[1].early_stopping.monitor`` (a watched name the
run never produces, found once ``train.py``'s setup is known), ``plugins[0].timer.every``
(a :class:`~bz.config.ConfigError` or :class:`~bz.config.ConfigValueError` the plugin's
own ``load_config``, ``create`` or constructor raises about a field).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from bz._config_values import ConfigValueError
from bz._errors import ConfigError

if TYPE_CHECKING:
    from bz.config import PluginSpec

__all__ = ["entry_paths", "named_under", "options_path"]


def options_path(spec: PluginSpec) -> str:
    """Where a plugin's options sit, plugin name included: ``plugins[0].gradnorm``.

    A plugin listed as a plain string has no options object in the file; errors about
    its options still name it, so the path says which plugin to give options to.
    """
    if not spec.path:
        return spec.name
    return spec.path if spec.path.endswith(f".{spec.name}") else f"{spec.path}.{spec.name}"


def entry_paths(specs: Sequence[PluginSpec]) -> dict[str, str]:
    """:func:`options_path` of each plugin in ``specs``, by plugin name: what checks made
    after loading (on plugin objects, which do not know their entry) name them by."""
    return {spec.name: options_path(spec) for spec in specs}


@contextlib.contextmanager
def named_under(spec: PluginSpec) -> Iterator[None]:
    """Configuration errors raised inside, named under ``spec``'s entry.

    A :class:`ConfigError` whose paths are the plugin's own (``every``, or none) gets
    the entry in front (``plugins[0].timer.every``); a :class:`ConfigValueError` (a
    value a plugin refuses, with its field) becomes such a :class:`ConfigError`: the
    user's mistake in the file (exit 2), not a fault of the plugin's code.
    """
    base = options_path(spec)
    try:
        yield
    except ConfigError as exc:
        raise ConfigError([(_under(base, path), m) for path, m in exc.problems]) from None
    except ConfigValueError as exc:
        raise ConfigError([(_under(base, exc.field), exc.message)]) from None


def _under(base: str, path: str) -> str:
    if not path:
        return base
    if path == base or path.startswith((f"{base}.", f"{base}[")):
        return path  # named from the file already (the loader's own structuring)
    return f"{base}{path}" if path.startswith("[") else f"{base}.{path}"
