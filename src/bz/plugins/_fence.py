"""The random fence: what a plugin draws from the global generators never reaches training.

Around every hook call that some plugin implements, the sandbox marks the state of the
global generators the loop draws from (torch's CPU generator, the current CUDA device's
when CUDA is initialised, Python's ``random`` and NumPy's legacy ``numpy.random``) and
puts it back afterwards. A plugin may draw freely; the data order, dropout masks and
weights that follow are those of a run without it.

Costs, per fenced hook call (not per plugin): torch's ``get_state``/``set_state`` pair
always; for Python's and NumPy's Mersenne Twisters, four integer reads from the live
generator (its index and two words, which change whenever the words are regenerated),
and the 2.5 KB copy only when a plugin really drew or the loop's own draws regenerated
the words since the last copy. Reading those generators through their public
``getstate()`` costs far more (docs/performance.md, "What keeps the loop cheap"); the
layout they are read through is checked against ``getstate()`` once, and where it does
not match (another Python implementation, another NumPy), the fence falls back to
``getstate``/``setstate``.

:func:`random_fence` builds the fence once per run: the flat :class:`_FastFence` for the
common case (torch on CPU, both twisters readable in place), :class:`_GenericFence`
otherwise (CUDA, or a fallback).

Known gap: NumPy's legacy ``randn``/``normal`` keep a cached second Gaussian outside the
Twister's words. A plugin that consumes that cached value without drawing anything else
is not seen (Python's ``random.gauss`` cache is put back).
"""

from __future__ import annotations

import ctypes
import random
import sys
from typing import Any

_WORDS = 624
_WORDS_BYTES = _WORDS * 4


class _Twister:
    """A Mersenne Twister read in place: its 624 words, its index, and a lazy copy."""

    __slots__ = ("_copied", "_copy", "_index", "_print", "_words")

    def __init__(self, words_address: int, index_address: int) -> None:
        self._words = words_address
        self._index = ctypes.c_int.from_address(index_address)
        # Words 2 and 3, read as one integer: regenerating the words changes them
        # (unless by a 1-in-2**64 coincidence).
        self._print = ctypes.c_uint64.from_address(words_address + 8)
        self._copy = (ctypes.c_uint32 * _WORDS)()
        self._copied = -1

    def mark(self) -> tuple[int, int]:
        """The current index and fingerprint; refreshes the copy when the words changed."""
        fingerprint = self._print.value
        if fingerprint != self._copied:
            ctypes.memmove(self._copy, self._words, _WORDS_BYTES)
            self._copied = fingerprint
        return self._index.value, fingerprint

    def put_back(self, mark: tuple[int, int]) -> None:
        """Undo every draw since :meth:`mark` (a no-op when there was none)."""
        index, fingerprint = mark
        if self._index.value != index or self._print.value != fingerprint:
            ctypes.memmove(self._words, self._copy, _WORDS_BYTES)
            self._index.value = index


def _python_twister(generator: random.Random) -> _Twister | None:
    """``generator`` read in place, if CPython's layout is the one checked here."""
    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    # CPython's RandomObject: PyObject_HEAD (16 bytes), int index, uint32_t state[624].
    probe = random.Random(20240601)
    probe.random()
    base = id(probe) + 16
    if not _matches(probe.getstate()[1], base + 4, base):
        return None
    twister = _Twister(base + 4, base)
    mark = twister.mark()
    before = probe.getstate()
    probe.random()
    twister.put_back(mark)
    if probe.getstate() != before:
        return None
    return _Twister(id(generator) + 20, id(generator) + 16)


def _matches(state: tuple[int, ...], words_address: int, index_address: int) -> bool:
    words = (ctypes.c_uint32 * _WORDS).from_address(words_address)
    return list(words) == list(state[:_WORDS]) and (
        ctypes.c_int.from_address(index_address).value == state[_WORDS]
    )


def _numpy_twister(numpy: Any) -> _Twister | None:
    """NumPy's global legacy generator read in place, if it is an MT19937 as expected."""
    try:
        bit_generator = numpy.random.mtrand._rand._bit_generator
        if type(bit_generator).__name__ != "MT19937":
            return None
        address = int(bit_generator.ctypes.state_address)
        state = bit_generator.state["state"]
    except (AttributeError, KeyError, TypeError):
        return None
    # mt19937_state: uint32_t key[624]; int pos.
    words = (ctypes.c_uint32 * _WORDS).from_address(address)
    position = ctypes.c_int.from_address(address + _WORDS_BYTES)
    if list(words) != [int(word) for word in state["key"]] or position.value != int(state["pos"]):
        return None
    return _Twister(address, address + _WORDS_BYTES)


class _GenericFence:
    """Any mix of generators, including the slow fallbacks (see the module docstring)."""

    __slots__ = ("_cuda", "_numpy", "_numpy_slow", "_python", "_torch")

    def __init__(self) -> None:
        torch = sys.modules.get("torch")
        self._torch: Any = torch.default_generator if torch is not None else None
        self._cuda: Any = None
        if torch is not None and torch.cuda.is_initialized():
            self._cuda = torch.cuda.default_generators[torch.cuda.current_device()]
        self._python = _python_twister(random._inst)
        numpy = sys.modules.get("numpy")
        self._numpy = _numpy_twister(numpy) if numpy is not None else None
        self._numpy_slow: Any = (
            numpy.random.mtrand._rand if numpy is not None and self._numpy is None else None
        )

    def mark(self) -> tuple[Any, ...]:
        """The state to put back after the plugins' calls."""
        python = self._python
        numpy = self._numpy
        return (
            self._torch.get_state() if self._torch is not None else None,
            self._cuda.get_state() if self._cuda is not None else None,
            python.mark() if python is not None else random.getstate(),
            random._inst.gauss_next,  # type: ignore[attr-defined]  # see __init__
            numpy.mark() if numpy is not None else None,
            self._numpy_slow.get_state() if self._numpy_slow is not None else None,
        )

    def put_back(self, mark: tuple[Any, ...]) -> None:
        """Undo whatever the plugins drew since :meth:`mark`."""
        torch_state, cuda_state, python_mark, gauss_next, numpy_mark, numpy_state = mark
        if torch_state is not None:
            self._torch.set_state(torch_state)
        if cuda_state is not None:
            self._cuda.set_state(cuda_state)
        if self._python is not None:
            self._python.put_back(python_mark)
        else:
            random.setstate(python_mark)
        random._inst.gauss_next = gauss_next  # type: ignore[attr-defined]  # see __init__
        if numpy_mark is not None:
            assert self._numpy is not None
            self._numpy.put_back(numpy_mark)
        elif numpy_state is not None:
            self._numpy_slow.set_state(numpy_state)


class _Fixed:
    """Stands in for a twister's index or fingerprint when there is no such generator."""

    __slots__ = ()
    value = 0


class _NoTwister(_Twister):
    """NumPy not imported: nothing to mark, nothing to put back."""

    def __init__(self) -> None:  # deliberately no super(): there is no memory to read
        self._index = _Fixed()  # type: ignore[assignment]  # duck-typed: only .value is read
        self._print = _Fixed()  # type: ignore[assignment]  # duck-typed: only .value is read
        self._copied = 0


class _FastFence:
    """The common case, flattened: torch's CPU generator, Python's and NumPy's twisters.

    One tuple per mark and no method calls on the no-draw path: this runs around every
    batch hook some plugin implements.
    """

    __slots__ = ("_get", "_instance", "_numpy", "_python", "_set")

    def __init__(self, torch_generator: Any, python: _Twister, numpy: _Twister) -> None:
        self._get = torch_generator.get_state
        self._set = torch_generator.set_state
        self._python = python
        self._numpy = numpy
        self._instance = random._inst

    def mark(self) -> tuple[Any, ...]:
        """The state to put back after the plugins' calls."""
        python, numpy = self._python, self._numpy
        python_print = python._print.value
        if python_print != python._copied:
            python.mark()
        numpy_print = numpy._print.value
        if numpy_print != numpy._copied:
            numpy.mark()
        return (
            self._get(),
            python._index.value,
            python_print,
            self._instance.gauss_next,  # type: ignore[attr-defined]  # Random's cached second Gaussian
            numpy._index.value,
            numpy_print,
        )

    def put_back(self, mark: tuple[Any, ...]) -> None:
        """Undo whatever the plugins drew since :meth:`mark`."""
        self._set(mark[0])
        python, numpy = self._python, self._numpy
        if python._index.value != mark[1] or python._print.value != mark[2]:
            python.put_back((mark[1], mark[2]))
        self._instance.gauss_next = mark[3]  # type: ignore[attr-defined]  # see mark()
        if numpy._index.value != mark[4] or numpy._print.value != mark[5]:
            numpy.put_back((mark[4], mark[5]))


RandomFence = _FastFence | _GenericFence


def random_fence() -> RandomFence:
    """A fence for the generators this process uses now (call once torch is set up)."""
    torch = sys.modules.get("torch")
    numpy = sys.modules.get("numpy")
    python = _python_twister(random._inst)
    numpy_twister = _numpy_twister(numpy) if numpy is not None else _NoTwister()
    cuda = torch is not None and torch.cuda.is_initialized()
    if torch is None or cuda or python is None or numpy_twister is None:
        return _GenericFence()
    return _FastFence(torch.default_generator, python, numpy_twister)
