"""A metric's options (its attrs ``Config`` class) as ``bz list-metrics`` shows them.

The fields are read by :func:`bz._options.describe_fields`, as for plugins and the JSON
Schema; this module only keeps the public record metrics have always been listed with.
"""

from __future__ import annotations

import attrs

from bz._options import describe_fields

__all__ = ["MetricOption", "describe_options"]


@attrs.frozen
class MetricOption:
    """One JSON key a metric accepts, as ``bz list-metrics --verbose`` shows it."""

    name: str
    """The key."""
    type: str
    """Its JSON type, e.g. ``integer``, ``integer | null`` or ``"macro" | "micro"``."""
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
    return tuple(
        MetricOption(
            name=field.name,
            type=field.type,
            default=field.default_text,
            doc=field.doc,
            constraints=field.constraints,
        )
        for field in describe_fields(config)
    )
