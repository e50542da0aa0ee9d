"""Plugins in a process of their own: the plugin's side (``python -m`` this module).

Started by :mod:`bz.plugins._isolated` with one end of a socket pair. The first message
names the plugin, its options and the run's configuration; the plugin is created by
:func:`bz.plugins._loader.load_plugins`, the path ``bz train`` takes in process. Then,
for each message: show the snapshot to the plugin through a read-only
:class:`~bz.plugins._context.LoopView`, call the hook, and send back what it changed
through the guide's channels. A fault in a hook is sent back (the training process
quarantines the plugin) and the plugin is not called again.

The process ends when told to, when its socket closes, or when the training process
ends (Linux: the kernel's parent-death signal; elsewhere a thread that watches the
parent's id).
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

PARENT_POLL_S = 0.5

_HOSTING = contextlib.ExitStack()


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="bz-parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def main(fd: int) -> None:
    """Serve one plugin over the socket ``fd`` until told to close."""
    connection = Connection(fd)
    _kind, start = pickle.loads(connection.recv_bytes())
    _die_with_parent(start.get("parent", os.getppid()))
    sys.path[:] = start["sys_path"]

    def send(message: object) -> None:
        connection.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    plugin, hooks = _create(start, send)
    if plugin is None:
        connection.close()
        os._exit(0)
    server = _Server(plugin, hooks, start["run_config"])
    while True:
        try:
            message = pickle.loads(connection.recv_bytes())
        except (EOFError, OSError):
            break
        reply = server.handle(message)
        send(reply)
        if message[0] == "close":
            break
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    # Threads the plugin started do not keep the process alive.
    os._exit(0)


def _create(start: dict[str, Any], send: Any) -> tuple[Any, frozenset[str]]:
    from bz import _logging
    from bz._errors import ConfigError
    from bz.config import PluginSpec
    from bz.plugins._inspection import implemented_hooks
    from bz.plugins._isolated import NEEDS_TRAINING_PROCESS
    from bz.plugins._loader import load_plugins
    from bz.plugins._order import plugin_order
    from bz.plugins._run_dir import run_dir_hint
    from bz.plugins._scalars import GRADIENT_NORM_ATTRIBUTE

    if start["log_format"] is not None:
        # Rendered like the training process's events; its prints and stdlib records
        # become events too (kept for the life of the process).
        _logging.configure(start["log_format"])
        _HOSTING.enter_context(_logging.host_plugin_output(start["log_format"], "info"))
    if start["run_dir_hint"] is not None:
        run_dir_hint.set(start["run_dir_hint"])
    path = start["path"]
    spec = PluginSpec(start["name"], start["options"], path)
    try:
        loaded = load_plugins([spec], start["run_config"], policy="isolate")
    except ConfigError as exc:
        send(("config_error", list(exc.problems)))
        return None, frozenset()
    except Exception as exc:  # bz's own errors while loading, e.g. an order problem
        send(("fault", ("load", f"{type(exc).__name__}: {exc}")))
        return None, frozenset()
    if not loaded.active:
        send(("faults", [(f.stage, f.error) for f in loaded.faults]))
        return None, frozenset()
    plugin = loaded.active[0]
    hooks = frozenset(implemented_hooks(plugin))
    order = plugin_order(plugin)
    every = getattr(plugin, GRADIENT_NORM_ATTRIBUTE, None)
    needs = getattr(plugin, NEEDS_TRAINING_PROCESS, False)
    info = {
        "hooks": sorted(hooks),
        "stateful": callable(getattr(plugin, "state_dict", None))
        and callable(getattr(plugin, "load_state_dict", None)),
        "order": order if _pickles(order) else None,
        "every_rank": getattr(plugin, "every_rank", False) is True,
        GRADIENT_NORM_ATTRIBUTE: every if isinstance(every, int) else None,
        NEEDS_TRAINING_PROCESS: needs if isinstance(needs, (bool, str)) else bool(needs),
    }
    send(("ready", info))
    return plugin, hooks


def _pickles(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


class _OptimizerValues:
    """What a process plugin sees of the optimizer: its parameter groups' plain values
    (``lr``, ``momentum``, ...), enough for ``learning_rates(context.optimizer)``."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.param_groups = param_groups


class _Server:
    """The plugin, its context, and one message at a time."""

    def __init__(self, plugin: Any, hooks: frozenset[str], run_config: Any) -> None:
        from bz.plugins._context import DeviceSum, LoopView, PluginContext

        self._plugin = plugin
        self._hooks = hooks
        self._sum = DeviceSum
        context = PluginContext()
        context.run_config = run_config
        context.hyperparameters = dict(getattr(run_config, "hyperparameters", {}) or {})
        self._context = context
        self._view = LoopView(context)
        self._failed = False

    def handle(self, message: tuple[Any, ...]) -> tuple[str, Any]:
        kind = message[0]
        if self._failed:
            return ("fault", (kind, "the plugin failed before"))
        try:
            if kind == "hook":
                return self._hook(message[1], message[2])
            if kind == "state_dict":
                return ("state", self._plugin.state_dict())
            if kind == "load_state_dict":
                self._plugin.load_state_dict(message[1])
                return ("done", None)
            if kind == "close":
                state = getattr(self._plugin, "state_dict", None)
                return ("state", state() if callable(state) else None)
        except BaseException as exc:  # the plugin's fault, reported to the training process
            self._failed = True
            where = message[1] if kind == "hook" else kind
            return ("fault", (where, f"{type(exc).__name__}: {exc}"))
        return ("fault", (kind, "unknown message"))

    def _hook(self, hook: str, snapshot: dict[str, Any]) -> tuple[str, Any]:
        context = self._context
        fields = context.__dict__
        extra = snapshot.pop("extra")
        loss = snapshot.pop("last_loss", None)
        context.last_loss = _tensor(loss)
        norm = snapshot.pop("gradient_norm", None)
        fields["_gradient_norm"] = norm
        groups = snapshot.pop("param_groups", None)
        fields["_optimizer"] = None if groups is None else _OptimizerValues(groups)
        if "device" in snapshot:
            device = snapshot.pop("device")
            fields["device"] = None if device is None else DeviceName(device)
        losses = snapshot.pop("losses", None)
        if losses is not None:
            weighted, batches, val_weighted, val_batches = losses
            fields["_training_loss"] = self._sum(weighted, batches)
            fields["_validation_loss"] = self._sum(val_weighted, val_batches)
        metrics: dict[str, dict[str, float]] = {}
        for field in ("training_metrics", "validation_metrics"):
            if field in snapshot:
                metrics[field] = snapshot.pop(field)
                fields[field] = dict(metrics[field])
        fields.update(snapshot)
        context.extra = extra
        before = copy.deepcopy(extra)
        stop = context.should_stop_training
        if hook in self._hooks:
            getattr(self._plugin, hook)(self._view)
        return ("changes", self._changes(before, stop, metrics))

    def _changes(
        self, before: dict[str, Any], stop: bool, metrics: dict[str, dict[str, float]]
    ) -> tuple[dict[str, Any], list[str], bool | None, dict[str, dict[str, float]]]:
        from bz.plugins._snapshot import plain

        context = self._context
        after = context.extra
        changed = {
            key: value
            for key, value in after.items()
            if (key not in before or before[key] != value) and plain(value)
        }
        removed = [key for key in before if key not in after]
        now = context.should_stop_training
        added: dict[str, dict[str, float]] = {}
        for field, seen in metrics.items():
            table = getattr(context, field)
            new = {k: v for k, v in table.items() if k not in seen and plain(v)}
            if new:
                added[field] = new
        return changed, removed, (now if now != stop else None), added


class DeviceName(str):
    """The training device as a process plugin sees it: its name (``str(device)`` as in
    process), with ``type`` like a ``torch.device``."""

    __slots__ = ()

    @property
    def type(self) -> str:
        """``cuda`` of ``cuda:1``."""
        return self.split(":")[0]


class HostScalar(float):
    """The step's loss as a process plugin sees it: a number that also answers the
    tensor calls plugins make on a loss (``.item()``, ``.detach()``, ``.cpu()``), so the
    plugin's process need not import torch for it."""

    def item(self) -> float:
        """The value, as ``Tensor.item()`` gives it."""
        return float(self)

    def detach(self) -> HostScalar:
        """Itself (it holds no graph)."""
        return self

    def cpu(self) -> HostScalar:
        """Itself (it is on the host)."""
        return self


def _tensor(value: float | None) -> Any:
    """The loss as plugins read it in process (``float(loss)``, ``loss.item()``)."""
    return None if value is None else HostScalar(value)


if __name__ == "__main__":
    main(int(sys.argv[1]))
