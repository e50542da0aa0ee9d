"""Checkpoints as files: the run signature, the payload, names, sidecars, reading.

A run's checkpoints live in ``<checkpoint_dir>/<signature>/``: one file per save,
``epoch-0003.pt`` after three completed epochs, ``epoch-0002-batch-00017.pt`` when
training stopped 17 batches into the third epoch, and ``model.pt``, the weights a
finished run ended with. The signature hashes what makes two runs the same run (model
architecture, optimizer and its hyperparameters, the loss, ``hyperparameters`` and
``seed``), so changing any of them never resumes from an unrelated run, while changing
``epochs`` (training longer) does resume.

Each file bz writes has a sidecar, ``epoch-0003.pt.json``, with the file's size and
SHA-256 and its position in training. Only files whose sidecar matches their bytes count
(for resuming, ``keep_last``, ``bz validate``); anything else in the folder is never
used and never deleted. Files are written atomically (temporary files in the same
folder, fsync, the sidecar renamed into place, then the file, fsync of the folder) and
read with ``torch.load(weights_only=True)``, so a checkpoint cannot run code and a kill
at any instant leaves either the previous file or the complete new one. Writing, the
run's lock and the store are in :mod:`bz.training.checkpoint.store`; random states in
:mod:`bz._rng`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    NotRequired,
    TypedDict,
    cast,
    overload,
)

import torch

from bz._logging import get_logger
from bz._setup import TRAIN_SCRIPT_MODULE_PREFIX
from bz.training.checkpoint.sidecars import FORMAT as FORMAT
from bz.training.checkpoint.sidecars import HASH as HASH
from bz.training.checkpoint.sidecars import SIDECAR_SUFFIX as SIDECAR_SUFFIX
from bz.training.checkpoint.sidecars import Entry as Entry
from bz.training.checkpoint.sidecars import _position as _position
from bz.training.checkpoint.sidecars import checkpoint_name as checkpoint_name
from bz.training.checkpoint.sidecars import hash_path as hash_path
from bz.training.checkpoint.sidecars import list_checkpoints as list_checkpoints
from bz.training.checkpoint.sidecars import list_entries as list_entries
from bz.training.checkpoint.sidecars import read_entry as read_entry
from bz.training.checkpoint.sidecars import sidecar as sidecar
from bz.training.checkpoint.sidecars import verify as verify

if TYPE_CHECKING:
    from bz._setup import TrainingSetup
    from bz.config import RunConfig

_REQUIRED_KEYS = frozenset(
    {"format", "signature", "epoch", "batch", "global_step", "model", "optimizer", "rng"}
)
_MODEL_KEYS = frozenset({"format", "signature", "epoch", "batch", "global_step", "model"})

FINAL_MODEL = "model.pt"
"""The weights a finished run ended with, beside its checkpoints: after the plugins'
``end_training_session`` (where ``early_stopping`` puts the best epoch's weights back),
so not always those of the last checkpoint, which keeps the state training resumes from."""
STATE_FILE = "state.pt"
"""In a sharded checkpoint's folder, rank 0's part: everything but the model and the
optimizer."""

_log = get_logger("bz")


class RngStates(TypedDict):
    """Random states to resume from (each as :func:`capture_rng` returns them)."""

    epoch_start: dict[str, Any]
    """Right before the interrupted epoch's ``iter(train_loader)``."""
    now: dict[str, Any]
    """After the last finished step (the same as ``epoch_start`` between epochs)."""


class ModelPayload(TypedDict):
    """What every file bz writes holds: a run's weights and where they stand.

    A final model (:data:`FINAL_MODEL`) holds just this; a checkpoint holds a
    :class:`CheckpointPayload`.
    """

    format: int
    signature: str
    epoch: int
    """Completed epochs."""
    batch: int
    """Batches of epoch ``epoch + 1`` already trained (0: written between epochs)."""
    global_step: int
    """Optimizer steps taken."""
    model: dict[str, torch.Tensor]
    loss: NotRequired[dict[str, Any] | None]
    """The loss module's state (None for a loss function)."""
    sharded: NotRequired[bool]
    """Read from a sharded checkpoint: ``model`` holds only the shapes (meta tensors),
    the weights and optimizer state load from the shards
    (:mod:`bz.training.checkpoint.sharded`)."""


class CheckpointPayload(ModelPayload):
    """Everything training resumes from (layout :data:`FORMAT`)."""

    optimizer: dict[str, Any]
    rng: RngStates
    world_size: NotRequired[int]
    stopped: NotRequired[bool]
    """A plugin or ``max_steps`` ended the run here: it is finished."""
    loss_total: NotRequired[float]
    """The interrupted epoch's loss sum so far, over all processes."""
    run_dir: NotRequired[str]
    """``context.extra["run_dir"]`` when written ("" when no plugin made one)."""
    batch_loss_total: NotRequired[float]
    """The interrupted epoch's sum of batch (mean) losses so far, over all processes."""
    samples: NotRequired[int]
    """The interrupted epoch's sample count so far, over all processes."""
    metrics: NotRequired[dict[str, list[torch.Tensor]]]
    """The interrupted epoch's mergeable metric state so far."""
    scheduler: NotRequired[dict[str, Any] | None]
    grad_scaler: NotRequired[dict[str, Any] | None]
    """``torch.amp.GradScaler`` state under ``precision: 16-mixed``."""
    plugins: NotRequired[dict[str, Any]]
    """Each stateful plugin's ``state_dict()``, by plugin name."""
    monitored: NotRequired[tuple[str, float | None]]
    """With ``keep_best``, at the end of an epoch: the monitored value's name and value
    (repeated in the sidecar, which ``keep_best`` ranks by)."""
    loader: NotRequired[dict[str, Any]]
    """The training loader's ``state_dict()``, for a loader that has one (rank 0's)."""
    loaders: NotRequired[list[dict[str, Any] | None]]
    """With several processes: each rank's loader ``state_dict()``, by rank."""
    val_loaders: NotRequired[list[dict[str, Any] | None]]
    """Each rank's validation loader state, by rank, for a loader that keeps one
    between its passes (:func:`bz.training.position.validation_state`)."""


def rank_loader_state(payload: CheckpointPayload, rank: int) -> dict[str, Any] | None:
    """The loader state process ``rank`` resumes from: its own when the checkpoint
    holds every rank's, else the one it holds (written by one process)."""
    loaders = payload.get("loaders")
    if loaders is not None and rank < len(loaders):
        return loaders[rank]
    return payload.get("loader")


def rank_validation_state(payload: CheckpointPayload, rank: int) -> dict[str, Any] | None:
    """The validation loader state process ``rank`` hands back (None: none saved)."""
    states = payload.get("val_loaders")
    return states[rank] if states is not None and rank < len(states) else None


# -- the run signature -----------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-friendly, address-free rendering of a hyperparameter value."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _callable_name(value: object) -> str:
    # A module's repr describes its configuration; a function's repr holds a memory
    # address, so it is named by where it is defined instead.
    if isinstance(value, torch.nn.Module):
        return repr(value)
    owner = value if isinstance(value, type) else type(value)
    name = getattr(value, "__qualname__", None) or owner.__qualname__
    module = getattr(value, "__module__", None) or owner.__module__
    if module.startswith(TRAIN_SCRIPT_MODULE_PREFIX):
        module = "train_script"  # the same run wherever its folder is
    return f"{module}.{name}"


def run_signature(setup: TrainingSetup, config: RunConfig) -> str:
    """A short hash of what makes two runs the same run.

    Covered: the model (state-dict keys, shapes and dtypes, and its ``repr``), the
    optimizer (class and every param group's hyperparameters), the scheduler's class,
    the loss (a module's ``repr``, a function's qualified name), the ``step`` and the
    ``scheduler_interval`` (when set), and the config's
    ``hyperparameters`` and ``seed``. Not covered: ``epochs`` (training longer resumes),
    the device, the plugins, the data itself.
    """
    model = setup.model
    optimizer = setup.optimizer
    described = {
        "model": {
            "repr": repr(model),
            "state": [
                [key, list(tensor.shape), str(tensor.dtype)]
                for key, tensor in model.state_dict().items()
            ],
        },
        "optimizer": {
            "class": _callable_name(type(optimizer)),
            "groups": [
                {
                    "params": len(group["params"]),
                    **{key: _plain(value) for key, value in group.items() if key != "params"},
                }
                for group in optimizer.param_groups
            ],
        },
        "scheduler": None if setup.scheduler is None else _callable_name(type(setup.scheduler)),
        "loss": _callable_name(setup.loss_fn),
        "hyperparameters": _plain(config.hyperparameters),
        "seed": config.seed,
    }
    # Keys added only when set, so that the runs of earlier releases keep their signature.
    if setup.step is not None:
        # By name only: train.py's module name differs between processes.
        described["step"] = getattr(setup.step, "__qualname__", type(setup.step).__qualname__)
    if setup.scheduler_interval != "epoch":
        described["scheduler_interval"] = setup.scheduler_interval
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# -- what a checkpoint may hold ------------------------------------------------------------

_SCALARS = (str, bytes, int, float, bool, complex, type(None))
_LEAVES = (torch.Tensor, torch.dtype, torch.device, torch.Size, *_SCALARS)


def loadable_problem(value: object, where: str = "state") -> str | None:
    """Why ``value`` could not be read back with ``weights_only=True``, or None.

    Checked before writing, so that one plugin's odd state cannot make every
    checkpoint of the run unreadable.
    """
    if isinstance(value, _LEAVES):
        return None
    if type(value) in (dict, OrderedDict):
        assert isinstance(value, dict)
        for key, item in value.items():
            if not isinstance(key, _SCALARS):
                return f"{where} has a key of type {type(key).__name__}"
            problem = loadable_problem(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    if type(value) in (list, tuple):
        assert isinstance(value, (list, tuple))
        for index, item in enumerate(value):
            problem = loadable_problem(item, f"{where}[{index}]")
            if problem:
                return problem
        return None
    return (
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors, numbers, "
        "strings, None, and lists, tuples and dicts of them"
    )


class UnreadableCheckpoint(Exception):
    """A checkpoint file that cannot be used (truncated, corrupt, another run's)."""


def read_sharded(path: Path) -> dict[str, Any]:
    """The rest of a sharded checkpoint, with ``model`` as the saved shapes (meta tensors,
    for checking that it fits) and ``sharded`` set; the shards are not read."""
    # Imported here: torch.distributed.checkpoint is slow to import.
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError("not a bz checkpoint")
    metadata = FileSystemReader(path).read_metadata()
    payload["model"] = {
        key.removeprefix("model."): torch.empty(
            item.size, dtype=item.properties.dtype, device="meta"
        )
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata)
    }
    payload["optimizer"] = {}
    payload["sharded"] = True
    return payload


@overload
def read_checkpoint(
    path: Path,
    signature: str | None = None,
    *,
    model_only: Literal[False] = False,
    verified: bool = True,
) -> CheckpointPayload: ...


@overload
def read_checkpoint(
    path: Path,
    signature: str | None = None,
    *,
    model_only: Literal[True],
    verified: bool = True,
) -> ModelPayload: ...


def read_checkpoint(
    path: Path,
    signature: str | None = None,
    *,
    model_only: bool = False,
    verified: bool = True,
) -> ModelPayload | CheckpointPayload:
    """Load and check one checkpoint file (``weights_only``; tensors land on the CPU).

    ``verified`` requires bz's sidecar and a matching checksum. ``model_only`` also
    accepts a run's final model (:data:`FINAL_MODEL`), which has the weights but no
    training state to resume from. Raises :class:`UnreadableCheckpoint` saying why the
    file cannot be used.
    """
    if verified:
        entry = read_entry(path)
        if entry is None:
            raise UnreadableCheckpoint(
                f"no bz sidecar ({sidecar(path).name}): not a checkpoint bz wrote, "
                "or its write did not finish"
            )
        problem = verify(entry)
        if problem is not None:
            raise UnreadableCheckpoint(problem)
    try:
        payload = read_sharded(path) if path.is_dir() else _load_file(path)
    except UnreadableCheckpoint:
        raise
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise UnreadableCheckpoint(_why_unloadable(exc)) from exc
    required = _MODEL_KEYS if model_only else _REQUIRED_KEYS
    if not isinstance(payload, dict) or not payload.keys() >= required:
        raise UnreadableCheckpoint("not a bz checkpoint")
    if payload["format"] != FORMAT:
        raise UnreadableCheckpoint(f"checkpoint format {payload['format']!r}, expected {FORMAT}")
    if signature is not None and payload["signature"] != signature:
        raise UnreadableCheckpoint(
            f"belongs to run {payload['signature']}, not {signature} (model, optimizer or "
            "hyperparameters differ)"
        )
    return cast("ModelPayload", payload) if model_only else cast("CheckpointPayload", payload)


_ZIP_MAGIC = b"PK\x03\x04"
"""How every file ``torch.save`` writes begins (a zip archive)."""


def _load_file(path: Path) -> object:
    """``torch.load(weights_only=True)`` of a file that at least begins like one
    ``torch.save`` wrote, without the warnings torch prints for other pickles."""
    with path.open("rb") as file:
        if file.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            raise UnreadableCheckpoint("not a file torch.save wrote (it is no zip archive)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def _why_unloadable(exc: Exception) -> str:
    """One line in bz's words for what ``torch.load`` refused. torch's own messages run
    to several sentences, and for a file holding other objects advise loading it with
    ``weights_only=False``, which would run whatever code the file names."""
    if isinstance(exc, pickle.UnpicklingError):
        return (
            "it holds Python objects besides tensors and plain values, which bz does not "
            "load (torch.load(weights_only=True))"
        )
    message = str(exc)
    if "PytorchStreamReader" in message or isinstance(exc, (EOFError, zipfile.BadZipFile)):
        return "damaged or cut short (torch cannot read its zip archive)"
    return f"{type(exc).__name__}: {message}".splitlines()[0]


def unusable_reason(
    payload: Mapping[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> str | None:
    """Why a verified checkpoint cannot be resumed into this model and optimizer, or None.

    Checked before anything is loaded, so a checkpoint that does not fit (another
    model's shapes, a missing random state) leaves the model untouched and the previous
    checkpoint can be tried instead.
    """
    for key in ("epoch", "batch", "global_step"):
        if not isinstance(payload.get(key), int) or payload[key] < 0:
            return f"counter {key!r} is missing or not a count"
    problem = model_fit_problem(payload.get("model"), model)
    if problem is not None:
        return problem
    saved_optimizer = payload.get("optimizer")
    if payload.get("sharded"):
        saved_optimizer = None  # by parameter name in the shards; DCP checks it on loading
    elif not isinstance(saved_optimizer, Mapping) or not isinstance(
        saved_optimizer.get("param_groups"), list
    ):
        return "it holds no optimizer state"
    groups = [] if saved_optimizer is None else saved_optimizer["param_groups"]
    if saved_optimizer is not None and [len(g.get("params", ())) for g in groups] != [
        len(g["params"]) for g in optimizer.param_groups
    ]:
        return "the optimizer's parameter groups differ"
    rng = payload.get("rng")
    for moment in ("epoch_start", "now"):
        saved_rng = rng.get(moment) if isinstance(rng, Mapping) else None
        if not isinstance(saved_rng, Mapping) or not {"torch", "python", "generators"} <= set(
            saved_rng
        ):
            return f"random state {moment!r} is missing"
    return None


def model_fit_problem(state: object, model: torch.nn.Module) -> str | None:
    """Why ``state`` cannot be loaded into ``model`` (entries or shapes differ), or None."""
    if not isinstance(state, Mapping):
        return "it holds no model weights"
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    if missing or extra:
        return f"model entries differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, tensor in expected.items():
        saved = state[key]
        if not isinstance(saved, torch.Tensor) or saved.shape != tensor.shape:
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            return f"model entry {key!r} is {shape}, the model has {tuple(tensor.shape)}"
    return None


def is_finished(payload: Mapping[str, Any], epochs: int, max_steps: int | None = None) -> bool:
    """Whether a run whose newest checkpoint is ``payload`` has nothing left to train
    for ``epochs`` and ``max_steps``: a plugin stopped it there, or it is at or past
    ``epochs`` (a mid-epoch checkpoint past a lowered ``epochs`` too: training cannot
    go back), or at ``max_steps``."""
    return (
        bool(payload.get("stopped", False))
        or int(payload["epoch"]) >= epochs
        or (max_steps is not None and int(payload["global_step"]) >= max_steps)
    )


def batch_loss_total(payload: CheckpointPayload, batch: int) -> float:
    """The interrupted epoch's sum of batch losses; for a checkpoint written before it
    was kept, the sample-weighted mean times the batches (exact when they share a size)."""
    if "batch_loss_total" in payload:
        return payload["batch_loss_total"]
    samples = payload.get("samples", 0)
    return payload.get("loss_total", 0.0) * batch / samples if samples else 0.0
