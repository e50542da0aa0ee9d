"""How many examples a property test tries: as written in ``make check``, fewer in the
quick loop.

``make quick`` loads the ``quick`` hypothesis profile (``--hypothesis-profile=quick``,
registered in ``tests/conftest.py``): every property still runs, on a fifth of its
examples (at least 5); ``make check`` and a plain ``pytest`` run the counts the tests
name. A test writes ``@settings(max_examples=examples(200))``.
"""

from __future__ import annotations

from hypothesis import settings

FULL = 100
"""The ``max_examples`` of the default profile: the scale the counts are written in."""


def examples(full: int) -> int:
    """``full`` scaled by the loaded profile's ``max_examples`` against :data:`FULL`."""
    loaded = settings().max_examples  # a fresh settings object inherits the loaded profile
    if loaded >= FULL:
        return full
    return max(5, full * loaded // FULL)
