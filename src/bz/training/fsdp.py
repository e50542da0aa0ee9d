"""``distributed.strategy: "fsdp"``: sharding the model with FSDP2's ``fully_shard``.

Each process keeps only its shard of every parameter (a ``DTensor`` over a device mesh
of all processes), of its gradient and of its optimizer state; a unit's whole
parameters exist only while its forward or backward runs. The units are the
submodules named in ``distributed.fsdp.shard_modules`` (or each direct child that has
parameters), then the root. Checkpoints of such a model are sharded
(:mod:`bz.training.checkpoint.sharded`); its final weights are gathered on rank 0.

Imported only when the strategy asks for it: ``torch.distributed.fsdp`` takes a while
to import, and most runs never need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from bz._errors import UsageError
from bz._logging import get_logger

if TYPE_CHECKING:
    from bz._distributed import Topology
    from bz.config import FsdpConfig

_log = get_logger("bz")

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


def units(model: torch.nn.Module, names: tuple[str, ...] | None) -> list[torch.nn.Module]:
    """The submodules sharded as units before the root, innermost first.

    ``names``: the classes named in ``shard_modules``; None: each direct child that has
    parameters. A module that shares a parameter with a module outside it (tied
    weights: an embedding and the output layer) is left out: ``fully_shard`` refuses a
    parameter that another unit manages, so the root (or a unit enclosing both ends of
    the tie) holds it.
    """
    if names is None:
        candidates = [child for child in model.children() if any(True for _ in child.parameters())]
    else:
        wanted = set(names)
        # Innermost first: fully_shard on a module claims the parameters its units do not.
        candidates = list(
            reversed(
                [
                    module
                    for module in model.modules()
                    if module is not model and type(module).__name__ in wanted
                ]
            )
        )
    # Every name of every parameter, a tied one under each of its names.
    places: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        places.setdefault(id(param), []).append(name)
    prefixes = {id(module): f"{name}." for name, module in model.named_modules()}
    chosen: list[torch.nn.Module] = []
    claimed: set[int] = set()
    for unit in candidates:
        prefix = prefixes[id(unit)]
        own = [id(param) for param in unit.parameters() if id(param) not in claimed]
        shared = [place for key in own for place in places[key] if not place.startswith(prefix)]
        if shared:
            _log.info(
                "fsdp_unit_skipped",
                module=prefix[:-1],
                shares=shared[0],
                hint="a tied parameter: the root (or an enclosing unit) shards it",
            )
            continue
        chosen.append(unit)
        claimed.update(own)
    return chosen


def shard_model(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: FsdpConfig,
    precision: str,
    device: torch.device,
) -> DeviceMesh:
    """Apply ``fully_shard`` to the units, then to the root (in place), over every process.

    ``fully_shard`` replaces each parameter by a sharded one; ``train.py`` built the
    optimizer before, on the whole ones, so its groups are pointed at their shards.
    Returns the device mesh the shards live on (see :func:`release_groups`).
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
    for unit in units(model, config.shard_modules):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    if any(True for _ in model.buffers()):
        model.register_forward_hook(_broadcast_buffers)
    _repoint(optimizer, names, dict(model.named_parameters()))
    return mesh


def release_groups(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Let go of the process groups the sharded ``model`` and its ``mesh`` hold, once
    ``destroy_process_group`` has destroyed them.

    The mesh (named by every shard) and FSDP's per-unit mesh records keep the groups
    alive as long as the model; ``destroy_process_group`` forgets them but cannot free
    them. A gloo group freed only when the interpreter shuts down joins its worker
    threads there, and a worker that still has a finished collective's tensors to
    release needs the interpreter's lock for it: the interpreter ends that thread and
    the C++ runtime aborts the process ("terminate called without an active
    exception", SIGABRT). Freed here, the group joins its threads while the
    interpreter still lets them finish.
    """
    registry = getattr(mesh, "_pg_registry", None)  # newer torch; older meshes keep names
    if isinstance(registry, dict):
        registry.clear()
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if callable(state) else None
        if group is None:
            continue
        holders = [group, *getattr(group, "fsdp_params", ())]
        for holder in holders:
            for name in ("mesh_info", "post_forward_mesh_info"):
                info = getattr(holder, name, None)
                if info is not None and hasattr(info, "shard_process_group"):
                    info.shard_process_group = None


def _broadcast_buffers(model: torch.nn.Module, args: Any, output: Any) -> None:
    """Give every process rank 0's buffers after a training forward.

    FSDP shards parameters only; buffers (batch norm's running statistics) are updated
    by each process from its own batch and would drift apart, so a checkpoint (DCP keeps
    one process's copy) could not resume exactly, and model.pt (rank 0's) would not be
    the weights a checkpoint holds. DDP broadcasts rank 0's before each forward; after
    it, every process already holds the same ones when a checkpoint is taken.
    """
    if model.training and torch.is_grad_enabled():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


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


def whole_tensors(state: Any, *, keep: bool) -> Any:
    """``state`` with every sharded tensor (``DTensor``) gathered whole on the CPU.

    A plugin's state is written by rank 0 alone; the shards of the others would be
    lost (early stopping's best weights, a ``model.state_dict()`` copy, are sharded).
    Every process must call it with states of the same structure (collectives); only
    the one that ``keep``s the result holds the whole tensors, one at a time on the
    device, so no process needs room for the whole model there.
    """
    if isinstance(state, DTensor):
        whole = state.full_tensor()
        return whole.cpu() if keep else None
    if isinstance(state, Mapping):
        return {key: whole_tensors(value, keep=keep) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(whole_tensors(value, keep=keep) for value in state)
    return state


def has_sharded_tensors(state: Any) -> bool:
    """Whether ``state`` holds a ``DTensor`` anywhere."""
    if isinstance(state, DTensor):
        return True
    if isinstance(state, Mapping):
        return any(has_sharded_tensors(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return any(has_sharded_tensors(value) for value in state)
    return False


def shard_like_model(model: torch.nn.Module, state: Any) -> Any:
    """``state`` (read from a checkpoint) with every whole tensor stored under one of the
    model's state-dict keys, with that entry's shape, sharded as the model's entry is.

    A plugin's copy of ``model.state_dict()`` is saved whole (:func:`whole_tensors`), and
    ``load_state_dict`` of a sharded model takes only sharded tensors: this puts such a
    copy back into the layout of the loading run, whatever number of processes wrote it.
    """
    entries = {
        key: value for key, value in model.state_dict().items() if isinstance(value, DTensor)
    }
    return _shard_like(entries, state)


def _shard_like(entries: Mapping[str, DTensor], state: Any) -> Any:
    if isinstance(state, Mapping):
        result: dict[Any, Any] = {}
        for key, value in state.items():
            like = entries.get(key) if isinstance(key, str) else None
            if (
                like is not None
                and isinstance(value, torch.Tensor)
                and not isinstance(value, DTensor)
                and value.shape == like.shape
            ):
                value = distribute_tensor(
                    value.to(like.device_mesh.device_type), like.device_mesh, like.placements
                )
            else:
                value = _shard_like(entries, value)
            result[key] = value
        return result
    if isinstance(state, (list, tuple)):
        return type(state)(_shard_like(entries, value) for value in state)
    return state


def load_whole_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
) -> None:
    """Load a single-file checkpoint (whole tensors: one process, or DDP) into a sharded
    model and its optimizer: each process keeps its shard of every tensor."""
    load_full_weights(model, dict(model_state))
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[Any, Any] = {}
    for index, entries in optimizer_state["state"].items():
        param = params[index] if isinstance(index, int) and index < len(params) else None
        if isinstance(param, DTensor):
            # Per-parameter tensors (momentum, Adam's moments) have its shape; a step
            # count is a scalar, kept whole as FSDP's optimizer keeps it.
            entries = {
                key: distribute_tensor(value, param.device_mesh, param.placements)
                if isinstance(value, torch.Tensor) and value.shape == param.shape
                else value
                for key, value in entries.items()
            }
        state[index] = entries
    optimizer.load_state_dict({"state": state, "param_groups": optimizer_state["param_groups"]})
