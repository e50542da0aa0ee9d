"""Describing installed plugins for ``bz list-plugins`` (and anything else that asks).

Plain listing reads entry-point metadata only. Verbose listing imports each plugin's
module — inside a boundary, so a broken package becomes a reported load error.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap
import typing
from typing import Any

import attrs

from bz._hooks import HOOK_NAMES
from bz._loader import (
    Discovery,
    PluginSource,
    config_class,
    discover,
    duplicate_message,
)
from bz._plugin import Plugin
from bz._sandbox import describe_exception


@attrs.frozen
class ConfigField:
    """One option of a plugin's config class."""

    name: str
    type: str
    default: Any
    required: bool
    doc: str


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
    """None when the plugin has no attrs config class (options are free-form)."""
    stateful: bool = False
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


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a class."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def config_schema(cls: type) -> tuple[ConfigField, ...]:
    """The fields of an attrs config class, with types, defaults and docs."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    docs = field_docs(cls)
    fields = []
    for field in attrs.fields(cls):
        required = field.default is attrs.NOTHING
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]  # a class at runtime
            default = default.factory()
        fields.append(
            ConfigField(
                name=field.name,
                type=_type_name(hints.get(field.name, field.type)),
                default=None if required else default,
                required=required,
                doc=docs.get(field.name, ""),
            )
        )
    return tuple(fields)


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
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
        if source.entry_point is None:
            raise ImportError(f"no entry point for {source.value}")
        factory = source.entry_point.load()
    except Exception as exc:
        return attrs.evolve(base, error=f"import failed: {describe_exception(exc)}")
    if not callable(factory):
        return attrs.evolve(base, error=f"{source.value} is not a class or factory")
    cls = factory if isinstance(factory, type) else type(factory)
    config_cls = config_class(factory)
    return attrs.evolve(
        base,
        summary=_summary(factory),
        hooks=class_hooks(cls) if isinstance(factory, type) else (),
        options=config_schema(config_cls) if config_cls is not None else None,
        stateful=callable(getattr(cls, "state_dict", None))
        and callable(getattr(cls, "load_state_dict", None)),
    )


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
