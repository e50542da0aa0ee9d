"""A plugin that hangs while it loads is interrupted after ``plugin_start_timeout``.

Its ``create``, ``load_config`` or constructor blocked (a sleep, a socket) is stopped
inside its own frame, reported by name with the limit, and the other plugins load;
under ``plugin_errors: "raise"`` it is a :class:`PluginFailure`. One that swallows the
interruption is forced out like a hook.
"""

from __future__ import annotations

import signal
import time
import types
from pathlib import Path
from typing import Any

import pytest

from bz import _supervision
from bz.config import PluginSpec, RunConfig
from bz.plugins import _faults, _start_limit
from bz.plugins._faults import PluginFailure
from bz.plugins._loader import load_plugins


class Healthy:
    name = "healthy"

    def end_epoch(self, context: object) -> None: ...


class SleepsInConstructor:
    name = "constructor"

    def __init__(self) -> None:
        time.sleep(3600)


class SleepsInCreate:
    @staticmethod
    def create(options: dict[str, Any], run_config: object) -> object:
        time.sleep(3600)
        return Healthy()


class SleepsInLoadConfig:
    @staticmethod
    def load_config(options: dict[str, Any]) -> dict[str, Any]:
        time.sleep(3600)
        return options

    @classmethod
    def create(cls, options: dict[str, Any], run_config: object) -> object:
        cls.load_config(options)  # the plugin guide's style: create calls it
        return Healthy()


class SwallowsTheInterruption:
    @staticmethod
    def create(options: dict[str, Any], run_config: object) -> object:
        while True:
            try:
                time.sleep(3600)
            except BaseException:  # a plugin that will not let go: forced out
                continue


REGISTRY: dict[str, Any] = {
    "healthy": Healthy,
    "constructor": SleepsInConstructor,
    "create": SleepsInCreate,
    "load_config": SleepsInLoadConfig,
    "swallows": SwallowsTheInterruption,
}


def _load(names: list[str], **config: Any) -> Any:
    run_config = RunConfig(plugin_start_timeout=0.2, **config)
    specs = [PluginSpec(name, {}, f"plugins[{i}]") for i, name in enumerate(names)]
    return load_plugins(specs, run_config, registry=REGISTRY)


@pytest.mark.parametrize(
    ("plugin", "stage", "where"),
    [
        ("constructor", "create", "SleepsInConstructor.__init__"),
        ("create", "create", "SleepsInCreate.create"),
        ("load_config", "create", "SleepsInLoadConfig.load_config"),
    ],
)
def test_a_plugin_hung_while_loading_is_reported_and_the_others_load(
    plugin: str, stage: str, where: str
) -> None:
    plugins = _load([plugin, "healthy"])
    assert [p.name for p in plugins.active] == ["healthy"]
    (fault,) = plugins.faults
    assert (fault.plugin, fault.stage) == (plugin, stage)
    # Its stack ends where it hung: the plugin's own frame, whose line the message names.
    assert fault.cause is not None
    frames = []
    traceback = fault.cause.__traceback__
    while traceback is not None:
        frames.append((traceback.tb_frame.f_code.co_qualname, traceback.tb_lineno))
        traceback = traceback.tb_next
    assert frames[-1][0] == where, frames
    assert fault.error == (
        f"{__file__}:{frames[-1][1]}: PluginStartTimeout: plugin {plugin!r} took longer "
        f"than plugin_start_timeout (0.2 s) in its {stage}"
    )


def test_under_raise_a_hung_plugin_fails_the_run_naming_the_limit() -> None:
    expected = r"plugin 'create' failed in create: .*\.py:\d+: PluginStartTimeout: .*\(0\.2 s\)"
    with pytest.raises(PluginFailure, match=expected):
        _load(["create"], plugin_errors="raise")


def test_a_plugin_that_swallows_the_interruption_is_forced_out() -> None:
    plugins = _load(["swallows", "healthy"])
    assert [p.name for p in plugins.active] == ["healthy"]
    (fault,) = plugins.faults
    assert fault.plugin == "swallows"
    assert "plugin_start_timeout (0.2 s)" in fault.error


def test_the_limit_is_gone_once_loading_is_done() -> None:
    # Whoever handled SIGALRM before (the user's own code) handles it again.
    def own(signum: int, frame: object) -> None: ...

    previous = signal.signal(signal.SIGALRM, own)
    try:
        plugins = _load(["healthy"])
        assert signal.getsignal(signal.SIGALRM) is own
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert [p.name for p in plugins.active] == ["healthy"]


# -- a plugin that never returns: the line the process ends with ---------------------------


class _Ended(Exception):
    """What ``os._exit`` raises here instead of ending the test process."""


def _last_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], give_up: Any
) -> str:
    def end(code: int) -> None:
        raise _Ended(code)

    monkeypatch.setattr(_faults, "os", types.SimpleNamespace(_exit=end))
    reason = "plugin 'healthy' ran longer than plugin_timeout (1 s)"
    with pytest.raises(_Ended):
        give_up(Healthy(), 1, reason)
    (line,) = capsys.readouterr().err.splitlines()
    return line


def test_given_up_while_loading_it_says_nothing_was_trained(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # What the start limit's watchdog calls; a checkpoint an earlier run of this process
    # wrote is not what this run would resume from: it trained nothing.
    monkeypatch.setattr(_supervision, "_newest", None)  # put back after the test
    _supervision.checkpoint_written(tmp_path / "epoch-0001.pt")
    assert _last_line(monkeypatch, capsys, _start_limit._give_up) == (
        "bz: error: plugin 'healthy' did not return 10 s after it was interrupted (plugin "
        "'healthy' ran longer than plugin_start_timeout (1 s)); ending the run while plugins "
        "load, before training started: nothing was trained"
    )


def test_given_up_in_a_hook_it_names_the_checkpoint_training_resumes_from(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(_supervision, "_newest", None)  # put back after the test
    newest = tmp_path / "epoch-0002.pt"
    _supervision.checkpoint_written(newest)
    assert _last_line(monkeypatch, capsys, _faults.give_up).endswith(
        f"ending the run (the newest checkpoint, where it resumes: {newest})"
    )
    _supervision.resuming_from(None)  # none written or resumed from yet
    assert _last_line(monkeypatch, capsys, _faults.give_up).endswith(
        "ending the run before its first checkpoint: `bz train` starts it over"
    )
