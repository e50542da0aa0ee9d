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

import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

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
    is_verdict,
    log_fault,
    verdict,
)
from bz.plugins._fence import RandomFence, random_fence
from bz.plugins._hooks import HOOK_NAMES, HOOKS
from bz.plugins._process import ProcessKeeper
from bz.plugins._torch_hooks import HookLedger
from bz.plugins._watchdog import PluginInterrupted, Watchdog

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


_PER_BATCH = frozenset(spec.name for spec in HOOKS if spec.per_batch)
_HOOK_NUMBERS = {name: number for number, name in enumerate(HOOK_NAMES, start=1)}
"""What the supervisor is told for each hook (see :mod:`bz._supervision`)."""


class _Slot:
    """A plugin's bookkeeping: mutated in place on the hot path, so no allocation."""

    __slots__ = ("calls", "dormant", "fault", "hooks", "name", "number", "plugin", "seconds")

    def __init__(
        self, name: str, plugin: NamedPlugin, hooks: tuple[str, ...], number: int = 0
    ) -> None:
        self.name = name
        self.number = number
        """1-based position: what the supervisor is told while its hooks run."""
        self.plugin = plugin
        self.hooks = hooks
        self.calls = 0
        self.seconds = 0.0
        self.fault: PluginFault | None = None
        self.dormant = False
        """True on ranks where the plugin does not run (see ``PluginSet.for_rank``)."""


T = TypeVar("T")

_Entry = tuple[_Slot, Callable[["PluginContext"], object]]


class PluginSet:
    """Loaded plugins, the hooks each implements, and the boundary every call goes through.

    ``plugins`` pairs each plugin object with the hooks it really implements (the loader
    works that out; :func:`bz.plugins._loader.implemented_hooks` does it for objects built in
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
            _Slot(plugin.name, plugin, hooks, number)
            for number, (plugin, hooks) in enumerate(plugins, start=1)
        ]
        self._where = _supervision.where
        """Which plugin and hook run now, for a supervising ``bz train`` (shared memory)."""
        self._load_faults = list(load_faults)
        self._table: dict[str, tuple[_Entry, ...]] = {}
        self.implemented: dict[str, bool] = {}
        """Per hook, whether an active plugin implements it: one dict for the set's life,
        kept current (the loop holds it and tests a hook before preparing its call)."""
        self.rewindable = False
        """Set by the loop while it can go back to a consistent state (``rewind``)."""
        self._fence: RandomFence | None = None
        self._grad_mode: Callable[[], bool] | None = None
        """``torch.is_grad_enabled``, once the fence is built (torch is imported then)."""
        self._shown: PluginContext | None = None
        self._view: PluginContext = LoopView(PluginContext())
        self._watchdog = Watchdog()
        self._watchdog.boundaries = frozenset(
            {PluginSet.call.__code__, PluginSet._run_torch_hook.__code__}
        )
        self._watchdog.give_up = give_up
        self._keeper = ProcessKeeper(self._watchdog)
        self._ledger: HookLedger | None = None
        """The torch hooks plugins registered (while a run lasts: see ``_view_for``)."""
        self._autocast: Any = None
        """Autocast as it was before a plugin's hook changed it (see ``_touched``)."""
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
        # Precomputed per hook: a hook nobody implements is an empty tuple, so calling
        # it costs a dict lookup and nothing else.
        # Hooks above the batch level also check bz's signal handlers around each call.
        keeper = self._keeper
        self._table = {
            hook: tuple(
                (
                    slot,
                    getattr(slot.plugin, hook)
                    if hook in _PER_BATCH
                    else keeper.kept(getattr(slot.plugin, hook)),
                )
                for slot in self._slots
                if slot.fault is None and not slot.dormant and hook in slot.hooks
            )
            for hook in HOOK_NAMES
        }
        self.implemented.update((hook, bool(entries)) for hook, entries in self._table.items())

    # -- the hot path ----------------------------------------------------------------

    def call(self, hook: str, context: PluginContext) -> None:
        """Call ``hook`` on every active plugin that implements it, inside the boundary."""
        # Fast path, run several times per batch: a hook nobody implements returns after
        # one lookup. Otherwise: one random fence for the whole round (not per plugin),
        # one clock read per plugin (each call's end is the next one's start) and
        # nothing allocated but the fence's mark. Quarantine (the slow path) rebuilds
        # the table, and the tuple held here keeps this round's order intact.
        entries = self._table[hook]
        if not entries:
            return
        view = self._view if context is self._shown else self._view_for(context)
        fence = self._fence or self._new_fence()
        mark = fence.mark()
        # Grad mode is global: a plugin that turns it off (and fails, or forgets to turn
        # it back on) would leave the loop's backward pass without a graph.
        grad_mode = self._grad_mode
        grad = grad_mode is None or grad_mode()
        watchdog = self._watchdog
        clock = _perf_counter
        where = self._where
        where[1] = _HOOK_NUMBERS[hook]
        started = clock()
        try:
            for slot, method in entries:
                slot.calls += 1
                watchdog.since = started
                try:
                    # Inside the try: an interruption aimed at this plugin (timeout, a
                    # second Ctrl-C) is caught here even if it lands on these lines.
                    watchdog.running = slot
                    where[0] = slot.number
                    method(view)
                    watchdog.running = None
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # a plugin cannot end the process
                    watchdog.running = None
                    if is_verdict(exc):
                        raise  # another plugin's torch hook failed inside this one's hook
                    self._fail(slot, hook, exc, context)
                finished = clock()
                slot.seconds += finished - started
                started = finished
        finally:
            watchdog.running = None
            where[0] = 0
            fence.put_back(mark)
            if grad_mode is not None and grad_mode() is not grad:
                _set_grad_mode(grad)
            # Autocast too, but read only when a plugin's hook changed it (``_touched``):
            # reading it costs a microsecond, this test nothing.
            if self._autocast is not None:
                self._put_back_autocast()

    def _view_for(self, context: PluginContext) -> PluginContext:
        # A new context (a new run, or a test's own): plugins see it through a read-only
        # view; the view is kept, so plugins holding it across hooks keep a live one.
        self._shown = context
        self._view = LoopView(context)
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
        self._fence = random_fence()
        torch = sys.modules.get("torch")
        if torch is not None:
            self._grad_mode = torch.is_grad_enabled
        return self._fence

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

    def _run_torch_hook(
        self,
        slot: _Slot,
        kind: str,
        hook: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> object:
        # A torch hook a plugin registered, called by torch in the middle of a forward,
        # a backward or an optimizer step: the plugin's boundary, fence and clock.
        if slot.fault is not None:
            return None
        watchdog = self._watchdog
        outer = watchdog.running
        fence = self._fence or self._new_fence()
        mark = fence.mark()
        grad_mode = self._grad_mode
        grad = grad_mode is None or grad_mode()
        started = _perf_counter()
        if outer is None:
            watchdog.since = started
        slot.calls += 1
        where = self._where
        outer_where = where[0], where[1]
        try:
            watchdog.running = slot
            where[0], where[1] = slot.number, _supervision.TORCH_HOOK
            return hook(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the plugin's, as in its own hooks
            watchdog.running = outer
            if is_verdict(exc):
                raise
            shown = self._shown if self._shown is not None else PluginContext()
            self._fail(slot, f"torch {kind}", exc, shown)
            return None  # isolate: as if the hook were not there
        finally:
            watchdog.running = outer
            where[0], where[1] = outer_where
            slot.seconds += _perf_counter() - started
            fence.put_back(mark)
            if grad_mode is not None and grad_mode() is not grad:
                _set_grad_mode(grad)
            if self._autocast is not None:
                self._put_back_autocast()

    def _touched(self) -> None:
        # A plugin's hook is about to change autocast: keep the state it changes.
        if self._autocast is None:
            from bz.plugins import _autocast

            self._autocast = _autocast.capture()

    def _put_back_autocast(self) -> None:
        from bz.plugins import _autocast

        state, self._autocast = self._autocast, None
        _autocast.restore(state)

    def interrupt_running(self, signum: int) -> None:
        """From a signal handler: fail the plugin whose hook is running now, if any.

        A second Ctrl-C or SIGTERM while a hook runs means that hook kept the run from
        stopping after its step: it becomes that plugin's fault (logged with its stack,
        quarantined, rewound) and the loop goes on to stop cleanly, with a checkpoint.
        Returns when no plugin is running.
        """
        running = self._watchdog.running
        if running is not None:
            name = getattr(running, "name", "?")
            error = PluginInterrupted(
                f"plugin {name!r} was still running when a second "
                f"{signal.Signals(signum).name} arrived"
            )
            # Should the hook swallow it: forced out, or the process ends (143 / 130).
            self._watchdog.escalate(running, 128 + signum, error)
            raise error

    # -- the slow path ---------------------------------------------------------------

    def _fail(self, slot: _Slot, hook: str, exc: BaseException, context: PluginContext) -> None:
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
        if rank == 0:
            return
        for slot in self._slots:
            slot.dormant = getattr(slot.plugin, "every_rank", False) is not True
        self._rebuild()

    def faulted_slots(self) -> set[int]:
        """Indices of the plugins quarantined on this process."""
        return {index for index, slot in enumerate(self._slots) if slot.fault is not None}

    def quarantine_slots(self, indices: set[int], context: PluginContext) -> None:
        """Quarantine plugins another process quarantined, so every rank runs the same hooks."""
        changed = False
        for index in sorted(indices):
            slot = self._slots[index]
            if slot.fault is None:
                slot.fault = PluginFault(
                    slot.name,
                    "another process",
                    "quarantined because it failed on another rank",
                    context.epoch + 1,
                    context.global_step,
                )
                changed = True
        if changed:
            self._rebuild()

    def set_aside(self, faults: Sequence[PluginFault]) -> None:
        """Quarantine plugins before the run starts: a supervised ``bz train`` restarted
        training without them, each having ended the process it ran in."""
        by_name = {fault.plugin: fault for fault in faults}
        for slot in self._slots:
            if slot.fault is None and slot.name in by_name:
                slot.fault = by_name[slot.name]
        self._rebuild()

    def report(self) -> list[PluginReport]:
        """Time spent and faults, per plugin (loading faults included)."""
        reports = [
            PluginReport(slot.name, slot.hooks, slot.calls, slot.seconds, slot.fault)
            for slot in self._slots
        ]
        reports.extend(PluginReport(f.plugin, (), 0, 0.0, f) for f in self._load_faults)
        return reports

    def log_summary(self) -> None:
        """Emit the end-of-run summary as one structured event."""
        _log.info(
            "plugin_summary",
            plugins={
                report.name: {
                    "calls": report.calls,
                    "seconds": round(report.seconds, 6),
                    "status": "quarantined" if report.fault else "ok",
                    "fault": report.fault.describe() if report.fault else None,
                }
                for report in self.report()
            },
        )


def _set_grad_mode(enabled: bool) -> None:
    import torch  # imported already: only called once a hook has run under torch

    torch.set_grad_enabled(enabled)


# -- plugin states inside the sandbox ---------------------------------------------------------


def guarded(
    plugins: PluginSet,
    plugin: NamedPlugin,
    stage: str,
    context: PluginContext,
    action: Callable[[], T],
) -> T | None:
    """Run a plugin's ``state_dict`` / ``load_state_dict`` inside the sandbox boundary.

    These are not hooks, so :meth:`PluginSet.call` cannot run them; a failure is
    handled exactly like a hook's (logged once, plugin quarantined, or raised under
    the ``raise`` policy). Returns None when the plugin failed.
    """
    try:
        return action()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # like a hook's: everything but Ctrl-C is the plugin's
        plugins.quarantine(plugin, stage, exc, context)
        return None
