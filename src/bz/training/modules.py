"""The model as objects, not only as a ``state_dict``: what a rewind puts back besides values.

A plugin can change a model in ways its ``state_dict`` does not show: a module's plain
attributes (a dropout's ``p``, ``training``), which Parameter, buffer or submodule
object sits under a name (the optimizer holds the old ones), reparametrizations
(``torch.nn.utils.prune`` moves ``weight`` to ``weight_orig``, adds a mask buffer, a
``weight`` attribute and a forward pre-hook), hooks on the modules, and a tensor's dtype
and device (``model.double()`` swaps ``.data`` under the same Parameter).

:class:`ModuleSnapshot` keeps, for every module of the model (and the loss module), a
shallow copy of its ``__dict__`` (dicts and sets copied one level: ``_parameters``,
``_buffers``, ``_modules``, the hook tables) and each parameter's and buffer's dtype,
device and shape. :meth:`ModuleSnapshot.put_back` makes each ``__dict__`` what it was
(the same container objects, refilled: handles torch gave out still find their
tables) and gives a tensor whose dtype, device or shape changed storage of the old kind;
the values come back from the ``state_dict`` right after. Cost: a few small dict copies
per module per part, nothing per batch.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from bz._errors import UsageError
from bz._rng import capture_rng, loader_generators, restore_rng
from bz.training.device import to_device
from bz.training.forward import forward_for

if TYPE_CHECKING:
    from bz._setup import TrainingSetup

_CONTAINERS = (dict, OrderedDict, set)

_Saved = tuple[Any, Any]
"""(the container object, a copy of its contents), or (None, the value itself)."""


class ModuleSnapshot:
    """The modules' own attributes and their tensors' kinds (see the module docstring)."""

    __slots__ = ("_entries",)

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        entries = []
        seen: set[int] = set()
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            saved: dict[str, _Saved] = {}
            for key, value in vars(module).items():
                if type(value) in _CONTAINERS:
                    saved[key] = (value, value.copy())
                else:
                    saved[key] = (None, value)
            kinds = [
                (tensor, tensor.dtype, tensor.device, tensor.shape)
                for table in (module._parameters, module._buffers)
                for tensor in table.values()
                if tensor is not None
            ]
            entries.append((module, saved, kinds))
        self._entries = entries

    def put_back(self) -> None:
        """Every module's ``__dict__`` as it was; tensors of their old dtype, device, shape."""
        for module, saved, kinds in self._entries:
            current = vars(module)
            for key in [key for key in current if key not in saved]:
                del current[key]
            for key, (container, contents) in saved.items():
                if container is None:
                    current[key] = contents
                else:
                    container.clear()
                    container.update(contents)
                    current[key] = container
            for tensor, dtype, device, shape in kinds:
                if tensor.dtype != dtype or tensor.device != device or tensor.shape != shape:
                    with torch.no_grad():
                        tensor.data = torch.empty(shape, dtype=dtype, device=device)


def model_modules(model: torch.nn.Module, loss_fn: object) -> list[torch.nn.Module]:
    """The model's modules and, when it is one, the loss module's."""
    modules = list(model.modules())
    if isinstance(loss_fn, torch.nn.Module):
        modules.extend(loss_fn.modules())
    return modules


def is_lazy(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds a parameter or buffer a lazy module has not shaped yet."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return any(torch.nn.parameter.is_lazy(tensor) for tensor in tensors)


def materialize(setup: TrainingSetup) -> None:
    """Shape the lazy modules of ``setup.model`` (``nn.LazyLinear`` & co.) before a run.

    What bz does before the first step needs every parameter's shape: the run signature,
    checkpoints, rewind snapshots, DDP and FSDP. So a model with lazy modules runs one
    forward pass, as torch advises, on the first training batch: without gradients, in
    eval mode (batch norm statistics and dropout untouched), and every random state a
    step draws from (torch's, the loader's generators) put back after it, so the
    weights draw their initial values and training then goes on as if it had not run.
    Costs nothing for a model without lazy modules.
    """
    model, loader = setup.model, setup.train_loader
    if not is_lazy(model):
        return
    if isinstance(loader, Iterator):
        raise UsageError(
            "the model has lazy modules (nn.LazyLinear, ...) and train_loader can be read "
            "only once: run one batch through the model in setup() to shape them"
        )
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    forward = forward_for(setup, "train_loader", metrics=False)
    generators = loader_generators(loader)
    saved = capture_rng(generators)
    training = model.training
    try:
        batch = next(iter(loader), None)
        if batch is None:  # an empty loader: the loop's own check reports it
            return
        if device.type != "cpu":
            batch = to_device(batch, device)
        model.eval()
        with torch.no_grad():
            forward.compute(model, forward.prepare(batch))
    finally:
        model.train(training)
        restore_rng(saved, generators)


__all__ = ["ModuleSnapshot", "is_lazy", "materialize", "model_modules"]
