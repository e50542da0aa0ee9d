"""The sandbox's dispatch table and its tallies: per plugin a slot, per hook a round.

:func:`build_table` makes, for every hook, the :class:`Round` of the active plugins that
implement it (None where none does: calling such a hook costs one lookup). A round counts
its calls itself (one countdown per round, not a counter per plugin) and times its
plugins in a sample of rounds; :func:`report` adds it all up per plugin. A per-batch
hook's rounds run as one generated function (:func:`straight`): one line per plugin,
nothing stored per call, and in the sampled rounds the clock read after each call on
that call's line. Under a supervisor, for another context than the run's, and after a
fault, the sandbox's general loop runs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import CodeType
from typing import TYPE_CHECKING, Any, NamedTuple

from bz.plugins._faults import PluginFault, PluginReport
from bz.plugins._hooks import HOOK_NAMES, HOOKS
from bz.plugins._watchdog import ROUND_FILE, Straight, Watchdog

if TYPE_CHECKING:
    from bz.plugins._context import PluginContext
    from bz.plugins._process import ProcessKeeper
    from bz.plugins._protocol import NamedPlugin

__all__ = [
    "SAMPLE_EVERY",
    "Boundary",
    "Entry",
    "Round",
    "Slot",
    "build_table",
    "not_called",
    "quarantine_slots",
    "report",
    "set_aside",
    "straight",
    "summary",
]

PER_BATCH = frozenset(spec.name for spec in HOOKS if spec.per_batch)
HOOK_NUMBERS = {name: number for number, name in enumerate(HOOK_NAMES, start=1)}
"""What the supervisor is told for each hook (see :mod:`bz._supervision`)."""


class Slot:
    """A plugin's bookkeeping: mutated in place on the slow paths only (see ``Round``)."""

    __slots__ = (
        "calls",
        "dormant",
        "fault",
        "hooks",
        "name",
        "number",
        "plugin",
        "sampled_calls",
        "sampled_of",
        "sampled_seconds",
        "seconds",
    )

    def __init__(
        self, name: str, plugin: NamedPlugin, hooks: tuple[str, ...], number: int = 0
    ) -> None:
        self.name = name
        self.number = number
        """1-based position: what the supervisor is told while its hooks run."""
        self.plugin = plugin
        self.hooks = hooks
        self.calls = 0
        """Calls so far, counted per round by ``Round`` (added here when a round's table
        is replaced or a report is made)."""
        self.seconds = 0.0
        """Time in hooks every call of which is timed (all but the per-batch ones)."""
        self.sampled_seconds = 0.0
        """Time in the sampled calls of per-batch hooks (see ``Round``)."""
        self.sampled_calls = 0
        """How many per-batch calls were timed."""
        self.sampled_of = 0
        """How many per-batch calls there were (flushed like ``calls``)."""
        self.fault: PluginFault | None = None
        self.dormant = False
        """True on ranks where the plugin does not run (see ``PluginSet.for_rank``)."""

    def estimated_seconds(self, sampled_of: int, sampled_calls: int) -> float:
        """Exact time in the fully timed hooks plus the per-batch hooks' sampled time
        (``sampled_calls`` calls) scaled to all ``sampled_of`` per-batch calls."""
        sampled = self.sampled_seconds
        if sampled_calls:
            sampled *= sampled_of / sampled_calls
        return self.seconds + sampled


class Round:
    """One hook's plugins, in call order, and its tallies: what a round costs is one
    countdown, not a counter and a clock read per plugin.

    Calls are counted per round (``done()`` rounds, each calling every entry). Rounds of
    per-batch hooks are timed plugin by plugin once every ``interval`` rounds, the
    interval drawn anew each time between 1 and ``2 * SAMPLE_EVERY - 1`` (mean
    ``SAMPLE_EVERY``: irregular, so a plugin that works every k-th step is not always or
    never timed) from a generator of the sandbox's own; rounds of all other hooks are
    always timed.
    """

    __slots__ = (
        "countdown",
        "entries",
        "hook",
        "interval",
        "number",
        "rounds",
        "run",
        "sampled",
        "seed",
        "straight",
        "supervised",
        "timed",
    )

    def __init__(
        self,
        entries: tuple[Entry, ...],
        number: int,
        sampled: bool,
        supervised: bool = False,
        hook: str = "",
    ) -> None:
        self.entries = entries
        self.hook = hook
        self.supervised = supervised
        """Under a supervisor, which is told each call's plugin: never ``run``."""
        self.run: Callable[[PluginContext], None] | None = None
        """The whole round as one function (:func:`straight`), once the sandbox has
        built it (it needs the run's view and fence); None until then, and always under
        a supervisor (the sandbox's general loop tells it each call's plugin)."""
        self.straight: Straight | None = None
        """What tells which plugin ``run`` is calling (for the watchdog and faults)."""
        self.number = number
        """The hook's number, for the supervisor."""
        self.sampled = sampled
        self.rounds = 0
        """Rounds in the intervals already ended."""
        self.seed = number
        self.interval = 1
        self.countdown = 1
        """Rounds left in this interval: the round that brings it to 0 is timed."""
        self.timed = 0
        """Rounds whose every call a generated round (:func:`straight`) timed: each of
        its plugins' timed calls, added to their slots with the round's count."""

    def done(self) -> int:
        """Rounds started so far."""
        return self.rounds + self.interval - self.countdown

    def next_interval(self) -> None:
        """The timed round: start the next interval."""
        self.rounds += self.interval
        if self.sampled:
            # A linear congruential generator of the sandbox's own: the fence keeps the
            # global ones untouched, and this one must not disturb them either.
            self.seed = seed = (self.seed * 1103515245 + 12345) & 0x7FFFFFFF
            self.interval = 1 + (seed >> 16) % (2 * SAMPLE_EVERY - 1)
        self.countdown = self.interval

    def failed(self, exc: BaseException, watchdog: Watchdog) -> int:
        """``exc`` left ``run``: the plugin it came from (the line its traceback passed
        through) is made ``watchdog.running``, as the general loop leaves it for the
        sandbox's fault handling; its position (-1: raised before the first call)."""
        assert self.straight is not None
        index = self.straight.index(exc.__traceback__)
        watchdog.running = self.entries[index][0] if index >= 0 else None
        return index

    def flush(self) -> None:
        """Add the rounds counted here to the plugins' own counts (the table is replaced)."""
        done = self.done()
        for slot, _ in self.entries:
            slot.calls += done
            if self.sampled:
                slot.sampled_of += done
                slot.sampled_calls += self.timed


SAMPLE_EVERY = 16
"""Per-batch hooks are timed plugin by plugin in about one round in this many."""


Entry = tuple[Slot, Callable[["PluginContext"], object]]


class Boundary(NamedTuple):
    """What a generated round (:func:`straight`) needs of its sandbox."""

    owner: Any
    """The ``PluginSet``: its ``_autocast`` (set when a plugin's hook changed autocast)
    is read after each round, and ``_put_back_autocast`` called then."""
    shown: PluginContext
    """The context the round runs for (another one takes ``general``)."""
    view: PluginContext
    """What plugins see of ``shown``."""
    general: Callable[[str, PluginContext], None]
    """The sandbox's general round ``(hook, context)``: a call for another context."""
    fault: Callable[[Round, BaseException, PluginContext], None]
    """Called with what a plugin's call raised: blames it, goes on with the round."""
    interrupted: Callable[[Round, BaseException], None]
    """Called with a ``KeyboardInterrupt`` from a plugin's call (raised on after it)."""
    fence: Any
    """The random fence (``live``, ``copies``, ``instance``, ``refresh``, ``restore``)."""
    grad_mode: Callable[[], bool]
    set_grad_mode: Callable[[bool], None]
    watchdog: Watchdog


_ROUND = """\
def plugin_round(context):
    if context is not shown:
        return general(hook, context)
    if live != copies:
        fence.refresh()
    gauss = python["gauss_next"]
{grad_before}    watchdog.running = straight
    try:
        if round_.countdown != 1:
            round_.countdown -= 1
{calls}        else:
            round_.next_interval()
            started = clock()
{timed}{tally}            round_.timed += 1
    except KeyboardInterrupt as exc:
        interrupted(round_, exc)
        raise
    except BaseException as exc:
        fault(round_, exc, context)
    finally:
        watchdog.running = None
        if live != copies:
            fence.restore()
        if python["gauss_next"] is not gauss:
            python["gauss_next"] = gauss
{grad_after}        if owner._autocast is not None:
            owner._put_back_autocast()
"""
"""A round as one function; ``{calls}``: a line per plugin, ``{timed}``: the same calls
each with the clock read after it (the timed round), ``{tally}``: adding those times to
the plugins' slots (their count of timed calls is the round's ``timed``, added to them
when the round is flushed or reported); ``{grad_before}``, ``{grad_after}``: reading and
putting back grad mode, where the fence does not (``fence.grad``)."""


def straight(round_: Round, parts: Boundary) -> tuple[Callable[[PluginContext], None], Straight]:
    """The whole round as one function of the context, its plugins' calls written out
    one per line: the boundary's common path (the fence's marks, grad mode, the
    countdown) inline, no loop and nothing stored per call. Which plugin it is calling
    is its frame's line (:class:`~bz.plugins._watchdog.Straight`): a fault's traceback
    and the watchdog read it there. The sampled timed round is written out the same way,
    each call with the clock read after it on its own line; a call for another context
    than ``parts.shown`` goes to ``parts.general``. Built when the active plugins, the
    context shown or the fence change; the text is made from indices only, never from
    plugin names. What it reads are its module's globals (a namespace of its own), not
    a closure's cells: a call copies no cells into its frame and releases none."""
    fence = parts.fence
    count = len(round_.entries)
    names = [f"hook_{index}" for index in range(count)]
    slots = [f"slot_{index}" for index in range(count)]
    source = _ROUND.format(
        calls="".join(f"            {name}(view)\n" for name in names),
        timed="".join(
            f"            {name}(view); time_{index} = clock()\n"
            for index, name in enumerate(names)
        ),
        tally="".join(
            f"            {slot}.sampled_seconds += time_{index} - "
            f"{'started' if index == 0 else f'time_{index - 1}'}\n"
            for index, slot in enumerate(slots)
        ),
        grad_before="" if fence.grad else "    grad = grad_mode()\n",
        grad_after=""
        if fence.grad
        else "        if grad_mode() is not grad:\n            set_grad_mode(grad)\n",
    )
    namespace: dict[str, Any] = {
        "hook": round_.hook,
        "round_": round_,
        "shown": parts.shown,
        "view": parts.view,
        "general": parts.general,
        "fault": parts.fault,
        "interrupted": parts.interrupted,
        "owner": parts.owner,
        "fence": fence,
        "live": fence.live,
        "copies": fence.copies,
        # ``random``'s cached Gaussian, read from its instance's dict: its attribute is
        # not one the interpreter reads fast (a generic lookup, several times longer).
        "python": vars(fence.instance),
        "grad_mode": parts.grad_mode,
        "set_grad_mode": parts.set_grad_mode,
        "watchdog": parts.watchdog,
        "clock": time.perf_counter,
    }
    namespace.update(zip(names, (method for _, method in round_.entries), strict=True))
    namespace.update(zip(slots, (slot for slot, _ in round_.entries), strict=True))
    code = compile(source, ROUND_FILE, "exec")
    (function_code,) = (const for const in code.co_consts if isinstance(const, CodeType))
    lines = source.splitlines()
    firsts = (
        lines.index(f"            {names[0]}(view)") + 1,
        lines.index(f"            {names[0]}(view); time_0 = clock()") + 1,
    )
    marker = namespace["straight"] = Straight(
        function_code, tuple(slot for slot, _ in round_.entries), firsts
    )
    exec(code, namespace)  # our own text, from indices only
    return namespace["plugin_round"], marker


def build_table(
    slots: Sequence[Slot], keeper: ProcessKeeper, supervised: bool = False
) -> dict[str, Round | None]:
    """Per hook, the round of the active plugins implementing it, or None.

    Hooks above the batch level also check bz's signal handlers around each call.
    Under a supervisor (``supervised``) every round runs through the sandbox's general
    loop, which tells the supervisor each call's plugin.
    """
    table: dict[str, Round | None] = {}
    for hook in HOOK_NAMES:
        entries = tuple(
            (
                slot,
                getattr(slot.plugin, hook)
                if hook in PER_BATCH
                else keeper.kept(getattr(slot.plugin, hook)),
            )
            for slot in slots
            if slot.fault is None and not slot.dormant and hook in slot.hooks
        )
        sampled = hook in PER_BATCH
        table[hook] = (
            Round(entries, HOOK_NUMBERS[hook], sampled, supervised, hook) if entries else None
        )
    return table


def not_called(round_: Round, last: object) -> None:
    """The round ended early, after ``last`` (None: before its first plugin): the
    plugins after it, counted with the round, were not called."""
    after = last is None
    for slot, _ in round_.entries:
        if after:
            slot.calls -= 1
            if round_.sampled:
                slot.sampled_of -= 1
        after = after or slot is last


def report(
    slots: Sequence[Slot], table: Mapping[str, Round | None], load_faults: Sequence[PluginFault]
) -> list[PluginReport]:
    """Time spent and faults, per plugin (loading faults included)."""
    calls = {id(slot): slot.calls for slot in slots}
    sampled_of = {id(slot): slot.sampled_of for slot in slots}
    sampled_calls = {id(slot): slot.sampled_calls for slot in slots}
    for round_ in table.values():
        if round_ is not None:
            done = round_.done()
            for slot, _ in round_.entries:
                calls[id(slot)] += done
                if round_.sampled:
                    sampled_of[id(slot)] += done
                    sampled_calls[id(slot)] += round_.timed
    reports = [
        PluginReport(
            slot.name,
            slot.hooks,
            calls[id(slot)],
            slot.estimated_seconds(sampled_of[id(slot)], sampled_calls[id(slot)]),
            slot.fault,
        )
        for slot in slots
    ]
    reports.extend(PluginReport(f.plugin, (), 0, 0.0, f) for f in load_faults)
    return reports


def summary(reports: Sequence[PluginReport]) -> dict[str, dict[str, Any]]:
    """The end-of-run summary's ``plugins`` field."""
    return {
        report.name: {
            "calls": report.calls,
            "seconds": round(report.seconds, 6),
            "status": "quarantined" if report.fault else "ok",
            "fault": report.fault.describe() if report.fault else None,
        }
        for report in reports
    }


def quarantine_slots(slots: Sequence[Slot], indices: set[int], epoch: int, step: int) -> bool:
    """Quarantine the plugins at ``indices``, which another process quarantined (in
    ``epoch``, 1-based, at ``step``); whether any was still active here."""
    changed = False
    for index in sorted(indices):
        slot = slots[index]
        if slot.fault is None:
            slot.fault = PluginFault(
                slot.name,
                "another process",
                "quarantined because it failed on another rank",
                epoch,
                step,
            )
            changed = True
    return changed


def set_aside(slots: Sequence[Slot], faults: Sequence[PluginFault]) -> None:
    """Quarantine the plugins ``faults`` name (with those faults)."""
    by_name = {fault.plugin: fault for fault in faults}
    for slot in slots:
        if slot.fault is None and slot.name in by_name:
            slot.fault = by_name[slot.name]
