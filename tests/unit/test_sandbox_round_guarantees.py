"""What a round of plugin calls leaves behind: the loop's random streams, grad mode.

Whatever plugins draw from the global generators in any round (torch's, Python's
``random`` with its cached Gaussian, NumPy's), and whether they return, raise or turn
grad mode off, the numbers the loop draws afterwards are those of a run without them,
and grad mode is what the loop had. These tests drive a ``PluginSet`` through many
rounds, so that both kinds of round run: most as one generated function, a sample
timed plugin by plugin.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from unittest import mock

import numpy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples

from bz.plugins import PluginContext, _fence
from bz.plugins._sandbox import PluginSet

HOOK = "after_backward"
ROUNDS = 48


def _reseed() -> None:
    torch.manual_seed(7)
    random.seed(7)
    numpy.random.seed(7)


ACTIONS: dict[str, Callable[[], object]] = {
    "torch": lambda: torch.rand(3),
    "torch_normal": lambda: torch.randn(1),  # takes the cached normal, or leaves one
    "many": lambda: torch.randint(0, 10, (700,)),  # regenerates the words
    "python": random.random,
    "gauss": lambda: random.gauss(0.0, 1.0),  # takes the cached Gaussian, or leaves one
    "numpy": lambda: numpy.random.rand(3),
    "reseed": _reseed,
    "grad_off": lambda: torch.set_grad_enabled(False),
}


class Drawer:
    """Does, in its n-th call, the actions ``plan`` lists for n; raises if told to."""

    def __init__(self, name: str, plan: dict[int, tuple[list[str], bool]]) -> None:
        self.name, self.plan, self.called = name, plan, 0

    def after_backward(self, context: PluginContext) -> None:
        self.called += 1
        actions, fail = self.plan.get(self.called, ([], False))
        for action in actions:
            ACTIONS[action]()
        if fail:
            raise RuntimeError("fails after drawing")


def _loop_draws(kind: int) -> list[float]:
    # What the loop draws between two rounds (nothing, or from one or all generators),
    # or grad mode switched by the loop (as validation does): a round must not undo it.
    if kind == 0:
        return []
    if kind == 5:
        torch.set_grad_enabled(not torch.is_grad_enabled())
        return []
    if kind == 1:
        return torch.rand(2).tolist()
    if kind == 2:
        return [random.random(), random.gauss(0.0, 1.0)]
    if kind == 3:
        return [float(value) for value in numpy.random.rand(2)]
    return [*torch.randn(1).tolist(), random.random(), float(numpy.random.rand())]


def _run(plugins: list[Drawer], between: list[int], seed: int) -> tuple[list[object], int]:
    """The loop's draws and grad mode after every round; the rounds run straight."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)
    plugin_set = PluginSet([(plugin, (HOOK,)) for plugin in plugins], policy="isolate")
    context = PluginContext()
    seen: list[object] = []
    straight = 0
    try:
        for index in range(ROUNDS):
            seen.append(_loop_draws(between[index % len(between)]))
            round_ = plugin_set._table[HOOK]
            straight += round_ is not None and plugin_set.callers[HOOK] is round_.run
            plugin_set.call(HOOK, context)
            seen.append(torch.is_grad_enabled())
        seen.append(_loop_draws(4))
    finally:
        torch.set_grad_enabled(True)
    return seen, straight


@settings(max_examples=examples(40), deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    between=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    plans=st.lists(
        st.dictionaries(
            st.integers(1, ROUNDS),
            st.tuples(st.lists(st.sampled_from(sorted(ACTIONS)), max_size=3), st.booleans()),
            max_size=6,
        ),
        min_size=1,
        max_size=4,
    ),
    grad_in_place=st.booleans(),
)
def test_what_plugins_draw_in_any_round_never_reaches_the_loop(
    seed: int,
    between: list[int],
    plans: list[dict[int, tuple[list[str], bool]]],
    grad_in_place: bool,
) -> None:
    expected, _ = _run([], between, seed)
    # One that never draws nor fails: there is a round to run after any quarantine.
    drawers = [Drawer(f"p{i}", plan) for i, plan in enumerate(plans)] + [Drawer("quiet", {})]
    # Grad mode read in place by the fence where torch allows it (this machine), or
    # read by the round itself (the fallback).
    with mock.patch.object(
        _fence, "_grad_word", _fence._grad_word if grad_in_place else lambda torch: None
    ):
        got, straight = _run(drawers, between, seed)
    assert got == expected
    assert straight > ROUNDS // 2  # most rounds ran as one generated function
