"""The plugin API: what plugin authors import.

::

    from bz.plugins import Plugin, PluginContext
"""

from __future__ import annotations

from bz._context import PluginContext
from bz._hooks import HOOK_NAMES, HOOKS, HookSpec
from bz._logging import plugin_logger
from bz._order import Order
from bz._plugin import (
    ContextNotReady,
    NamedPlugin,
    Plugin,
    StatefulPlugin,
    device_of,
    loss_of,
    model_of,
    optimizer_of,
)
from bz._typing import ConfiguredPluginClass, CreatingPluginClass, HookMethod, hook

__all__ = [
    "HOOKS",
    "HOOK_NAMES",
    "ConfiguredPluginClass",
    "ContextNotReady",
    "CreatingPluginClass",
    "HookMethod",
    "HookSpec",
    "NamedPlugin",
    "Order",
    "Plugin",
    "PluginContext",
    "StatefulPlugin",
    "device_of",
    "hook",
    "loss_of",
    "model_of",
    "optimizer_of",
    "plugin_logger",
]
