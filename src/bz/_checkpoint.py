"""Checkpoints: the run signature, atomic writes, safe loading, RNG states.

A run's checkpoints live in ``<checkpoint_dir>/<signature>/``: one file per save,
``epoch-0003.pt`` after three completed epochs, ``epoch-0002-batch-00017.pt`` when
training was interrupted 17 batches into the third epoch. The signature hashes what
makes two runs the same run (model architecture, optimizer and its hyperparameters, the
loss, ``hyperparameters`` and ``seed``), so changing any of them never resumes from an
unrelated run, while changing ``epochs`` (training longer) does resume.

Files are written atomically (temporary file in the same folder, flush, fsync, rename,
fsync of the folder) and read with ``torch.load(weights_only=True)``, so a checkpoint
cannot run code and a crash mid-write never leaves a file that looks valid and is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict, TypeVar, cast, overload

import attrs
import structlog
import torch

if TYPE_CHECKING:
    from bz._context import PluginContext
    from bz._plugin import NamedPlugin
    from bz._sandbox import PluginSet
    from bz._setup import TrainingSetup
    from bz.config import RunConfig

FORMAT = 1
"""Version of the checkpoint layout; files of another version are not resumed from."""

_NAME = re.compile(r"epoch-(\d{4,})(?:-batch-(\d{5,}))?\.pt")
_TMP_SUFFIX = ".tmp"
_REQUIRED_KEYS = frozenset(
    {"format", "signature", "epoch", "batch", "global_step", "model", "optimizer", "rng"}
)
_MODEL_KEYS = frozenset({"format", "signature", "epoch", "global_step", "model"})

FINAL_MODEL = "model.pt"
"""The weights a finished run ended with, beside its checkpoints: after the plugins'
``end_training_session`` (where ``early_stopping`` puts the best epoch's weights back),
so not always those of the last checkpoint, which keeps the state training resumes from."""

_log = structlog.get_logger("bz")


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
    global_step: int
    """Optimizer steps taken."""
    model: dict[str, torch.Tensor]
    loss: NotRequired[dict[str, Any] | None]
    """The loss module's state (None for a loss function)."""


class CheckpointPayload(ModelPayload):
    """Everything training resumes from (layout :data:`FORMAT`)."""

    batch: int
    """Batches of epoch ``epoch`` already trained (0: written between epochs)."""
    optimizer: dict[str, Any]
    rng: RngStates
    world_size: NotRequired[int]
    stopped: NotRequired[bool]
    """A plugin or ``max_steps`` ended the run here: it is finished."""
    loss_total: NotRequired[float]
    """The interrupted epoch's loss sum so far, over all processes."""
    samples: NotRequired[int]
    """The interrupted epoch's sample count so far, over all processes."""
    metrics: NotRequired[dict[str, list[torch.Tensor]]]
    """The interrupted epoch's mergeable metric state so far."""
    scheduler: NotRequired[dict[str, Any] | None]
    grad_scaler: NotRequired[dict[str, Any] | None]
    """``torch.amp.GradScaler`` state under ``precision: 16-mixed``."""
    plugins: NotRequired[dict[str, Any]]
    """Each stateful plugin's ``state_dict()``, by plugin name."""


T = TypeVar("T")


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
    return f"{module}.{name}"


def run_signature(setup: TrainingSetup, config: RunConfig) -> str:
    """A short hash of what makes two runs the same run.

    Covered: the model (state-dict keys, shapes and dtypes, and its ``repr``), the
    optimizer (class and every param group's hyperparameters), the scheduler's class,
    the loss (a module's ``repr``, a function's qualified name), and the config's
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
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# -- random number generators ------------------------------------------------------------


def loader_generators(loader: object) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a data loader draws its shuffling from.

    A ``DataLoader`` built with ``generator=`` (or a sampler with its own generator)
    does not use torch's global generator; these must be saved alongside it.
    """
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = [loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)]
    for owner in owners:
        candidate = getattr(owner, "generator", None)
        if isinstance(candidate, torch.Generator) and all(candidate is not g for g in found):
            found.append(candidate)
    return found


def capture_rng(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """Every random state a training step can draw from, in a ``weights_only`` form."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": [generator.get_state() for generator in generators],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": None,
    }
    numpy = sys.modules.get("numpy")  # only when something imported it: never import it here
    if numpy is not None:
        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (str(kind), [int(k) for k in keys], int(position), int(has_gauss), cached)
    return state


def restore_rng(state: Mapping[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    """Put back what :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for generator, saved in zip(generators, state["generators"], strict=False):
        generator.set_state(saved)
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    saved_numpy = state.get("numpy")
    numpy = sys.modules.get("numpy")
    if saved_numpy is not None and numpy is not None:
        kind, keys, position, has_gauss, cached = saved_numpy
        numpy.random.set_state(
            (kind, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, cached)
        )


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


# -- files ---------------------------------------------------------------------------------


def checkpoint_name(epoch: int, batch: int = 0) -> str:
    """``epoch-0003.pt`` (3 epochs done) or ``epoch-0002-batch-00017.pt`` (mid-epoch)."""
    return f"epoch-{epoch:04d}.pt" if batch == 0 else f"epoch-{epoch:04d}-batch-{batch:05d}.pt"


def _position(path: Path) -> tuple[int, int] | None:
    match = _NAME.fullmatch(path.name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint files in ``folder``, newest (furthest into training) first."""
    if not folder.is_dir():
        return []
    found = [(pos, path) for path in folder.iterdir() if (pos := _position(path)) is not None]
    return [path for _, path in sorted(found, reverse=True)]


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable. Not possible on every platform (Windows cannot
    # open a folder), where the rename is as durable as the filesystem makes it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(payload: object, path: Path) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is either complete or absent.

    The data goes to a temporary file in the same folder, which is flushed and fsynced
    before it is renamed over ``path``; a crash at any point leaves at most a stray
    temporary file, which :func:`remove_stray_files` deletes and loading ignores.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)


def remove_stray_files(folder: Path) -> None:
    """Delete temporary files left by a write that was killed."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(_TMP_SUFFIX):
            with contextlib.suppress(OSError):
                path.unlink()


class UnreadableCheckpoint(Exception):
    """A checkpoint file that cannot be used (truncated, corrupt, another run's)."""


@overload
def read_checkpoint(
    path: Path, signature: str | None = None, *, model_only: Literal[False] = False
) -> CheckpointPayload: ...


@overload
def read_checkpoint(
    path: Path, signature: str | None = None, *, model_only: Literal[True]
) -> ModelPayload: ...


def read_checkpoint(
    path: Path, signature: str | None = None, *, model_only: bool = False
) -> ModelPayload | CheckpointPayload:
    """Load and check one checkpoint file (``weights_only``; tensors land on the CPU).

    ``model_only`` also accepts a run's final model (:data:`FINAL_MODEL`), which has
    the weights but no training state to resume from. Raises
    :class:`UnreadableCheckpoint` saying why the file cannot be used.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise UnreadableCheckpoint(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
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


def read_latest(
    folder: Path, signature: str | None = None
) -> tuple[Path, CheckpointPayload] | None:
    """The newest usable checkpoint in ``folder``; damaged newer ones are reported."""
    for path in list_checkpoints(folder):
        try:
            return path, read_checkpoint(path, signature)
        except UnreadableCheckpoint as exc:
            _log.warning(
                "checkpoint_unreadable",
                path=str(path),
                error=str(exc),
                hint="skipping it; trying the previous checkpoint",
            )
    return None


def read_final_model(
    folder: Path, signature: str, at_least_step: int
) -> tuple[Path, ModelPayload] | None:
    """The run's final model, unless it is missing, unreadable (reported) or older than
    step ``at_least_step`` (written before the run was trained further)."""
    path = folder / FINAL_MODEL
    if not path.is_file():
        return None
    try:
        payload = read_checkpoint(path, signature, model_only=True)
    except UnreadableCheckpoint as exc:
        _log.warning("model_unreadable", path=str(path), error=str(exc))
        return None
    if payload["global_step"] < at_least_step:
        return None
    return path, payload


@attrs.define
class CheckpointStore:
    """The checkpoints of one run: ``<root>/<signature>/``."""

    folder: Path
    keep_last: int = 3

    def save(self, payload: Mapping[str, Any], epoch: int, batch: int) -> Path:
        """Write a checkpoint atomically, then drop all but the newest ``keep_last``."""
        path = self.folder / checkpoint_name(epoch, batch)
        atomic_save(dict(payload), path)
        self.prune(keep=path)
        return path

    def prune(self, keep: Path) -> None:
        """Delete all but the newest ``keep_last`` checkpoints (never ``keep``)."""
        others = [path for path in list_checkpoints(self.folder) if path != keep]
        for path in others[self.keep_last - 1 :]:
            self._delete(path)

    def discard_all_but(self, keep: Path) -> int:
        """Delete every checkpoint except ``keep``, and the final model (a run that was
        started over); returns how many checkpoints went."""
        doomed = [path for path in list_checkpoints(self.folder) if path != keep]
        for path in doomed:
            self._delete(path)
        self._delete(self.folder / FINAL_MODEL)
        return len(doomed)

    @staticmethod
    def _delete(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("checkpoint_not_deleted", path=str(path), error=str(exc))


# -- plugin states inside the sandbox ---------------------------------------------------------


def guarded(
    plugins: PluginSet,
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
