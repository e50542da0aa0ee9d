"""``plugin_errors: "rewind"``: a plugin's fault never changes what training produces.

The run is a sequence of replayable parts: the session's start (``start_training_session``
and the resume), each epoch (its hooks, its checkpoint and ``save_checkpoint``), and the
session's end (``end_training_session`` and ``model.pt``). Before each part the loop
takes an in-memory snapshot of everything training depends on. When a plugin fails
inside a part, the sandbox quarantines it and raises :class:`RewindRequested`; the loop
puts the snapshot back, tells the remaining plugins (``on_rewind``, with
``context.extra["rewind"]``) and runs the part again, without the faulty plugin. Each
fault quarantines one plugin, so a part is run at most once more than there are plugins.

What a snapshot holds: the model's and the loss module's state, which parameters
require gradients, the optimizer's parameter groups and state, the
scheduler's (learning rates included), every random state a step draws from (torch,
CUDA, Python, NumPy, the loaders' generators), the loop's counters and where the epoch
starts, the stop flag and why the run stopped, the gradient scaler (``16-mixed``),
``extra`` (shallow) and the state of every stateful plugin. It
costs one copy of those, on the device, per part: no per-batch work. Large models opt
out with ``plugin_errors: "isolate"``, which keeps training from the point of the fault.

Several processes do not rewind (one process going back alone would desynchronise the
others): there ``rewind`` acts as ``isolate``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from bz._logging import get_logger
from bz._rng import capture_rng, restore_rng
from bz.plugins._protocol import StatefulPlugin
from bz.plugins._sandbox import RewindRequested
from bz.training.checkpoint.files import list_entries

if TYPE_CHECKING:
    from pathlib import Path

    from bz.plugins._protocol import NamedPlugin
    from bz.plugins._sandbox import PluginFault
    from bz.training.loop import Run

T = TypeVar("T")

_log = get_logger("bz")


def _tensor_copy(value: Any) -> Any:
    """A deep copy; tensors are cloned where they are (no host round trip)."""
    return copy.deepcopy(value)


class Snapshot:
    """Everything a replayed part needs to start exactly as the first time."""

    __slots__ = (
        "checkpoint",
        "checkpoints",
        "epoch",
        "extra",
        "frozen",
        "global_step",
        "groups",
        "loss",
        "model",
        "optimizer",
        "plugins",
        "resume_point",
        "rng",
        "scaler",
        "scheduler",
        "stop",
        "stopped_by",
    )

    def __init__(self, run: Run) -> None:
        setup = run.setup
        self.model = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        self.optimizer = _tensor_copy(setup.optimizer.state_dict())
        # Not in the state dicts, yet a plugin can change them: which parameters train
        # (``requires_grad_``) and which the optimizer holds (``add_param_group``).
        self.frozen = [p for p in run.model.parameters() if not p.requires_grad]
        self.groups = [dict(g, params=list(g["params"])) for g in setup.optimizer.param_groups]
        scheduler = setup.scheduler
        self.scheduler = (
            _tensor_copy(scheduler.state_dict()) if hasattr(scheduler, "state_dict") else None
        )
        loss_fn = setup.loss_fn
        self.loss = (
            _tensor_copy(loss_fn.state_dict()) if isinstance(loss_fn, torch.nn.Module) else None
        )
        scaler = run.precision.scaler
        self.scaler = None if scaler is None else _tensor_copy(scaler.state_dict())
        self.stopped_by = run.stopped_by
        self.checkpoint = run.checkpoints.last
        self.checkpoints = _checkpoint_files(run)
        self.rng = capture_rng(run.generators)
        self.epoch = run.epoch
        self.global_step = run.global_step
        self.resume_point = run.resume_point
        context = run.context
        self.stop = context.should_stop_training
        self.extra = dict(context.extra)
        self.plugins: list[tuple[StatefulPlugin, Any]] = []
        for plugin in run.plugins.active:
            if isinstance(plugin, StatefulPlugin):
                state = _plugin_state(run, plugin)
                if state is not None:
                    self.plugins.append((plugin, state))

    def put_back(self, run: Run) -> None:
        """Make ``run`` what it was when the snapshot was taken."""
        setup = run.setup
        run.model.load_state_dict(self.model)
        frozen = {id(p) for p in self.frozen}  # the snapshot keeps them alive: ids hold
        for parameter in run.model.parameters():
            parameter.requires_grad_(id(parameter) not in frozen)
        groups = setup.optimizer.param_groups
        groups[:] = [dict(g, params=list(g["params"])) for g in self.groups]
        # Optimizers and schedulers keep references to what they load: give them copies,
        # so a second rewind to the same snapshot still finds it intact.
        setup.optimizer.load_state_dict(_tensor_copy(self.optimizer))
        setup.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            setup.scheduler.load_state_dict(_tensor_copy(self.scheduler))
        loss_fn = setup.loss_fn
        if self.loss is not None and isinstance(loss_fn, torch.nn.Module):
            loss_fn.load_state_dict(_tensor_copy(self.loss))
        if self.scaler is not None and run.precision.scaler is not None:
            run.precision.scaler.load_state_dict(_tensor_copy(self.scaler))
        run.stopped_by = self.stopped_by
        self._drop_new_checkpoints(run)
        run.micro = 0
        restore_rng(self.rng, run.generators)
        run.epoch = self.epoch
        run.global_step = self.global_step
        run.resume_point = self.resume_point
        context = run.context
        context.should_stop_training = self.stop
        context.extra.clear()
        context.extra.update(self.extra)
        context.training_metrics = {}
        context.validation_metrics = {}
        active = run.plugins.active
        for plugin, state in self.plugins:
            if any(plugin is other for other in active):
                restore = _loader(plugin, _tensor_copy(state))
                _guarded(run, plugin, "load_state_dict", restore)

    def _drop_new_checkpoints(self, run: Run) -> None:
        # What the failed attempt wrote holds what the plugin did: left on disk, it
        # would be the newest checkpoint for a resume after a crash or Ctrl-C during
        # the replay (which writes its own, clean, ones as it goes).
        run.checkpoints.last = self.checkpoint
        store = run.checkpoints.store
        before = self.checkpoints
        for path, written in _checkpoint_files(run).items():
            if store is not None and before.get(path) != written:
                store.delete(path)


def _checkpoint_files(run: Run) -> dict[Path, int]:
    """The run's checkpoint files and when each was last written (none: not saving)."""
    store = run.checkpoints.store
    if store is None or not run.checkpoints.saving:
        return {}
    files: dict[Path, int] = {}
    for entry in list_entries(store.folder):  # only files bz wrote: never the user's
        with contextlib.suppress(FileNotFoundError):
            files[entry.path] = entry.path.stat().st_mtime_ns
    return files


def _plugin_state(run: Run, plugin: StatefulPlugin) -> Any:
    state = _guarded(run, plugin, "state_dict", plugin.state_dict)
    return _tensor_copy(state) if state is not None else None


def _loader(plugin: StatefulPlugin, state: Any) -> Callable[[], None]:
    def load() -> None:
        plugin.load_state_dict(state)

    return load


def _guarded(run: Run, plugin: NamedPlugin, stage: str, action: Callable[[], T]) -> T | None:
    # Like a hook: a fault quarantines the plugin. Never a rewind from here: the
    # snapshot is being taken or put back, and the part has not started.
    plugins = run.plugins
    rewindable, plugins.rewindable = plugins.rewindable, False
    try:
        return action()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # everything else is the plugin's fault
        plugins.quarantine(plugin, stage, exc, run.refresh_context())
        return None
    finally:
        plugins.rewindable = rewindable


class Rewinder:
    """Runs the parts of a run so that a plugin's fault sends the part back to its start."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rewinds = 0
        """How many times this run went back."""

    @staticmethod
    def wanted(run: Run) -> bool:
        """Whether this run rewinds (``rewind`` policy, one process)."""
        return run.config.plugin_errors == "rewind" and not run.topology.distributed

    def part(self, body: Callable[[], T]) -> T:
        """Run ``body`` from a snapshot; after a plugin's fault, from the snapshot again."""
        run = self.run
        plugins = run.plugins
        if not plugins.active:  # no plugin left that could fail: no snapshot to pay for
            return body()
        snapshot = Snapshot(run)
        while True:
            plugins.rewindable = True
            try:
                return body()
            except RewindRequested as request:
                fault: PluginFault | None = request.fault
            finally:
                plugins.rewindable = False
            while fault is not None:
                fault = self._go_back(snapshot, fault)

    def _go_back(self, snapshot: Snapshot, fault: PluginFault) -> PluginFault | None:
        """Put ``snapshot`` back and tell the plugins; a plugin failing then is returned."""
        run = self.run
        snapshot.put_back(run)
        self.rewinds += 1
        where = {
            "plugin": fault.plugin,
            "hook": fault.stage,
            # Epochs as context.epoch counts them (from 0), like "epoch" beside it; the
            # fault itself counts from 1, as the console does.
            "failed_at_epoch": None if fault.epoch is None else fault.epoch - 1,
            "failed_at_step": fault.step,
            "epoch": run.epoch,
            "step": run.global_step,
            "count": self.rewinds,
        }
        run.context.extra["rewind"] = where
        run.context.extra["active_plugins"] = run.plugins.active_names
        _log.warning("training_rewound", **where)
        plugins = run.plugins
        if not plugins.implements("on_rewind"):
            return None
        plugins.rewindable = True
        try:
            plugins.call("on_rewind", run.refresh_context())
        except RewindRequested as request:
            return request.fault
        finally:
            plugins.rewindable = False
        return None
