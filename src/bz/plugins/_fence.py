"""The random fence: what a plugin draws from the global generators never reaches training.

Around every hook call that some plugin implements, the sandbox marks the state of the
global generators the loop draws from (torch's CPU generator, the current CUDA device's
when CUDA is initialised, Python's ``random`` and NumPy's legacy ``numpy.random``) and
puts it back afterwards. A plugin may draw freely; the data order, dropout masks and
weights that follow are those of a run without it.

Costs, per fenced hook call (not per plugin): every generator is read in place, a few
bytes of it that any draw changes (its fingerprint: for torch's CPU generator its seed,
position and first word and its cached normal samples; for Python's and NumPy's
Mersenne Twisters their index and a few words), once before the plugins and once after;
the state itself (about 2.5 KB each) is copied only when the
fingerprint moved since the last copy (the loop drew since), and written back only when
a plugin really drew. torch's ``get_state``/``set_state`` pair, which the fence used
before, cost several times more than the whole round; reading the Twisters through
their public ``getstate()`` costs far more still (docs/performance.md, "What keeps the
loop cheap"). The layouts read here are checked against ``getstate()`` / torch's
``get_state()`` once, by drawing from a probe generator; where one does not match
(another Python implementation, another NumPy or torch build), the fence falls back to
the public calls.

:func:`random_fence` builds the fence once per run: the flat :class:`_FastFence` for the
common case (torch on CPU, all three generators readable in place), :class:`_GenericFence`
otherwise (CUDA, or a fallback).

Known gap: NumPy's legacy ``randn``/``normal`` keep a cached second Gaussian outside the
Twister's words. A plugin that consumes that cached value without drawing anything else
is not seen (Python's ``random.gauss`` cache is put back).
"""

from __future__ import annotations

import ctypes
import random
import struct
import sys
from typing import Any

_WORDS = 624
_WORDS_BYTES = _WORDS * 4


class _Twister:
    """A generator's state read in place: ``size`` bytes at ``start`` and a lazy copy.

    ``fingerprint`` is a few bytes of that state which every draw changes: a Twister's
    index (its position in the words) and some words (they change when the words are
    regenerated, unless by a 1-in-2**64 coincidence). Marking reads them; the copy is
    refreshed only when they differ from the copied ones (the loop drew since).
    """

    __slots__ = ("_copied", "_copy", "_print", "_size", "_start")

    def __init__(self, start: int, size: int, fingerprint: int, length: int) -> None:
        self._start = start
        self._size = size
        self._print = (ctypes.c_char * length).from_address(fingerprint)
        self._copy = (ctypes.c_char * size)()
        self._copied = b""

    def mark(self) -> bytes:
        """The current fingerprint; refreshes the copy when the state changed."""
        fingerprint = self._print.raw
        if fingerprint != self._copied:
            self.refresh(fingerprint)
        return fingerprint

    def refresh(self, fingerprint: bytes) -> None:
        """Copy the state, whose fingerprint is ``fingerprint``."""
        ctypes.memmove(self._copy, self._start, self._size)
        self._copied = fingerprint

    def put_back(self, mark: bytes) -> None:
        """Undo every draw since :meth:`mark` (a no-op when there was none)."""
        if self._print.raw != mark:
            self.restore()

    def restore(self) -> None:
        """Write the copy back."""
        ctypes.memmove(self._start, self._copy, self._size)


def _cpython_twister(index_address: int) -> _Twister:
    # CPython's RandomObject from its int index on: the index, then uint32_t state[624].
    return _Twister(index_address, 4 + _WORDS_BYTES, index_address, 16)


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
    twister = _cpython_twister(base)
    mark = twister.mark()
    before = probe.getstate()
    probe.random()
    twister.put_back(mark)
    if probe.getstate() != before:
        return None
    return _cpython_twister(id(generator) + 16)


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
    # The fingerprint: the last two words and the position right after them.
    return _Twister(address, _WORDS_BYTES + 4, address + _WORDS_BYTES - 8, 12)


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


class _NoTwister(_Twister):
    """NumPy not imported: nothing to mark, nothing to put back."""

    def __init__(self) -> None:  # deliberately no super(): there is no memory to read
        self._print = _EMPTY  # type: ignore[assignment]  # duck-typed: only .raw is read
        self._copied = b""


class _Empty:
    """Stands in for a fingerprint when there is no generator: always the same bytes."""

    __slots__ = ()
    raw = b""


_EMPTY = _Empty()

# torch's CPU generator (CPUGeneratorImpl), from its mt19937 engine on: uint64 seed_,
# int left_, bool seeded_, uint32 next_, uint32 state_[624]; then the cached normals
# std::optional<float> and std::optional<double>. Found and checked by _torch_engine.
_TORCH_SIZE = 20 + _WORDS_BYTES + 28
_TORCH_NORMALS = 20 + _WORDS_BYTES
"""Where the two cached normals start (the fingerprint's second part)."""


class _TorchTwister(_Twister):
    """torch's CPU generator read in place: any draw changes ``left_`` and ``next_``
    (or regenerates the words, ``state_[0]`` among them), a reseed ``seed_``, a normal
    sample taken or cached the optionals; the fingerprint is those bytes."""

    __slots__ = ("_normals",)

    def __init__(self, start: int) -> None:
        super().__init__(start, _TORCH_SIZE, start, 24)
        self._normals = (ctypes.c_char * 28).from_address(start + _TORCH_NORMALS)

    def mark(self) -> bytes:
        """The current fingerprint; refreshes the copy when the state changed."""
        fingerprint = self._print.raw + self._normals.raw
        if fingerprint != self._copied:
            self.refresh(fingerprint)
        return fingerprint

    def put_back(self, mark: bytes) -> None:
        """Undo every draw since :meth:`mark` (a no-op when there was none)."""
        if self._print.raw + self._normals.raw != mark:
            self.restore()


def _torch_twister(torch: Any) -> _TorchTwister | None:
    """torch's default CPU generator read in place, if its layout is the one checked here."""
    probe = torch.Generator()
    offset = _torch_engine(torch, probe)
    address = getattr(torch.default_generator, "_cdata", None)
    if offset is None or not isinstance(address, int):
        return None
    twister = _TorchTwister(probe._cdata + offset)
    mark = twister.mark()
    before = probe.get_state()
    torch.rand(3, generator=probe)
    torch.randn(1, generator=probe)  # takes the cached normal
    torch.randint(0, 10, (700,), generator=probe)  # regenerates the words
    probe.manual_seed(2**32 + 20240601)  # the same words, another seed_
    twister.put_back(mark)
    if not torch.equal(probe.get_state(), before):
        return None
    return _TorchTwister(address + offset)


def _torch_engine(torch: Any, probe: Any) -> int | None:
    """Where the engine starts in ``probe``'s generator object, checked field by field
    against ``get_state()`` (whose layout is torch's serialisation format)."""
    address = getattr(probe, "_cdata", None)
    if sys.implementation.name != "cpython" or not isinstance(address, int):
        return None
    probe.manual_seed(20240601)
    torch.rand(3, generator=probe)
    torch.randn(1, generator=probe)  # leaves a normal cached
    state = bytes(probe.get_state().tolist())
    # CPUGeneratorImplState: uint64 seed, int left, int seeded, uint64 next,
    # uint64 state[624], double normal_x, normal_y, normal_rho, int normal_is_valid;
    # float next_float_normal_sample, bool is_next_float_normal_sample_valid.
    if len(state) != 5056:
        return None
    seed, left, _, next_ = struct.unpack_from("<QiiQ", state, 0)
    words = struct.unpack_from(f"<{_WORDS}Q", state, 24)
    normal_y, normal_valid = struct.unpack_from("<8xdxxxxxxxxi", state, 24 + 8 * _WORDS)
    memory = ctypes.string_at(address, 512 + 16)
    found = memory.find(struct.pack("<4I", *words[:4]))
    if found < 20 or found % 4:
        return None
    start = address + found - 20
    engine = ctypes.string_at(start, _TORCH_SIZE)
    seed_in, left_in, next_in = struct.unpack_from("<Qi4xI", engine, 0)
    words_in = struct.unpack_from(f"<{_WORDS}I", engine, 20)
    cached, engaged = struct.unpack_from("<dB", engine, _TORCH_NORMALS + 12)
    if (seed_in, left_in, next_in, words_in) != (seed, left, next_, words):
        return None
    if not (normal_valid == 1 and engaged == 1 and cached == normal_y):
        return None
    return found - 20


class _FastFence:
    """The common case, flattened: torch's CPU generator, Python's and NumPy's twisters,
    all read in place.

    One tuple per mark and no method calls on the no-draw path: this runs around every
    batch hook some plugin implements. torch's whole state (2.5 KB) is read as one bytes
    object, which is both its fingerprint and its copy: one read costs less than the two
    short reads and the join its fingerprint took.
    """

    __slots__ = ("_instance", "_numpy", "_python", "_torch", "_torch_address", "_torch_state")

    def __init__(self, torch: _TorchTwister, python: _Twister, numpy: _Twister) -> None:
        self._torch = torch
        self._torch_state = (ctypes.c_char * _TORCH_SIZE).from_address(torch._start)
        self._torch_address = torch._start
        self._python = python
        self._numpy = numpy
        self._instance = random._inst

    def mark(self) -> tuple[Any, ...]:
        """The state to put back after the plugins' calls."""
        python, numpy = self._python, self._numpy
        python_print = python._print.raw
        if python_print != python._copied:
            python.refresh(python_print)
        numpy_print = numpy._print.raw
        if numpy_print != numpy._copied:
            numpy.refresh(numpy_print)
        return (
            self._torch_state.raw,
            python_print,
            self._instance.gauss_next,  # type: ignore[attr-defined]  # Random's cached second Gaussian
            numpy_print,
        )

    def put_back(self, mark: tuple[Any, ...]) -> None:
        """Undo whatever the plugins drew since :meth:`mark`."""
        if self._torch_state.raw != mark[0]:
            ctypes.memmove(self._torch_address, mark[0], _TORCH_SIZE)
        python, numpy = self._python, self._numpy
        if python._print.raw != mark[1]:
            python.restore()
        self._instance.gauss_next = mark[2]  # type: ignore[attr-defined]  # see mark()
        if numpy._print.raw != mark[3]:
            numpy.restore()


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
    torch_twister = _torch_twister(torch)
    if torch_twister is None:
        return _GenericFence()
    return _FastFence(torch_twister, python, numpy_twister)
