"""``bz check-config`` and ``"isolation": "process"`` for a plugin that needs the model.

``bz train`` refuses such a plugin before training (one line, exit 2), but
``bz check-config`` said ``OK``: the very first plugin a user would isolate,
``early_stopping`` with its default ``restore_best_weights``, passed the check and
failed the run. check-config creates no plugin, so it reads the class's declaration:
its attribute, or its property on the checked ``Config`` object; for a plugin in the
guide's style (``load_config`` + ``create``), also the class ``create`` says it returns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._plugin_packages_support import Packages, packages

from bz.commands import cli
from bz.config import structure
from bz.plugins._isolated import declared_need
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig
from bz.plugins.tensorboard import TensorBoard, TensorBoardConfig

__all__ = ["packages"]  # the fixture, imported for the tests below


def _check(tmp_path: Path, plugin: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "train.py").write_text("", encoding="utf-8")
    config = {"epochs": 1, "plugins": [plugin]}
    (tmp_path / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BZ_CONFIG", raising=False)
    return CliRunner().invoke(cli, ["check-config"])


@pytest.mark.parametrize(
    ("plugin", "why"),
    [
        ({"ema": {}}, "it keeps an average of the model's weights"),
        ({"early_stopping": {}}, "restore_best_weights copies the model's weights"),
        (
            {"tensorboard": {"histogram_interval": 1}},
            "histogram_interval reads the model's weights",
        ),
    ],
)
def test_a_plugin_that_needs_the_training_process_is_refused_as_bz_train_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugin: dict[str, Any], why: str
) -> None:
    ((name, options),) = plugin.items()
    result = _check(tmp_path, {name: {**options, "isolation": "process"}}, monkeypatch)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"bz: error: bzconfig.json: plugins[0].{name}.isolation: plugin {name!r} cannot run "
        f'with "isolation": "process"; it needs the training process: {why}'
    ]


@pytest.mark.parametrize(
    "plugin",
    [
        {"early_stopping": {"restore_best_weights": False}},
        {"tensorboard": {}},
        {"run_log": {}},
    ],
)
def test_one_that_does_not_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugin: dict[str, Any]
) -> None:
    ((name, options),) = plugin.items()
    result = _check(tmp_path, {name: {**options, "isolation": "process"}}, monkeypatch)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("bzconfig.json: OK")


@settings(max_examples=30, deadline=None)
@given(restore=st.booleans(), histograms=st.one_of(st.none(), st.integers(1, 5)))
def test_the_check_agrees_with_the_created_plugin(restore: bool, histograms: int | None) -> None:
    stopping = structure({"restore_best_weights": restore}, EarlyStoppingConfig, "x")
    board = structure({"histogram_interval": histograms}, TensorBoardConfig, "x")
    assert declared_need(EarlyStopping, stopping) == EarlyStopping(stopping).needs_training_process
    assert declared_need(TensorBoard, board) == TensorBoard(board).needs_training_process


# -- the guide's style: load_config + create, the plugin made by create ---------------------

_GUIDE_STYLE = """
    from typing import Any


    class Watcher:
        name = "watcher"
        needs_training_process = "it reads the model's weights"

        def end_epoch(self, context: object) -> None: ...


    class WatcherPlugin:
        @staticmethod
        def load_config(config_data: dict[str, Any]) -> dict[str, Any]:
            return dict(config_data)

        @staticmethod
        def create(config_data: dict[str, Any], training_config: object) -> "Watcher | None":
            return Watcher()
"""


def test_a_guide_style_plugin_is_refused_for_what_its_create_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packages: Packages
) -> None:
    # The factory class declares nothing; the plugin its create returns does, and that is
    # what bz train's process plugin reports when it is created.
    packages.install(
        "watcher-plugin",
        {"watcher": "watcher_mod:WatcherPlugin"},
        {"watcher_mod.py": _GUIDE_STYLE},
    )
    result = _check(tmp_path, {"watcher": {"isolation": "process"}}, monkeypatch)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "bz: error: bzconfig.json: plugins[0].watcher.isolation: plugin 'watcher' cannot run "
        'with "isolation": "process"; it needs the training process: it reads the model\'s '
        "weights"
    ]


class _Needs:
    name = "needs"
    needs_training_process = True


class _Free:
    name = "free"


class _Optional:
    @staticmethod
    def create(config_data: dict[str, Any], training_config: object) -> _Needs | None:
        return _Needs()


class _Selfish:
    needs_training_process = "it measures this process"
    name = "selfish"

    @classmethod
    def create(cls, config_data: dict[str, Any], training_config: object) -> Self:
        return cls()


class _Either:
    @staticmethod
    def create(config_data: dict[str, Any], training_config: object) -> _Free:
        return _Free()


def _function(config: object) -> _Needs:
    return _Needs()


@pytest.mark.parametrize("factory", [_Optional, _Selfish, _Either, _function])
def test_the_check_agrees_with_the_plugin_create_returns(factory: Any) -> None:
    create = getattr(factory, "create", None)
    made = create({}, None) if create is not None else factory(None)
    expected = getattr(made, "needs_training_process", None)
    assert declared_need(factory, {}) == expected


def test_a_create_without_a_return_annotation_is_left_to_bz_train() -> None:
    class Unannotated:
        @staticmethod
        def create(config_data: dict[str, Any], training_config: object):  # type: ignore[no-untyped-def]  # the case under test
            return _Needs()

    assert declared_need(Unannotated, {}) is None
