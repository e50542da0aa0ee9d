"""``plugin_errors: "rewind"``: a plugin's fault never changes what training produces.

The run is a sequence of replayable parts: the session's start (``start_training_session``
and the resume), each epoch (its hooks, its checkpoint and ``save_checkpoint``), and the
session's end (``end_training_session`` and ``model.pt``). Before each part the loop
takes an in-memory snapshot of everything training depends on. When a plugin fails
inside a part, the sandbox quarantines it and raises :class:`RewindRequested`; the loop
puts the snapshot back, tells the remaining plugins (``on_rewind``, with
``context.extra["rewind"]``) and runs the part again, without the faulty plugin. Each
fault quarantines one plugin, so a part is run at most once more than there are plugins.

What a snapshot holds: the model's and the loss module's state, the modules as objects
(their attributes, the Parameter, buffer and submodule objects under each name,
reparametrizations, hooks, each tensor's dtype and device: :mod:`bz.training.modules`),
the torch hooks plugins registered during the part, which parameters require gradients,
the optimizer's parameter groups and state, the scheduler's (learning rates included),
every random state a step draws from (torch, CUDA, Python, NumPy, the loaders'
generators, the validation loader's included), the process-wide settings a step depends
on (:mod:`bz.training.settings`: default dtype and device, threads, deterministic
algorithms, anomaly mode, denormals, float32 precision, cuDNN's, oneDNN's and attention
kernels' flags, the recursion limit), the loop's counters and where the epoch starts,
the stop flag and why the run stopped, the gradient scaler (``16-mixed``), ``extra``
(shallow) and the state of every stateful plugin. It costs one copy of those, on the
device, per part: no per-batch work. Large models opt out with ``plugin_errors:
"isolate"``, which keeps training from the point of the fault.

Several processes do not rewind (one process going back alone would desynchronise the
others): there ``rewind`` acts as ``isolate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from bz._logging import get_logger
from bz._rng import capture_rng, restore_rng
from bz.plugins._sandbox import RewindRequested
from bz.training.capture import capture, deep_copy, load_plugin_states, plugin_states, restore
from bz.training.checkpoint.files import list_entries
from bz.training.modules import ModuleSnapshot, model_modules
from bz.training.position import validation_state
from bz.training.settings import put_back_settings, read_settings
from bz.training.state import RunParts

if TYPE_CHECKING:
    from pathlib import Path

    from bz.plugins._protocol import StatefulPlugin
    from bz.plugins._sandbox import PluginFault
    from bz.training.checkpoint.policy import CheckpointPolicy

T = TypeVar("T")

_log = get_logger("bz")


class RewindableRun(RunParts, Protocol):
    """What rewind needs of a run: its parts and its checkpoint policy."""

    checkpoints: CheckpointPolicy


class Snapshot:
    """Everything a replayed part needs to start exactly as the first time."""

    __slots__ = (
        "checkpoint",
        "checkpoints",
        "extra",
        "frozen",
        "groups",
        "hooks",
        "loop",
        "modules",
        "plugins",
        "rng",
        "settings",
        "stop",
        "training",
        "val_loader",
    )

    def __init__(self, run: RewindableRun) -> None:
        # What a checkpoint holds (model, optimizer, scheduler, loss module, gradient
        # scaler; the plugins' states), captured as a checkpoint captures it, copied.
        self.training = capture(run).copied()
        # Not in the state dicts either: the modules as objects (attributes, which
        # Parameter sits under a name, reparametrizations, hooks, dtype and device), and
        # the torch hooks plugins registered elsewhere (tensors, optimizer, global).
        self.modules = ModuleSnapshot(model_modules(run.model, run.setup.loss_fn))
        self.hooks = run.plugins.hooks_mark()
        # Not in the state dicts, yet a plugin can change them: which parameters train
        # (``requires_grad_``) and which the optimizer holds (``add_param_group``).
        optimizer = run.setup.optimizer
        self.frozen = [p for p in run.model.parameters() if not p.requires_grad]
        self.groups = [dict(g, params=list(g["params"])) for g in optimizer.param_groups]
        self.loop = run.state.copy()
        self.checkpoint = run.checkpoints.last
        self.checkpoints = _checkpoint_files(run)
        self.rng = capture_rng(run.generators)
        self.settings = read_settings()
        context = run.context
        self.stop = context.should_stop_training
        self.extra = dict(context.extra)
        self.plugins = plugin_states(run, _copied_state)
        # What the validation loader carries from one pass to the next (a pass count, a
        # stream's position): handed back before the replayed part's first pass.
        pending = run.state.val_loader_state
        self.val_loader = deep_copy(pending) if pending is not None else _val_state(run)

    def put_back(self, run: RewindableRun) -> None:
        """Make ``run`` what it was when the snapshot was taken."""
        # First: what follows makes tensors (the default dtype and device) and calls
        # functions (the recursion limit) as it did when the snapshot was taken.
        put_back_settings(self.settings)
        self.modules.put_back()  # then: the state dicts load into these objects
        run.plugins.drop_hooks_since(self.hooks)
        frozen = {id(p) for p in self.frozen}  # the snapshot keeps them alive: ids hold
        for parameter in run.model.parameters():
            parameter.requires_grad_(id(parameter) not in frozen)
        optimizer = run.setup.optimizer
        optimizer.param_groups[:] = [dict(g, params=list(g["params"])) for g in self.groups]
        # Optimizers and schedulers keep references to what they load: they get copies,
        # so a second rewind to the same snapshot still finds it intact.
        restore(run, self.training, copies=True)
        optimizer.zero_grad(set_to_none=True)
        run.state.put_back(self.loop)
        if self.val_loader is not None:  # a copy: a second rewind finds this one intact
            run.state.val_loader_state = deep_copy(self.val_loader)
        self._drop_new_checkpoints(run)
        restore_rng(self.rng, run.generators)
        context = run.context
        context.should_stop_training = self.stop
        context.extra.clear()
        context.extra.update(self.extra)
        context.training_metrics = {}
        context.validation_metrics = {}
        load_plugin_states(run, self.plugins, copies=True)

    def _drop_new_checkpoints(self, run: RewindableRun) -> None:
        # What the failed attempt wrote holds what the plugin did: left on disk, it
        # would be the newest checkpoint for a resume after a crash or Ctrl-C during
        # the replay (which writes its own, clean, ones as it goes).
        run.checkpoints.last = self.checkpoint
        store = run.checkpoints.store
        before = self.checkpoints
        for path, written in _checkpoint_files(run).items():
            if store is not None and before.get(path) != written:
                store.delete(path)


def _checkpoint_files(run: RewindableRun) -> dict[Path, int]:
    """The run's checkpoint files and when each was last written (none: not saving)."""
    store = run.checkpoints.store
    if store is None or not run.checkpoints.saving:
        return {}
    files: dict[Path, int] = {}
    for entry in list_entries(store.folder):  # only files bz wrote: never the user's
        with contextlib.suppress(FileNotFoundError):
            files[entry.path] = entry.path.stat().st_mtime_ns
    return files


def _val_state(run: RunParts) -> dict[str, Any] | None:
    """A copy of the validation loader's own state (None: it keeps none). A loader whose
    ``state_dict()`` fails is replayed without it: checkpoints report that failure."""
    if run.val_loader is None:
        return None
    try:
        state = validation_state(run.val_loader)
        return None if state is None else dict(deep_copy(state))
    except Exception:  # the user's loader; never a reason to stop training
        return None


def _copied_state(plugin: StatefulPlugin) -> Any:
    # A fault here quarantines the plugin, never rewinds: snapshots are taken and put
    # back outside a part's run, where the plugin set is not rewindable.
    return deep_copy(plugin.state_dict())


class Rewinder:
    """Runs the parts of a run so that a plugin's fault sends the part back to its start."""

    def __init__(self, run: RewindableRun) -> None:
        self.run = run
        self.rewinds = 0
        """How many times this run went back."""

    @staticmethod
    def wanted(run: RewindableRun) -> bool:
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
            "epoch": run.state.epoch,
            "step": run.state.global_step,
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
