"""What the training process tells a supervising ``bz train``, and how that one reads it.

The end-to-end behaviour (deaths, restarts, signals) is in
``tests/integration/test_supervisor.py``; here, the parts in one process: the sandbox's
plugin/hook index, the hang detector's rule, the options' bad values.
"""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner
from tests._support import tiny_setup

import bz
from bz import _supervision
from bz.commands import cli
from bz.commands.supervise import HUNG_AFTER_S, _Pulse
from bz.config import RunConfig
from bz.plugins import HOOK_NAMES, PluginContext
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
