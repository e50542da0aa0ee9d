"""Finding what installed packages register under an entry-point group.

One mechanism for both registries (plugins in ``bz.plugins``, metrics in
``bz.metrics``), so both follow one rule when two distributions register the same
name:

1. bz's own distribution wins, so a third-party package cannot silently replace a
   built-in (``console_out``, ``accuracy``);
2. otherwise the distribution first in alphabetical order wins: stable from one
   machine to the next, unlike ``sys.path`` order, and explainable in one line.

The same distribution seen twice (an editable install beside stale metadata) is not a
clash. Discovery reads metadata only; nothing is imported until :meth:`EntrySource.load`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any

import attrs

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "Discovery",
    "EntrySource",
    "builtin_sources",
    "choose",
    "discover",
    "duplicate_message",
]

BUILTIN_DISTRIBUTION = "bz-cli"
"""The distribution that ships bz and its built-in plugins and metrics."""


@attrs.frozen
class EntrySource:
    """Where a registered name comes from: its entry point and the distribution shipping it."""

    name: str
    value: str
    """``module:attribute``."""
    distribution: str | None
    version: str | None
    entry_point: metadata.EntryPoint | None = attrs.field(eq=False, repr=False, default=None)

    @property
    def module(self) -> str:
        """The module the entry point imports."""
        return self.value.partition(":")[0]

    @property
    def builtin(self) -> bool:
        """Whether bz itself ships this entry."""
        return self.distribution == BUILTIN_DISTRIBUTION

    def load(self) -> Any:
        """Import what the entry point names (exceptions of the import propagate)."""
        entry = self.entry_point or metadata.EntryPoint(self.name, self.value, "")
        return entry.load()


@attrs.frozen
class Discovery:
    """Every registered name with the source used, plus duplicated names (with the loser(s))."""

    sources: dict[str, EntrySource]
    duplicates: dict[str, tuple[EntrySource, ...]]
    """name -> sources that were *not* chosen (the chosen one is in ``sources``)."""


def _precedence(source: EntrySource) -> tuple[int, str]:
    return (0 if source.builtin else 1, source.distribution or "")


def discover(group: str, builtins: Mapping[str, str] | None = None) -> Discovery:
    """The entries of ``group``, read from installed metadata, one source per name.

    ``builtins`` (name -> ``module:attribute``) are bz's own entries, counted as
    registered by :data:`BUILTIN_DISTRIBUTION` even when the installed metadata predates
    them (an editable install that was not refreshed).
    """
    installed = [
        EntrySource(
            entry.name,
            entry.value,
            entry.dist.metadata["Name"] if entry.dist is not None else None,
            entry.dist.version if entry.dist is not None else None,
            entry,
        )
        for entry in metadata.entry_points(group=group)
    ]
    return choose([*installed, *builtin_sources(group, builtins or {}).values()])


def choose(candidates: Iterable[EntrySource]) -> Discovery:
    """One source per name, by the rule above; the others are kept as duplicates."""
    found: dict[str, list[EntrySource]] = {}
    for source in candidates:
        _add(found, source)
    sources: dict[str, EntrySource] = {}
    duplicates: dict[str, tuple[EntrySource, ...]] = {}
    for name, candidates in sorted(found.items()):
        ordered = sorted(candidates, key=_precedence)
        sources[name] = ordered[0]
        if len(ordered) > 1:
            duplicates[name] = tuple(ordered[1:])
    return Discovery(sources, duplicates)


def _add(found: dict[str, list[EntrySource]], source: EntrySource) -> None:
    known = found.setdefault(source.name, [])
    # The same distribution visible twice (an editable install next to a build tree, or
    # a built-in table entry its metadata repeats) is one source, not a conflict.
    if all(s.value != source.value or s.distribution != source.distribution for s in known):
        known.append(source)


def builtin_sources(group: str, builtins: Mapping[str, str]) -> dict[str, EntrySource]:
    """bz's own entries as sources, made without scanning the installed distributions."""
    version = _builtin_version()
    return {
        name: EntrySource(
            name,
            value,
            BUILTIN_DISTRIBUTION,
            version,
            metadata.EntryPoint(name, value, group),
        )
        for name, value in builtins.items()
    }


@functools.cache
def _builtin_version() -> str | None:
    # Cached: looking a distribution up scans sys.path, and bz's own version is fixed.
    try:
        return metadata.version(BUILTIN_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def duplicate_message(
    kind: str, name: str, chosen: EntrySource, others: Sequence[EntrySource]
) -> str:
    """Why one of several entries registered under ``name`` is used (``kind``: "plugin")."""
    losers = ", ".join(f"{s.distribution} ({s.value})" for s in others)
    reason = (
        f"bz's own {kind}s take precedence"
        if chosen.builtin
        else "the first distribution in alphabetical order is used"
    )
    return (
        f"{kind} name {name!r} is provided by {chosen.distribution} ({chosen.value}) "
        f"and by {losers}; using {chosen.distribution}: {reason}"
    )
