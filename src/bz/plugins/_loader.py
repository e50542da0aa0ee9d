"""Finding plugins (entry points ``bz.plugins``), checking them, and creating them.

Discovery reads entry-point metadata only; a plugin's module is imported when the
plugin is used (or listed verbosely). Everything that runs plugin code — import,
config structuring, ``create`` — runs inside the sandbox boundary.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from bz._converter import converter, input_error_types, nearest
from bz._entry_points import Discovery, EntrySource
from bz._entry_points import discover as discover_entries
from bz._entry_points import duplicate_message as entry_duplicate_message
from bz._errors import ConfigError, UsageError, defined_at, describe_exception, package_frame
from bz._logging import get_logger, note_plugin_module
from bz.config import PluginSpec, RunConfig, structure, unstructure
from bz.plugins import _isolated
from bz.plugins._conflicts import check_specs
from bz.plugins._entries import named_under, options_path
from bz.plugins._hooks import HOOK_NAMES
from bz.plugins._isolated import isolated_starts, isolation_of, start_isolated, without_isolation
from bz.plugins._order import plugin_order, sort_plugins
from bz.plugins._protocol import NamedPlugin, Plugin
from bz.plugins._sandbox import ErrorPolicy, PluginFault, PluginSet
from bz.plugins._start_limit import LoadBoundary, start_limit
from bz.plugins._typing import HOOK_MARKER

ENTRY_POINT_GROUP = "bz.plugins"

_log = get_logger("bz")

# Attributes a plugin class may have that are not hooks (never "near misses").
_NOT_HOOKS = frozenset(
    {"name", "logger", "state_dict", "load_state_dict", "Config", "config", "create"}
    | {"load_config", "rank_zero_only", "order", "every_rank", "monitor_problem"}
)

PluginSource = EntrySource
"""Where a plugin comes from (the shared :class:`bz._entry_points.EntrySource`)."""


def discover() -> Discovery:
    """Installed plugins, read from entry-point metadata (nothing is imported).

    Name clashes follow the one rule of :mod:`bz._entry_points`.
    """
    return discover_entries(ENTRY_POINT_GROUP)


def duplicate_message(name: str, chosen: PluginSource, others: Sequence[PluginSource]) -> str:
    """Why one of several plugins with the same name is used."""
    return entry_duplicate_message("plugin", name, chosen, others)


# -- inspecting a plugin -------------------------------------------------------------


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


# -- creating a plugin ---------------------------------------------------------------


_NOT_CHECKED = object()
"""What :func:`_options` returns when the options could not be checked (a fault)."""


def _options(
    factory: Any, spec: PluginSpec, faults: list[PluginFault], policy: ErrorPolicy
) -> object:
    """A plugin's checked options, without creating it: its ``Config`` object, the dict
    its ``load_config`` returns (guide style), the raw options (``create`` without
    ``load_config``) or None (no options); :data:`_NOT_CHECKED` after a fault."""
    options = without_isolation(spec.options)
    if callable(getattr(factory, "create", None)):
        load_config = getattr(factory, "load_config", None)
        if not callable(load_config):
            return options
        with LoadBoundary(spec.name, "config", policy, faults), named_under(spec):
            loaded: object = load_config(options)
            return loaded
        return _NOT_CHECKED
    options.pop("enabled", None)
    config_cls = config_class(factory)
    if config_cls is not None:
        with LoadBoundary(spec.name, "config", policy, faults):
            check_defaults(config_cls)
            config: object = structure(options, config_cls, options_path(spec))
            return config
        return _NOT_CHECKED
    if options:
        problem = f"plugin {spec.name!r} takes no options (got {', '.join(sorted(options))})"
        raise ConfigError([(options_path(spec), problem)])
    return None


def _create(
    factory: Any,
    spec: PluginSpec,
    run_config: RunConfig,
    faults: list[PluginFault],
    policy: ErrorPolicy,
) -> NamedPlugin | None:
    create = getattr(factory, "create", None)
    if callable(create):
        # The plugin guide's style: create(config_data, training_config) -> plugin | None
        # (its load_config runs inside, as the guide writes it).
        with LoadBoundary(spec.name, "create", policy, faults), named_under(spec):
            created: NamedPlugin | None = create(without_isolation(spec.options), run_config)
            return created
        return None
    config = _options(factory, spec, faults, policy)
    if config is _NOT_CHECKED:
        return None
    with LoadBoundary(spec.name, "create", policy, faults), named_under(spec):
        plugin: NamedPlugin = factory() if config is None else factory(config)
        return plugin
    return None


def check_plugin_options(
    specs: Sequence[PluginSpec],
    run_config: RunConfig,
    *,
    discovery: Discovery | None = None,
) -> tuple[dict[str, object], list[PluginFault]]:
    """What ``bz check-config`` checks, creating no plugin (which may open files or
    connect): every listed plugin imports, its options pass its ``Config`` (or its
    ``load_config``), and it can take the ``isolation`` asked. Returns the checked options
    by name and the faults; unknown names and bad options raise :class:`ConfigError`."""
    discovery = discovery or discover()
    _check_names(specs, discovery, {})
    faults: list[PluginFault] = []
    checked: dict[str, object] = {}
    for spec in specs:
        if not spec.enabled:
            continue
        isolation_of(spec.options, options_path(spec))
        factory = _import(discovery.sources[spec.name], "isolate", faults)
        if factory is None:
            continue
        options = _options(factory, spec, faults, "isolate")
        if options is not _NOT_CHECKED:
            checked[spec.name] = options
            _isolated.check_isolation(factory, options, spec, options_path(spec))
    return checked, faults


def _check_names(
    specs: Sequence[PluginSpec], discovery: Discovery, registry: Mapping[str, object]
) -> None:
    """Unknown and repeated plugin names: a :class:`ConfigError` naming each."""
    known = sorted({*discovery.sources, *registry})
    unknown = [s for s in specs if s.name not in discovery.sources and s.name not in registry]
    if unknown:
        raise ConfigError([(s.path, _unknown_message(s.name, known)) for s in unknown])
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(
                [(spec.path, f"plugin {spec.name!r} is already listed at {seen[spec.name]}")]
            )
        seen[spec.name] = spec.path
    check_specs(specs, options_path)  # options of two plugins that contradict each other


def load_plugins(
    specs: Sequence[PluginSpec],
    run_config: RunConfig,
    *,
    policy: ErrorPolicy | None = None,
    discovery: Discovery | None = None,
    registry: Mapping[str, Callable[..., Any]] | None = None,
) -> PluginSet:
    """Create the configured plugins and wrap them in a :class:`PluginSet`.

    Unknown names and bad options: a :class:`ConfigError` (exit 2) naming each. Faults in
    plugin code (import, options, ``create``, a bad hook, ``plugin_start_timeout`` run
    out) follow ``policy``. ``registry`` maps extra names to factories (tests, embedders).
    """
    policy = policy or run_config.plugin_errors
    discovery = discovery or discover()
    registry = registry or {}
    _check_names(specs, discovery, registry)
    faults: list[PluginFault] = []
    loaded: list[tuple[NamedPlugin, tuple[str, ...]]] = []
    limit = start_limit(run_config.plugin_start_timeout)  # each step of loading one
    # Process plugins start all at once, and are waited for in their turn.
    with limit, isolated_starts(specs, options_path, run_config, registry) as starting:
        for spec in specs:
            if not spec.enabled:
                continue
            if spec.name in discovery.duplicates:
                others = discovery.duplicates[spec.name]
                hint = duplicate_message(spec.name, discovery.sources[spec.name], others)
                _log.warning("plugin_name_duplicated", plugin=spec.name, hint=hint)
            if spec.name in starting:
                proxy = start_isolated(starting[spec.name], policy, faults)
                if proxy is not None:
                    loaded.append((proxy, check_plugin(spec.name, proxy)))
                continue
            factory = registry.get(spec.name)
            if factory is None:
                factory = _import(discovery.sources[spec.name], policy, faults)
                if factory is None:
                    continue
            # Its stdlib loggers and prints are attributed to it (shown under `bz train`).
            note_plugin_module(str(getattr(factory, "__module__", "")), spec.name)
            plugin = _create(factory, spec, run_config, faults, policy)
            if plugin is None:
                continue
            with LoadBoundary(spec.name, "load", policy, faults):
                loaded.append((plugin, check_plugin(spec.name, plugin)))
    return PluginSet(in_run_order(loaded), policy, faults)


class PluginImportError(ImportError):
    """An entry point that could not be imported, named with the distribution shipping it."""


class NotAPluginError(TypeError):
    """An entry point that imports, but names something that cannot make a plugin."""


def load_factory(source: PluginSource) -> Any:
    """Import what an entry point names and check that it can make plugins.

    Raises :class:`PluginImportError` (the import failed; the message names the
    distribution and the original error) or :class:`NotAPluginError`.
    """
    try:
        factory = source.load()
    except Exception as exc:  # named at the plugin's own line (console lines have no traceback)
        where = package_frame(exc, source.module)
        raise PluginImportError(
            f"{source.value} (from {_origin(source)}) failed to import: "
            f"{where}{describe_exception(exc)}"
        ) from exc
    problem = factory_problem(factory)
    if problem is not None:
        raise NotAPluginError(f"{source.value} (from {_origin(source)}) {problem}")
    return factory


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


def _origin(source: PluginSource) -> str:
    if source.distribution is None:
        return "an unknown distribution"
    return f"{source.distribution} {source.version}" if source.version else source.distribution


def _import(source: PluginSource, policy: ErrorPolicy, faults: list[PluginFault]) -> Any:
    with LoadBoundary(source.name, "import", policy, faults):
        return load_factory(source)
    return None


def _unknown_message(name: str, known: Sequence[str]) -> str:
    message = f"unknown plugin {name!r}"
    hint = nearest(name, known)
    if hint:
        return f'{message} (did you mean "{hint}"?)'
    installed = ", ".join(known) if known else "none"
    return f"{message} (installed: {installed}; see `bz list-plugins`)"


def plugin_set(plugins: Sequence[NamedPlugin], policy: ErrorPolicy = "isolate") -> PluginSet:
    """Wrap plugin objects built in code (``Trainer`` users) with the same checks."""
    faults: list[PluginFault] = []
    loaded = []
    for plugin in plugins:
        name = str(getattr(plugin, "name", type(plugin).__name__))
        with LoadBoundary(name, "load", policy, faults):
            loaded.append((plugin, check_plugin(name, plugin)))
    names = [p.name for p, _ in loaded]
    if len(set(names)) != len(names):
        raise UsageError(
            f"two plugins share a name: {sorted(n for n in names if names.count(n) > 1)}"
        )
    return PluginSet(in_run_order(loaded), policy, faults)


def in_run_order(
    loaded: Sequence[tuple[NamedPlugin, tuple[str, ...]]],
) -> list[tuple[NamedPlugin, tuple[str, ...]]]:
    """Loaded plugins sorted by their ``order`` declarations (see :mod:`bz.plugins._order`).

    Sorted here, before the :class:`PluginSet` is built, so dispatch stays a plain
    precomputed list. A cycle raises :class:`bz.OrderCycleError` (exit 2).
    """
    return sort_plugins(
        loaded, [plugin.name for plugin, _ in loaded], [plugin_order(p) for p, _ in loaded]
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
