"""``--set KEY=VALUE``: the command-line override that ``bz train`` and ``bz tune`` share."""

from __future__ import annotations

import json
from typing import Any

import click


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as ``(key, value)``; VALUE is JSON, or a bare string (``device=cpu``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--set")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word is a string: --set device=cpu
    return key, value
