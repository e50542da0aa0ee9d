"""Rounds run as one generated function: nothing is stored per call, and every fault,
timeout and interruption is still the right plugin's, and the round goes on after it.

Most rounds of the per-batch hooks run as one generated function with a line per
plugin (a sample of them is timed plugin by plugin instead). These tests drive a
``PluginSet`` past its first (timed) round, so that the calls they check run that way.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bz.config import RunConfig
from bz.plugins import PluginContext
from bz.plugins._sandbox import PluginSet
from bz.plugins._watchdog import PluginInterrupted, PluginTimeout

HOOK = "after_backward"
ROUNDS = 40


class Plugin:
    """Counts its calls; does ``act`` (a callable of the call's number) in each one."""

    def __init__(self, name: str, act: Any = None) -> None:
        self.name, self.act, self.called = name, act, 0

    def after_backward(self, context: PluginContext) -> None:
        self.called += 1
        if self.act is not None:
            self.act(self.called)


def straight_next(plugins: PluginSet) -> bool:
    """Whether the next round of ``HOOK`` runs as one generated function (not timed)."""
    round_ = plugins._table[HOOK]
    return round_ is not None and round_.run is not None and round_.countdown > 1


def reported_calls(plugins: PluginSet) -> dict[str, int]:
    return {report.name: report.calls for report in plugins.report()}


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=6),
    data=st.data(),
    kept_traceback=st.booleans(),
)
def test_a_fault_in_any_round_is_the_raising_plugins_and_the_round_goes_on(
    size: int, data: st.DataObject, kept_traceback: bool
) -> None:
    faulty = data.draw(st.integers(min_value=0, max_value=size - 1), label="faulty")
    fail_at = data.draw(st.integers(min_value=1, max_value=ROUNDS), label="fail_at")
    # An exception raised before, elsewhere, and raised again: its old traceback must
    # not decide whose it is.
    stored = RuntimeError("stored")
    try:
        raise stored
    except RuntimeError:
        pass

    def fail(call: int) -> None:
        if call == fail_at:
            raise stored if kept_traceback else RuntimeError("boom")

    plugins_ = [Plugin(f"p{i}", fail if i == faulty else None) for i in range(size)]
    plugins = PluginSet([(plugin, (HOOK,)) for plugin in plugins_], policy="isolate")
    context = PluginContext()
    for _ in range(ROUNDS):
        plugins.call(HOOK, context)
    assert [plugin.called for plugin in plugins_] == [
        fail_at if i == faulty else ROUNDS for i in range(size)
    ]
    (fault,) = plugins.faults
    assert (fault.plugin, fault.stage) == (f"p{faulty}", HOOK)
    assert reported_calls(plugins) == {plugin.name: plugin.called for plugin in plugins_}


def test_ctrl_c_from_a_plugin_in_a_straight_round_ends_the_round_there() -> None:
    raise_now = [False]

    def interrupt(call: int) -> None:
        if raise_now[0]:
            raise KeyboardInterrupt

    plugins_ = [Plugin("first"), Plugin("second", interrupt), Plugin("third")]
    plugins = PluginSet([(plugin, (HOOK,)) for plugin in plugins_])
    context = PluginContext()
    plugins.call(HOOK, context)  # the first round is timed
    while not straight_next(plugins):
        plugins.call(HOOK, context)
    raise_now[0] = True
    try:
        plugins.call(HOOK, context)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("Ctrl-C was swallowed")
    called = [plugin.called for plugin in plugins_]
    assert called[0] == called[1] == called[2] + 1
    assert reported_calls(plugins) == {plugin.name: plugin.called for plugin in plugins_}
    assert plugins.faults == []


def test_a_second_ctrl_c_in_a_straight_round_is_the_running_plugins_fault() -> None:
    # What bz's handler does on a second Ctrl-C while a hook runs: the plugin running
    # now (read from the round's frame) gets the interruption, the others go on.
    plugins: PluginSet
    interrupt_now = [False]

    def hang(call: int) -> None:
        if interrupt_now[0]:
            interrupt_now[0] = False
            plugins.interrupt_running(signal.SIGINT)  # as the signal handler would

    plugins_ = [Plugin("first"), Plugin("second", hang), Plugin("third")]
    plugins = PluginSet([(plugin, (HOOK,)) for plugin in plugins_])
    context = PluginContext()
    plugins.call(HOOK, context)
    while not straight_next(plugins):
        plugins.call(HOOK, context)
    interrupt_now[0] = True
    plugins.call(HOOK, context)
    (fault,) = plugins.faults
    assert fault.plugin == "second"
    assert PluginInterrupted.__name__ in fault.error
    assert plugins_[0].called == plugins_[2].called == plugins_[1].called
    plugins.interrupt_running(signal.SIGINT)  # no plugin runs: nothing to interrupt
    plugins.close()


def test_a_timeout_in_a_straight_round_is_the_hanging_plugins_and_the_round_goes_on() -> None:
    hang_now = [False]

    def hang(call: int) -> None:
        if hang_now[0]:
            hang_now[0] = False
            time.sleep(30)  # interrupted by the timeout

    plugins_ = [Plugin("first"), Plugin("slow", hang), Plugin("third")]
    plugins = PluginSet([(plugin, (HOOK,)) for plugin in plugins_], policy="isolate")
    context = PluginContext()
    context.run_config = RunConfig(epochs=1, device="cpu", plugin_timeout=0.3)
    try:
        # Many short rounds first: the watchdog must not add them up into a timeout.
        started = time.perf_counter()
        while time.perf_counter() - started < 0.8 or not straight_next(plugins):
            plugins.call(HOOK, context)
        assert plugins.faults == []
        hang_now[0] = True
        started = time.perf_counter()
        plugins.call(HOOK, context)
        assert time.perf_counter() - started < 10
    finally:
        plugins.close()
    (fault,) = plugins.faults
    assert fault.plugin == "slow"
    assert PluginTimeout.__name__ in fault.error
    assert plugins_[0].called == plugins_[2].called == plugins_[1].called
