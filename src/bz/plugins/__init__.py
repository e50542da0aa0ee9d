"""The plugin API: what plugin authors import.

::

    from bz.plugins import Plugin, PluginContext
"""

from __future__ import annotations

from bz._logging import plugin_logger
from bz.plugins._context import PluginContext
from bz.plugins._hooks import HOOK_NAMES, HOOKS, HookSpec
from bz.plugins._order import Order
from bz.plugins._protocol import (
    ContextNotReady,
    NamedPlugin,
    Plugin,
    StatefulPlugin,
    device_of,
    loss_of,
    model_of,
    optimizer_of,
)
from bz.plugins._typing import ConfiguredPluginClass, CreatingPluginClass, HookMethod, hook

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
