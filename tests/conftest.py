"""Shared fixtures: captured structured events and a project on disk."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from tests._support import TINY_TRAIN_PY


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """CLI tests configure structlog globally; every test starts from its defaults."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def events() -> Iterator[list[MutableMapping[str, Any]]]:
    """Structured events bz logs during the test (structlog's capture_logs)."""
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Write ``train.py`` and ``bzconfig.json`` into a fresh folder and ``cd`` into it."""

    def make(config: dict[str, Any] | None = None, train_py: str = TINY_TRAIN_PY) -> Path:
        (tmp_path / "train.py").write_text(train_py, encoding="utf-8")
        defaults = {"epochs": 2, "device": "cpu", "plugins": []}
        (tmp_path / "bzconfig.json").write_text(
            json.dumps({**defaults, **(config or {})}), encoding="utf-8"
        )
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("BZ_CONFIG", raising=False)
        return tmp_path

    return make
