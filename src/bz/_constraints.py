"""What a config field's validators allow, as JSON Schema keywords and as words.

``bz config-schema``, ``bz list-plugins`` and ``bz list-metrics`` all read validators
through :func:`validator_schema`, so a bound declared once (``attrs.validators.ge(1)``
or bz's ``at_least(1)``) shows up everywhere.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Any

__all__ = ["describe_constraints", "field_constraints", "validator_schema"]

_BOUND = re.compile(r"(at_least|between)\.<locals>\.check")

# attrs' comparison validators, by operator, as JSON Schema keywords.
_COMPARISONS = {
    ">=": "minimum",
    "<=": "maximum",
    ">": "exclusiveMinimum",
    "<": "exclusiveMaximum",
}


def validator_schema(validator: object, annotation: Any = None) -> dict[str, Any]:
    """JSON Schema keywords for the checks a field's validator makes.

    Understood: bz's ``at_least`` / ``between`` and attrs' ``ge``, ``le``, ``gt``,
    ``lt``, ``in_``, ``min_len``, ``max_len`` (alone, in a list, ``and_``-ed, or under
    ``optional``). Anything else adds nothing: the schema stays a little more lenient
    than the validator, never stricter.
    """
    found: dict[str, Any] = {}
    for candidate in _leaf_validators(validator):
        found.update(_one_validator(candidate, annotation))
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
    kind = type(candidate).__name__
    if kind == "_NumberValidator":
        keyword = _COMPARISONS.get(getattr(candidate, "compare_op", ""))
        # attrs' validator classes are private: recognised by name, read by attribute.
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
    match = _BOUND.fullmatch(getattr(candidate, "__qualname__", ""))
    cells = getattr(candidate, "__closure__", None)
    code = getattr(candidate, "__code__", None)
    if match is None or not cells or code is None:
        return {}
    free = dict(zip(code.co_freevars, (c.cell_contents for c in cells), strict=True))
    if match.group(1) == "at_least":
        return {"minimum": free["minimum"]}
    return {"minimum": free["low"], "maximum": free["high"]}


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


def describe_constraints(schema: dict[str, Any]) -> str:
    """The validator keywords of a field's schema for people: ``>= 1, <= 10``."""
    parts = [_WORDS[key].format(json.dumps(schema[key])) for key in _WORDS if key in schema]
    if "enum" in schema:
        parts.append("one of " + ", ".join(json.dumps(v, default=str) for v in schema["enum"]))
    return ", ".join(parts)


def field_constraints(cls: type, name: str, annotation: Any = None) -> str:
    """``describe_constraints`` for one field of an attrs class (``""`` when none)."""
    import attrs

    field = getattr(attrs.fields(cls), name)
    return describe_constraints(validator_schema(field.validator, annotation))
