"""One description of an attrs options class: every field's name, JSON type, default,
doc, constraints and JSON Schema, read in one place.

``bz list-plugins``, ``bz list-metrics`` and ``bz config-schema`` all describe config
classes through :func:`describe_fields` and :func:`object_schema`, so they name types
alike (JSON Schema's words: ``integer``, ``number``, ``string``, ``boolean``, ``null``,
``array``, ``object``) and show the same bounds. A field's type name is read off the
schema of its annotation, so the name and the schema cannot drift apart.

Validators carry what they allow as data: bz's own (``at_least``, ``between``, the
device name, "exactly one of") answer ``json_schema()``; attrs' ``ge``/``le``/``gt``/
``lt``/``in_``/``min_len``/``max_len`` keep their bound in attributes. Any other
validator adds nothing: the schema then stays a little more lenient than bz, never
stricter.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import attrs

from bz._config_values import CLOCK_PATTERN, Seconds
from bz._converter import unstructure
from bz._docstrings import attribute_docs

__all__ = [
    "OptionField",
    "describe_constraints",
    "describe_fields",
    "object_schema",
    "type_name",
    "type_schema",
    "validator_schema",
    "value_type_name",
]


@attrs.frozen
class OptionField:
    """One JSON key of a config class, as every listing and the schema show it."""

    name: str
    """The key."""
    type: str
    """Its JSON type: ``integer``, ``integer | null``, ``"macro" | "micro"``,
    ``array[string]``..."""
    required: bool
    """Whether the key must be given (the field has no default)."""
    default: Any
    """The default as a JSON value (``None`` when required or computed)."""
    default_text: str | None
    """The default as JSON text (``5``, ``"macro"``, ``null``), ``(computed from other
    fields)`` for a default made from the instance; ``None`` when required."""
    doc: str
    """The docstring written under the field, if any."""
    constraints: str
    """What the field's validators allow (``>= 1``, ``one of "a", "b"``), if any."""
    schema: dict[str, Any]
    """The field's JSON Schema: type, validator keywords, description, default."""


# -- types ------------------------------------------------------------------------------

_SCALARS: dict[object, dict[str, Any]] = {
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    type(None): {"type": "null"},
    Seconds: {
        "anyOf": [
            {"type": "number", "minimum": 0},
            {"type": "string", "pattern": CLOCK_PATTERN},
        ]
    },
}


def type_schema(annotation: Any) -> dict[str, Any]:
    """The JSON Schema of one annotated type, as bz's converter reads JSON into it."""
    if annotation in _SCALARS:
        return copy.deepcopy(_SCALARS[annotation])  # callers add keywords to their copy
    if annotation is Any or annotation is object:
        return {}
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is Literal:
        return {"enum": list(arguments)}
    if origin is Union or origin is types.UnionType:
        return {"anyOf": [type_schema(argument) for argument in arguments]}
    if origin in (list, tuple, typing.Sequence, _abc("Sequence")):
        items = arguments[0] if arguments else Any
        if origin is tuple and arguments and not (len(arguments) == 2 and arguments[1] is ...):
            return {
                "type": "array",
                "prefixItems": [type_schema(a) for a in arguments],
                "items": False,
            }
        return {"type": "array", "items": type_schema(items)}
    if origin in (dict, typing.Mapping, _abc("Mapping")):
        value = arguments[1] if len(arguments) == 2 else Any
        return {"type": "object", "additionalProperties": type_schema(value)}
    if isinstance(annotation, type) and attrs.has(annotation):
        return object_schema(annotation)
    return {}  # a type bz cannot describe: accept anything rather than refuse valid input


def _abc(name: str) -> object:
    import collections.abc

    return getattr(collections.abc, name)


def type_name(schema: Mapping[str, Any]) -> str:
    """A schema's type in words: ``integer | null``, ``"a" | "b"``, ``array[number]``."""
    if "enum" in schema:
        return " | ".join(_json_text(value) for value in schema["enum"])
    if "anyOf" in schema:
        names = [type_name(option) for option in schema["anyOf"]]
        return " | ".join(dict.fromkeys(names))  # once each, in order
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        if isinstance(items, Mapping) and items:
            return f"array[{type_name(items)}]"
        return "array"
    if isinstance(kind, str):
        return kind
    return "any"


def value_type_name(value: object) -> str:
    """The JSON type of a value (``boolean``, ``integer``, ``array``...), for options
    known only by an example, such as the defaults a ``load_config({})`` returns."""
    if value is None:
        return "null"
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        ((list, tuple), "array"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


# -- validators ---------------------------------------------------------------------------

# attrs' comparison validators, by operator, as JSON Schema keywords.
_COMPARISONS = {
    ">=": "minimum",
    "<=": "maximum",
    ">": "exclusiveMinimum",
    "<": "exclusiveMaximum",
}


def validator_schema(validator: object, annotation: Any = None) -> dict[str, Any]:
    """JSON Schema keywords for the checks a field's validator makes.

    Read: a ``json_schema()`` method (bz's validators), and attrs' ``ge``, ``le``,
    ``gt``, ``lt``, ``in_``, ``min_len``, ``max_len`` (alone, in a list, ``and_``-ed, or
    under ``optional``).
    """
    found: dict[str, Any] = {}
    for candidate in _leaf_validators(validator):
        found.update(_one_validator(candidate, annotation))
    return found


def _object_keywords(cls: type) -> dict[str, Any]:
    """Keywords about the object as a whole, from validators that check several fields."""
    found: dict[str, Any] = {}
    for field in attrs.fields(cls):
        for candidate in _leaf_validators(field.validator):
            method = getattr(candidate, "object_json_schema", None)
            if callable(method):
                found.update(method())
    return found


def _leaf_validators(validator: object) -> list[object]:
    if validator is None:
        return []
    inner = getattr(validator, "_validators", None)
    if isinstance(inner, tuple | list):
        return [leaf for v in inner for leaf in _leaf_validators(v)]
    if type(validator).__name__ == "_OptionalValidator":
        return _leaf_validators(getattr(validator, "validator", None))
    return [validator]


def _one_validator(candidate: object, annotation: Any) -> dict[str, Any]:
    own = getattr(candidate, "json_schema", None)
    if callable(own):
        found: dict[str, Any] = own()
        return found
    # attrs' validator classes are private: recognised by name, read by attribute.
    kind = type(candidate).__name__
    if kind == "_NumberValidator":
        keyword = _COMPARISONS.get(getattr(candidate, "compare_op", ""))
        bound: Any = getattr(candidate, "bound", None)
        return {keyword: bound} if keyword else {}
    if kind == "_InValidator":
        options: Any = getattr(candidate, "_original_options", None) or getattr(
            candidate, "options", ()
        )
        try:
            return {"enum": list(options)}
        except TypeError:  # a container that cannot be listed (a range of floats...)
            return {}
    if kind in ("_MinLengthValidator", "_MaxLengthValidator"):
        side = "min" if kind == "_MinLengthValidator" else "max"
        count = getattr(candidate, f"{side}_length")
        unit = "Length" if _is_string(annotation) else "Items"
        return {f"{side}{unit}": count}
    return {}


def _is_string(annotation: Any) -> bool:
    if annotation is str:
        return True
    return str in typing.get_args(annotation)


_WORDS = {
    "minimum": ">= {}",
    "maximum": "<= {}",
    "exclusiveMinimum": "> {}",
    "exclusiveMaximum": "< {}",
    "minLength": "length >= {}",
    "maxLength": "length <= {}",
    "minItems": "at least {} item(s)",
    "maxItems": "at most {} item(s)",
}


def describe_constraints(schema: Mapping[str, Any]) -> str:
    """The validator keywords of a field's schema for people: ``>= 1, <= 10``."""
    parts = [_WORDS[key].format(json.dumps(schema[key])) for key in _WORDS if key in schema]
    if "enum" in schema:
        parts.append("one of " + ", ".join(json.dumps(v, default=str) for v in schema["enum"]))
    return ", ".join(parts)


# -- classes ------------------------------------------------------------------------------


def describe_fields(cls: type) -> tuple[OptionField, ...]:
    """Every field of an attrs config class, in declaration order."""
    hints = _type_hints(cls)
    docs = attribute_docs(cls)
    described = []
    for field in attrs.fields(cls):
        annotation = hints.get(field.name, field.type)
        checks = validator_schema(field.validator, annotation)
        base = type_schema(annotation)
        schema = {**base, **checks}
        doc = docs.get(field.name, "")
        if doc:
            schema["description"] = doc
        required = field.default is attrs.NOTHING
        default, text, is_json = _default(field.default)
        if is_json:
            schema["default"] = default
        described.append(
            OptionField(
                name=field.name,
                # An annotation that was never resolved is shown as written.
                type=annotation if isinstance(annotation, str) else type_name(base),
                required=required,
                default=default,
                default_text=None if required else text,
                doc=doc,
                constraints=describe_constraints(checks),
                schema=schema,
            )
        )
    return tuple(described)


def object_schema(
    cls: type, *, extra: Mapping[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An object schema for an attrs class: one property per field, nothing else."""
    fields = describe_fields(cls)
    result: dict[str, Any] = {
        "type": "object",
        "properties": {**(extra or {}), **{field.name: field.schema for field in fields}},
        "additionalProperties": False,
    }
    required = [field.name for field in fields if field.required]
    if required:
        result["required"] = required
    result.update(_object_keywords(cls))
    summary = (cls.__doc__ or "").strip().splitlines()
    if summary:
        result["description"] = summary[0]
    return result


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: fall back to attrs' view
        return {}


def _default(default: Any) -> tuple[Any, str, bool]:
    """``(JSON value, JSON text, whether it is JSON)`` of a field's default."""
    if default is attrs.NOTHING:
        return None, "", False
    # attrs keeps `attrs.Factory(list)` defaults as Factory objects, which its stubs type
    # as the value they make; so they are recognised by their attributes.
    factory = getattr(default, "factory", None)
    if callable(factory):
        if getattr(default, "takes_self", False):
            return None, "(computed from other fields)", False
        default = factory()
    try:
        value = unstructure(default)
        return value, json.dumps(value), True
    except (TypeError, ValueError):
        return repr(default), repr(default), False


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
