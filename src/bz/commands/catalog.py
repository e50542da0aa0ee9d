"""``bz list-plugins`` and ``bz list-metrics``, and the plugin descriptions they show.

Plain listing reads entry-point metadata only. Verbose listing imports each plugin's
module — inside a boundary, so a broken package becomes a reported load error.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from typing import TYPE_CHECKING, Any

import attrs
import click

from bz._errors import UsageError, describe_exception
from bz._options import describe_fields, value_type_name
from bz.config import unstructure
from bz.plugins._hooks import HOOK_NAMES
from bz.plugins._inspection import config_class, default_problem
from bz.plugins._loader import PluginSource, discover, duplicate_message, load_factory
from bz.plugins._protocol import Plugin

if TYPE_CHECKING:
    from bz._entry_points import Discovery


@attrs.frozen
class ConfigField:
    """One option of a plugin's config class."""

    name: str
    type: str
    default: Any
    required: bool
    doc: str
    constraints: str = ""
    """What the field's validators allow, e.g. ``>= 1`` or ``one of "a", "b"``."""


@attrs.frozen
class PluginDescription:
    """What ``bz list-plugins`` shows about one plugin."""

    name: str
    distribution: str | None
    version: str | None
    entry_point: str
    module: str
    summary: str = ""
    hooks: tuple[str, ...] = ()
    options: tuple[ConfigField, ...] | None = None
    """None when bz cannot tell which options the plugin takes (free-form)."""
    options_from: str | None = None
    """``Config`` (an attrs class: checked by bz), ``load_config`` (the defaults the
    plugin's own ``load_config({})`` returns: not checked by bz), or None."""
    stateful: bool = False
    isolation: str = ""
    """Where the plugin may run (its ``isolation`` framework option)."""
    error: str | None = None
    duplicate_of: str | None = None
    """Set on a plugin that lost a name clash: why another one is used."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``bz list-plugins --json``)."""
        data: dict[str, Any] = attrs.asdict(self, recurse=True)
        return data


def class_hooks(cls: type) -> tuple[str, ...]:
    """Hooks a plugin class defines itself (inherited ``Plugin`` no-ops excluded)."""
    return tuple(
        hook
        for hook in HOOK_NAMES
        if (method := getattr(cls, hook, None)) is not None and method is not getattr(Plugin, hook)
    )


def config_schema(cls: type) -> tuple[ConfigField, ...]:
    """The fields of an attrs config class, with types, defaults and docs."""
    return tuple(
        ConfigField(
            name=field.name,
            type=field.type,
            default=field.default,
            required=field.required,
            doc=field.doc,
            constraints=field.constraints,
        )
        for field in describe_fields(cls)
    )


def _json_value(value: Any) -> Any:
    try:
        return unstructure(value)
    except Exception:
        return repr(value)


def loaded_config_schema(factory: object) -> tuple[ConfigField, ...] | None:
    """Options of a guide-style plugin, read from what ``load_config({})`` returns.

    The guide's ``load_config`` fills in a default for every option it knows, so its
    answer to an empty object lists them. Anything else (it raises, or returns a
    non-dict) means the options cannot be told.
    """
    load_config = getattr(factory, "load_config", None)
    if not callable(load_config):
        return None
    try:
        defaults = load_config({})
    except Exception:
        return None
    if not isinstance(defaults, dict):
        return None
    return tuple(
        ConfigField(
            name=str(key),
            type=value_type_name(value),
            default=_json_value(value),
            required=False,
            doc="",
        )
        for key, value in defaults.items()
    )


def _summary(obj: object) -> str:
    # The class's own docstring only: inspect.getdoc would show Plugin's for subclasses.
    own = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    doc = inspect.cleandoc(own) if isinstance(own, str) else ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def describe(source: PluginSource, *, load: bool) -> PluginDescription:
    """Describe one plugin; with ``load``, import it to list hooks and options."""
    base = PluginDescription(
        name=source.name,
        distribution=source.distribution,
        version=source.version,
        entry_point=source.value,
        module=source.module,
    )
    if not load:
        return base
    try:
        factory = load_factory(source)
    except Exception as exc:
        return attrs.evolve(base, error=describe_exception(exc))
    cls = factory if isinstance(factory, type) else type(factory)
    config_cls = config_class(factory)
    options: tuple[ConfigField, ...] | None
    options_from: str | None
    if config_cls is not None:
        # What the loader would refuse, shown before anyone trains with it.
        problem = default_problem(config_cls)
        if problem is not None:
            return attrs.evolve(base, error=f"BadDefaultError: {problem}")
        options, options_from = config_schema(config_cls), "Config"
    elif callable(getattr(factory, "create", None)):
        options = loaded_config_schema(factory)
        options_from = "load_config" if options is not None else None
    else:
        # No Config and no create: the loader refuses every option.
        options, options_from = (), None
    return attrs.evolve(
        base,
        summary=_summary(factory),
        hooks=class_hooks(cls) if isinstance(factory, type) else (),
        options=options,
        options_from=options_from,
        stateful=callable(getattr(cls, "state_dict", None))
        and callable(getattr(cls, "load_state_dict", None)),
        isolation=isolation_choices(cls),
    )


def isolation_choices(cls: type) -> str:
    """What ``isolation`` a plugin class allows, from its ``needs_training_process``."""
    declared = inspect.getattr_static(cls, "needs_training_process", False)
    if declared is True or (isinstance(declared, str) and declared):
        reason = f": {declared}" if isinstance(declared, str) else ""
        return f'"in-process" only (needs the training process{reason})'
    if isinstance(declared, property):
        return '"in-process" (default) or "process" (some options need the training process)'
    return '"in-process" (default) or "process"'


def describe_all(*, load: bool, discovery: Discovery | None = None) -> list[PluginDescription]:
    """Every installed plugin (losers of name clashes included, marked as such)."""
    discovery = discovery or discover()
    described = []
    for name, source in discovery.sources.items():
        described.append(describe(source, load=load))
        for other in discovery.duplicates.get(name, ()):
            note = duplicate_message(name, source, discovery.duplicates[name])
            described.append(attrs.evolve(describe(other, load=load), duplicate_of=note))
    return described


# -- list-plugins ------------------------------------------------------------------------


@click.command("list-plugins")
@click.argument("name", required=False)
@click.option(
    "-v", "--verbose", is_flag=True, help="Import each plugin: hooks, options, state, load errors."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (implies verbose).")
def list_plugins(name: str | None, verbose: bool, as_json: bool) -> None:
    """List installed plugins (entry-point group bz.plugins)."""
    from bz._converter import nearest

    described = describe_all(load=verbose or as_json or name is not None)
    if name is not None:
        chosen = [d for d in described if d.name == name]
        if not chosen:
            hint = nearest(name, [d.name for d in described])
            suffix = f' (did you mean "{hint}"?)' if hint else ""
            raise UsageError(f"no plugin named {name!r}{suffix}")
        described = chosen
    if as_json:
        click.echo(json.dumps([d.to_json() for d in described], indent=2, default=str))
        return
    if not verbose and name is None:
        for d in described:
            origin = f"{d.distribution} {d.version}" if d.distribution else "unknown distribution"
            click.echo(f"{d.name:<20} {origin:<28} {d.entry_point}")
        return
    for index, d in enumerate(described):
        if index:
            click.echo()
        _print_plugin(d)


def _print_plugin(d: PluginDescription) -> None:
    click.secho(d.name, bold=True)
    if d.summary:
        click.echo(f"  {d.summary}")
    click.echo(f"  distribution: {d.distribution or '?'} {d.version or ''}".rstrip())
    click.echo(f"  entry point:  {d.entry_point}")
    if d.duplicate_of:
        click.echo(f"  NOT USED:     {d.duplicate_of}")
    if d.error:
        click.echo(f"  LOAD ERROR:   {d.error}")
        return
    click.echo(f"  hooks:        {', '.join(d.hooks) if d.hooks else '(none)'}")
    click.echo(f"  stateful:     {'yes (saved in checkpoints)' if d.stateful else 'no'}")
    click.echo(f"  isolation:    {d.isolation}")
    if d.options is None:
        click.echo("  options:      free-form (the plugin reads them itself)")
    elif not d.options:
        click.echo("  options:      none")
    else:
        if d.options_from == "load_config":
            click.echo("  options (defaults from load_config; bz does not check them):")
        else:
            click.echo("  options:")
        for field in d.options:
            default = "required" if field.required else f"default {json.dumps(field.default)}"
            allowed = f"; {field.constraints}" if field.constraints else ""
            click.echo(f"    {field.name}: {field.type} ({default}{allowed})")
            if field.doc:
                click.echo(textwrap.indent(field.doc, " " * 8))


# -- list-metrics ------------------------------------------------------------------------


@click.command("list-metrics")
@click.option("-v", "--verbose", is_flag=True, help="Show each metric's options.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_metrics(verbose: bool, as_json: bool) -> None:
    """List available metrics (built in, and entry-point group bz.metrics)."""
    from bz.metrics import available_metrics

    metrics = available_metrics()
    if as_json:
        listing = [
            {
                "name": info.name,
                "source": info.source,
                "distribution": info.distribution,
                "version": info.version,
                "summary": info.summary,
                "options": [
                    {
                        "name": o.name,
                        "type": o.type,
                        "default": o.default,
                        "doc": o.doc,
                        "constraints": o.constraints,
                    }
                    for o in info.options
                ],
                "error": info.error,
            }
            for info in metrics.values()
        ]
        click.echo(json.dumps(listing, indent=2))
        return
    for info in metrics.values():
        if info.error:
            click.echo(f"{info.name:<22} LOAD ERROR: {info.error}")
            continue
        click.echo(f"{info.name:<22} {info.summary}")
        if not verbose:
            continue
        origin = f"{info.distribution} {info.version or ''}".strip() if info.distribution else "?"
        click.echo(f"    from: {origin} ({info.source})")
        for option in info.options:
            default = "required" if option.required else f"default {option.default}"
            allowed = f"; {option.constraints}" if option.constraints else ""
            click.echo(f"    {option.name}: {option.type} ({default}{allowed})")
            if option.doc:
                click.echo(textwrap.indent(option.doc, " " * 8))
