"""One memoryview over words scattered in memory: the random fence's fingerprints, gathered.

The fence tells whether a generator moved by comparing a few words of its live state
with the same words of its copy. Its generators' words lie in four places (torch's
engine, Python's and NumPy's Twisters, NumPy's cached Gaussian), in five regions; as a
tuple of five memoryviews that comparison is five ``memory_richcompare`` calls, most of
whose cost is the call, not the words (about 240 instructions each).

A buffer may say, per dimension, that its entries are pointers to follow
(``suboffsets``, PEP 3118, as image libraries export rows kept apart). :func:`gathered`
builds such a buffer, one dimension, whose entries are pointers to the words
themselves: one memoryview whose items are those words, wherever they lie, and one
comparison (about 60 instructions, and about 37 per word) where there were five.
CPython has no Python-level way to make one, so it is made the way a C extension would:
a ``Py_buffer`` filled in here, handed to ``PyMemoryView_FromBuffer`` (which copies the
shape, strides and suboffsets, and keeps pointing at the pointer table and the format,
both kept alive by :class:`Gathered`). The view is checked word by word against the
memory it should show before it is used; where anything differs or is missing (not
CPython, not 64-bit), :func:`gathered` returns None and the fence keeps its tuples.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from collections.abc import Sequence

__all__ = ["WORD", "Gathered", "gathered"]

WORD = 8
"""Bytes per gathered item (format ``Q``: compared as unsigned 64-bit integers, with no
alignment needed: CPython copies each item out before comparing it)."""


class _Buffer(ctypes.Structure):
    # CPython's Py_buffer (part of the stable ABI since 3.11).
    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.POINTER(ctypes.c_ssize_t)),
        ("strides", ctypes.POINTER(ctypes.c_ssize_t)),
        ("suboffsets", ctypes.POINTER(ctypes.c_ssize_t)),
        ("internal", ctypes.c_void_p),
    )


class Gathered:
    """A memoryview (``view``) whose items are the 8-byte words at ``addresses``, and
    what it points at (kept alive as long as this object)."""

    __slots__ = ("_format", "_pointers", "addresses", "view")

    def __init__(self, addresses: Sequence[int], make: object) -> None:
        count = len(addresses)
        self.addresses = tuple(addresses)
        self._pointers = (ctypes.c_void_p * count)(*addresses)
        self._format = ctypes.create_string_buffer(b"Q")
        one = ctypes.c_ssize_t * 1
        info = _Buffer(
            ctypes.addressof(self._pointers),
            None,
            count * WORD,
            WORD,
            1,  # read-only: the fence never writes through it
            1,
            ctypes.cast(self._format, ctypes.c_char_p),
            one(count),
            one(ctypes.sizeof(ctypes.c_void_p)),
            one(0),  # each entry is a pointer to follow, to the word itself
            None,
        )
        self.view: memoryview = make(ctypes.byref(info))  # type: ignore[operator]


def _maker() -> object | None:
    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != WORD:
        return None
    try:
        prototype = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.POINTER(_Buffer))
        return prototype(("PyMemoryView_FromBuffer", ctypes.pythonapi))
    except (AttributeError, OSError):
        return None


def gathered(addresses: Sequence[int]) -> Gathered | None:
    """One memoryview over the 8-byte words at ``addresses`` (readable memory that
    outlives it), checked against that memory; None where it cannot be made or checked."""
    make = _maker()
    if make is None or not addresses:
        return None
    try:
        made = Gathered(addresses, make)
        view = made.view
        shown = view.tolist()
    except (TypeError, ValueError, OSError, AttributeError):
        return None
    expected = [struct.unpack("=Q", ctypes.string_at(address, WORD))[0] for address in addresses]
    layout = (view.ndim, view.shape, view.format, view.itemsize, view.suboffsets)
    if shown != expected or layout != (1, (len(addresses),), "Q", WORD, (0,)):
        return None
    return made
