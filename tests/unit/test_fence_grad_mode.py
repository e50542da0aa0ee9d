"""Grad mode read in place by the random fence: put back after a plugin's hook, per thread.

Where torch's c10 library exports the thread's autograd state (Linux and macOS builds),
the fence keeps grad mode's word beside the generators' fingerprints, so a per-batch round
compares it with the rest instead of asking torch twice. These tests hold it to what
grad mode's reads promised: a plugin that turns grad mode off finds it put back after its
hook, a change the loop makes between rounds stays, and a run on another thread gets the
grad mode of its own thread, never another's.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from bz.plugins import PluginContext, _fence
from bz.plugins._sandbox import PluginSet

HOOK = "after_backward"

in_place = pytest.mark.skipif(
    sys.platform not in ("linux", "darwin"), reason="c10's autograd state read in place"
)


class GradOff:
    """Turns grad mode off in every call (and never back on)."""

    name = "grad_off"

    def __init__(self) -> None:
        self.calls = 0

    def after_backward(self, context: PluginContext) -> None:
        self.calls += 1
        torch.set_grad_enabled(False)


def _rounds(plugin_set: PluginSet, context: PluginContext, count: int) -> list[bool]:
    """Grad mode after each of ``count`` rounds, the loop's own switched on before each."""
    seen = []
    for _ in range(count):
        torch.set_grad_enabled(True)
        plugin_set.call(HOOK, context)
        seen.append(torch.is_grad_enabled())
    return seen


@in_place
def test_the_fence_holds_grad_mode_where_torch_exports_its_state() -> None:
    fence = _fence.random_fence()
    assert fence.grad
    fence.refresh()
    torch.set_grad_enabled(False)
    try:
        assert fence.live != fence.copies  # the one comparison sees grad mode change
        fence.restore()
        assert torch.is_grad_enabled()
        assert fence.live == fence.copies
    finally:
        torch.set_grad_enabled(True)


@in_place
def test_grad_mode_a_plugin_turns_off_is_back_on_after_every_generated_round() -> None:
    plugin = GradOff()
    plugin_set = PluginSet([(plugin, (HOOK,))], policy="isolate")
    context = PluginContext()
    seen = _rounds(plugin_set, context, 40)
    round_ = plugin_set._table[HOOK]
    assert round_ is not None
    assert plugin_set.callers[HOOK] is round_.run
    assert plugin_set._fence is not None
    assert plugin_set._fence.grad
    assert seen == [True] * 40
    assert plugin.calls == 40


@in_place
def test_grad_mode_the_loop_turned_off_stays_off_after_a_round() -> None:
    class Quiet:
        name = "quiet"

        def after_backward(self, context: PluginContext) -> None:
            pass

    plugin_set = PluginSet([(Quiet(), (HOOK,))], policy="isolate")
    context = PluginContext()
    _rounds(plugin_set, context, 20)
    try:
        for enabled in (False, True, False, False, True):
            torch.set_grad_enabled(enabled)
            plugin_set.call(HOOK, context)
            assert torch.is_grad_enabled() is enabled
    finally:
        torch.set_grad_enabled(True)


@in_place
def test_a_run_on_another_thread_gets_its_own_threads_grad_mode_back() -> None:
    plugin = GradOff()
    plugin_set = PluginSet([(plugin, (HOOK,))], policy="isolate")
    _rounds(plugin_set, PluginContext(), 20)  # the fence is built here, on this thread
    first = plugin_set._fence
    seen: list[bool] = []
    elsewhere: list[object] = []

    def run() -> None:  # a second run (a new context), on a thread of its own
        seen.extend(_rounds(plugin_set, PluginContext(), 20))
        elsewhere.append(plugin_set._fence)

    torch.set_grad_enabled(False)  # this thread's grad mode, which nothing may touch
    try:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    assert seen == [True] * 20
    assert elsewhere
    assert elsewhere[0] is not first


def test_without_the_exported_state_the_round_reads_grad_mode_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_fence, "_grad_word", lambda torch: None)
    plugin = GradOff()
    plugin_set = PluginSet([(plugin, (HOOK,))], policy="isolate")
    seen = _rounds(plugin_set, PluginContext(), 40)
    assert plugin_set._fence is not None
    assert not plugin_set._fence.grad
    round_ = plugin_set._table[HOOK]
    assert round_ is not None
    assert plugin_set.callers[HOOK] is round_.run
    assert seen == [True] * 40


def test_what_the_watchdog_runs_while_it_forces_a_call_out_is_never_traced() -> None:
    # While a hook is forced out, a trace function raises in every new frame that is
    # not the watchdog's own; telling which plugin a generated round runs (Straight's
    # methods) happens inside that check, so each must be one of its own (a method
    # left out made the forced call never end: the process exited after EXIT_AFTER_S).
    import inspect

    from bz.plugins._watchdog import _OWN_CODES, Straight

    methods = [m for m in vars(Straight).values() if inspect.isfunction(m)]
    assert {"at", "position", "index"} <= {m.__name__ for m in methods}
    # ``index`` reads a traceback once the exception has left the call; the others are
    # what ``Watchdog.current`` calls to tell the running plugin.
    asked = {m.__code__ for m in methods if m.__name__ not in ("__init__", "index")}
    assert asked <= _OWN_CODES
