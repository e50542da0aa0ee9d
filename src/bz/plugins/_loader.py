"""Finding plugins (entry points ``bz.plugins``), importing them, and creating them.

Discovery reads entry-point metadata only; a plugin's module is imported when the
plugin is used (or listed verbosely). Everything that runs plugin code — import,
config structuring, ``create`` — runs inside the sandbox boundary; what is checked by
looking at a plugin is :mod:`bz.plugins._inspection`'s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bz import _supervision
from bz._converter import nearest
from bz._entry_points import Discovery, EntrySource
from bz._entry_points import discover as discover_entries
from bz._entry_points import duplicate_message as entry_duplicate_message
from bz._errors import (
    ConfigError,
    UsageError,
    definition_place,
    describe_exception,
    package_frame,
)
from bz._logging import get_logger, note_plugin_module
from bz.config import PluginSpec, RunConfig, structure
from bz.plugins import _isolated
from bz.plugins._conflicts import check_specs
from bz.plugins._context import read_only_config
from bz.plugins._entries import named_under, options_path
from bz.plugins._inspection import check_defaults, check_plugin, config_class, factory_problem
from bz.plugins._isolated import isolated_starts, isolation_of, start_isolated, without_isolation
from bz.plugins._order import plugin_order, sort_plugins
from bz.plugins._sandbox import ErrorPolicy, PluginFault, PluginSet
from bz.plugins._start_limit import LoadBoundary, start_limit

if TYPE_CHECKING:
    from bz.plugins._protocol import NamedPlugin

ENTRY_POINT_GROUP = "bz.plugins"

_log = get_logger("bz")

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


# -- creating a plugin ---------------------------------------------------------------


_NOT_CHECKED = object()
"""What :func:`_options` returns when the options could not be checked (a fault)."""


def _options(
    factory: Any, spec: PluginSpec, faults: list[PluginFault], policy: ErrorPolicy
) -> object:
    """A plugin's checked options, without creating it: its ``Config`` object, the dict
    its ``load_config`` returns (guide style), the raw options (``create`` without
    ``load_config``) or None (no options); :data:`_NOT_CHECKED` after a fault."""
    options = _own_options(spec)
    module = _module_of(factory)
    if callable(getattr(factory, "create", None)):
        load_config = getattr(factory, "load_config", None)
        if not callable(load_config):
            return options
        with LoadBoundary(spec.name, "config", policy, faults, module), named_under(spec):
            loaded: object = load_config(options)
            return loaded
        return _NOT_CHECKED
    options.pop("enabled", None)
    config_cls = config_class(factory)
    if config_cls is not None:
        with LoadBoundary(spec.name, "config", policy, faults, module):
            check_defaults(config_cls)
            config: object = structure(options, config_cls, options_path(spec))
            return config
        return _NOT_CHECKED
    if options:
        problem = f"plugin {spec.name!r} takes no options (got {', '.join(sorted(options))})"
        raise ConfigError([(options_path(spec), problem)])
    return None


def _own_options(spec: PluginSpec) -> dict[str, Any]:
    """The options a plugin reads, as a copy of its own (its ``load_config``, ``create``
    or ``Config`` may keep or change them; the caller's config stays as it was)."""
    options = without_isolation(spec.options)
    try:
        return copy.deepcopy(options)
    except Exception:  # an object given in Python that cannot be copied: shared, as before
        return options


def _module_of(factory: object) -> str | None:
    """The plugin's module: its faults while loading name its innermost line there."""
    module = getattr(factory, "__module__", None)
    return module if isinstance(module, str) else None


def _create(
    factory: Any,
    spec: PluginSpec,
    run_config: RunConfig,
    faults: list[PluginFault],
    policy: ErrorPolicy,
) -> NamedPlugin | None:
    create = getattr(factory, "create", None)
    module = _module_of(factory)
    if callable(create):
        # The plugin guide's style: create(config_data, training_config) -> plugin | None
        # (its load_config runs inside, as the guide writes it).
        shown = read_only_config(run_config)  # as the context shows it in hooks
        with LoadBoundary(spec.name, "create", policy, faults, module), named_under(spec):
            created: NamedPlugin | None = create(_own_options(spec), shown)
            return created
        return None
    config = _options(factory, spec, faults, policy)
    if config is _NOT_CHECKED:
        return None
    with LoadBoundary(spec.name, "create", policy, faults, module), named_under(spec):
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
    # A supervising `bz check-config` is told which plugin loads, as `bz train` is.
    _supervision.announce([spec.name for spec in specs if spec.enabled], ())
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
    left_out: Sequence[PluginFault] = (),
) -> PluginSet:
    """Create the configured plugins and wrap them in a :class:`PluginSet`.

    Unknown names and bad options: a :class:`ConfigError` (exit 2) naming each. Faults in
    plugin code (import, options, ``create``, a bad hook, ``plugin_start_timeout`` run
    out) follow ``policy``. ``registry`` maps extra names to factories (tests, embedders).
    The plugins ``left_out`` names are not loaded at all (a supervising ``bz train``
    restarted training without them: loading them ended the process); their faults are
    reported as loading faults.
    """
    policy = policy or run_config.plugin_errors
    discovery = discovery or discover()
    registry = registry or {}
    _check_names(specs, discovery, registry)
    left = {fault.plugin for fault in left_out}
    specs = [spec for spec in specs if spec.name not in left]
    faults: list[PluginFault] = list(left_out)
    loaded: list[tuple[NamedPlugin, tuple[str, ...]]] = []
    # A supervising `bz train` is told which plugin loads (see LoadBoundary): by number.
    _supervision.announce([spec.name for spec in specs if spec.enabled], ())
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


def _origin(source: PluginSource) -> str:
    if source.distribution is None:
        return "an unknown distribution"
    return f"{source.distribution} {source.version}" if source.version else source.distribution


def _import(source: PluginSource, policy: ErrorPolicy, faults: list[PluginFault]) -> Any:
    with LoadBoundary(source.name, "import", policy, faults, source.module):
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
        name = _shown_name(plugin)
        with LoadBoundary(name, "load", policy, faults):
            loaded.append((plugin, check_plugin(name, plugin)))
    names = [p.name for p, _ in loaded]
    if len(set(names)) != len(names):
        raise UsageError(
            f"two plugins share a name: {sorted(n for n in names if names.count(n) > 1)}"
        )
    return PluginSet(in_run_order(loaded), policy, faults)


def _shown_name(plugin: object) -> str:
    """What a fault of ``plugin`` is reported under: its ``name`` where reading it works
    (a ``name`` property that raises is the plugin's fault, found by ``check_plugin``
    inside its boundary), else its class's name."""
    try:
        return str(getattr(plugin, "name", type(plugin).__name__))
    except Exception:  # the plugin's own code: its fault, found by check_plugin
        return type(plugin).__name__


def in_run_order(
    loaded: Sequence[tuple[NamedPlugin, tuple[str, ...]]],
) -> list[tuple[NamedPlugin, tuple[str, ...]]]:
    """Loaded plugins sorted by their ``order`` declarations (see :mod:`bz.plugins._order`).

    Sorted here, before the :class:`PluginSet` is built, so dispatch stays a plain
    precomputed list. A cycle raises :class:`bz.OrderCycleError` (exit 2).
    """
    names = [plugin.name for plugin, _ in loaded]
    orders = [plugin_order(plugin) for plugin, _ in loaded]
    # A process plugin's class is bz's proxy: where the plugin is defined is unknown here.
    places = [
        "" if isinstance(plugin, _isolated.IsolatedPlugin) else definition_place(type(plugin))
        for plugin, _ in loaded
    ]
    return sort_plugins(loaded, names, orders, places)
