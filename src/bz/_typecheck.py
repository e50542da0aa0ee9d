"""Checking, at construction, that a config class built in Python holds what JSON would.

Values read from ``bzconfig.json`` are checked by the converter (``bz.config``). A
:class:`~bz.RunConfig` built in code skips it, so without this check a value of the
wrong type (``precision="fp16"``, ``max_steps=1.5``) would be accepted and fail later,
deep in training. The rules are the converter's: ``int`` is not ``bool``, ``float``
takes ints, a ``Literal`` takes only its values, ``X | None`` takes None.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import attrs


def check_field_types(instance: attrs.AttrsInstance) -> None:
    """Raise ``TypeError`` naming the first field whose value its annotation refuses."""
    cls = type(instance)
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        value = getattr(instance, field.name)
        expected = hints.get(field.name, Any)
        if not _fits(value, expected):
            raise TypeError(
                f"{cls.__name__}({field.name}=...): expected {_describe(expected)}, got {value!r}"
            )


def _fits(value: object, expected: Any) -> bool:
    if expected is Any or expected is object:
        return True
    supertype = getattr(expected, "__supertype__", None)  # a NewType such as Seconds
    if supertype is not None:
        return _fits(value, supertype)
    origin = typing.get_origin(expected)
    arguments = typing.get_args(expected)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in arguments)
    if origin is Union or origin is types.UnionType:
        return any(_fits(value, argument) for argument in arguments)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if origin is tuple:
        return isinstance(value, tuple)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True  # an annotation this check does not know: the converter's business


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    arguments = typing.get_args(expected)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in arguments)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in arguments)
    if expected is type(None):
        return "None"
    supertype = getattr(expected, "__supertype__", None)
    if supertype is not None:
        return _describe(supertype)
    return getattr(expected, "__name__", str(expected))
