"""The random fence: what a plugin draws from the global generators never reaches training.

Around every hook call that some plugin implements, the sandbox marks the state of the
global generators the loop draws from (torch's CPU generator, the current CUDA device's
when CUDA is initialised, Python's ``random`` and NumPy's legacy ``numpy.random``) and
puts it back afterwards. A plugin may draw freely; the data order, dropout masks and
weights that follow are those of a run without it.

Costs, per fenced hook call (not per plugin): each generator's state is read in place,
never through its public API. The fence keeps a copy of every state between rounds and,
once before the plugins and once after, compares a few words of each live state that
any draw changes (its fingerprint: for torch's CPU generator its seed, position and
first word and its cached normal samples; for Python's and NumPy's Mersenne Twisters
their index and a few words) with the same words of its copy. With no draw that is two
comparisons of two memoryviews, made once, each gathering the words of every
fingerprint wherever they lie (:mod:`bz.plugins._gathered`), and no new object. A state (about
2.5 KB each) is copied only when its fingerprint moved before the plugins (the loop drew
since the last copy), and written back only when a plugin really drew. torch's
``get_state``/``set_state`` pair, which the fence used before, cost several times more
than the whole round; reading the Twisters through their public ``getstate()`` costs far
more still (docs/performance.md, "What keeps the
loop cheap"). The layouts read here are checked against ``getstate()`` / torch's
``get_state()`` once, by drawing from a probe generator; where one does not match
(another Python implementation, another NumPy or torch build), the fence falls back to
the public calls.

:func:`random_fence` builds the fence once per run: the flat :class:`_FastFence` for the
common case (torch on CPU, all three generators readable in place), :class:`_GenericFence`
otherwise (CUDA, or a fallback). The round's marks do not nest; a fence inside a round
(a plugin's torch hook) takes whole snapshots instead (``save``/``load``).

NumPy's legacy ``randn``/``normal`` keep a cached second Gaussian outside the Twister's
words, in the ``RandomState`` object itself (``has_gauss``, ``gauss``); the fence reads
those 16 bytes in place too, as a state of their own (:func:`_numpy_gauss`), as it puts
back Python's ``random.gauss`` cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from bz.plugins._gathered import WORD, Gathered, gathered

_WORDS = 624
_WORDS_BYTES = _WORDS * 4


class _Twister:
    """A generator's state read in place: ``size`` bytes at ``start``, and a copy of them.

    Its fingerprint is a few bytes of that state which every draw changes (a Twister's
    index, its position in the words, and some words, which change when the words are
    regenerated, unless by a 1-in-2**64 coincidence): ``prints`` pairs each such region
    of the live state with the same region of the copy, as memoryviews made once, so
    telling whether the generator moved since the copy is one comparison of a few words
    per region, with nothing read into a new object.
    """

    __slots__ = ("_copy", "_size", "_start", "prints", "regions")

    def __init__(self, start: int, size: int, prints: tuple[tuple[int, int], ...]) -> None:
        self._start = start
        self._size = size
        self._copy = (ctypes.c_char * size)()
        self.regions = prints
        self.prints = tuple(
            (
                _words(ctypes.c_char * length, start + offset),
                _copy_words(self._copy, offset, length),
            )
            for offset, length in prints
        )

    def moved(self) -> bool:
        """Whether the state differs from the copy (something drew since)."""
        return any(live != copy for live, copy in self.prints)

    def words(self) -> list[tuple[int, int]]:
        """The fingerprint as 8-byte words, ``(live address, copy address)``: every
        region covered exactly (a region's last word overlaps the one before it where
        its length is not a multiple of 8), for :func:`~bz.plugins._gathered.gathered`."""
        copy = ctypes.addressof(self._copy)
        found: list[tuple[int, int]] = []
        for offset, length in self.regions:
            starts = list(range(offset, offset + length - WORD + 1, WORD))
            if length % WORD:
                starts.append(offset + length - WORD)
            found.extend((self._start + start, copy + start) for start in starts)
        return found

    def refresh(self) -> None:
        """Copy the state."""
        ctypes.memmove(self._copy, self._start, self._size)

    def restore(self) -> None:
        """Write the copy back."""
        ctypes.memmove(self._start, self._copy, self._size)

    def snapshot(self) -> bytes:
        """The whole state, for :meth:`load` (the copy is left alone)."""
        return ctypes.string_at(self._start, self._size)

    def load(self, snapshot: bytes) -> None:
        """Put back what :meth:`snapshot` returned (a no-op when nothing drew since)."""
        if ctypes.string_at(self._start, self._size) != snapshot:
            ctypes.memmove(self._start, snapshot, self._size)


def _words(array_type: Any, address: int) -> memoryview:
    # A fingerprint region as 8-byte (or 4-byte) words: comparing two such views
    # compares a few words, not every byte one by one.
    view = memoryview(array_type.from_address(address)).cast("B")
    return view.cast("Q" if len(view) % 8 == 0 else "I")


def _copy_words(copy: Any, offset: int, length: int) -> memoryview:
    view = memoryview((ctypes.c_char * length).from_buffer(copy, offset)).cast("B")
    return view.cast("Q" if length % 8 == 0 else "I")


def _cpython_twister(index_address: int) -> _Twister:
    # CPython's RandomObject from its int index on: the index, then uint32_t state[624].
    # The fingerprint: the index and the first three words.
    return _Twister(index_address, 4 + _WORDS_BYTES, ((0, 16),))


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
    twister.refresh()
    before = probe.getstate()
    probe.random()
    if not twister.moved():
        return None
    twister.restore()
    if probe.getstate() != before or twister.moved():
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
    return _Twister(address, _WORDS_BYTES + 4, ((_WORDS_BYTES - 8, 12),))


_GAUSS_PROBE = 0.6180339887498949
"""A cached Gaussian no seed gives by chance, to find where a ``RandomState`` keeps it."""


def _numpy_gauss(numpy: Any) -> _Twister | None:
    """NumPy's global legacy generator's cached Gaussian (``int has_gauss``, padding,
    ``double gauss``: 16 bytes inside the ``RandomState`` object) read in place, found on
    a probe generator and checked against ``get_state()``; None where it is not so."""
    try:
        probe = numpy.random.RandomState(20240601)
        kind, key, position, _, _ = probe.get_state()
        probe.set_state((kind, key, position, 1, _GAUSS_PROBE))
        size = type(probe).__basicsize__
        found = ctypes.string_at(id(probe), size).find(struct.pack("d", _GAUSS_PROBE))
        if found < 8 or found % 8:
            return None
        offset = found - 8
        if ctypes.c_int.from_address(id(probe) + offset).value != 1:
            return None
        probe.set_state((kind, key, position, 0, 0.0))
        if ctypes.string_at(id(probe) + found, 8) != struct.pack("d", 0.0):
            return None
        if ctypes.c_int.from_address(id(probe) + offset).value != 0:
            return None
        generator = numpy.random.mtrand._rand
        if type(generator) is not type(probe):
            return None
        *_, has_gauss, gauss = generator.get_state()
        address = id(generator) + offset
        read = (
            ctypes.c_int.from_address(address).value,
            ctypes.c_double.from_address(address + 8).value,
        )
    except (AttributeError, TypeError, ValueError):
        return None
    if read != (int(has_gauss), float(gauss)):
        return None
    return _Twister(address, 16, ((0, 16),))


class _GenericFence:
    """Any mix of generators, including the slow fallbacks (see the module docstring).

    Every mark is a whole snapshot, so marks nest: this fence serves both levels.
    """

    __slots__ = (
        "_cuda",
        "_mark",
        "_numpy",
        "_numpy_gauss",
        "_numpy_slow",
        "_python",
        "_torch",
        "instance",
    )

    live = (0,)
    copies = (1,)
    """Never equal: a round always marks (``refresh``) and puts back (``restore``)."""
    grad = False
    """Grad mode is not in the fingerprints: a round reads it itself."""
    thread = 0

    def __init__(self) -> None:
        self.instance: Any = random._inst
        self._mark: tuple[Any, ...] | None = None
        torch = sys.modules.get("torch")
        self._torch: Any = torch.default_generator if torch is not None else None
        self._cuda: Any = None
        if torch is not None and torch.cuda.is_initialized():
            self._cuda = torch.cuda.default_generators[torch.cuda.current_device()]
        self._python = _python_twister(random._inst)
        numpy = sys.modules.get("numpy")
        self._numpy = _numpy_twister(numpy) if numpy is not None else None
        self._numpy_gauss = _numpy_gauss(numpy) if self._numpy is not None else None
        if self._numpy_gauss is None:
            self._numpy = None  # the public calls, which carry the cached Gaussian too
        self._numpy_slow: Any = (
            numpy.random.mtrand._rand if numpy is not None and self._numpy is None else None
        )

    def mark(self) -> tuple[Any, ...]:
        """The state to put back after the plugins' calls."""
        python = self._python
        numpy, gauss = self._numpy, self._numpy_gauss
        numpy_mark = None
        if numpy is not None and gauss is not None:
            numpy_mark = (numpy.snapshot(), gauss.snapshot())
        return (
            self._torch.get_state() if self._torch is not None else None,
            self._cuda.get_state() if self._cuda is not None else None,
            python.snapshot() if python is not None else random.getstate(),
            random._inst.gauss_next,  # type: ignore[attr-defined]  # see __init__
            numpy_mark,
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
            self._python.load(python_mark)
        else:
            random.setstate(python_mark)
        random._inst.gauss_next = gauss_next  # type: ignore[attr-defined]  # see __init__
        if numpy_mark is not None:
            assert self._numpy is not None
            assert self._numpy_gauss is not None
            self._numpy.load(numpy_mark[0])
            self._numpy_gauss.load(numpy_mark[1])
        elif numpy_state is not None:
            self._numpy_slow.set_state(numpy_state)

    save = mark
    load = put_back

    def refresh(self) -> None:
        """A round's start, as the sandbox inlines it (see :class:`_FastFence`)."""
        self._mark = self.mark()

    def restore(self) -> None:
        """A round's end: put back the state :meth:`refresh` marked."""
        mark, self._mark = self._mark, None
        if mark is not None:
            self.put_back(mark)


# torch's CPU generator (CPUGeneratorImpl), from its mt19937 engine on: uint64 seed_,
# int left_, bool seeded_, uint32 next_, uint32 state_[624]; then the cached normals
# std::optional<float> and std::optional<double>. Found and checked by _torch_engine.
_TORCH_SIZE = 20 + _WORDS_BYTES + 28
_TORCH_NORMALS = 20 + _WORDS_BYTES
"""Where the two cached normals start (the fingerprint's second part)."""


def _torch_twister_at(start: int) -> _Twister:
    # Any draw changes ``left_`` and ``next_`` (or regenerates the words, ``state_[0]``
    # among them), a reseed ``seed_``, a normal sample taken or cached the optionals:
    # the fingerprint is those bytes.
    return _Twister(start, _TORCH_SIZE, ((0, 24), (_TORCH_NORMALS, 28)))


def _torch_twister(torch: Any) -> _Twister | None:
    """torch's default CPU generator read in place, if its layout is the one checked here."""
    probe = torch.Generator()
    offset = _torch_engine(torch, probe)
    address = getattr(torch.default_generator, "_cdata", None)
    if offset is None or not isinstance(address, int):
        return None
    twister = _torch_twister_at(probe._cdata + offset)
    before = probe.get_state()
    twister.refresh()
    draws: tuple[tuple[Any, tuple[Any, ...]], ...] = (
        (torch.rand, (3,)),
        (torch.randn, (1,)),  # takes the cached normal
        (torch.randint, (0, 10, (700,))),  # regenerates the words
    )
    for draw, args in (*draws, (None, ())):
        if draw is None:
            probe.manual_seed(2**32 + 20240601)  # the same words, another seed_
        else:
            draw(*args, generator=probe)
        if not twister.moved():
            return None
        twister.restore()
        if not torch.equal(probe.get_state(), before) or twister.moved():
            return None
    return _torch_twister_at(address + offset)


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


class _GradWord:
    """Grad mode read in place: the 8-byte word of torch's thread-local
    ``AutogradState`` that holds its grad-mode bit (found by :func:`_grad_word`), and a
    copy of it, as the fence keeps of each generator's state. With it in the
    fingerprint, the fence's two comparisons also tell whether grad mode changed, and a
    round reads it no more (``torch.is_grad_enabled`` twice a round cost more than the
    comparisons' share of a word). The word is that of the thread that built the fence
    (``_FastFence.thread``): the sandbox builds another where a run starts on another
    thread.

    :meth:`restore` puts grad mode back through torch (never by writing the word); the
    word's other bits (inference mode, forward grad mode and the like, which the sandbox
    does not put back) are then taken as they are.
    """

    __slots__ = ("_copy", "_live", "_mask", "prints")

    def __init__(self, address: int, mask: int) -> None:
        self._live = ctypes.c_uint64.from_address(address)
        self._copy = ctypes.c_uint64(self._live.value)
        self._mask = mask
        self.prints = (
            (
                memoryview(self._live).cast("B").cast("Q"),
                memoryview(self._copy).cast("B").cast("Q"),
            ),
        )

    def words(self) -> list[tuple[int, int]]:
        """``(live address, copy address)`` of the word (see ``_Twister.words``)."""
        return [(ctypes.addressof(self._live), ctypes.addressof(self._copy))]

    def moved(self) -> bool:
        """Whether the word differs from the copy (grad mode or a bit beside it changed)."""
        return bool(self._live.value != self._copy.value)

    def refresh(self) -> None:
        """Copy the word."""
        self._copy.value = self._live.value

    def restore(self) -> None:
        """Put grad mode back to the copy's, then take the word as it is."""
        live, copy = self._live.value, self._copy.value
        if (live ^ copy) & self._mask:
            set_grad_mode(bool(copy & self._mask))
        self._copy.value = self._live.value


_TLS_STATE = "_ZN3c1013AutogradState13get_tls_stateEv"
"""``c10::AutogradState::get_tls_state()``: the calling thread's autograd state."""


def _grad_word(torch: Any) -> _GradWord | None:
    """The calling thread's grad-mode word, where torch's c10 library exports
    ``AutogradState::get_tls_state`` and exactly one bit near the address it returns
    follows ``torch.set_grad_enabled``; checked by turning grad mode off and on, and by
    running autograd between looks (the rest of the word must stay as it is, or each
    round would take it for a change). None otherwise: the round reads grad mode then."""
    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    library = None
    folder = Path(torch.__file__).parent / "lib"
    for name in ("libc10.so", "libc10.dylib"):
        with contextlib.suppress(OSError):
            library = ctypes.CDLL(str(folder / name))
            break
    getter = getattr(library, _TLS_STATE, None) if library is not None else None
    if getter is None:
        return None
    getter.restype = ctypes.c_void_p
    getter.argtypes = ()
    address = getter()
    if not isinstance(address, int) or address == 0 or getter() != address:
        return None
    span = 40  # torch 2.13's AutogradState is 32 bytes; the bit lies in its first 40

    def look(enabled: bool) -> bytes:
        torch.set_grad_enabled(enabled)
        if torch.is_grad_enabled() is not enabled:
            raise ValueError("grad mode did not follow")
        return ctypes.string_at(address, span)

    was = torch.is_grad_enabled()
    try:
        on, off, again = look(True), look(False), look(True)
        flips = [
            (index, a ^ b) for index, (a, b) in enumerate(zip(on, off, strict=True)) if a != b
        ]
        if on != again or len(flips) != 1 or flips[0][1] & (flips[0][1] - 1):
            return None
        index, bit = flips[0]
        for start in (index, index - 7):  # the word from the bit's byte on, else ending there
            if start < 0:
                continue
            word = _GradWord(address + start, bit << (8 * (index - start)))
            tensor = torch.ones(2, requires_grad=True)
            with torch.no_grad():
                tensor.mul(2)
            (tensor * tensor).sum().backward()
            with torch.inference_mode():
                tensor.add(1)
            if not word.moved() and _follows(torch, word):
                return word
    except ValueError:
        return None
    finally:
        torch.set_grad_enabled(was)
    return None


def _follows(torch: Any, word: _GradWord) -> bool:
    # Turning grad mode off is seen as a change, and put back by ``restore``.
    was = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(not was)
        if not word.moved():
            return False
        word.restore()
        return torch.is_grad_enabled() is was and not word.moved()
    finally:
        torch.set_grad_enabled(was)


class _FastFence:
    """The common case: torch's CPU generator, Python's and NumPy's twisters, all read in
    place, each with a copy of its state kept here between rounds.

    :meth:`mark` compares the generators' fingerprints with their copies' and copies a
    state anew only where the loop drew since; :meth:`put_back` compares again and writes
    a copy back only where a plugin drew. The fingerprints' regions, live and copied, sit
    in two tuples, so with no draw each is one comparison of two tuples: a few words per
    region, compared in C, and no new object. Marks do not nest (a mark inside another's
    span would replace the copy the outer one puts back): a fence inside a round, around
    a plugin's torch hook, uses :meth:`save` and :meth:`load`, which take whole snapshots.
    """

    __slots__ = (
        "_gathered",
        "_twisters",
        "_watched",
        "copies",
        "grad",
        "instance",
        "live",
        "thread",
    )

    def __init__(
        self, torch: _Twister, python: _Twister, *numpy: _Twister, grad: _GradWord | None = None
    ) -> None:
        # ``numpy``: none, or NumPy's Twister and its cached Gaussian.
        self._twisters = twisters = (torch, python, *numpy)
        self.grad = grad is not None
        """Whether the fingerprints include grad mode (:class:`_GradWord`): a round then
        reads it no more."""
        self.thread = threading.get_ident()
        """The thread whose grad mode the fingerprints include."""
        watched: tuple[_Twister | _GradWord, ...] = twisters
        if grad is not None:
            watched = (*twisters, grad)
        self._watched = watched
        self.live: Any = tuple(live for twister in watched for live, _ in twister.prints)
        """The fingerprints in the live states; ``copies``: in the copies. The sandbox
        compares the two itself (inlined :meth:`mark` and :meth:`put_back`): where it
        can be made, each is one memoryview gathering every fingerprint's words (one
        comparison in C; :mod:`bz.plugins._gathered`), otherwise a tuple of a
        memoryview per region."""
        self.copies: Any = tuple(copy for twister in watched for _, copy in twister.prints)
        words = [pair for twister in watched for pair in twister.words()]
        live, copies = gathered([a for a, _ in words]), gathered([b for _, b in words])
        self._gathered: tuple[Gathered, Gathered] | None = None
        if live is not None and copies is not None:
            self._gathered = (live, copies)
            self.live, self.copies = live.view, copies.view
        self.instance: Any = random._inst
        """``random``'s generator, whose cached Gaussian (``gauss_next``) the round
        keeps aside and puts back."""

    def refresh(self) -> None:
        """Copy the states that moved since their copies (the loop drew, or changed
        grad mode)."""
        for twister in self._watched:
            if twister.moved():
                twister.refresh()

    def restore(self) -> None:
        """Write back the copies of the states that moved since (a plugin drew), and
        grad mode (a plugin changed it)."""
        for twister in self._watched:
            if twister.moved():
                twister.restore()

    def mark(self) -> Any:
        """Make the copies current; what :meth:`put_back` needs besides them."""
        if self.live != self.copies:
            self.refresh()
        return self.instance.gauss_next

    def put_back(self, mark: Any) -> None:
        """Undo whatever the plugins drew since :meth:`mark`."""
        if self.live != self.copies:
            self.restore()
        instance = self.instance
        if instance.gauss_next is not mark:
            instance.gauss_next = mark

    def save(self) -> tuple[Any, ...]:
        """A whole snapshot, for :meth:`load` (these nest, and leave the copies alone)."""
        states = tuple(twister.snapshot() for twister in self._twisters)
        return (*states, self.instance.gauss_next)

    def load(self, saved: tuple[Any, ...]) -> None:
        """Put back what :meth:`save` returned."""
        for twister, state in zip(self._twisters, saved, strict=False):
            twister.load(state)
        self.instance.gauss_next = saved[-1]


RandomFence = _FastFence | _GenericFence


def random_fence() -> RandomFence:
    """A fence for the generators this process uses now (call once torch is set up)."""
    torch = sys.modules.get("torch")
    numpy = sys.modules.get("numpy")
    python = _python_twister(random._inst)
    numpy_twisters: tuple[_Twister | None, ...] = ()
    if numpy is not None:
        numpy_twisters = (_numpy_twister(numpy), _numpy_gauss(numpy))
    cuda = torch is not None and torch.cuda.is_initialized()
    if torch is None or cuda or python is None or None in numpy_twisters:
        return _GenericFence()
    torch_twister = _torch_twister(torch)
    if torch_twister is None:
        return _GenericFence()
    return _FastFence(
        torch_twister,
        python,
        *(t for t in numpy_twisters if t is not None),
        grad=_grad_word(torch),
    )


# Grad mode is global state too, which the sandbox puts back after each round.


def grad_on() -> bool:
    """Grad mode before torch is imported (nothing can have turned it off)."""
    return True


def set_grad_mode(enabled: bool) -> None:
    """Put grad mode back (called only once a hook has run under torch)."""
    import torch  # imported already

    torch.set_grad_enabled(enabled)
