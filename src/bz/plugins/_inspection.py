"""What the loader refuses in a plugin, found by looking at it (no call of its code).

A plugin class or object is read here: which hooks it implements, whether each can be
called as ``hook(context)``, near misses of hook names, ``@hook`` on methods that are no
hook, a ``name`` that is not a string, an ``order`` that is not an :class:`Order`, a
``Config`` default its own field type refuses. Each problem is raised from bz's own
code, so its message names where the plugin defines what is wrong (`` (at file:line)``).
:mod:`bz.plugins._loader` runs these checks inside the loading boundary; ``bz
list-plugins --verbose`` shows them for classes it has not created.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import attrs

from bz._converter import converter, input_error_types, nearest
from bz._errors import defined_at
from bz._logging import get_logger
from bz.config import unstructure
from bz.plugins._hooks import HOOK_NAMES
from bz.plugins._order import plugin_order
from bz.plugins._protocol import NamedPlugin, Plugin
from bz.plugins._typing import HOOK_MARKER

__all__ = [
    "BadDefaultError",
    "check_defaults",
    "check_plugin",
    "class_problems",
    "config_class",
    "default_problem",
    "factory_problem",
    "implemented_hooks",
    "misplaced_hook_marks",
    "near_miss_hooks",
    "signature_problem",
]

_log = get_logger("bz")

# Attributes a plugin class may have that are not hooks (never "near misses").
_NOT_HOOKS = frozenset(
    {"name", "logger", "state_dict", "load_state_dict", "Config", "config", "create"}
    | {"load_config", "rank_zero_only", "order", "every_rank", "monitor_problem"}
)


def implemented_hooks(plugin: object) -> tuple[str, ...]:
    """The hooks ``plugin`` really implements, in table order.

    A hook inherited unchanged from :class:`bz.plugins.Plugin` is a no-op and does not
    count, so explicit subclasses cost nothing for the hooks they leave alone.
    """
    cls = type(plugin)
    hooks = []
    for hook in HOOK_NAMES:
        method = getattr(cls, hook, None)
        if method is None and callable(getattr(plugin, hook, None)):
            hooks.append(hook)  # set on the instance
        elif method is not None and method is not getattr(Plugin, hook):
            hooks.append(hook)
    return tuple(hooks)


def signature_problem(plugin: object, hook: str) -> str | None:
    """Why ``plugin.<hook>`` cannot be called as ``hook(context)``, or None if it can."""
    return _call_problem(hook, getattr(plugin, hook), 1, "context")


def _call_problem(hook: str, function: object, arguments: int, call: str) -> str | None:
    """Why ``function`` cannot be a hook called with ``arguments`` positional arguments
    (naming where it is defined)."""
    if not callable(function):
        return f"{hook} is not callable (it is {type(function).__name__})"
    if inspect.iscoroutinefunction(function):
        why = "is async; hooks are called synchronously and must be plain methods"
        return f"{hook} {why}{defined_at(function)}"
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None  # builtins and C callables: nothing to check
    try:
        signature.bind(*[object()] * arguments)
    except TypeError:
        return f"{hook}{signature} cannot be called as {hook}({call}){defined_at(function)}"
    return None


def near_miss_hooks(plugin: object) -> list[tuple[str, str]]:
    """Public methods that look like misspelled hooks: ``(method, hook)`` pairs."""
    misses = []
    for attribute in dir(type(plugin)):
        if attribute.startswith("_") or attribute in HOOK_NAMES or attribute in _NOT_HOOKS:
            continue
        if not callable(getattr(type(plugin), attribute, None)):
            continue
        if getattr(getattr(type(plugin), attribute), HOOK_MARKER, False) is True:
            continue  # reported as an error by misplaced_hook_marks
        hint = nearest(attribute, HOOK_NAMES)
        if hint is not None:
            misses.append((attribute, hint))
    return misses


def misplaced_hook_marks(plugin_or_class: object) -> list[str]:
    """Methods marked ``@hook`` whose name is not a hook, with the nearest hook named."""
    cls = plugin_or_class if isinstance(plugin_or_class, type) else type(plugin_or_class)
    problems = []
    for attribute in dir(cls):
        if attribute in HOOK_NAMES:
            continue
        value = inspect.getattr_static(cls, attribute, None)
        function = getattr(value, "__func__", value)  # staticmethod / classmethod
        if getattr(function, HOOK_MARKER, False) is True:
            hint = nearest(attribute, HOOK_NAMES)
            suggestion = (f" (did you mean {hint}?)" if hint else "") + defined_at(function)
            problems.append(f"{attribute} is marked @hook but bz has no such hook{suggestion}")
    return problems


def class_problems(cls: type) -> list[str]:
    """What the loader would refuse in a plugin class, found without creating it.

    Used by ``bz list-plugins --verbose``: a ``name`` that is not a string, hooks that
    cannot be called as ``hook(context)``, and ``@hook`` marks on non-hooks.
    """
    problems = []
    name = inspect.getattr_static(cls, "name", None)
    if name is not None and not isinstance(name, (str, property)):
        problems.append(f"name is {type(name).__name__}, not str{defined_at(cls)}")
    for hook in HOOK_NAMES:
        problem = _class_signature_problem(cls, hook)
        if problem is not None:
            problems.append(problem)
    problems.extend(misplaced_hook_marks(cls))
    return problems


def _class_signature_problem(cls: type, hook: str) -> str | None:
    value = inspect.getattr_static(cls, hook, None)
    if value is None or value is inspect.getattr_static(Plugin, hook, None):
        return None
    if isinstance(value, (staticmethod, classmethod)):
        # Bound through the class, both are called with the context alone.
        return signature_problem(cls, hook)
    return _call_problem(hook, value, 2, "self, context")


def config_class(factory: object) -> type | None:
    """The attrs class a plugin declares for its options (``Config``), if any."""
    candidate = getattr(factory, "Config", None)
    return candidate if isinstance(candidate, type) and attrs.has(candidate) else None


def check_plugin(name: str, plugin: object) -> tuple[str, ...]:
    """Validate a created plugin; return its hooks. Raises ``TypeError`` on a bad plugin."""
    if isinstance(plugin, type):  # fit(plugins=[MyPlugin]): every hook would lack self
        raise TypeError(
            f"{plugin.__name__} is a class, not a plugin object: pass an instance, "
            f"{plugin.__name__}()"
        )
    if not isinstance(plugin, NamedPlugin) or not isinstance(getattr(plugin, "name", None), str):
        raise TypeError(
            f"{type(plugin).__name__} is not a plugin: a plugin needs a `name: str` attribute"
            f"{defined_at(type(plugin))}"
        )
    hooks = implemented_hooks(plugin)
    problems = [p for hook in hooks if (p := signature_problem(plugin, hook)) is not None]
    problems.extend(misplaced_hook_marks(plugin))
    # A misspelled hook would never be called: the plugin would silently do nothing.
    problems.extend(
        f"{method} is not a hook (did you mean {hook}?); rename it, or start its name "
        f"with _ if it is a helper{defined_at(getattr(type(plugin), method))}"
        for method, hook in near_miss_hooks(plugin)
    )
    if problems:
        raise TypeError("; ".join(problems))
    plugin_order(plugin)  # a malformed `order` is the plugin's fault, found at load
    if plugin.name != name:
        _log.warning(
            "plugin_name_mismatch",
            plugin=name,
            hint=f"configured as {name!r} but its name attribute is {plugin.name!r}",
        )
    return hooks


def factory_problem(factory: object) -> str | None:
    """Why an entry point's object cannot make plugins, or None if it can."""
    if isinstance(factory, type):
        if issubclass(factory, BaseException):
            return f"is an exception class ({factory.__name__}), not a plugin class"
        problems = class_problems(factory)
        return "; ".join(problems) if problems else None
    if callable(factory):
        return None  # a function returning a plugin
    kind = "a module" if inspect.ismodule(factory) else f"a {type(factory).__name__}"
    return (
        f"is {kind}, not a plugin: an entry point must name a plugin class "
        "(or a function that returns a plugin)"
    )


class BadDefaultError(TypeError):
    """A plugin's config class has a default its own field type refuses."""


def check_defaults(cls: type) -> None:
    """Pass every default of an attrs config class through bz's converter.

    cattrs never structures a default, so ``every: int = "10"`` would reach the plugin
    as a string and fail later, blamed on a hook. Raises :class:`BadDefaultError`
    naming the class and field.
    """
    problem = default_problem(cls)
    if problem is not None:
        raise BadDefaultError(problem)


def default_problem(cls: type) -> str | None:
    """Why a default of ``cls`` does not fit its field's type, or None."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation: nothing to check against
        hints = {}
    for field in attrs.fields(cls):
        default: Any = field.default
        if default is attrs.NOTHING:
            continue
        factory = getattr(default, "factory", None)
        if callable(factory):
            if getattr(default, "takes_self", False):
                continue
            default = factory()
        annotation = hints.get(field.name, field.type)
        if annotation is None:
            continue
        try:
            converter.structure(unstructure(default), annotation)
        except input_error_types() as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return (
                f"{cls.__qualname__}.{field.name}: default {default!r} does not fit "
                f"its type: {message}{defined_at(cls)}"
            )
        except Exception:  # a type bz's converter cannot build: not the default's fault
            continue
    return None
