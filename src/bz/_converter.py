"""The one converter that reads JSON into bz's config classes, with errors that name the
JSON path and the nearest valid name. Public through :mod:`bz.config`.
"""

from __future__ import annotations

import difflib
import re
import sys
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableSequence, Sequence
from typing import Any, Literal, TypeVar

import attrs
import cattrs
import cattrs.cols
from cattrs.errors import (
    BaseValidationError,
    ForbiddenExtraKeysError,
)
from cattrs.gen import make_dict_structure_fn

from bz._config_values import (
    ConfigValueError,
    MetricSpec,
    PluginSpec,
    Seconds,
    parse_seconds,
    quote_value,
)
from bz._errors import ConfigError

T = TypeVar("T")

# -- the converter -------------------------------------------------------------------


def _strict_scalar(kind: type, label: str, accepts: tuple[type, ...]) -> Callable[[Any, Any], Any]:
    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and bool not in accepts:
            raise TypeError(f"expected {label}, got {quote_value(value)}")
        if not isinstance(value, accepts):
            raise TypeError(f"expected {label}, got {quote_value(value)}")
        return kind(value)

    return hook


def _literal_hook(value: Any, literal: Any) -> Any:
    allowed = typing.get_args(literal)
    if value in allowed and type(value) in {type(a) for a in allowed}:
        return value
    choices = ", ".join(quote_value(a) for a in allowed)
    message = f"expected one of {choices}, got {quote_value(value)}"
    if isinstance(value, str):
        hint = nearest(value, [a for a in allowed if isinstance(a, str)])
        if hint:
            message += f' (did you mean "{hint}"?)'
    raise ValueError(message)


def _entries(value: Any, key: str, kind: str) -> Iterator[tuple[str, Mapping[str, Any], str]]:
    if not isinstance(value, list):
        raise ConfigError([("", f"expected a list, got {quote_value(value)}")])
    # Problems carry paths relative to the list (the error walker prefixes the key);
    # specs carry absolute paths so later errors (plugin options) can name them.
    problems: list[tuple[str, str]] = []
    for index, item in enumerate(value):
        path = f"{key}[{index}]"
        if isinstance(item, str):
            yield item, {}, path
        elif isinstance(item, dict) and len(item) == 1:
            ((name, options),) = item.items()
            if options is None:
                options = {}
            if not isinstance(options, dict):
                problems.append(
                    (
                        f"[{index}].{name}",
                        f"expected an object of options, got {quote_value(options)}",
                    )
                )
                continue
            switch = options.get("enabled", True)
            if key == "plugins" and not isinstance(switch, bool):
                # Read as "is not False", "enabled": "false" would have left it on.
                problems.append(
                    (
                        f"[{index}].{name}.enabled",
                        f"expected true or false, got {quote_value(switch)}",
                    )
                )
                continue
            yield name, options, f"{path}.{name}"
        else:
            problems.append(
                (
                    f"[{index}]",
                    f'expected "{kind}" or {{"{kind}": {{...options}}}}, got {quote_value(item)}',
                )
            )
    if problems:
        raise ConfigError(problems)


def _structure_plugins(value: Any, _type: Any) -> tuple[PluginSpec, ...]:
    return tuple(
        PluginSpec(name, options, path)
        for name, options, path in _entries(value, "plugins", "name")
    )


def _structure_metrics(value: Any, _type: Any) -> tuple[MetricSpec, ...]:
    return tuple(
        MetricSpec(name, options, path)
        for name, options, path in _entries(value, "metrics", "name")
    )


def _unstructure_specs(specs: tuple[PluginSpec | MetricSpec, ...]) -> list[Any]:
    return [{spec.name: dict(spec.options)} if spec.options else spec.name for spec in specs]


def _json_object(value: Any, _type: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {quote_value(value)}")
    return dict(value)


def _is_literal(annotation: Any) -> bool:
    origin: object = typing.get_origin(annotation)
    return origin is Literal


def _objects_only(conv: cattrs.Converter) -> Callable[[type], Callable[[Any, Any], Any]]:
    """Attrs classes are structured from JSON objects only (cattrs would crash on a list)."""

    def factory(cls: type) -> Callable[[Any, Any], Any]:
        structure_fields: Callable[[Any, Any], Any] = make_dict_structure_fn(
            cls, conv, _cattrs_forbid_extra_keys=True
        )

        def hook(value: Any, _type: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {quote_value(value)}")
            return structure_fields(value, cls)

        return hook

    return factory


def _is_array(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        arguments = typing.get_args(annotation)
        return len(arguments) == 2 and arguments[1] is Ellipsis
    return origin in (list, Sequence, MutableSequence)


def _only(
    accepted: type | tuple[type, ...],
    noun: str,
    build: Callable[[Any], Callable[[Any, Any], Any]],
) -> Callable[[Any], Callable[[Any, Any], Any]]:
    """A hook factory that hands ``build``'s hook only values of the ``accepted`` kinds;
    anything else is ``expected <noun>, got <value>``."""

    def factory(annotation: Any) -> Callable[[Any, Any], Any]:
        inner = build(annotation)

        def hook(value: Any, kind: Any) -> Any:
            if not isinstance(value, accepted):
                raise TypeError(f"expected {noun}, got {quote_value(value)}")
            return inner(value, kind)

        return hook

    return factory


def _arrays_only(conv: cattrs.Converter) -> Callable[[Any], Callable[[Any, Any], Any]]:
    """``tuple[X, ...]``, ``list[X]``, ``Sequence[X]`` from JSON arrays only: cattrs alone
    would take any iterable, so ``"tags": "ab"`` became ``("a", "b")`` and an object
    became its keys. (A tuple is what Python callers, and unstructure, may hand over.)"""

    def build(annotation: Any) -> Callable[[Any, Any], Any]:
        if typing.get_origin(annotation) is tuple:
            return cattrs.cols.homogenous_tuple_structure_factory(annotation, conv)
        return cattrs.cols.list_structure_factory(annotation, conv)

    return _only((list, tuple), "a list", build)


def _mappings_only(conv: cattrs.Converter) -> Callable[[Any], Callable[[Any, Any], Any]]:
    """``dict[K, V]`` and ``Mapping[K, V]`` from JSON objects only: cattrs alone calls
    ``.items()`` on whatever it is given, so ``"tags": ["a"]`` raised AttributeError,
    which the loader took for a bug in the plugin (quarantined, exit 0) instead of a
    mistake in the file."""
    return _only(
        Mapping,
        "an object",
        lambda annotation: cattrs.cols.mapping_structure_factory(annotation, conv),
    )


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook_factory(attrs.has, _objects_only(conv))
    conv.register_structure_hook_factory(_is_array, _arrays_only(conv))
    conv.register_structure_hook_factory(cattrs.cols.is_mapping, _mappings_only(conv))
    conv.register_structure_hook(bool, _strict_scalar(bool, "boolean", (bool,)))
    conv.register_structure_hook(int, _strict_scalar(int, "int", (int,)))
    conv.register_structure_hook(float, _strict_scalar(float, "number", (int, float)))
    conv.register_structure_hook(str, _strict_scalar(str, "string", (str,)))
    conv.register_structure_hook(Seconds, lambda value, _type: parse_seconds(value))
    conv.register_structure_hook_func(_is_literal, _literal_hook)
    conv.register_structure_hook_func(lambda t: t == dict[str, Any], _json_object)
    conv.register_structure_hook_func(lambda t: t == tuple[PluginSpec, ...], _structure_plugins)
    conv.register_structure_hook_func(lambda t: t == tuple[MetricSpec, ...], _structure_metrics)
    conv.register_unstructure_hook_func(
        lambda t: t in (tuple[PluginSpec, ...], tuple[MetricSpec, ...]), _unstructure_specs
    )
    return conv


converter: cattrs.Converter = _make_converter()
"""The one converter bz structures JSON with (strict types, no unknown keys)."""


# -- errors with JSON paths -----------------------------------------------------------


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word``, if any is close enough to suggest."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _join(path: str, segment: str | int) -> str:
    if isinstance(segment, int):
        return f"{path}[{segment}]"
    if segment.startswith("[") or not path:
        return f"{path}{segment}"
    return f"{path}.{segment}"


def _note_segment(exc: BaseException) -> str | int | None:
    for note in getattr(exc, "__notes__", ()):
        name = getattr(note, "name", None)
        if isinstance(name, str):
            return name
        index = getattr(note, "index", None)
        if isinstance(index, (int, str)):  # list positions and dict keys
            return index
    return None


def _required_hint(exc: BaseException, key: str | int) -> str:
    """``"every": <int>``: the key to add, with the type the field wants."""
    for note in getattr(exc, "__notes__", ()):
        kind = getattr(note, "type", None)
        if kind is not None:
            return f'"{key}": <{_annotation_name(kind)}>'
    return f'"{key}"'


def _annotation_name(annotation: Any) -> str:
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return {bool: "boolean", str: "string", float: "number", dict: "object"}.get(
            annotation, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def config_fields(cls: type) -> list[str]:
    """The JSON keys an attrs config class accepts."""
    return [field.name for field in attrs.fields(cls)]


def _problems(exc: BaseException, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(exc, ForbiddenExtraKeysError):
        allowed = config_fields(exc.cl) if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            message = "unknown key"
            hint = nearest(key, allowed)
            if hint:
                message += f' (did you mean "{hint}"?)'
            elif allowed:
                message += f" (valid keys: {', '.join(allowed)})"
            yield _join(path, key), message
    elif isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            segment = _note_segment(sub)
            subpath = path if segment is None else _join(path, segment)
            if isinstance(sub, KeyError) and segment is not None:
                yield subpath, f"missing required key (add {_required_hint(sub, segment)})"
            else:
                yield from _problems(sub, subpath)
    elif isinstance(exc, ConfigError):
        for sub_path, message in exc.problems:
            yield (_join(path, sub_path) if sub_path else path), message
    elif isinstance(exc, ConfigValueError):
        yield _join(path, exc.field), exc.message
    elif isinstance(exc, ValueError) and (match := _attrs_validator_message(exc)):
        # attrs.validators word their errors "'field' must be ...": give the field a path.
        yield _join(path, match["field"]), match["message"]
    else:
        yield path, str(exc)


_ATTRS_VALIDATOR = re.compile(r"^'(?P<field>\w+)' (?P<message>.+)$", re.DOTALL)
# min_len / max_len: "Length of 'tag' must be <= 8: 11".
_ATTRS_LENGTH = re.compile(r"^Length of '(?P<field>\w+)' (?P<message>.+)$", re.DOTALL)


def _attrs_validator_message(exc: ValueError) -> dict[str, str] | None:
    """``field`` and ``message`` of an attrs validator's error, if it is one."""
    # in_ passes (message, attribute, options, value) as arguments: the text is the first.
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    match = _ATTRS_VALIDATOR.match(text)
    if match is None:
        match = _ATTRS_LENGTH.match(text)
        if match is not None:
            return {"field": match["field"], "message": f"length {match['message']}"}
        return None
    return {"field": match["field"], "message": match["message"]}


MAX_DEPTH = 100
"""How deeply objects and lists may nest in a configuration: far more than any option
needs, and far less than the interpreter's recursion limit, which structuring, copying
and pickling the config would otherwise hit."""


def check_depth(data: Any, path: str = "") -> None:
    """Raise a one-line :class:`ConfigError` when ``data`` nests deeper than ``MAX_DEPTH``.

    Walks with a stack, never recursion, so any depth is answered with the same line.
    """
    stack: list[tuple[Any, str, int]] = [(data, path, 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, dict):
            children: Iterable[tuple[str | int, Any]] = value.items()
        elif isinstance(value, list | tuple):
            children = enumerate(value)
        else:
            continue
        if depth >= MAX_DEPTH:
            raise ConfigError([(where, f"nested deeper than {MAX_DEPTH} levels")])
        # Paths are kept short: the first levels say where, the rest would be noise.
        stack.extend(
            (
                child,
                _join(where, key if isinstance(key, int) else str(key)) if depth < 3 else where,
                depth + 1,
            )
            for key, child in children
        )


def too_deep_message() -> str:
    """What a JSON reader that ran out of recursion reports (see ``MAX_DEPTH``)."""
    return f"nested deeper than {MAX_DEPTH} levels"


def too_long_number_message() -> str:
    """What a JSON reader reports for an integer longer than Python converts."""
    return f"invalid JSON: a number with more than {sys.get_int_max_str_digits()} digits"


def structure(data: Any, cls: type[T], path: str = "") -> T:
    """Structure JSON ``data`` into ``cls``; raise :class:`ConfigError` with JSON paths."""
    check_depth(data, path)
    if attrs.has(cls) and not isinstance(data, dict):
        raise ConfigError([(path, f"expected an object, got {quote_value(data)}")])
    try:
        return converter.structure(data, cls)
    except ConfigError as exc:
        raise ConfigError(list(_problems(exc, path))) from None
    except (BaseValidationError, ConfigValueError, ValueError, TypeError) as exc:
        crash = _code_fault(exc)
        if crash is not None:
            raise crash from None
        raise ConfigError(list(_problems(exc, path))) from None


# What bad input raises; anything else inside structuring is a bug in someone's code
# (a config class's validator, say) and must not be reported as the user's mistake.
_INPUT_ERRORS = (
    ConfigError,
    ConfigValueError,
    ForbiddenExtraKeysError,
    ValueError,
    TypeError,
    KeyError,
)


def _code_fault(exc: BaseException) -> BaseException | None:
    """The first exception in ``exc`` (a cattrs error group) that is not about input."""
    if isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            found = _code_fault(sub)
            if found is not None:
                return found
        return None
    return None if isinstance(exc, _INPUT_ERRORS) else exc


def input_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions structuring raises for values that do not fit (not code faults)."""
    return (*_INPUT_ERRORS, BaseValidationError)


def unstructure(value: Any) -> Any:
    """The JSON form of a config object (``structure`` reads it back unchanged)."""
    return converter.unstructure(value)
