"""The fence's gathered fingerprints: one comparison sees a change to any of their bytes.

The fast fence compares the words of all its generators' fingerprints, which lie in
several places, as one memoryview per side (``bz.plugins._gathered``). These tests build
a fence over generator states of their own (plain memory laid out like the real ones)
and change single bytes in them: a change anywhere in a fingerprint is seen, and writing
the copy back makes the two sides equal again.
"""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples

from bz.plugins._fence import _TORCH_NORMALS, _TORCH_SIZE, _FastFence, _Twister, random_fence
from bz.plugins._gathered import gathered

# The real generators' fingerprints: torch's engine, Python's Twister, NumPy's Twister
# and NumPy's cached Gaussian (see bz.plugins._fence).
LAYOUTS: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = (
    (_TORCH_SIZE, ((0, 24), (_TORCH_NORMALS, 28))),
    (4 + 2496, ((0, 16),)),
    (2496 + 4, ((2488, 12),)),
    (16, ((0, 16),)),
)


def _fence() -> tuple[_FastFence, list[ctypes.Array[ctypes.c_char]]]:
    states = [
        (ctypes.c_char * size)(*(bytes([n % 251]) for n in range(size))) for size, _ in LAYOUTS
    ]
    twisters = [
        _Twister(ctypes.addressof(state), size, prints)
        for state, (size, prints) in zip(states, LAYOUTS, strict=True)
    ]
    fence = _FastFence(*twisters)
    fence.refresh()
    return fence, states


def test_this_interpreter_compares_one_gathered_view_per_side() -> None:
    fence = random_fence()
    assert isinstance(fence.live, memoryview)
    assert isinstance(fence.copies, memoryview)


@settings(max_examples=examples(200))
@given(data=st.data())
def test_a_change_to_any_fingerprint_byte_is_seen_and_put_back(data: st.DataObject) -> None:
    fence, states = _fence()
    assert isinstance(fence.live, memoryview)
    assert fence.live == fence.copies
    which = data.draw(st.integers(0, len(LAYOUTS) - 1))
    offset, length = data.draw(st.sampled_from(LAYOUTS[which][1]))
    at = offset + data.draw(st.integers(0, length - 1))
    before = bytes(states[which])
    states[which][at] = bytes([(before[at] + data.draw(st.integers(1, 255))) % 256])
    assert fence.live != fence.copies
    fence.restore()
    assert fence.live == fence.copies
    assert bytes(states[which]) == before


def test_bytes_outside_the_fingerprints_are_not_compared() -> None:
    fence, states = _fence()
    states[0][100] = b"\xff" if states[0][100] != b"\xff" else b"\x00"
    assert fence.live == fence.copies


@pytest.mark.parametrize("count", [1, 3, 13])
def test_a_gathered_view_shows_the_words_where_they_lie(count: int) -> None:
    words = [ctypes.c_uint64(n * 0x0101010101010101) for n in range(count)]
    made = gathered([ctypes.addressof(word) for word in reversed(words)])
    assert made is not None
    assert made.view.tolist() == [word.value for word in reversed(words)]
    words[0].value += 1
    assert made.view.tolist()[-1] == words[0].value
