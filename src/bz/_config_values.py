"""The values ``bzconfig.json`` is made of: validators, durations, plugin and metric entries.

Shared by :mod:`bz.config` (the classes) and :mod:`bz._converter` (reading JSON into
them); both re-export what is public through :mod:`bz.config`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, NewType, TypeVar

import attrs


def quote_value(value: Any) -> str:
    # A bad value as the user wrote it in JSON ("abc", null, 3.5); repr if not JSON.
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


class ConfigValueError(ValueError):
    """A value that has the right type but is not allowed, raised by a validator.

    ``field`` names the attribute so the error can carry the full JSON path.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


# -- validators -------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@attrs.frozen
class AtLeast:
    """An attrs validator: a number is ``>= minimum`` (None and other types pass: the
    field's type check reports those). The bound is data, so listings and the JSON
    Schema read it from here."""

    minimum: float

    def __call__(self, _instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        """Raise :class:`ConfigValueError` for a number below the bound (or NaN)."""
        if not _is_number(value):
            return  # None, or a wrong type the field's type check reports
        # Written as "not >=" so that NaN, which compares false to everything, is refused.
        if not value >= self.minimum:
            raise ConfigValueError(attribute.name, f"must be >= {self.minimum}, got {value!r}")

    def json_schema(self) -> dict[str, Any]:
        """The bound as JSON Schema keywords."""
        return {"minimum": self.minimum}


@attrs.frozen
class GreaterThan:
    """An attrs validator: a number is ``> minimum`` (None and other types pass), for a
    value whose bound itself means nothing useful (a clipping threshold of 0 zeroes
    every gradient)."""

    minimum: float

    def __call__(self, _instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        """Raise :class:`ConfigValueError` for a number at or below the bound (or NaN)."""
        if not _is_number(value):
            return
        if not value > self.minimum:  # "not >" refuses NaN too
            raise ConfigValueError(attribute.name, f"must be > {self.minimum}, got {value!r}")

    def json_schema(self) -> dict[str, Any]:
        """The bound as JSON Schema keywords."""
        return {"exclusiveMinimum": self.minimum}


@attrs.frozen
class Between:
    """An attrs validator: a number lies in ``[low, high]`` (None and other types pass)."""

    low: float
    high: float

    def __call__(self, _instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        """Raise :class:`ConfigValueError` for a number outside the range."""
        if _is_number(value) and not self.low <= value <= self.high:
            raise ConfigValueError(
                attribute.name, f"must be between {self.low} and {self.high}, got {value!r}"
            )

    def json_schema(self) -> dict[str, Any]:
        """The bounds as JSON Schema keywords."""
        return {"minimum": self.low, "maximum": self.high}


def at_least(minimum: float) -> AtLeast:
    """An attrs validator: the value (when not None) is ``>= minimum``."""
    return AtLeast(minimum)


def greater_than(minimum: float) -> GreaterThan:
    """An attrs validator: the value (when not None) is ``> minimum``."""
    return GreaterThan(minimum)


def between(low: float, high: float) -> Between:
    """An attrs validator: the value (when not None) lies in ``[low, high]``."""
    return Between(low, high)


# ASCII digits only: what torch parses, and what an editor's (JavaScript) regex means.
_DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"


@attrs.frozen
class _DeviceName:
    """The ``device`` key's validator: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``."""

    pattern: re.Pattern[str] = re.compile(_DEVICE_PATTERN)

    def __call__(self, _instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if isinstance(value, str) and not self.pattern.fullmatch(value):
            raise ConfigValueError(
                attribute.name,
                f'expected "auto", "cpu", "cuda", "cuda:N" or "mps", got {quote_value(value)}',
            )

    def json_schema(self) -> dict[str, Any]:
        # Python's `$` also matches before a final newline ("cpu\n"), which bz refuses;
        # the lookahead makes Python's validators read it as JavaScript's (editors) do.
        return {"pattern": f"^({_DEVICE_PATTERN})$(?!\n)"}


_check_device = _DeviceName()


@attrs.frozen
class ExactlyOne:
    """An attrs validator for a class whose fields ``names`` exclude each other: exactly
    one of them is set (not None). Put it on the last of them, so all are set when it
    runs; the JSON Schema gets the same rule as a ``oneOf``."""

    names: tuple[str, ...]
    message: str

    def __call__(self, instance: Any, _attribute: attrs.Attribute[Any], _value: Any) -> None:
        """Raise :class:`ConfigValueError` (on the first name) unless exactly one is set."""
        if sum(getattr(instance, name) is not None for name in self.names) != 1:
            raise ConfigValueError(self.names[0], self.message)

    def object_json_schema(self) -> dict[str, Any]:
        """The rule for the whole object: exactly one of the keys is present and not null."""
        return {
            "oneOf": [
                {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                for name in self.names
            ]
        }


Seconds = NewType("Seconds", float)
"""A duration: seconds in JSON as a number, or a ``"HH:MM:SS"`` / ``"D:HH:MM:SS"`` string."""

CLOCK_PATTERN = r"^\s*(?:([0-9]+):)?([0-9]+):([0-5]?[0-9]):([0-5]?[0-9](?:\.[0-9]*)?)\s*$"
"""A ``"[D:]HH:MM:SS[.fff]"`` duration (surrounding blanks allowed): the converter's rule,
and the ``pattern`` the JSON Schema gives editors."""
_CLOCK = re.compile(CLOCK_PATTERN)


def parse_seconds(value: object) -> Seconds:
    """A duration from a number of seconds or an ``"[D:]HH:MM:SS"`` string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"expected a finite number of seconds >= 0, got {quote_value(value)}")
        return Seconds(float(value))
    if isinstance(value, str):
        match = _CLOCK.match(value)
        if match is None:
            raise ValueError(f'expected seconds or "HH:MM:SS", got {quote_value(value)}')
        days, hours, minutes, seconds = match.groups()
        whole = ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60
        try:
            total = whole + float(seconds)
        except OverflowError:  # more days than a float holds
            raise ValueError(
                "expected a finite number of seconds, got more days than that"
            ) from None
        return Seconds(total)
    raise TypeError(f'expected seconds or "HH:MM:SS", got {quote_value(value)}')


def _optional_seconds(field: str, value: float | str | None) -> Seconds | None:
    if value is None:
        return None
    try:
        return parse_seconds(value)
    except (TypeError, ValueError) as exc:
        # In Python the converter runs first: name the field, as the JSON path would.
        raise type(exc)(f"{field}: {exc}") from None


def _max_time(value: float | str | None) -> Seconds | None:
    return _optional_seconds("max_time", value)


def _checkpoint_seconds(value: float | str | None) -> Seconds | None:
    return _optional_seconds("checkpoint_every_seconds", value)


# -- the configuration --------------------------------------------------------------


@attrs.frozen
class PluginSpec:
    """One entry of the ``plugins`` list: a name and the JSON options given for it."""

    name: str
    options: Mapping[str, Any] = attrs.field(factory=dict)
    path: str = attrs.field(default="", eq=False)
    """Where the entry sits in the file, e.g. ``plugins[1].my_plugin`` (not compared)."""

    @property
    def enabled(self) -> bool:
        """False when the options say ``"enabled": false``."""
        return self.options.get("enabled", True) is not False


@attrs.frozen
class MetricSpec:
    """One entry of the ``metrics`` list: a metric name and its options."""

    name: str
    options: Mapping[str, Any] = attrs.field(factory=dict)
    path: str = attrs.field(default="", eq=False)


SpecEntry = str | Mapping[str, Mapping[str, Any] | None]
"""What a ``metrics`` or ``plugins`` entry may be in Python: as in JSON, a name or
``{name: options}`` (``None`` options meaning none)."""

SpecT = TypeVar("SpecT", PluginSpec, MetricSpec)


def _specs(kind: type[SpecT], key: str, value: object) -> tuple[SpecT, ...]:
    """``value`` as specs of ``kind``: what ``RunConfig`` does with Python input.

    JSON reaches here already structured (a tuple of specs); Python callers may pass
    what the JSON holds. Anything else is refused now, with a ``TypeError`` that says
    what is accepted, rather than failing later inside ``fit``.
    """
    accepted = f"a list of names, {{name: {{options}}}} or {kind.__name__} objects"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"RunConfig({key}=...) takes {accepted}, got {quote_value(value)}")
    specs: list[SpecT] = []
    for index, item in enumerate(value):
        path = f"{key}[{index}]"
        if isinstance(item, kind):
            specs.append(item if item.path else attrs.evolve(item, path=f"{path}.{item.name}"))
        elif isinstance(item, str):
            specs.append(kind(item, {}, path))
        elif (
            isinstance(item, Mapping)
            and len(item) == 1
            and isinstance(name := next(iter(item)), str)
            and (item[name] is None or _is_options(item[name]))
        ):
            specs.append(kind(name, dict(item[name] or {}), f"{path}.{name}"))
        else:
            raise TypeError(
                f"RunConfig({key}=...): {path} is {quote_value(item)}; expected "
                f'"name", {{"name": {{options}}}} or a {kind.__name__}'
            )
    return tuple(specs)


def _is_options(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(key, str) for key in value)


def metric_specs(value: Iterable[MetricSpec | SpecEntry]) -> tuple[MetricSpec, ...]:
    """``RunConfig.metrics`` from names, ``{name: options}`` or :class:`MetricSpec` objects."""
    return _specs(MetricSpec, "metrics", value)


def plugin_specs(value: Iterable[PluginSpec | SpecEntry]) -> tuple[PluginSpec, ...]:
    """``RunConfig.plugins`` from names, ``{name: options}`` or :class:`PluginSpec` objects."""
    return _specs(PluginSpec, "plugins", value)
