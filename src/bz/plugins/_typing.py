"""Static typing for plugin authors: what ``mypy --strict`` can check in a plugin package.

A plugin that subclasses :class:`bz.plugins.Plugin` is checked by mypy's ordinary
override rules: a hook with the wrong signature or a ``name`` that is not a ``str`` is
an error in the class body. A structural plugin (no base class) has nothing to be
compared with, so it states its intent:

- ``@hook`` on each hook method checks that method's signature (``(self, context) ->
  None``). It returns the method unchanged and only marks it, so the loader can also
  report a marked method whose name is not a hook.
- An annotated assignment checks the class as the loader will create it::

      _: ConfiguredPluginClass[TimerConfig] = Timer   # Timer(config: TimerConfig)
      _: CreatingPluginClass = MyPlugin                # MyPlugin.create(data, config)
      _: NamedPlugin = Plain()                         # Plain() with name: str

Protocols (not functions with overloads) are used because mypy then says exactly which
member conflicts and how.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from bz.config import RunConfig
    from bz.plugins._context import PluginContext
    from bz.plugins._protocol import NamedPlugin

__all__ = ["HOOK_MARKER", "ConfiguredPluginClass", "CreatingPluginClass", "HookMethod", "hook"]

HOOK_MARKER = "__bz_hook__"
"""Attribute ``@hook`` sets on a method, so the loader knows it was meant as a hook."""

HookMethod = Callable[[Any, "PluginContext"], None]
"""What every hook is: ``def hook(self, context: PluginContext) -> None``."""

HookT = TypeVar("HookT", bound=HookMethod)
ConfigT = TypeVar("ConfigT")


def hook(method: HookT) -> HookT:
    """Mark a method as a bz hook, so mypy checks its signature.

    ::

        class Timer:
            name = "timer"

            @hook
            def end_epoch(self, context: PluginContext) -> None: ...

    ``def end_epoch(self, context: int)`` or ``def end_epoch(self)`` is then a mypy
    error (``Value of type variable "HookT" of "hook" cannot be ...``). At run time the
    method is returned as it is, with a marker the loader reads: a marked method whose
    name is not a hook is reported when the plugin loads.
    """
    setattr(method, HOOK_MARKER, True)
    return method


class ConfiguredPluginClass(Protocol[ConfigT]):
    """A plugin class the loader creates as ``cls(config)`` from its ``Config`` class.

    The loader structures the plugin's JSON options into ``cls.Config`` (an attrs
    class) and passes the result to the constructor. Check a class against it with an
    annotated assignment: ``_: ConfiguredPluginClass[TimerConfig] = Timer``.
    """

    # A read-only property so that a plain class attribute (`Config = TimerConfig`)
    # satisfies it; a settable member would demand a mutable attribute.
    @property
    def Config(self) -> type[ConfigT]:
        """The attrs class the options are structured into."""
        ...

    def __call__(self, config: ConfigT, /) -> NamedPlugin:
        """Create the plugin from its structured options."""
        ...


class CreatingPluginClass(Protocol):
    """A plugin class written the plugin guide's way, with a static ``create``.

    The loader calls ``cls.create(options, run_config)``; returning ``None`` means
    "not created" (e.g. ``enabled: false``).
    """

    def create(
        self, config_data: dict[str, Any], training_config: RunConfig, /
    ) -> NamedPlugin | None:
        """Create the plugin from its raw JSON options and the run's configuration."""
        ...
