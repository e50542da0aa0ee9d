"""The plugin API: what plugin authors import.

::

    from bz.plugins import Plugin, PluginContext
"""

from __future__ import annotations

from bz._context import PluginContext
from bz._hooks import HOOK_NAMES, HOOKS, HookSpec
from bz._plugin import NamedPlugin, Plugin, StatefulPlugin

__all__ = [
    "HOOKS",
    "HOOK_NAMES",
    "HookSpec",
    "NamedPlugin",
    "Plugin",
    "PluginContext",
    "StatefulPlugin",
]
