"""Shared fixtures: captured structured events and a project on disk."""

from __future__ import annotations

import json
import os

# One intra-op thread per test process and per process a test starts (they inherit the
# environment), as torchrun does for each of its processes: the suite runs two test
# processes on two cores, and torch's default (a thread per core) has every tiny model's
# kernels wait on threads that spin for a busy core: ten times the CPU per training run.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from hypothesis import settings
from tests._fault_support import install_fake_distribution
from tests._support import TINY_TRAIN_PY

torch.set_num_threads(1)  # were torch loaded before this file (a plugin, PYTHONSTARTUP)

# No per-example deadline: examples run torch code whose first calls are slow on a busy
# CI machine, and a timing failure says nothing about the contract under test. A
# failure prints the blob that reproduces it.
settings.register_profile("bz", deadline=None, print_blob=True)
# `make quick` (--hypothesis-profile=quick): every property on a fifth of its examples
# (tests/_examples.py scales the counts the tests name); `make check` runs them all.
settings.register_profile("quick", parent=settings.get_profile("bz"), max_examples=20)
settings.load_profile("bz")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files with the most slow tests first, the others after them, each file's tests
    in their own order.

    ``pytest -n 2 --dist loadfile`` hands out whole files in this order (the project
    turns off xdist's own reordering, by test count): the longest files start first and
    the quick ones fill in at the end, so that the workers finish close together instead
    of one running a long file alone at the end.
    """
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first: dict[object, int] = {}
    for index, item in enumerate(items):
        first.setdefault(item.path, index)
    items.sort(key=lambda item: (-slow[item.path], first[item.path]))


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


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fake distribution (``faulty``, ``broken_import``), importable for the module."""
    folder = install_fake_distribution(tmp_path_factory.mktemp("site"))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield folder
