"""The sandbox: one error boundary around every plugin call, and the hook dispatch table.

Every hook call of every plugin goes through :meth:`PluginSet.call`. Everything a plugin
raises except ``KeyboardInterrupt`` is that plugin's fault (``SystemExit``,
``GeneratorExit``, ``CancelledError`` and custom ``BaseException`` subclasses included: a
plugin cannot end the process). A faulty plugin is logged once (with its traceback) and
quarantined. Then, by policy: ``rewind`` (the default) asks the loop to go back to its
last consistent state and replay without the plugin (:class:`RewindRequested`; where the
loop cannot rewind, it behaves as ``isolate``), ``isolate`` trains on from where the
fault happened, ``raise`` ends the run.

Around each hook call the sandbox also fences the global random generators (see
:mod:`bz.plugins._fence`), shows plugins a read-only view of the loop's values (see
:class:`bz.plugins._context.LoopView`), and, with ``plugin_timeout``, interrupts a hook that runs
too long (see :mod:`bz.plugins._watchdog`). Torch hooks a plugin registers from inside
its hooks run inside the same boundary, as the plugin's (see :mod:`bz.plugins._torch_hooks`),
and bz's signal handlers and standard streams stay bz's (see :mod:`bz.plugins._process`).
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from bz import _supervision
from bz._errors import describe_exception
from bz._logging import get_logger
from bz.plugins import _torch_hooks
from bz.plugins._context import LoopView, PluginContext
from bz.plugins._faults import (
    ErrorPolicy,
    LoadBoundary,
    PluginFailure,
    PluginFault,
    PluginReport,
    RewindRequested,
    give_up,
    guarded,
    is_verdict,
    log_fault,
    verdict,
)
from bz.plugins._fence import RandomFence, grad_on, random_fence, set_grad_mode
from bz.plugins._process import ProcessKeeper
from bz.plugins._rounds import (
    Boundary,
    Entry,
    Round,
    Slot,
    build_table,
    not_called,
    quarantine_slots,
    report,
    set_aside,
    straight,
    summary,
)
from bz.plugins._torch_boundary import TorchBoundary
from bz.plugins._torch_hooks import HookLedger
from bz.plugins._watchdog import Watchdog

if TYPE_CHECKING:
    from bz.plugins._protocol import NamedPlugin

# Faults live in _faults; their home for the rest of bz stays here.
__all__ = [
    "ErrorPolicy",
    "LoadBoundary",
    "PluginFailure",
    "PluginFault",
    "PluginReport",
    "PluginSet",
    "RewindRequested",
    "guarded",
    "log_fault",
]

_log = get_logger("bz")
_perf_counter = time.perf_counter


def _nothing(context: PluginContext) -> None:
    """A hook no active plugin implements."""


class PluginSet(TorchBoundary):
    """Loaded plugins, the hooks each implements, and the boundary every call goes through.

    ``plugins`` pairs each plugin object with the hooks it really implements (the loader
    works that out; :func:`bz.plugins._inspection.implemented_hooks` does it for objects built in
    code). Faults found while loading (``load_faults``) are part of the end-of-run report.
    """

    def __init__(
        self,
        plugins: Sequence[tuple[NamedPlugin, tuple[str, ...]]] = (),
        policy: ErrorPolicy = "isolate",
        load_faults: Sequence[PluginFault] = (),
    ) -> None:
        self.policy: ErrorPolicy = policy
        self._slots = [
            Slot(plugin.name, plugin, hooks, number)
            for number, (plugin, hooks) in enumerate(plugins, start=1)
        ]
        self._supervised = _supervision.supervised()
        """Whether anyone reads ``_where``."""
        self._where: memoryview | list[int] = _supervision.where if self._supervised else [0, 0]
        """Which plugin and hook run now, for a supervising ``bz train`` (shared memory);
        elsewhere a list nobody reads: the rounds that store there (timed ones, the rest
        of a round after a fault) pay a list's store, not a shared int32's (~200
        instructions each, twelve per timed round of ten plugins)."""
        self._load_faults = list(load_faults)
        self._table: dict[str, Round | None] = {}
        self.callers: dict[str, Callable[[PluginContext], None]] = {}
        """Per hook, what calls its round with a context (``call``'s work): one dict for
        the set's life, kept current; the loop calls through it."""
        self.implemented: dict[str, bool] = {}
        """Per hook, whether an active plugin implements it: one dict for the set's life,
        kept current (the loop holds it and tests a hook before preparing its call)."""
        self.rewindable = False
        """Set by the loop while it can go back to a consistent state (``rewind``)."""
        self._fence: RandomFence | None = None
        self._grad_mode: Callable[[], bool] = grad_on
        """``torch.is_grad_enabled``, once the fence is built (torch is imported then)."""
        self._shown: PluginContext | None = None
        self._view: PluginContext = LoopView(PluginContext())
        self._watchdog = Watchdog()
        self._watchdog.boundaries = frozenset(
            {
                PluginSet._general.__code__,
                PluginSet._round.__code__,
                PluginSet._timed_round.__code__,
                PluginSet._run_torch_hook.__code__,
            }
        )
        self._watchdog.give_up = give_up
        self._keeper = ProcessKeeper(self._watchdog)
        self._ledger: HookLedger | None = None
        """The torch hooks plugins registered (while a run lasts: see ``_view_for``)."""
        self._autocast = None
        self._pending = None
        self._rebuild()

    # -- what is loaded --------------------------------------------------------------

    @property
    def active(self) -> list[NamedPlugin]:
        """Plugins that are still being called (not quarantined), in call order."""
        return [slot.plugin for slot in self._slots if slot.fault is None and not slot.dormant]

    @property
    def active_names(self) -> list[str]:
        """Names of the active plugins (what ``context.extra["active_plugins"]`` holds)."""
        return [slot.name for slot in self._slots if slot.fault is None and not slot.dormant]

    @property
    def faults(self) -> list[PluginFault]:
        """Every fault so far, loading faults first."""
        return self._load_faults + [slot.fault for slot in self._slots if slot.fault]

    def __len__(self) -> int:
        """Number of plugins, quarantined and dormant ones included."""
        return len(self._slots)

    def implements(self, hook: str) -> bool:
        """Whether any active plugin implements ``hook``."""
        return self.implemented[hook]

    def _rebuild(self) -> None:
        # The rounds counted so far go to the plugins; the new table has fresh rounds.
        for old in self._table.values():
            if old is not None:
                old.flush()
        self._table = table = build_table(self._slots, self._keeper, self._supervised)
        self.implemented.update((hook, entries is not None) for hook, entries in table.items())
        self._publish()

    # -- the hot path ----------------------------------------------------------------

    def call(self, hook: str, context: PluginContext) -> None:
        """Call ``hook`` on every active plugin that implements it, inside the boundary."""
        self.callers[hook](context)

    def _general(self, hook: str, context: PluginContext) -> None:
        # The boundary's general form: timed rounds (every round of most hooks, a sample
        # of the per-batch ones), the first round for a context, rounds under a
        # supervisor. The others run as one generated function (``_rounds.straight``),
        # which does the same, inline, with the calls written out.
        round_ = self._table[hook]
        if round_ is None:
            return
        view = self._view if context is self._shown else self._view_for(context)
        # The fence's ``mark`` and ``put_back``, inlined: with no draw, one comparison
        # of two tuples each (see ``bz.plugins._fence``).
        fence = self._fence or self._new_fence()
        if fence.live != fence.copies:
            fence.refresh()
        instance = fence.instance
        gauss = instance.gauss_next
        # Grad mode is global: a plugin that turns it off (and fails, or forgets to turn
        # it back on) would leave the loop's backward pass without a graph.
        grad_mode = self._grad_mode
        grad = grad_mode()
        watchdog = self._watchdog
        round_.countdown -= 1
        try:
            remaining = iter(round_.entries)
            watchdog.round = remaining  # a new object each round: tells calls apart
            if not round_.countdown:
                round_.next_interval()
                self._timed_round(round_, hook, view, context, remaining)
            else:
                self._round(round_, hook, view, context, remaining)
        finally:
            watchdog.running = None
            if fence.live != fence.copies:
                fence.restore()
            if instance.gauss_next is not gauss:
                instance.gauss_next = gauss
            if grad_mode() is not grad:
                set_grad_mode(grad)
            # Autocast too, but read only when a plugin's hook changed it (``_touched``):
            # reading it costs a microsecond, this test nothing.
            if self._autocast is not None:
                self._put_back_autocast()

    def _publish(self) -> None:
        # Per hook, what ``call`` runs: nothing, the general round, or, once the fence
        # and the context shown are known, the round as one generated function.
        fence, shown = self._fence, self._shown
        parts = None
        if fence is not None and shown is not None:
            parts = Boundary(
                owner=self,
                shown=shown,
                view=self._view,
                general=self._general,
                fault=self._straight_fault,
                interrupted=self._straight_interrupted,
                fence=fence,
                grad_mode=self._grad_mode,
                set_grad_mode=set_grad_mode,
                watchdog=self._watchdog,
            )
        callers = self.callers
        for hook, round_ in self._table.items():
            if round_ is None:
                callers[hook] = _nothing
            elif parts is None or round_.supervised or not round_.sampled:
                round_.run = round_.straight = None
                callers[hook] = functools.partial(self._general, hook)
            else:
                round_.run, round_.straight = straight(round_, parts)
                callers[hook] = round_.run

    def _straight_interrupted(self, round_: Round, exc: BaseException) -> None:
        # Ctrl-C in a generated round's call: the rest of the round is not called.
        round_.failed(exc, self._watchdog)
        not_called(round_, self._watchdog.running)

    def _straight_fault(self, round_: Round, exc: BaseException, context: PluginContext) -> None:
        # What left a generated round's call: that plugin's fault (the line its
        # traceback passed through names it); the rest of the round in ``_round``.
        watchdog = self._watchdog
        index = round_.failed(exc, watchdog)
        self._caught(round_, round_.hook, exc, context)
        remaining = iter(round_.entries[index + 1 :])
        watchdog.round = remaining
        self._round(round_, round_.hook, self._view, context, remaining)

    def _round(
        self,
        round_: Round,
        hook: str,
        view: PluginContext,
        context: PluginContext,
        remaining: Iterator[Entry],
    ) -> None:
        # The calls left in a round, telling the supervisor which plugin runs. The whole
        # loop sits inside the ``try``: an interruption aimed at a plugin (a timeout, a
        # second Ctrl-C) is that plugin's wherever it lands, even between two calls
        # (``watchdog.running`` still names the plugin it was aimed at); the loop then
        # goes on from the next plugin (the iterator keeps its place).
        watchdog, where = self._watchdog, self._where
        where[1] = round_.number
        try:
            while True:
                try:
                    for slot, method in remaining:
                        watchdog.running = slot
                        where[0] = slot.number
                        method(view)
                except KeyboardInterrupt:
                    not_called(round_, watchdog.running)
                    raise
                except BaseException as exc:  # a plugin cannot end the process
                    self._caught(round_, hook, exc, context)
                    continue
                return
        finally:
            where[0] = 0

    def _timed_round(
        self,
        round_: Round,
        hook: str,
        view: PluginContext,
        context: PluginContext,
        remaining: Iterator[Entry],
    ) -> None:
        # ``_round`` with a clock read per plugin (each call's end is the next one's
        # start): every round of most hooks, a sample of the per-batch hooks' rounds.
        watchdog, where = self._watchdog, self._where
        where[1] = round_.number
        sampled, clock = round_.sampled, _perf_counter
        started = clock()
        try:
            while True:
                try:
                    for slot, method in remaining:
                        watchdog.running = slot
                        where[0] = slot.number
                        method(view)
                        finished = clock()
                        if sampled:
                            slot.sampled_seconds += finished - started
                            slot.sampled_calls += 1
                        else:
                            slot.seconds += finished - started
                        started = finished
                except KeyboardInterrupt:
                    not_called(round_, watchdog.running)
                    raise
                except BaseException as exc:  # a plugin cannot end the process
                    self._caught(round_, hook, exc, context)
                    started = clock()
                    continue
                return
        finally:
            where[0] = 0

    def _caught(
        self, round_: Round, hook: str, exc: BaseException, context: PluginContext
    ) -> None:
        # What a plugin raised (or an interruption aimed at it): its fault. Raises on
        # when the round must end here (a verdict, ``raise``, ``rewind``).
        watchdog = self._watchdog
        slot, watchdog.running = watchdog.running, None
        if not isinstance(slot, Slot) or is_verdict(exc):
            # Another plugin's torch hook failed inside this one's hook (a verdict):
            # on its way, so no longer pending (``_torch_boundary``).
            self._pending = None
            not_called(round_, slot)
            raise exc
        try:
            self._fail(slot, hook, exc, context)
        except BaseException:
            self._pending = None  # this round's verdict is on its way
            not_called(round_, slot)
            raise

    def _view_for(self, context: PluginContext) -> PluginContext:
        # A new context (a new run, or a test's own): plugins see it through a read-only
        # view; the view is kept, so plugins holding it across hooks keep a live one.
        self._shown = context
        self._view = LoopView(context)
        fence = self._fence
        if fence is not None and fence.grad and fence.thread != threading.get_ident():
            # The fence reads the grad mode of the thread that built it: a run on another
            # thread gets a fence of its own (built at the round that follows).
            self._fence = None
        self._publish()
        config = context.run_config
        self._watchdog.arm(getattr(config, "plugin_timeout", None))
        if config is not None and self._ledger is None and "torch" in sys.modules:
            # A run: torch hooks registered inside plugins' hooks become theirs.
            self._ledger = HookLedger(self._watchdog, self._run_torch_hook, self._touched)
            _torch_hooks.adopt(self._ledger)
        return self._view

    def _new_fence(self) -> RandomFence:
        # Built at the first call, once the loop has imported torch (and maybe NumPy)
        # and initialised CUDA, so the fence covers the generators the loop uses.
        self._fence = fence = random_fence()
        torch = sys.modules.get("torch")
        if torch is not None:
            self._grad_mode = torch.is_grad_enabled
        self._publish()
        return fence

    def close(self) -> None:
        """Stop the timeout watchdog and stop adopting torch hooks (when the run ends).

        Torch hooks healthy plugins registered stay where they are, still guarded.
        """
        self._watchdog.disarm()
        self._keeper.release()
        if self._ledger is not None:
            _torch_hooks.release(self._ledger)

    def keep_handlers(self, handlers: dict[int, object] | None) -> None:
        """Keep bz's signal ``handlers`` installed against plugins (None: stop)."""
        if handlers is None:
            self._keeper.release()
        else:
            self._keeper.keep(handlers)

    def hooks_mark(self) -> int:
        """Where the torch hooks plugins registered stand now (for a snapshot)."""
        return self._ledger.mark() if self._ledger is not None else 0

    def drop_hooks_since(self, mark: int) -> None:
        """Remove the torch hooks plugins registered since ``mark`` (a rewind)."""
        if self._ledger is not None:
            self._ledger.drop_since(mark)

    def interrupt_running(self, signum: int) -> None:
        """From a signal handler: fail the plugin whose hook is running now, if any.

        A second Ctrl-C or SIGTERM while a hook runs means that hook kept the run from
        stopping after its step: it becomes that plugin's fault (logged with its stack,
        quarantined, rewound) and the loop goes on to stop cleanly, with a checkpoint.
        Returns when no plugin is running.
        """
        self._watchdog.interrupt_running(signum)

    # -- the slow path ---------------------------------------------------------------

    def _fail(self, slot: Slot, hook: str, exc: BaseException, context: PluginContext) -> None:
        fault = PluginFault(
            slot.name, hook, describe_exception(exc), context.epoch + 1, context.global_step
        )
        slot.fault = fault
        self._watchdog.settle()
        self._rebuild()
        if self._ledger is not None:
            self._ledger.drop(slot)  # its torch hooks leave with it
        if self.policy == "raise":
            raise verdict(fault.describe()) from exc
        log_fault(fault, exc)
        if self.policy == "rewind" and self.rewindable:
            raise RewindRequested(fault) from exc

    def quarantine(
        self, plugin: NamedPlugin, stage: str, exc: BaseException, context: PluginContext
    ) -> None:
        """Handle a fault outside a hook (``state_dict``, ``load_state_dict``) like a hook's."""
        for slot in self._slots:
            if slot.plugin is plugin and slot.fault is None:
                self._fail(slot, stage, exc, context)
                return

    # -- several processes --------------------------------------------------------------

    def for_rank(self, rank: int) -> None:
        """Keep, on ranks other than 0, only plugins that declare ``every_rank = True``.

        Logging, progress and checkpoint plugins run on rank 0 alone by default. The
        slots stay (dormant), so slot indices mean the same plugin on every rank.
        """
        if rank != 0:
            for slot in self._slots:
                slot.dormant = getattr(slot.plugin, "every_rank", False) is not True
            self._rebuild()

    def faulted_slots(self) -> set[int]:
        """Indices of the plugins quarantined on this process."""
        return {index for index, slot in enumerate(self._slots) if slot.fault is not None}

    def quarantine_slots(self, indices: set[int], context: PluginContext) -> None:
        """Quarantine plugins another process quarantined, so every rank runs the same hooks."""
        if quarantine_slots(self._slots, indices, context.epoch + 1, context.global_step):
            self._rebuild()

    def set_aside(self, faults: Sequence[PluginFault]) -> None:
        """Quarantine plugins before the run starts: a supervised ``bz train`` restarted
        training without them, each having ended the process it ran in."""
        set_aside(self._slots, faults)
        self._rebuild()

    def report(self) -> list[PluginReport]:
        """Time spent and faults, per plugin (loading faults included)."""
        return report(self._slots, self._table, self._load_faults)

    def log_summary(self) -> None:
        """Emit the end-of-run summary as one structured event."""
        _log.info("plugin_summary", plugins=summary(self.report()))
