"""Plugins in a process of their own: ``"isolation": "process"`` (the training side).

A plugin listed with ``"isolation": "process"`` is created in a fresh Python process
(:mod:`bz.plugins._isolated_child`, started with ``python -m``: never a fork of a
process that holds torch's threads), from its entry point and options, by the same
loader ``bz train`` uses. The training process holds an :class:`IsolatedPlugin` in its
place: a proxy implementing the same hooks, run by the sandbox like any plugin. At each
hook the proxy sends the child a snapshot of the context's plain values (counters,
losses, metrics, learning rates, ``extra``'s plain entries, ``run_dir``), never the
model, the optimizer, the batch or a tensor; the child shows them to the plugin and
sends back what the plugin changed through the guide's channels (``extra``,
``should_stop_training``, new metric entries).

How the training process waits on it:

* **Batch-level hooks** (``start_training_batch`` ... ``end_validation_batch``) never
  wait. The snapshot is posted and the step goes on. At most :data:`QUEUE_LIMIT`
  messages (and :data:`BYTES_LIMIT` bytes) are on their way to the child; a batch-level
  snapshot that finds the queue full is **dropped and counted** (the plugin never sees
  that call; the count is logged as ``isolated_plugin_dropped`` when the session ends).
  The loss, the gradient norm and the learning rates are read to the host for it only
  in ``end_training_batch`` of the steps it declares with ``gradient_norm_every = N``
  (what the built-in loggers set from ``step_interval``); elsewhere ``last_loss`` is None
  in its batch hooks.
* **Every other hook waits** for the child to finish every message sent before it and
  then that hook, so ``extra`` and ``should_stop_training`` set there are exact. What a
  batch-level hook sets takes effect at a later batch-level call of the proxy (it reads
  the replies that arrived once :data:`READ_AT` messages are out), and at the latest at
  ``end_epoch`` (the proxy always waits there).
* ``state_dict`` / ``load_state_dict`` wait, like epoch-level hooks.

Waiting is bounded by ``plugin_timeout``; start-up (a fresh interpreter importing and
creating the plugin) is not a hook and has its own limit, ``plugin_start_timeout``, and
the process plugins of a run start at the same time (:func:`isolated_starts`). Whatever
ends the child (an exception in a
hook, a segfault, ``os._exit``, a hang past the timeout) is the plugin's fault: the
proxy ends the child and raises, and the sandbox quarantines it as it does any plugin.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from bz._errors import ConfigError
from bz._logging import get_logger
from bz.plugins._faults import PluginFailure, PluginFault
from bz.plugins._hooks import HOOKS
from bz.plugins._isolated_channel import (
    QUEUE_LIMIT,
    Channel,
    IsolatedPluginError,
    spawn,
)
from bz.plugins._run_dir import run_dir_hint
from bz.plugins._scalars import GRADIENT_NORM_ATTRIBUTE
from bz.plugins._snapshot import COUNTERS, epoch_values, plain_entries, source_of, step_values

if TYPE_CHECKING:
    from bz.config import PluginSpec, RunConfig
    from bz.plugins._context import PluginContext
    from bz.plugins._faults import ErrorPolicy

ISOLATION_KEY = "isolation"
"""The framework key of a plugin's options mapping (like ``enabled``)."""
IN_PROCESS = "in-process"
PROCESS = "process"
ISOLATIONS = (IN_PROCESS, PROCESS)
"""Its values; ``in-process`` is the default."""

NEEDS_TRAINING_PROCESS = "needs_training_process"
"""A plugin attribute: true (or a string saying why) when the plugin must run in the
training process (it reads or changes the model, the optimizer, tensors, or measures the
training process itself); ``"isolation": "process"`` refuses such a plugin."""

PER_BATCH = frozenset(spec.name for spec in HOOKS if spec.per_batch)
SYNC_HOOKS = ("end_epoch", "end_training_session")
"""Hooks every proxy implements: where replies of batch-level hooks are waited for."""

_log = get_logger("bz")


def isolation_of(options: Mapping[str, Any], path: str) -> str:
    """The ``isolation`` a plugin's options ask for; a :class:`ConfigError` if unknown."""
    value = options.get(ISOLATION_KEY, IN_PROCESS)
    if value not in ISOLATIONS:
        raise ConfigError(
            [
                (
                    f"{path}.{ISOLATION_KEY}",
                    f'expected "{IN_PROCESS}" or "{PROCESS}", got {json.dumps(value)}',
                )
            ]
        )
    return str(value)


def needs_training_process(name: str, path: str, declared: object) -> ConfigError:
    """The error for a plugin that declared ``needs_training_process`` (``declared``:
    true, or why) and is configured with ``"isolation": "process"``."""
    reason = f": {declared}" if isinstance(declared, str) else ""
    return ConfigError(
        [
            (
                f"{path}.{ISOLATION_KEY}",
                f'plugin {name!r} cannot run with "isolation": "{PROCESS}"; it '
                f"needs the training process{reason}",
            )
        ]
    )


def check_isolation(factory: object, config: object, spec: PluginSpec, path: str) -> None:
    """``bz check-config``: refuse ``"isolation": "process"`` for a plugin class that
    declares it needs the training process, as starting it would (without creating it)."""
    if isolation_of(spec.options, path) != PROCESS:
        return
    declared = declared_need(factory, config)
    if declared is True or (isinstance(declared, str) and declared):
        raise needs_training_process(spec.name, path, declared)


def declared_need(factory: object, config: object) -> object:
    """What a plugin declares as ``needs_training_process`` without creating it
    (``bz check-config``): its class's attribute, or its property evaluated on the checked
    ``Config`` object as the plugin holds it (``self.config``, as bz's own plugins and
    the guide's do); for a plugin made by ``create`` (the guide's style) or by a factory
    function, the same of each class its return annotation names. None where only the
    created plugin can say."""
    declared = _declared_by(factory, config)
    if not _refuses(declared):
        for made in _classes_made_by(factory):
            if _refuses(made_need := _declared_by(made, config)):
                return made_need
    return declared


def _refuses(declared: object) -> bool:
    return declared is True or (isinstance(declared, str) and bool(declared))


def _declared_by(cls: object, config: object) -> object:
    declared = inspect.getattr_static(cls, NEEDS_TRAINING_PROCESS, None)
    if isinstance(declared, property):
        if declared.fget is None or not attrs.has(type(config)):
            return None
        try:
            return declared.fget(types.SimpleNamespace(config=config))
        except Exception:  # it reads more than its config: bz train checks it
            return None
    return declared


def _classes_made_by(factory: object) -> tuple[type, ...]:
    """The classes ``factory``'s ``create`` (or the factory function itself) says it
    returns, from its return annotation (``-> "MyPlugin | None"``, ``-> Self``)."""
    if isinstance(factory, type):
        create = inspect.getattr_static(factory, "create", None)
        function = getattr(create, "__func__", create)  # a staticmethod or classmethod
    else:
        function = factory
    if not callable(function):
        return ()
    try:
        returned = typing.get_type_hints(function).get("return")
    except Exception:  # an annotation that does not resolve: only bz train can tell
        return ()
    return tuple(_classes_in(returned, factory))


def _classes_in(annotation: object, factory: object) -> Iterator[type]:
    if annotation is typing.Self and isinstance(factory, type):
        yield factory
    elif isinstance(annotation, type) and annotation is not type(None):
        yield annotation
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            yield from _classes_in(member, factory)


def without_isolation(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a plugin itself reads (the framework's ``isolation`` key removed)."""
    return {key: value for key, value in options.items() if key != ISOLATION_KEY}


def _log_format() -> str | None:
    """How bz's events are rendered in this process (the child renders its own alike)."""
    import structlog

    processors = structlog.get_config().get("processors", [])
    names = {type(processor).__name__ for processor in processors}
    if "JSONRenderer" in names:
        return "json"
    if "ConsoleRenderer" in names:
        return "console"
    return None


# -- starting one ---------------------------------------------------------------------------


@attrs.frozen
class Starting:
    """A process plugin whose process was started and asked to create the plugin."""

    spec: PluginSpec
    path: str
    timeout: float | None
    """``plugin_timeout``, for the plugin's hooks (start-up has ``plugin_start_timeout``)."""
    channel: Channel
    deadline: float | None
    """When start-up must be over (``time.monotonic``; None: no limit)."""
    limit: str
    """What set the deadline, for the line that reports it passed."""


def begin_isolated(
    spec: PluginSpec, path: str, run_config: RunConfig, registry: Mapping[str, object]
) -> Starting:
    """Start plugin ``spec.name``'s process and ask it to create the plugin, without
    waiting (:func:`start_isolated` does): several start at the same time. A factory
    given in code cannot be imported there: a :class:`ConfigError`."""
    if spec.name in registry:
        raise ConfigError([(path, f'"isolation": "{PROCESS}" needs an installed plugin')])
    channel = spawn()
    start = {
        "name": spec.name,
        "options": without_isolation(spec.options),
        "path": path,
        "run_config": run_config,
        "sys_path": list(sys.path),
        "parent": os.getpid(),
        "run_dir_hint": run_dir_hint.get(),
        "log_format": _log_format(),
    }
    seconds = run_config.plugin_start_timeout
    deadline = None if seconds is None else time.monotonic() + seconds
    with contextlib.suppress(IsolatedPluginError):  # ended already: start_isolated says how
        channel.post(("start", start), limit=False)
    limit = "plugin_start_timeout" + (f" ({seconds:g} s)" if seconds is not None else "")
    return Starting(spec, path, run_config.plugin_timeout, channel, deadline, limit)


@contextlib.contextmanager
def isolated_starts(
    specs: Iterable[PluginSpec],
    path: Callable[[PluginSpec], str],
    run_config: RunConfig,
    registry: Mapping[str, object],
) -> Iterator[dict[str, Starting]]:
    """Every enabled process plugin of ``specs``, started at once (:func:`begin_isolated`)
    and handed to :func:`start_isolated` by name; if loading fails, their processes end."""
    starting: dict[str, Starting] = {}
    try:
        for spec in specs:
            where = path(spec)
            if spec.enabled and isolation_of(spec.options, where) == PROCESS:
                starting[spec.name] = begin_isolated(spec, where, run_config, registry)
        yield starting
    except BaseException:
        for each in starting.values():
            each.channel.close(kill=True)  # a no-op for one already closed
        raise


def start_isolated(
    starting: Starting, policy: ErrorPolicy, faults: list[PluginFault]
) -> IsolatedPlugin | None:
    """Wait for a plugin :func:`begin_isolated` started and return its proxy.

    Start-up (a fresh interpreter importing and creating the plugin) may take
    ``plugin_start_timeout``, counted from when its process started, whatever
    ``plugin_timeout`` is (that bounds its hooks). Bad options are a
    :class:`ConfigError`, as in process; a plugin that declares it needs the training
    process (:data:`NEEDS_TRAINING_PROCESS`) is one too. Faults while importing or
    creating it follow ``policy`` (appended to ``faults`` and None, or a
    :class:`PluginFailure`).
    """
    name, path, channel = starting.spec.name, starting.path, starting.channel
    try:
        kind, payload = channel.receive(
            starting.deadline, f"plugin {name!r} (starting)", starting.limit
        )
    except IsolatedPluginError as exc:
        channel.close(kill=True)
        kind, payload = "fault", ("create", f"IsolatedPluginError: {exc}")
    if kind == "ready":
        refusal = payload.get(NEEDS_TRAINING_PROCESS)
        if refusal:
            channel.close(kill=True)
            raise needs_training_process(name, path, refusal)
        proxy_class = StatefulIsolatedPlugin if payload["stateful"] else IsolatedPlugin
        return proxy_class(name, payload, channel, starting.timeout)
    channel.close(kill=kind != "closed")
    if kind == "config_error":
        raise ConfigError([tuple(problem) for problem in payload])
    if kind == "faults":
        # The child logged them (with their tracebacks) as in-process loading does.
        for stage, error in payload:
            fault = PluginFault(name, stage, error)
            if policy == "raise":
                raise PluginFailure(fault.describe())
            faults.append(fault)
        return None
    stage, error = payload
    fault = PluginFault(name, stage, error)
    if policy == "raise":
        raise PluginFailure(fault.describe())
    faults.append(fault)
    _log.error("plugin_failed", plugin=name, hook=stage, error=error)
    return None


# -- the proxy ------------------------------------------------------------------------------


class IsolatedPlugin:
    """The training process's side of a plugin that runs in its own process."""

    def __init__(
        self, name: str, info: Mapping[str, Any], channel: Channel, timeout: float | None
    ) -> None:
        self.name = name
        self._channel = channel
        self._timeout = timeout
        self._hooks = frozenset(info["hooks"])
        self._state: Any = None
        self.dropped = 0
        """Batch-level calls dropped because the queue was full."""
        self._last_step = -1
        if info.get("order") is not None:
            self.order = info["order"]
        if info.get("every_rank") is True:
            self.every_rank = True
        every = info.get(GRADIENT_NORM_ATTRIBUTE)
        self._values_every = every if isinstance(every, int) and every >= 1 else 0
        if self._values_every:
            setattr(self, GRADIENT_NORM_ATTRIBUTE, every)
        for hook in {*self._hooks, *SYNC_HOOKS}:
            call = self._post if hook in PER_BATCH else self._ask
            setattr(self, hook, functools.partial(call, hook))

    # -- batch level: never waits --------------------------------------------------------

    def _post(self, hook: str, context: PluginContext) -> None:
        channel = self._channel
        if channel.closed:
            raise IsolatedPluginError("its process has ended")
        while channel.ready():
            self._apply(channel.receive(None, hook), context)
        source = source_of(context)
        fields = source.__dict__
        snapshot = {field: fields[field] for field in COUNTERS}
        snapshot["extra"] = plain_entries(source.extra)
        if hook == "end_training_batch" and self._values_every:
            step = source.global_step
            if step != self._last_step:
                self._last_step = step
                if step % self._values_every == 0:
                    snapshot.update(step_values(source))
        if not channel.post(("hook", hook, snapshot), limit=True):
            self.dropped += 1

    # -- everything else: waits ----------------------------------------------------------

    def _ask(self, hook: str, context: PluginContext) -> None:
        source = source_of(context)
        self._last_step = source.global_step
        snapshot = {field: source.__dict__[field] for field in COUNTERS}
        snapshot.update(epoch_values(source))
        self._request(("hook", hook, snapshot), hook, context)
        if hook == "end_training_session":
            self._finish(context)

    def _request(self, message: object, what: str, context: PluginContext | None) -> Any:
        channel = self._channel
        if channel.closed:
            raise IsolatedPluginError("its process has ended")
        timeout = self._timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while channel.in_flight:  # what batch-level hooks sent first
                self._apply(channel.receive(deadline, what), context)
            channel.post(message, limit=False)
            return self._apply(channel.receive(deadline, what), context)
        except BaseException:  # a fault, the watchdog's interruption, Ctrl-C: it ends here
            channel.close(kill=True)
            raise

    def _apply(self, reply: Any, context: PluginContext | None) -> Any:
        kind, payload = reply
        if kind == "fault":
            hook, error = payload
            raise IsolatedPluginError(f"in {hook}: {error}")
        if kind != "changes" or context is None:
            return payload
        extra, removed, stop, metrics = payload
        if extra or removed:
            table = context.extra
            table.update(extra)
            for key in removed:
                table.pop(key, None)
        if stop is not None:
            context.should_stop_training = stop
        for field, entries in metrics.items():
            getattr(context, field).update(entries)
        return None

    def _finish(self, context: PluginContext) -> None:
        self._state = self._request(("close",), "close", None)
        self._channel.close(kill=False)
        if self.dropped:
            _log.warning(
                "isolated_plugin_dropped",
                plugin=self.name,
                dropped=self.dropped,
                hint=f"its queue ({QUEUE_LIMIT} messages) was full: it did not see "
                "these batch-level calls",
            )


class StatefulIsolatedPlugin(IsolatedPlugin):
    """A process plugin with ``state_dict`` / ``load_state_dict``: through the channel."""

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state, asked of its process (after every hook sent before)."""
        if self._channel.closed and self._state is not None:
            state: dict[str, Any] = self._state  # its last state, sent as it closed
            return state
        fresh: dict[str, Any] = self._request(("state_dict",), "state_dict", None)
        return fresh

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Hand ``state`` to the plugin in its process."""
        self._request(("load_state_dict", dict(state)), "load_state_dict", None)


__all__ = [
    "IN_PROCESS",
    "ISOLATIONS",
    "ISOLATION_KEY",
    "NEEDS_TRAINING_PROCESS",
    "PROCESS",
    "QUEUE_LIMIT",
    "IsolatedPlugin",
    "IsolatedPluginError",
    "Starting",
    "StatefulIsolatedPlugin",
    "begin_isolated",
    "isolated_starts",
    "isolation_of",
    "start_isolated",
    "without_isolation",
]
