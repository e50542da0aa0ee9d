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
too long (see :mod:`bz.plugins._watchdog`).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

import attrs

from bz._errors import BzError, TrainingError, describe_exception
from bz._logging import get_logger
from bz.plugins._context import LoopView, PluginContext
from bz.plugins._fence import RandomFence, random_fence
from bz.plugins._hooks import HOOK_NAMES
from bz.plugins._watchdog import PluginInterrupted, Watchdog

if TYPE_CHECKING:
    from types import TracebackType

    from bz.plugins._protocol import NamedPlugin

ErrorPolicy = Literal["rewind", "isolate", "raise"]

_log = get_logger("bz")
_perf_counter = time.perf_counter


class PluginFailure(TrainingError):
    """A plugin raised while the policy was ``raise`` (exit 1)."""


class RewindRequested(BaseException):
    """A plugin failed under ``rewind``: the loop goes back to its last consistent state.

    Raised out of :meth:`PluginSet.call` only while the loop has said it can rewind
    (:attr:`PluginSet.rewindable`). A ``BaseException`` so that no ``except Exception``
    between the hook and the loop swallows it. The plugin is already quarantined.
    """

    def __init__(self, fault: PluginFault) -> None:
        super().__init__(fault.describe())
        self.fault = fault


@attrs.frozen
class PluginFault:
    """What went wrong with a plugin, where, and when."""

    plugin: str
    stage: str
    """The hook name, or ``import`` / ``config`` / ``create`` / ``load`` while loading."""
    error: str
    """``ExceptionType: message``."""
    epoch: int | None = None
    step: int | None = None
    cause: BaseException | None = attrs.field(default=None, eq=False, repr=False)
    """The exception, for faults while loading (``bz check-config --traceback``)."""

    def describe(self) -> str:
        """One line for people."""
        where = f" (epoch {self.epoch}, step {self.step})" if self.epoch is not None else ""
        return f"plugin {self.plugin!r} failed in {self.stage}{where}: {self.error}"


@attrs.frozen
class PluginReport:
    """End-of-run numbers for one plugin."""

    name: str
    hooks: tuple[str, ...]
    calls: int
    seconds: float
    fault: PluginFault | None


class _Slot:
    """A plugin's bookkeeping: mutated in place on the hot path, so no allocation."""

    __slots__ = ("calls", "dormant", "fault", "hooks", "name", "plugin", "seconds")

    def __init__(self, name: str, plugin: NamedPlugin, hooks: tuple[str, ...]) -> None:
        self.name = name
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
        self._slots = [_Slot(plugin.name, plugin, hooks) for plugin, hooks in plugins]
        self._load_faults = list(load_faults)
        self._table: dict[str, tuple[_Entry, ...]] = {}
        self._rebuild()
        self.rewindable = False
        """Set by the loop while it can go back to a consistent state (``rewind``)."""
        self._fence: RandomFence | None = None
        self._grad_mode: Callable[[], bool] | None = None
        """``torch.is_grad_enabled``, once the fence is built (torch is imported then)."""
        self._shown: PluginContext | None = None
        self._view: PluginContext = LoopView(PluginContext())
        self._watchdog = Watchdog()

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
        return bool(self._table[hook])

    def _rebuild(self) -> None:
        # Precomputed per hook: a hook nobody implements is an empty tuple, so calling
        # it costs a dict lookup and nothing else.
        self._table = {
            hook: tuple(
                (slot, getattr(slot.plugin, hook))
                for slot in self._slots
                if slot.fault is None and not slot.dormant and hook in slot.hooks
            )
            for hook in HOOK_NAMES
        }

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
        started = clock()
        try:
            for slot, method in entries:
                slot.calls += 1
                watchdog.since = started
                try:
                    # Inside the try: an interruption aimed at this plugin (timeout, a
                    # second Ctrl-C) is caught here even if it lands on these lines.
                    watchdog.running = slot
                    method(view)
                    watchdog.running = None
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # a plugin cannot end the process
                    watchdog.running = None
                    self._fail(slot, hook, exc, context)
                finished = clock()
                slot.seconds += finished - started
                started = finished
        finally:
            watchdog.running = None
            fence.put_back(mark)
            if grad_mode is not None and grad_mode() is not grad:
                _set_grad_mode(grad)

    def _view_for(self, context: PluginContext) -> PluginContext:
        # A new context (a new run, or a test's own): plugins see it through a read-only
        # view; the view is kept, so plugins holding it across hooks keep a live one.
        self._shown = context
        self._view = LoopView(context)
        config = context.run_config
        self._watchdog.arm(getattr(config, "plugin_timeout", None))
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
        """Stop the timeout watchdog (the loop calls this when the run ends)."""
        self._watchdog.disarm()

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
            raise PluginInterrupted(
                f"plugin {name!r} was still running when a second "
                f"{signal.Signals(signum).name} arrived"
            )

    # -- the slow path ---------------------------------------------------------------

    def _fail(self, slot: _Slot, hook: str, exc: BaseException, context: PluginContext) -> None:
        fault = PluginFault(
            slot.name, hook, describe_exception(exc), context.epoch + 1, context.global_step
        )
        slot.fault = fault
        self._rebuild()
        if self.policy == "raise":
            raise PluginFailure(fault.describe()) from exc
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


def log_fault(fault: PluginFault, exc: BaseException) -> None:
    """The one structured event a fault produces, traceback included."""
    _log.error(
        "plugin_failed",
        plugin=fault.plugin,
        hook=fault.stage,
        epoch=fault.epoch,
        step=fault.step,
        error=fault.error,
        exc_info=exc,
    )


class LoadBoundary:
    """The same boundary for loading: import, config structuring, ``create``.

    A fault is appended to ``faults`` and logged (``isolate``), and the ``with`` block
    is left as if it had finished, so code after it runs; under ``raise`` it becomes a
    :class:`PluginFailure`. bz's own errors (a bad option in ``bzconfig.json``, a
    nested boundary's verdict) pass through untouched.
    """

    __slots__ = ("_faults", "_plugin", "_policy", "_stage")

    def __init__(
        self, plugin: str, stage: str, policy: ErrorPolicy, faults: list[PluginFault]
    ) -> None:
        self._plugin, self._stage, self._policy, self._faults = plugin, stage, policy, faults

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or isinstance(exc, (KeyboardInterrupt, BzError)):
            return False
        fault = PluginFault(self._plugin, self._stage, describe_exception(exc), cause=exc)
        if self._policy == "raise":
            raise PluginFailure(fault.describe()) from exc
        # Loading happens before training: there is nothing to rewind.
        self._faults.append(fault)
        log_fault(fault, exc)
        return True


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
