"""Fault injection: a plugin that fails anywhere never changes what training produces.

Every case runs ``bz train`` end to end (``CliRunner``) with a plugin discovered through
entry points, like an installed package. Each one must end with the same final weights
as the clean run, report the fault exactly once (one ``plugin_failed`` event), exit 0,
and exit 1 under ``--strict-plugins``.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from click.testing import CliRunner, Result
from tests._fault_support import final_model_state, no_rendering
from tests._support import TINY_TRAIN_PY, assert_same_weights

from bz import _logging
from bz.commands import cli
from bz.plugins import HOOK_NAMES

EPOCHS = 2


def train(
    folder: Path, plugins: list[Any], *extra: str, source: str = TINY_TRAIN_PY
) -> tuple[Result, list[MutableMapping[str, Any]]]:
    """``bz train`` in ``folder`` with ``plugins``; the result and the events it logged."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(source, encoding="utf-8")
    config = {"epochs": EPOCHS, "device": "cpu", "seed": 3, "plugins": plugins}
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch, structlog.testing.capture_logs() as events:
        patch.setattr(_logging, "configure", no_rendering)
        result = CliRunner().invoke(
            cli, ["train", "--config", str(folder / "bzconfig.json"), *extra]
        )
    return result, events


@pytest.fixture(scope="module")
def clean(plugin_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of the run without the faulty plugin."""
    folder = tmp_path_factory.mktemp("clean")
    result, _ = train(folder, [])
    assert result.exit_code == 0, result.output
    return final_model_state(folder)


def faults(events: list[MutableMapping[str, Any]]) -> list[tuple[str, str]]:
    return [(e["plugin"], e["hook"]) for e in events if e["event"] == "plugin_failed"]


# Where the loop reaches a hook on a fresh run; the others need a resume or a failure.
_NEEDS_RESUME = {"load_checkpoint", "load_state_dict"}
CASES = [
    *(hook for hook in HOOK_NAMES if hook not in ("on_exception", "on_rewind")),
    "create",
    "config",
    "state_dict",
    "load_state_dict",
]


@pytest.mark.parametrize("stage", CASES)
def test_a_plugin_failing_in_one_place_is_isolated_and_changes_nothing(
    stage: str, plugin_path: Path, clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    plugins = [{"faulty": {"fail_in": stage}}]
    if stage in _NEEDS_RESUME:
        # One epoch first; the run under test resumes from it (the fault needs a resume).
        warmup, _ = train(tmp_path, plugins, "--epochs", "1")
        assert warmup.exit_code == 0, warmup.output
    result, events = train(tmp_path, plugins)
    assert result.exit_code == 0, result.output
    assert faults(events) == [("faulty", stage)]
    assert "QUARANTINED" in result.stderr
    assert stage in result.stderr
    assert_same_weights(final_model_state(tmp_path), clean)


@pytest.mark.parametrize("stage", CASES)
def test_strict_plugins_makes_the_same_fault_fatal(
    stage: str, plugin_path: Path, tmp_path: Path
) -> None:
    plugins = [{"faulty": {"fail_in": stage}}]
    if stage in _NEEDS_RESUME:
        assert train(tmp_path, plugins, "--epochs", "1")[0].exit_code == 0
    result, _ = train(tmp_path, plugins, "--strict-plugins")
    assert result.exit_code == 1, result.output
    assert "injected fault" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_plugin_package_that_fails_to_import_is_reported_and_skipped(
    plugin_path: Path, clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    result, events = train(tmp_path, ["broken_import"])
    assert result.exit_code == 0, result.output
    assert faults(events) == [("broken_import", "import")]
    assert_same_weights(final_model_state(tmp_path), clean)
    (tmp_path / "strict").mkdir()
    strict, _ = train(tmp_path / "strict", ["broken_import"], "--strict-plugins")
    assert strict.exit_code == 1
    assert "injected fault at import" in strict.stderr


def test_garbage_returns_change_nothing(
    plugin_path: Path, clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Hook return values are ignored."""
    for extra in ((), ("--strict-plugins",)):
        folder = tmp_path / ("strict" if extra else "isolate")
        folder.mkdir()
        result, events = train(folder, [{"faulty": {"mode": "garbage"}}], *extra)
        assert result.exit_code == 0, result.output
        assert faults(events) == []
        assert_same_weights(final_model_state(folder), clean)


def test_scribbling_over_the_loops_counters_is_a_fault_that_changes_nothing(
    plugin_path: Path, clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """The loop's values are read-only to plugins: the first write fails in its hook."""
    result, events = train(tmp_path, [{"faulty": {"mode": "mutate"}}])
    assert result.exit_code == 0, result.output
    assert faults(events) == [("faulty", "start_training_session")]
    assert_same_weights(final_model_state(tmp_path), clean)
    (tmp_path / "strict").mkdir()
    strict, _ = train(tmp_path / "strict", [{"faulty": {"mode": "mutate"}}], "--strict-plugins")
    assert strict.exit_code == 1
    assert "read-only" in strict.stderr


def test_garbage_plugin_state_is_one_fault_and_checkpoints_stay_readable(
    plugin_path: Path, clean: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # state_dict() returns an object that weights_only loading would refuse.
    result, events = train(tmp_path, [{"faulty": {"mode": "garbage_state"}}, "early_stopping"])
    assert result.exit_code == 0, result.output
    assert faults(events) == [("faulty", "state_dict")]
    assert_same_weights(final_model_state(tmp_path), clean)


def test_a_fault_in_on_exception_never_hides_the_training_error(
    plugin_path: Path, tmp_path: Path
) -> None:
    broken = TINY_TRAIN_PY.replace(
        "loss_fn=nn.CrossEntropyLoss(),", "loss_fn=lambda outputs, targets: 1 / 0,"
    )
    for extra in ((), ("--strict-plugins",)):
        folder = tmp_path / ("strict" if extra else "isolate")
        folder.mkdir()
        (folder / "train.py").write_text(broken, encoding="utf-8")
        config = {
            "epochs": EPOCHS,
            "device": "cpu",
            "plugins": [{"faulty": {"fail_in": "on_exception"}}],
        }
        (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
        with pytest.MonkeyPatch.context() as patch, structlog.testing.capture_logs() as events:
            patch.setattr(_logging, "configure", no_rendering)
            result = CliRunner().invoke(
                cli, ["train", "--config", str(folder / "bzconfig.json"), *extra]
            )
        assert result.exit_code == 1
        assert "ZeroDivisionError" in result.stderr
        assert faults(events) == [("faulty", "on_exception")]


LAZY_TRAIN_PY = TINY_TRAIN_PY.replace("nn.Linear(4, 8)", "nn.LazyLinear(8)").replace(
    "nn.Linear(8, 2)", "nn.LazyLinear(2)"
)


def test_a_model_with_lazy_modules_trains_and_a_fault_rewinds_it_exactly(
    plugin_path: Path, tmp_path: Path
) -> None:
    assert LAZY_TRAIN_PY.count("nn.LazyLinear") == 2
    clean_run, _ = train(tmp_path / "clean", [], source=LAZY_TRAIN_PY)
    assert clean_run.exit_code == 0, clean_run.output
    plugins = [{"faulty": {"fail_in": "end_training_batch"}}]
    result, events = train(tmp_path / "faulty", plugins, source=LAZY_TRAIN_PY)
    assert result.exit_code == 0, result.output
    assert faults(events) == [("faulty", "end_training_batch")]
    assert [e["event"] for e in events].count("training_rewound") == 1
    weights = final_model_state(tmp_path / "faulty")
    assert weights["0.weight"].shape == (8, 4)
    assert_same_weights(weights, final_model_state(tmp_path / "clean"))
    # bz validate builds the model afresh (lazy again): it finds and evaluates the run.
    config = str(tmp_path / "clean" / "bzconfig.json")
    done = CliRunner().invoke(cli, ["validate", "--config", config, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["step"] == 8
