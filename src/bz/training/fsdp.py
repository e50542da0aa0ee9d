"""``distributed.strategy: "fsdp"``: sharding the model with FSDP2's ``fully_shard``.

Each process keeps only its shard of every parameter (a ``DTensor`` over a device mesh
of all processes), of its gradient and of its optimizer state; a unit's whole
parameters exist only while its forward or backward runs. The units are the
submodules named in ``distributed.fsdp.shard_modules`` (or each direct child that has
parameters), then the root. Checkpoints of such a model are sharded
(:mod:`bz._checkpoint_sharded`); its final weights are gathered on rank 0.

Imported only when the strategy asks for it: ``torch.distributed.fsdp`` takes a while
to import, and most runs never need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from bz._errors import UsageError

if TYPE_CHECKING:
    from bz._distributed import Topology
    from bz.config import FsdpConfig

_PARAM_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def check_shardable(
    model: torch.nn.Module,
    config: FsdpConfig,
    topology: Topology,
    device: torch.device | None = None,
) -> None:
    """Refuse, before training, what FSDP cannot shard (a :class:`~bz.UsageError`)."""
    if not topology.distributed:
        raise UsageError(
            'distributed.strategy "fsdp" needs several processes (bz train '
            '--nproc-per-node N, or torchrun); alone, use the default "ddp"'
        )
    if config.offload_to_cpu and device is not None and device.type == "cpu":
        # FSDP's offload moves shards between an accelerator and the CPU; it fails on CPU.
        raise UsageError(
            "distributed.fsdp.offload_to_cpu needs a GPU device; on the CPU the shards "
            "are there already (set it to false)"
        )
    if not any(True for _ in model.parameters()):
        raise UsageError('distributed.strategy "fsdp": the model has no parameters to shard')
    names = config.shard_modules
    if names is not None:
        present = {type(module).__name__ for module in model.modules()}
        missing = [name for name in names if name not in present]
        if missing:
            raise UsageError(
                f"distributed.fsdp.shard_modules: no submodule of class {missing[0]!r} "
                f"in the model (its classes: {', '.join(sorted(present))})"
            )


def _units(model: torch.nn.Module, names: tuple[str, ...] | None) -> list[torch.nn.Module]:
    if names is None:
        return [child for child in model.children() if any(True for _ in child.parameters())]
    wanted = set(names)
    # Innermost first: fully_shard on a module claims the parameters its own units do not.
    matching = [
        module
        for module in model.modules()
        if module is not model and type(module).__name__ in wanted
    ]
    return list(reversed(matching))


def shard_model(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: FsdpConfig,
    precision: str,
    device: torch.device,
) -> None:
    """Apply ``fully_shard`` to the units, then to the root (in place), over every process.

    ``fully_shard`` replaces each parameter by a sharded one; ``train.py`` built the
    optimizer before, on the whole ones, so its groups are pointed at their shards.
    """
    names = {param: name for name, param in model.named_parameters()}
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    param_dtype = _PARAM_DTYPES.get(precision)
    options: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": config.reshard_after_forward,
        # Parameters in the low precision for compute; gradients reduced in float32, as
        # autocast's master weights would be.
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype is not None
        else MixedPrecisionPolicy(),
    }
    if config.offload_to_cpu:
        options["offload_policy"] = CPUOffloadPolicy()
    for unit in _units(model, config.shard_modules):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    _repoint(optimizer, names, dict(model.named_parameters()))


def _repoint(
    optimizer: torch.optim.Optimizer,
    names: dict[torch.nn.Parameter, str],
    sharded: dict[str, torch.nn.Parameter],
) -> None:
    for group in optimizer.param_groups:
        # A parameter the model does not own (an extra tensor the user optimizes) stays.
        group["params"] = [
            sharded[names[param]] if param in names else param for param in group["params"]
        ]
    for old, name in names.items():
        if old in optimizer.state:  # a step taken in train.py: its state moves along
            optimizer.state[sharded[name]] = optimizer.state.pop(old)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (every process must call it; the
    others get an empty dict): what ``model.pt`` holds, loadable with ``torch.load``."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def load_full_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put whole weights (a ``model.pt``, read by every process) into a sharded model."""
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter storage this process holds (its shards under FSDP)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total
