"""Describing a metric's options (an attrs ``Config`` class) for people: types, defaults, docs."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal, Union

import attrs

from bz._constraints import describe_constraints, validator_schema
from bz._docstrings import attribute_docs
from bz.config import unstructure

__all__ = ["MetricOption", "describe_options", "describe_type"]

_SCALAR_NAMES: dict[object, str] = {
    bool: "boolean",
    int: "int",
    float: "number",
    str: "string",
    type(None): "null",
}


@attrs.frozen
class MetricOption:
    """One JSON key a metric accepts, as ``bz list-metrics --verbose`` shows it."""

    name: str
    """The key."""
    type: str
    """Its JSON type, e.g. ``int``, ``int | null`` or ``"macro" | "micro" | "weighted"``."""
    default: str | None
    """The default as JSON text (``5``, ``"macro"``, ``null``); ``None`` when required."""
    doc: str = ""
    """The docstring written under the field, if any."""
    constraints: str = ""
    """What the field's validators allow (``>= 1``, ``one of "a", "b"``), if any."""

    @property
    def required(self) -> bool:
        """Whether the option must be given."""
        return self.default is None


def describe_options(config: type) -> tuple[MetricOption, ...]:
    """The options of an attrs config class, in declaration order."""
    docs = attribute_docs(config)
    return tuple(
        MetricOption(
            name=field.name,
            type=describe_type(field.type),
            default=_describe_default(field.default),
            doc=docs.get(field.name, ""),
            constraints=describe_constraints(validator_schema(field.validator, field.type)),
        )
        for field in attrs.fields(config)
    )


def describe_type(annotation: object) -> str:
    """A JSON-flavoured name for a type: ``int | null``, ``"macro" | "micro"``, ``list[int]``."""
    if isinstance(annotation, str):
        return annotation  # an annotation that was never resolved: show it as written
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(_json(argument) for argument in arguments)
    if origin is Union or origin is types.UnionType:
        return " | ".join(describe_type(argument) for argument in arguments)
    if annotation in _SCALAR_NAMES:
        return _SCALAR_NAMES[annotation]
    if origin is not None:
        inner = ", ".join(describe_type(argument) for argument in arguments)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _describe_default(default: object) -> str | None:
    if default is attrs.NOTHING:
        return None
    # attrs keeps `attrs.Factory(list)` defaults as Factory objects, which its stubs type
    # as the value they make; so they are recognised by their attributes.
    factory = getattr(default, "factory", None)
    if callable(factory):
        if getattr(default, "takes_self", False):
            return "(computed from other fields)"
        default = factory()
    return _json(unstructure(default))


def _json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
