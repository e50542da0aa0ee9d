"""What a plugin's own code raises while it is created is named at its line.

Its ``load_config``, ``create`` or constructor: the fault's one line starts with the
plugin's innermost frame (``.../plugin.py:12: OSError: cannot open``), as an import
failure's does, so the console (which shows no traceback) names where to look.
"""

from __future__ import annotations

from typing import Any

import pytest

from bz.config import PluginSpec, RunConfig
from bz.plugins._loader import load_plugins


class _RaisesInLoadConfig:
    @staticmethod
    def load_config(options: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("no such server")

    @classmethod
    def create(cls, options: dict[str, Any], run_config: object) -> None:
        cls.load_config(options)


class _RaisesInCreate:
    @staticmethod
    def create(options: dict[str, Any], run_config: object) -> None:
        raise OSError("cannot open")


class _RaisesInConstructor:
    name = "constructor"

    def __init__(self) -> None:
        raise KeyError("missing")


@pytest.mark.parametrize(
    ("factory", "raiser", "error"),
    [
        (_RaisesInLoadConfig, "load_config", "ValueError: no such server"),
        (_RaisesInCreate, "create", "OSError: cannot open"),
        (_RaisesInConstructor, "__init__", "KeyError: 'missing'"),
    ],
)
def test_what_a_plugin_raises_while_created_is_named_at_its_line(
    factory: type, raiser: str, error: str
) -> None:
    # One line, as an import failure's: the plugin's innermost frame, then the exception.
    plugins = load_plugins([PluginSpec("p")], RunConfig(plugins=[]), registry={"p": factory})
    (fault,) = plugins.faults
    assert fault.cause is not None
    traceback = fault.cause.__traceback__
    assert traceback is not None
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    assert fault.error == f"{__file__}:{traceback.tb_lineno}: {error}"
    assert traceback.tb_frame.f_code.co_qualname == f"{factory.__qualname__}.{raiser}"
