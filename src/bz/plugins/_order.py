"""Which plugin runs first: list order, adjusted by what plugins declare.

The rule, in one sentence: at every position, the plugin listed earliest among those
whose declared constraints allow it goes next. Constraints come from a plugin's
``order`` attribute (an :class:`Order`): ``before`` / ``after`` other plugins by name
(ignored when that plugin is not loaded), or ``first`` / ``last`` (before, or after,
every plugin that is not itself ``first`` / ``last``). Without declarations this is list
order. Constraints that contradict each other (a cycle) are a load error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import attrs

from bz._errors import UsageError, defined_at

__all__ = ["Order", "OrderCycleError", "plugin_order", "sort_plugins"]


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    # A lone string is one name, not a sequence of one-letter names.
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class Order:
    """Where a plugin runs among the others; set it as a class attribute ``order``.

    ::

        class Reporter(Plugin):
            name = "reporter"
            order = Order(after="early_stopping")  # sees its decision in end_epoch

    ``before`` / ``after``: plugin names (one or several); a name that is not loaded is
    ignored. ``first`` / ``last``: run before / after every plugin that does not say the
    same. Plugins free to move keep their list order.
    """

    before: tuple[str, ...] = attrs.field(default=(), converter=_names)
    """Run before these plugins (when they are loaded)."""
    after: tuple[str, ...] = attrs.field(default=(), converter=_names)
    """Run after these plugins (when they are loaded)."""
    first: bool = False
    """Run before every plugin that is not ``first`` too."""
    last: bool = False
    """Run after every plugin that is not ``last`` too."""

    def __attrs_post_init__(self) -> None:
        if self.first and self.last:
            raise ValueError("a plugin cannot run both first and last")


class OrderCycleError(UsageError):
    """Plugins whose ``order`` declarations contradict each other (exit 2)."""


def plugin_order(plugin: object) -> Order:
    """The plugin's declared :class:`Order` (the default: none) ; ``TypeError`` if malformed."""
    declared = getattr(plugin, "order", None)
    if declared is None:
        return Order()
    if not isinstance(declared, Order):
        raise TypeError(
            f"order is {type(declared).__name__}; it must be bz.plugins.Order(...)"
            f"{defined_at(type(plugin))}"
        )
    return declared


T = TypeVar("T")


def sort_plugins(
    items: Sequence[T],
    names: Sequence[str],
    orders: Sequence[Order],
    places: Sequence[str] = (),
) -> list[T]:
    """``items`` (one per plugin, in list order) in the order the plugins run.

    ``names[i]`` and ``orders[i]`` describe ``items[i]``; ``places[i]``, where that
    plugin is defined (``file:line``, or ""), is named in the error. Raises
    :class:`OrderCycleError` when the declarations cannot all hold.
    """
    index = {name: i for i, name in enumerate(names)}
    after: list[set[int]] = [set() for _ in items]  # after[i]: what must run before i
    for i, order in enumerate(orders):
        after[i].update(index[n] for n in order.after if n in index and index[n] != i)
        for n in order.before:
            if n in index and index[n] != i:
                after[index[n]].add(i)
        for j, other in enumerate(orders):
            if (order.first and not other.first) or (other.last and not order.last):
                after[j].add(i)
    placed: list[int] = []
    waiting = list(range(len(items)))
    while waiting:
        ready = next((i for i in waiting if after[i] <= set(placed)), None)
        if ready is None:
            raise OrderCycleError(_cycle_message(waiting, after, names, places))
        placed.append(ready)
        waiting.remove(ready)
    return [items[i] for i in placed]


def _cycle_message(
    waiting: list[int], after: list[set[int]], names: Sequence[str], places: Sequence[str]
) -> str:
    # Walk "must run after" links from a stuck plugin until one repeats: that is a cycle.
    path = [waiting[0]]
    while True:
        following = min(j for j in after[path[-1]] if j in waiting)
        if following in path:
            cycle = [*path[path.index(following) :], following]
            break
        path.append(following)
    chain = " after ".join(repr(names[i]) for i in cycle)
    # Where each is defined, as other load problems end with `(at file:line)`.
    located = [f"{names[i]!r} at {places[i]}" for i in cycle[:-1] if i < len(places) and places[i]]
    at = f"; {', '.join(located)}" if located else ""
    return (
        f"plugin order cannot be satisfied: {chain} (their `order` declarations, "
        f"first/last included, form a cycle{at})"
    )
