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
from tests._examples import examples

from bz.plugins._fence import RandomFence, _FastFence, _GenericFence, random_fence

Draw = Callable[[], object]


def _next_numbers() -> tuple[list[float], float, float, list[float], list[float]]:
    return (
        torch.rand(5).tolist(),
        random.random(),
        random.gauss(0.0, 1.0),
        numpy.random.rand(5).tolist(),
        # NumPy's legacy Gaussians: an odd count takes or leaves the cached second one
        # (``has_gauss``/``gauss``, kept outside the Twister's words).
        numpy.random.randn(3).tolist(),
    )


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)


def _plugin_draws(
    torch_count: int, python_count: int, numpy_count: int, reseed: bool, numpy_normals: int = 1
) -> None:
    torch.rand(torch_count)
    for _ in range(python_count):
        random.random()
    random.gauss(0.0, 1.0)  # leaves a cached second Gaussian behind
    numpy.random.rand(numpy_count)
    # One value only takes a cached Gaussian the loop left, without touching the words.
    numpy.random.randn(numpy_normals)
    if reseed:
        random.seed(99)
        numpy.random.seed(99)
        torch.manual_seed(99)


FENCES: dict[str, Callable[[], RandomFence]] = {"fast": random_fence, "generic": _GenericFence}


def test_this_interpreter_gets_the_fast_fence() -> None:
    assert isinstance(random_fence(), _FastFence)


@pytest.mark.parametrize("kind", list(FENCES))
@settings(max_examples=examples(40))
@given(
    seed=st.integers(0, 2**32 - 1),
    loop_draws=st.integers(0, 700),
    torch_count=st.integers(0, 2000),
    python_count=st.integers(0, 1500),
    numpy_count=st.integers(0, 1500),
    numpy_normals=st.integers(0, 5),
    reseed=st.booleans(),
)
def test_what_plugins_draw_never_reaches_the_loop(
    kind: str,
    seed: int,
    loop_draws: int,
    torch_count: int,
    python_count: int,
    numpy_count: int,
    numpy_normals: int,
    reseed: bool,
) -> None:
    fence = FENCES[kind]()

    def loop_until_the_hook() -> None:
        # The loop's own draws before the hook (they may regenerate the words too).
        for _ in range(loop_draws):
            random.random()
        numpy.random.rand(loop_draws)
        numpy.random.randn(loop_draws)  # an odd count leaves a cached Gaussian
        torch.rand(loop_draws)

    _seed(seed)
    loop_until_the_hook()
    expected = _next_numbers()

    _seed(seed)
    loop_until_the_hook()
    mark = fence.mark()
    _plugin_draws(torch_count, python_count, numpy_count, reseed, numpy_normals)
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


def _torch_draws(kind: int, count: int) -> None:
    if kind == 0:
        torch.randn(1)  # takes the cached normal, or leaves one behind
    elif kind == 1:
        torch.randn(count)
    elif kind == 2:
        torch.randint(0, 10, (count,))
    elif kind == 3:
        # The same 624 words as the seed it replaces (only the low 32 bits make the
        # words): the fence must still see the new seed (torch.initial_seed()).
        torch.manual_seed(torch.initial_seed() + 2**32)
    else:
        torch.normal(0.0, 1.0, (1,))


@pytest.mark.parametrize("kind", list(FENCES))
@settings(max_examples=examples(40))
@given(
    seed=st.integers(0, 2**32 - 1),
    cached=st.booleans(),
    draws=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 1300)), max_size=4),
)
def test_torchs_whole_generator_state_comes_back(
    kind: str, seed: int, cached: bool, draws: list[tuple[int, int]]
) -> None:
    # torch's CPU generator state is more than its words: the seed, and a cached
    # normal sample (randn of a few numbers takes one or leaves one behind).
    fence = FENCES[kind]()
    torch.manual_seed(seed)
    if cached:
        torch.randn(1)
    before, initial = torch.get_rng_state(), torch.initial_seed()
    mark = fence.mark()
    for draw, count in draws:
        _torch_draws(draw, count)
    fence.put_back(mark)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.initial_seed() == initial


@pytest.mark.parametrize("kind", list(FENCES))
def test_a_snapshot_inside_a_marked_round_leaves_the_round_to_be_put_back(kind: str) -> None:
    # A plugin's torch hook runs inside another plugin's hook: its fence (save/load)
    # sits inside the round's (mark/put_back), and both plugins' draws are undone.
    fence = FENCES[kind]()
    _seed(3)
    expected = _next_numbers()
    _seed(3)
    mark = fence.mark()
    _plugin_draws(5, 5, 5, reseed=False)  # the outer plugin, before its forward pass
    saved = fence.save()
    _plugin_draws(700, 700, 7, reseed=False)  # the torch hook
    fence.load(saved)
    _plugin_draws(1, 1, 1, reseed=True)  # the outer plugin again
    fence.put_back(mark)
    assert _next_numbers() == expected
