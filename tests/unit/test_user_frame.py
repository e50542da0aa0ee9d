"""Where an exception from the user's code is said to be: the innermost frame of the
user's own code, not of torch, the standard library or bz, with the library's message."""

from __future__ import annotations

import importlib
import json
import os
import re
import site
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from torch import nn

from bz._errors import user_frame


def _caught(function: Callable[..., object], *args: object) -> Exception:
    try:
        function(*args)
    except Exception as exc:
        return exc
    raise AssertionError(f"{function.__name__} raised nothing")


def _users_model(x: torch.Tensor) -> object:
    return nn.Linear(5, 2)(x)  # the line a shape mismatch inside torch is reported at


def _users_parser(text: str) -> object:
    return json.loads(text)  # the line a JSON error inside the standard library is reported at


def _line_of(marker: str) -> int:
    with open(__file__, encoding="utf-8") as file:
        return next(n for n, line in enumerate(file, 1) if marker in line and "def " not in line)


def test_an_error_inside_torch_names_the_users_line_with_torchs_message() -> None:
    text = user_frame(_caught(_users_model, torch.zeros(3, 4)))
    line = _line_of("nn.Linear(5, 2)(x)")
    assert re.fullmatch(
        rf".*test_user_frame\.py:{line}: RuntimeError: mat1 and mat2 shapes cannot be "
        r"multiplied \(3x4 and 5x2\)",
        text,
    ), text


def test_an_error_inside_the_standard_library_names_the_users_line() -> None:
    text = user_frame(_caught(_users_parser, "{"))
    assert f"test_user_frame.py:{_line_of('json.loads(text)')}: JSONDecodeError: " in text


def test_with_no_frame_of_the_users_the_innermost_is_named() -> None:
    exc = _caught(json.loads, "{")
    assert exc.__traceback__ is not None
    exc.__traceback__ = exc.__traceback__.tb_next  # only the library's frames are left
    text = user_frame(exc)
    assert re.match(r".*json.*\.py:\d+: JSONDecodeError: ", text), text
    assert "test_user_frame.py" not in text


def test_an_exception_without_a_traceback_is_its_type_and_message() -> None:
    assert user_frame(ValueError("bad")) == "ValueError: bad"


def _users_option(value: Any) -> object:
    return click.INT.convert(value, None, None)  # click raises from site-packages


def test_an_error_inside_an_installed_package_names_the_users_line() -> None:
    installed = [os.path.realpath(folder) for folder in site.getsitepackages()]
    assert os.path.realpath(click.__file__ or "").startswith(tuple(installed))
    text = user_frame(_caught(_users_option, "5x"))
    line = _line_of("click.INT.convert(value")
    assert re.fullmatch(
        rf".*test_user_frame\.py:{line}: BadParameter: '5x' is not a valid integer\.", text
    ), text


def test_a_package_imported_from_its_source_folder_is_the_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an editable install does: the package is imported from where its source is.
    package = tmp_path / "src" / "my_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from torch import nn\n\n\ndef head(x):\n    return nn.Linear(5, 2)(x)\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    module = importlib.import_module("my_models")
    text = user_frame(_caught(module.head, torch.zeros(3, 4)))
    assert re.match(rf"{re.escape(str(package.resolve()))}/__init__\.py:5: RuntimeError: ", text)
