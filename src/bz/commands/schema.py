"""The JSON Schema of ``bzconfig.json`` (``bz config-schema``), for editors and CI.

Generated, never written by hand: the top-level keys come from the attrs fields of
:class:`~bz.RunConfig`, and each installed plugin and metric contributes the schema of
its options (its attrs ``Config`` class; for a guide-style plugin, the defaults its
``load_config({})`` returns). Point an editor at the output (VS Code:
``"json.schemas"``) to complete and validate ``bzconfig.json`` as you type.

The schema says what bz's converter accepts, not more: unknown keys are refused where
bz refuses them. Plugins with ``create``-style options accept any further key, because
bz hands those options to the plugin unchecked.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import click

from bz._errors import UsageError
from bz._options import object_schema, type_schema
from bz.config import MetricSpec, PluginSpec, RunConfig

__all__ = ["SCHEMA_DIALECT", "bzconfig_schema", "config_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# -- plugins and metrics -------------------------------------------------------------------

_ENABLED: dict[str, dict[str, Any]] = {
    "enabled": {"type": "boolean", "description": "false: the plugin is not created."},
    "isolation": {
        "enum": ["in-process", "process"],
        "default": "in-process",
        "description": '"process": the plugin runs in a process of its own, seeing the '
        "run's values, never the model (docs/plugin-guide.md)",
    },
}


_DISABLED = {
    "type": "object",
    "properties": {"enabled": {"const": False}},
    "required": ["enabled"],
    "description": "a disabled plugin: its other options are not read",
}


def _plugin_options() -> dict[str, dict[str, Any]]:
    """name -> schema of the options object, for every installed plugin."""
    from bz.commands.catalog import describe
    from bz.plugins._inspection import config_class
    from bz.plugins._loader import discover, load_factory

    schemas: dict[str, dict[str, Any]] = {}
    for name, source in discover().sources.items():
        try:
            factory = load_factory(source)
        except Exception as exc:
            # bz train reports (and skips) such a plugin; naming it is not a config error.
            schemas[name] = {"type": "object", "description": f"could not be loaded: {exc}"}
            continue
        config_cls = config_class(factory)
        if config_cls is not None:
            schemas[name] = object_schema(config_cls, extra=_ENABLED)
        elif callable(getattr(factory, "create", None)):
            description = describe(source, load=True)
            properties = {
                option.name: {**_json_type(option.default), "default": option.default}
                for option in description.options or ()
            }
            schemas[name] = {
                "type": "object",
                "properties": {**_ENABLED, **properties},
                "description": "options are read by the plugin's own create()",
            }
        else:
            schemas[name] = {
                "type": "object",
                "properties": dict(_ENABLED),
                "additionalProperties": False,
            }
        summary = (getattr(factory, "__doc__", None) or "").strip().splitlines()
        if summary and "description" not in schemas[name]:
            schemas[name]["description"] = summary[0]
    return schemas


def _json_type(value: Any) -> dict[str, Any]:
    return type_schema(type(value))


def _metric_options() -> dict[str, dict[str, Any]]:
    from bz.metrics import available_metrics

    schemas: dict[str, dict[str, Any]] = {}
    for name, info in available_metrics().items():
        if info.error is not None:
            schemas[name] = {"type": "object", "description": f"could not be loaded: {info.error}"}
        elif info.config is None:
            schemas[name] = {"type": "object", "additionalProperties": False}
        else:
            schemas[name] = object_schema(info.config)
        if info.summary and "description" not in schemas[name]:
            schemas[name]["description"] = info.summary
    return schemas


def _entries_schema(kind: str, options: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """A list of ``"name"`` or ``{"name": {options}}`` (or ``{"name": null}``)."""
    prefix = f"{kind}."
    extra: list[dict[str, Any]] = [{"type": "null"}]
    if kind == "plugin":
        # bz neither imports nor checks a disabled plugin (its package may be absent).
        extra.append(_DISABLED)
    return {
        "type": "array",
        "items": {
            "anyOf": [
                {"enum": sorted(options)},
                {
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "properties": {
                        name: {"anyOf": [{"$ref": f"#/$defs/{prefix}{name}"}, *extra]}
                        for name in sorted(options)
                    },
                    "additionalProperties": False,
                },
            ]
        },
    }


def bzconfig_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``bzconfig.json`` with what is installed now."""
    plugins, metrics = _plugin_options(), _metric_options()
    entries = {
        tuple[PluginSpec, ...]: _entries_schema("plugin", plugins),
        tuple[MetricSpec, ...]: _entries_schema("metric", metrics),
    }
    hints = typing.get_type_hints(RunConfig)
    schema = object_schema(RunConfig)
    for field in attrs.fields(RunConfig):
        kind = hints.get(field.name)
        if kind in entries:
            # The list itself replaces the generic (empty) item schema; keep the docs.
            schema["properties"][field.name] = {
                **entries[kind],
                **{
                    key: value
                    for key, value in schema["properties"][field.name].items()
                    if key in ("description", "default")
                },
            }
    defs = {f"plugin.{name}": option for name, option in plugins.items()}
    defs.update({f"metric.{name}": option for name, option in metrics.items()})
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": "https://bz.invalid/bzconfig.schema.json",
        "title": "bzconfig.json",
        **schema,
        "$defs": defs,
    }


@click.command("config-schema")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the schema to this file instead of stdout.",
)
def config_schema(output: str | None) -> None:
    """Print the JSON Schema of bzconfig.json, installed plugins and metrics included."""
    text = json.dumps(bzconfig_schema(), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:  # a missing folder, a read-only place
        raise UsageError(f"{output}: cannot write the schema: {exc.strerror}") from None
    click.echo(f"wrote {output}", err=True)
