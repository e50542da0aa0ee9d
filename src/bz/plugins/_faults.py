"""What a plugin's fault is, how it is reported, and the boundary around loading plugins.

:mod:`bz.plugins._sandbox` raises and records these; they live here so that the
sandbox module stays about dispatch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

import attrs

from bz import _stdio, _supervision
from bz._errors import BzError, TrainingError, describe_exception, package_frame
from bz._logging import get_logger
from bz.plugins._watchdog import EXIT_AFTER_S

if TYPE_CHECKING:
    from types import TracebackType

    from bz.plugins._context import PluginContext
    from bz.plugins._protocol import NamedPlugin

ErrorPolicy = Literal["rewind", "isolate", "raise"]

_log = get_logger("bz")


class PluginFailure(TrainingError):
    """A plugin raised while the policy was ``raise`` (exit 1)."""

    _verdict = False
    """True when the sandbox raised it (see :func:`is_verdict`)."""


def verdict(message: str) -> PluginFailure:
    """The sandbox's own :class:`PluginFailure`, which passes through every boundary."""
    failure = PluginFailure(message)
    failure._verdict = True
    return failure


def is_verdict(exc: BaseException) -> bool:
    """Whether ``exc`` is the sandbox's decision about some plugin, not a new fault: a
    rewind request or a verdict (a torch hook of one plugin can fail inside another
    plugin's hook; that is not the other plugin's fault)."""
    return isinstance(exc, RewindRequested) or (isinstance(exc, PluginFailure) and exc._verdict)


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
    nested boundary's verdict) pass through untouched. Given the plugin's ``module``
    (where its code raises, not bz's look at it), the fault's line starts with the
    plugin's innermost frame (``.../plugin.py:12: ValueError: ...``), as an import
    failure's does. While the block runs, a supervising ``bz train`` is told which plugin
    loads and at which stage (:func:`bz._supervision.loading`).
    """

    __slots__ = ("_faults", "_module", "_plugin", "_policy", "_stage", "_told")

    def __init__(
        self,
        plugin: str,
        stage: str,
        policy: ErrorPolicy,
        faults: list[PluginFault],
        module: str | None = None,
    ) -> None:
        self._plugin, self._stage, self._policy, self._faults = plugin, stage, policy, faults
        self._module = module

    def __enter__(self) -> None:
        self._told = _supervision.loading(self._plugin, self._stage)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        _supervision.restore(self._told)
        if exc is None or isinstance(exc, (KeyboardInterrupt, BzError)):
            return False
        error = self._located(exc) + describe_exception(exc)
        fault = PluginFault(self._plugin, self._stage, error, cause=exc)
        if self._policy == "raise":
            raise PluginFailure(fault.describe()) from exc
        # Loading happens before training: there is nothing to rewind.
        self._faults.append(fault)
        log_fault(fault, exc)
        return True

    def _located(self, exc: BaseException) -> str:
        """``file:line: ``, the plugin's innermost frame ``exc`` passed through, or "".
        An import failure names it inside its own message (``failed to import: ...``)."""
        if self._module is None or self._stage == "import":
            return ""
        return package_frame(exc, self._module)


def give_up(slot: object, exit_code: int, reason: str, *, loading: bool = False) -> None:
    """A hook (``loading``: a plugin's loading) that never returned from its
    interruption: report it and end the process.

    Called from the watchdog's escalation thread while the training thread is stuck in
    the plugin; nothing after that call would ever run, so this writes what it can.
    """
    name = getattr(slot, "name", "?")
    message = (
        f"plugin {name!r} did not return {EXIT_AFTER_S:g} s after it was interrupted "
        f"({reason}); ending the run {_what_is_kept(loading)}"
    )
    with contextlib.suppress(Exception):
        _log.error("plugin_hung", plugin=name, error=reason, exit_code=exit_code)
    with contextlib.suppress(Exception):
        stream = _stdio.stderr()
        stream.write(f"bz: error: {message}\n")
        stream.flush()
    if exit_code != 1:  # stopped by a second signal: a finished command, not a crash
        _supervision.report_outcome(exit_code)
    os._exit(exit_code)


def _what_is_kept(loading: bool) -> str:
    """What the run leaves behind as it ends (the give-up line's end)."""
    if loading:
        return "while plugins load, before training started: nothing was trained"
    newest = _supervision.newest_checkpoint()
    if newest is None:
        return "before its first checkpoint: `bz train` starts it over"
    return f"(the newest checkpoint, where it resumes: {newest})"


__all__ = [
    "ErrorPolicy",
    "LoadBoundary",
    "PluginFailure",
    "PluginFault",
    "PluginReport",
    "RewindRequested",
    "give_up",
    "guarded",
    "is_verdict",
    "log_fault",
    "verdict",
]


T = TypeVar("T")


class Quarantines(Protocol):
    """What :func:`guarded` needs of a plugin set (:class:`bz.plugins._sandbox.PluginSet`)."""

    def quarantine(
        self, plugin: NamedPlugin, stage: str, exc: BaseException, context: PluginContext
    ) -> None:
        """Handle a fault outside a hook like a hook's."""
        ...


# -- plugin states inside the sandbox ---------------------------------------------------------


def guarded(
    plugins: Quarantines,
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
