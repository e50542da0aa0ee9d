"""One capture and one restore of the training state, for checkpoints and rewind.

The training state is what a step changes besides the loop's counters: the model's
weights, the optimizer's state, the scheduler's, the loss module's, the gradient
scaler's (``16-mixed``), and every stateful plugin's. A checkpoint writes
:func:`capture`'s :class:`TrainingState` and :func:`plugin_states` to disk; a rewind
snapshot keeps copies of the same in memory. Both put it back with :func:`restore` and
:func:`load_plugin_states`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import torch

from bz.plugins._protocol import StatefulPlugin
from bz.plugins._sandbox import guarded
from bz.training.checkpoint.files import loadable_problem

if TYPE_CHECKING:
    from bz.training.state import RunParts


@attrs.frozen
class TrainingState:
    """The state dicts of the training objects (None: that object has none, or, for the
    model and optimizer, they are held elsewhere: a sharded checkpoint's shards)."""

    model: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    loss: dict[str, Any] | None
    grad_scaler: dict[str, Any] | None

    def copied(self) -> TrainingState:
        """A copy on the same devices that nothing in the run shares (weights cloned,
        the rest deep-copied; no host round trip)."""
        model = (
            None if self.model is None else {k: v.detach().clone() for k, v in self.model.items()}
        )
        return TrainingState(
            model,
            deep_copy(self.optimizer),
            deep_copy(self.scheduler),
            deep_copy(self.loss),
            deep_copy(self.grad_scaler),
        )


def capture(run: RunParts, *, whole: bool = True) -> TrainingState:
    """The run's training state as live state dicts (``whole=False``: without the model
    and the optimizer, which sharded checkpoints save apart)."""
    setup = run.setup
    scheduler, loss_fn, scaler = setup.scheduler, setup.loss_fn, run.precision.scaler
    return TrainingState(
        model=run.model.state_dict() if whole else None,
        optimizer=setup.optimizer.state_dict() if whole else None,
        scheduler=scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
        loss=loss_fn.state_dict() if isinstance(loss_fn, torch.nn.Module) else None,
        grad_scaler=None if scaler is None else scaler.state_dict(),
    )


def restore(run: RunParts, state: TrainingState, *, copies: bool = False) -> None:
    """Load ``state`` into the run (what is None is left as it is). ``copies``: the
    optimizer and the others get copies, so ``state`` survives to be restored again
    (they keep references to what they load); weights are always copied in."""
    setup = run.setup
    fresh: Callable[[Any], Any] = deep_copy if copies else _same
    if state.model is not None:
        run.model.load_state_dict(state.model)
    if state.optimizer is not None:
        setup.optimizer.load_state_dict(fresh(state.optimizer))
    if state.scheduler is not None and hasattr(setup.scheduler, "state_dict"):
        setup.scheduler.load_state_dict(fresh(state.scheduler))
    if state.loss is not None and isinstance(setup.loss_fn, torch.nn.Module):
        setup.loss_fn.load_state_dict(fresh(state.loss))
    scaler = run.precision.scaler
    if scaler is not None and state.grad_scaler:
        scaler.load_state_dict(fresh(state.grad_scaler))


PluginStates = list[tuple[StatefulPlugin, Any]]
"""Stateful plugins and their states, in the plugins' order."""


def plugin_states(
    run: RunParts, read: Callable[[StatefulPlugin], Any] | None = None
) -> PluginStates:
    """Every active stateful plugin's ``state_dict()``, each read inside the sandbox (a
    plugin that fails is quarantined and left out). ``read`` reads one."""
    states: PluginStates = []
    context = run.refresh_context()
    plugins = run.plugins
    for plugin in plugins.active:
        if not isinstance(plugin, StatefulPlugin):
            continue
        action = functools.partial(read or _state_dict, plugin)
        state = guarded(plugins, plugin, "state_dict", context, action)
        if state is not None:
            states.append((plugin, state))
    return states


def by_name(run: RunParts, states: Mapping[str, Any]) -> PluginStates:
    """The active stateful plugins ``states`` (a checkpoint's, by name) has a state for."""
    return [
        (plugin, states[plugin.name])
        for plugin in run.plugins.active
        if isinstance(plugin, StatefulPlugin) and plugin.name in states
    ]


def load_plugin_states(run: RunParts, states: PluginStates, *, copies: bool = False) -> None:
    """``load_state_dict`` for each plugin of ``states`` still active, inside the sandbox
    (``copies``: of a copy, so ``states`` survives to be loaded again)."""
    plugins = run.plugins
    active = plugins.active
    for plugin, state in states:
        if any(plugin is other for other in active):
            load = functools.partial(plugin.load_state_dict, deep_copy(state) if copies else state)
            guarded(plugins, plugin, "load_state_dict", run.refresh_context(), load)


def deep_copy(value: Any) -> Any:
    """A deep copy; tensors are cloned where they are (no host round trip)."""
    return copy.deepcopy(value)


def _same(value: Any) -> Any:
    return value


def _state_dict(plugin: StatefulPlugin) -> Any:
    return plugin.state_dict()


def checked_plugin_state(plugin: StatefulPlugin, *, alone: bool = False) -> dict[str, Any]:
    """``plugin.state_dict()``, checked to be loadable (``TypeError`` naming what is not)."""
    state = plugin.state_dict()
    problem = loadable_problem(state, "state_dict()")
    if problem is None and alone:
        from bz.training.fsdp import has_sharded_tensors

        if has_sharded_tensors(state):
            problem = (
                "state_dict() holds sharded tensors (DTensor) but the plugin runs on "
                "rank 0 only, which has only its own shards (set every_rank = True)"
            )
    if problem is not None:
        raise TypeError(problem)
    return state
