"""The random fence puts back torch's, Python's and NumPy's global generators.

Whatever happens between ``mark`` and ``put_back`` (a few draws, enough draws to
regenerate the Mersenne Twister's words, a reseed, a cached Gaussian), the numbers drawn
afterwards are those that would have been drawn without it. Both the fast path (the
generators read in place) and the generic one (``getstate``/``setstate``) are checked.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bz.plugins._fence import RandomFence, _FastFence, _GenericFence, random_fence

Draw = Callable[[], object]


def _next_numbers() -> tuple[list[float], float, float, list[float]]:
    return (
        torch.rand(5).tolist(),
        random.random(),
        random.gauss(0.0, 1.0),
        numpy.random.rand(5).tolist(),
    )


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)


def _plugin_draws(torch_count: int, python_count: int, numpy_count: int, reseed: bool) -> None:
    torch.rand(torch_count)
    for _ in range(python_count):
        random.random()
    random.gauss(0.0, 1.0)  # leaves a cached second Gaussian behind
    numpy.random.rand(numpy_count)
    if reseed:
        random.seed(99)
        numpy.random.seed(99)
        torch.manual_seed(99)


FENCES: dict[str, Callable[[], RandomFence]] = {"fast": random_fence, "generic": _GenericFence}


def test_this_interpreter_gets_the_fast_fence() -> None:
    assert isinstance(random_fence(), _FastFence)


@pytest.mark.parametrize("kind", list(FENCES))
@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**32 - 1),
    loop_draws=st.integers(0, 700),
    torch_count=st.integers(0, 2000),
    python_count=st.integers(0, 1500),
    numpy_count=st.integers(0, 1500),
    reseed=st.booleans(),
)
def test_what_plugins_draw_never_reaches_the_loop(
    kind: str,
    seed: int,
    loop_draws: int,
    torch_count: int,
    python_count: int,
    numpy_count: int,
    reseed: bool,
) -> None:
    fence = FENCES[kind]()

    def loop_until_the_hook() -> None:
        # The loop's own draws before the hook (they may regenerate the words too).
        for _ in range(loop_draws):
            random.random()
        numpy.random.rand(loop_draws)
        torch.rand(loop_draws)

    _seed(seed)
    loop_until_the_hook()
    expected = _next_numbers()

    _seed(seed)
    loop_until_the_hook()
    mark = fence.mark()
    _plugin_draws(torch_count, python_count, numpy_count, reseed)
    fence.put_back(mark)
    assert _next_numbers() == expected


@pytest.mark.parametrize("kind", list(FENCES))
def test_a_fence_with_no_draws_changes_nothing_and_can_be_used_again(kind: str) -> None:
    fence = FENCES[kind]()
    _seed(1)
    expected = [_next_numbers() for _ in range(3)]
    _seed(1)
    got = []
    for _ in range(3):
        fence.put_back(fence.mark())
        mark = fence.mark()
        _plugin_draws(3, 3, 3, reseed=False)
        fence.put_back(mark)
        got.append(_next_numbers())
    assert got == expected
