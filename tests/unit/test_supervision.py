"""What the training process tells a supervising ``bz train``, and how that one reads it.

The end-to-end behaviour (deaths, restarts, signals) is in
``tests/integration/test_supervisor.py``; here, the parts in one process: the sandbox's
plugin/hook index, the hang detector's rule, the options' bad values.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner
from tests._support import tiny_setup

import bz
from bz import _supervision
from bz.commands import cli
from bz.commands.supervise import HUNG_AFTER_S, _Ending, _names, _Pulse
from bz.config import PluginSpec, RunConfig
from bz.plugins import HOOK_NAMES, PluginContext
from bz.plugins._loader import load_plugins
from bz.plugins._sandbox import PluginSet

CONFIG = RunConfig(epochs=1, device="cpu", plugins=())


def _block() -> memoryview:
    return memoryview(bytearray(_supervision.NAMES_OFFSET)).cast("i")


class _Looking:
    """Records what the shared block says while its ``end_epoch`` runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[int, int]] = []

    def end_epoch(self, context: PluginContext) -> None:
        where = _supervision.where
        self.seen.append((where[_supervision.PLUGIN], where[_supervision.HOOK]))

    end_training_batch = end_epoch


def test_the_sandbox_says_which_plugin_and_hook_run_and_clears_it_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A supervised child: every call says which plugin runs, per-batch ones included
    # (outside a supervisor the per-batch rounds skip the stores nobody reads).
    block = _block()
    monkeypatch.setattr(_supervision, "where", block)
    monkeypatch.setattr(_supervision, "supervised", lambda: True)
    first, second = _Looking("first"), _Looking("second")
    bz.Trainer().fit(tiny_setup(batches=40), CONFIG, plugins=[first, second])
    epoch, batch = HOOK_NAMES.index("end_epoch") + 1, HOOK_NAMES.index("end_training_batch") + 1
    assert set(first.seen) == {(1, epoch), (1, batch)}
    assert set(second.seen) == {(2, epoch), (2, batch)}
    assert first.seen.count((1, batch)) == 40  # every round, not only the timed ones
    assert block[_supervision.PLUGIN] == 0  # outside every hook now


def test_a_plugin_set_aside_by_the_supervisor_is_reported_quarantined() -> None:
    from bz.plugins._faults import PluginFault

    plugins = PluginSet([(_Looking("first"), ("end_epoch",)), (_Looking("second"), ())])
    fault = PluginFault("first", "end_epoch", "the training process killed by SIGSEGV")
    plugins.set_aside([fault])
    assert plugins.active_names == ["second"]
    assert [report.fault for report in plugins.report()] == [fault, None]


def _pulse(**values: int) -> tuple[_Pulse, memoryview]:
    view = _block()
    for name, value in values.items():
        view[getattr(_supervision, name)] = value
    return _Pulse(view), view


def test_a_child_is_hung_when_its_heartbeat_stops_inside_one_hook_past_the_timeout() -> None:
    pulse, _ = _pulse(TIMEOUT_MS=2000, PLUGIN=1, HOOK=3, BEAT=7)
    limit = 2.0 + HUNG_AFTER_S
    assert pulse.hung(100.0) is None
    assert pulse.hung(100.0 + limit - 0.5) is None
    assert pulse.hung(100.0 + limit + 0.5) == pytest.approx(limit + 0.5)


@pytest.mark.parametrize(
    "change",
    [
        {"BEAT": 8},  # the watchdog thread ran: the interpreter is not held
        {"PLUGIN": 0},  # outside every hook
        {"PLUGIN": 2},  # another plugin's hook
        {"HOOK": 4},  # another hook
        {"TIMEOUT_MS": 0},  # no plugin_timeout (or the run ended)
    ],
)
def test_any_sign_of_life_or_no_timeout_is_not_a_hang(change: dict[str, Any]) -> None:
    pulse, view = _pulse(TIMEOUT_MS=2000, PLUGIN=1, HOOK=3, BEAT=7)
    assert pulse.hung(0.0) is None
    for name, value in change.items():
        view[getattr(_supervision, name)] = value
    assert pulse.hung(1000.0) is None


@pytest.mark.parametrize("value", ["-1", "x"])
def test_a_bad_max_restarts_is_one_line_and_exit_2(value: str) -> None:
    done = CliRunner().invoke(cli, ["train", "--max-restarts", value])
    assert done.exit_code == 2
    assert "--max-restarts" in done.output
    assert done.output.count("\n") == 1


def test_outside_a_supervised_child_nothing_is_reported() -> None:
    assert not _supervision.attach()  # no supervisor in this process's environment
    _supervision.report_outcome(0)
    _supervision.announce(["a"], ["b"])
    assert _supervision.quarantined() == []


# -- while plugins load -------------------------------------------------------------------


class _Made:
    """A plugin whose making records which plugin and stage the block names then."""

    seen: ClassVar[list[tuple[str | None, str | None]]] = []

    def __init__(self, name: str = "made") -> None:
        self.name = name
        _Made.seen.append(_where_now())

    def end_epoch(self, context: PluginContext) -> None: ...


class _Created:
    """The guide's style: ``load_config`` + ``create``."""

    @staticmethod
    def load_config(options: dict[str, Any]) -> dict[str, Any]:
        _Made.seen.append(_where_now())
        return options

    @classmethod
    def create(cls, options: dict[str, Any], run_config: object) -> _Made:
        cls.load_config(options)  # as the guide writes it
        return _Made("guide")


def _where_now() -> tuple[str | None, str | None]:
    """What the supervisor would read now (its own decoding of the block)."""
    block = _supervision._block
    assert isinstance(block, mmap.mmap)
    where = _supervision.where
    return _names(block, where[_supervision.PLUGIN], where[_supervision.HOOK])


@pytest.fixture
def supervised_block(monkeypatch: pytest.MonkeyPatch) -> memoryview:
    """This process as a supervised child: a shared block of its own (anonymous memory)."""
    block = mmap.mmap(-1, _supervision.BLOCK_BYTES)
    where = memoryview(block).cast("i")
    monkeypatch.setattr(_supervision, "_block", block)
    monkeypatch.setattr(_supervision, "where", where)
    monkeypatch.setattr(_supervision, "_announced", {})
    _Made.seen.clear()
    return where


def test_while_a_plugin_loads_the_supervisor_would_name_it_and_the_stage(
    supervised_block: memoryview,
) -> None:
    # As a hook's plugin and hook are named while it runs: a death while a plugin is
    # created is blamed on that plugin (and it is left out of the restart).
    specs = [PluginSpec("made"), PluginSpec("guide")]
    plugins = load_plugins(specs, CONFIG, registry={"made": _Made, "guide": _Created})
    assert plugins.active_names == ["made", "guide"]
    # _Made's constructor; the guide's load_config and constructor, inside its create.
    assert _Made.seen == [("made", "create"), ("guide", "create"), ("guide", "create")]
    assert supervised_block[_supervision.PLUGIN] == 0  # none loads now


def test_a_plugin_that_ended_the_process_while_loading_is_not_loaded_again(
    supervised_block: memoryview,
) -> None:
    from bz.plugins._faults import PluginFault

    died = PluginFault("made", "create", "the training process was killed by SIGKILL")
    specs = [PluginSpec("made"), PluginSpec("guide")]
    plugins = load_plugins(
        specs, CONFIG, registry={"made": _Made, "guide": _Created}, left_out=[died]
    )
    assert plugins.active_names == ["guide"]
    assert _Made.seen == [("guide", "create"), ("guide", "create")]  # never made again
    assert [report.fault for report in plugins.report() if report.name == "made"] == [died]


@pytest.mark.parametrize(
    ("stage", "where"),
    [
        ("import", "in plugin 'slow' (while loading, in its import)"),
        ("create", "in plugin 'slow' (while loading, in its create)"),
    ],
)
def test_the_supervisor_reads_a_stage_of_loading_as_no_hook(
    supervised_block: memoryview, stage: str, where: str
) -> None:
    _supervision.announce(["fast", "slow"], ())
    _supervision.loading("slow", stage)
    plugin, hook = _where_now()
    ending = _Ending(-9, None, plugin, hook, None)
    assert ending.loading
    assert ending.where() == where


# -- what a run that ends now leaves behind ------------------------------------------------


class _Watching:
    """Records, as each epoch starts, the checkpoint this process knows is the newest."""

    name = "watching"

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def start_epoch(self, context: PluginContext) -> None:
        self.seen.append(_supervision.newest_checkpoint())


def test_the_process_knows_its_newest_checkpoint_as_it_writes_or_resumes_one(
    tmp_path: Path,
) -> None:
    # What a plugin that hangs for good is reported with (see plugins._faults.give_up).
    config = RunConfig(epochs=2, device="cpu", plugins=())
    first = _Watching()
    done = bz.Trainer().fit(tiny_setup(), config, [first], checkpoint_dir=tmp_path)
    assert done.checkpoint is not None
    assert first.seen == [None, str(done.checkpoint.with_name("epoch-0001.pt"))]
    assert _supervision.newest_checkpoint() == str(done.checkpoint)
    again = _Watching()
    resumed = bz.Trainer().fit(
        tiny_setup(), config.with_overrides(epochs=3), [again], checkpoint_dir=tmp_path
    )
    assert again.seen == [str(resumed.resumed_from)] == [str(done.checkpoint)]
    fresh = _Watching()
    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, device="cpu"), [fresh])
    assert fresh.seen == [None]  # another run in the same process: none of its own
