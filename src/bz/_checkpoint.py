"""Checkpoints: the run signature, verified atomic files, the run's lock, RNG states.

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
at any instant leaves either the previous file or the complete new one. One process at a
time writes a run: :class:`RunLock`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import random
import re
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Literal,
    NotRequired,
    TypedDict,
    TypeVar,
    cast,
    overload,
)

import attrs
import torch

from bz._logging import get_logger

if TYPE_CHECKING:
    from bz._context import PluginContext
    from bz._plugin import NamedPlugin
    from bz._sandbox import PluginSet
    from bz._setup import TrainingSetup
    from bz.config import RunConfig

FORMAT = 2
"""Version of the checkpoint layout; files of another version are not resumed from.
(Version 1 had no sidecars: such files are left alone like any file bz did not write.)"""

SIDECAR_SUFFIX = ".json"
"""``epoch-0003.pt.json`` describes ``epoch-0003.pt`` (see :func:`atomic_save`)."""
LOCK_FILE = ".lock"
"""The run's lock file (see :class:`RunLock`)."""

_NAME = re.compile(r"epoch-(\d{4,})(?:-batch-(\d{5,}))?\.pt")
_TMP_SUFFIX = ".tmp"
# What flock answers on a filesystem without locks (as opposed to "someone holds it").
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
# Temporary files of bz's writes: ".<final name>.<pid>.tmp".
_STRAY = re.compile(r"\.(?:epoch-\d{4,}(?:-batch-\d{5,})?\.pt|model\.pt)(?:\.json)?\.\d+\.tmp")
_REQUIRED_KEYS = frozenset(
    {"format", "signature", "epoch", "batch", "global_step", "model", "optimizer", "rng"}
)
_MODEL_KEYS = frozenset({"format", "signature", "epoch", "batch", "global_step", "model"})

FINAL_MODEL = "model.pt"
"""The weights a finished run ended with, beside its checkpoints: after the plugins'
``end_training_session`` (where ``early_stopping`` puts the best epoch's weights back),
so not always those of the last checkpoint, which keeps the state training resumes from."""

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


class CheckpointPayload(ModelPayload):
    """Everything training resumes from (layout :data:`FORMAT`)."""

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


def sidecar(path: Path) -> Path:
    """The small JSON file beside ``path`` that says bz wrote it, and its checksum."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _position(path: Path) -> tuple[int, int] | None:
    match = _NAME.fullmatch(path.name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


@attrs.frozen
class Entry:
    """A file bz wrote, as its sidecar describes it (not yet checked against the bytes)."""

    path: Path
    sha256: str
    size: int
    signature: str
    epoch: int
    """Epochs completed when it was written (the number in its name)."""
    batch: int
    """Batches of the next epoch completed (0 at an epoch boundary)."""
    step: int
    """Optimizer steps completed."""
    stopped: bool = False
    """A plugin asked to stop training after this checkpoint."""

    @property
    def position(self) -> tuple[int, int]:
        """How far into training it is, for ordering: ``(epoch, batch)``."""
        return self.epoch, self.batch


def read_entry(path: Path) -> Entry | None:
    """The sidecar of ``path`` when it is bz's and describes this file, else None."""
    try:
        data = json.loads(sidecar(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("bz") != FORMAT or data.get("file") != path.name:
            return None
        return Entry(
            path=path,
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            signature=str(data["signature"]),
            epoch=int(data["epoch"]),
            batch=int(data["batch"]),
            step=int(data["step"]),
            stopped=bool(data.get("stopped", False)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(folder: Path) -> list[Path]:
    """Files in ``folder`` named like checkpoints, newest (furthest into training) first.

    Only the name is looked at; :func:`list_entries` gives those bz wrote.
    """
    if not folder.is_dir():
        return []
    found = [(pos, path) for path in folder.iterdir() if (pos := _position(path)) is not None]
    return [path for _, path in sorted(found, reverse=True)]


def list_entries(folder: Path) -> list[Entry]:
    """The checkpoints in ``folder`` that have bz's sidecar, newest first.

    Files named like checkpoints without one (copied in, written by hand, or left by a
    write that was killed before it finished) are not listed: nothing counts them.
    """
    found = []
    for path in list_checkpoints(folder):
        entry = read_entry(path)
        if entry is not None and entry.position == _position(path):
            found.append(entry)
    return found


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


class _HashingWriter:
    """A file that hashes what is written through it, so checksumming costs no re-read."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _torch_save(payload: Mapping[str, Any], file: _HashingWriter) -> None:
    # torch.save takes any object with write(); its annotation names only IO[bytes].
    torch.save(dict(payload), cast("IO[bytes]", file))


def _write_bytes(data: bytes, file: _HashingWriter) -> None:
    file.write(data)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")


def _write_tmp(path: Path, write: Callable[[_HashingWriter], None]) -> tuple[Path, int, str]:
    """Write a temporary file beside ``path``, flushed and fsynced; its size and sha256."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as file:
            writer = _HashingWriter(file)
            write(writer)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp, writer.size, writer.digest.hexdigest()


def atomic_save(payload: Mapping[str, Any], path: Path) -> Entry:
    """Write ``payload`` to ``path`` with its sidecar, so that a kill at any instant
    leaves either what was there before or the complete new file.

    Both files are written to temporary files in the same folder and fsynced. The
    sidecar is renamed into place first, then the checkpoint: until that second rename
    the checksum does not match whatever ``path`` held, so a half-done write never
    counts. ``payload`` must hold ``signature``, ``epoch``, ``global_step`` and may hold
    ``batch`` and ``stopped`` (they are repeated in the sidecar, so that listing a
    run's checkpoints reads no tensors).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    body, size, digest = _write_tmp(path, functools.partial(_torch_save, payload))
    entry = Entry(
        path=path,
        sha256=digest,
        size=size,
        signature=str(payload["signature"]),
        epoch=int(payload["epoch"]),
        batch=int(payload.get("batch", 0)),
        step=int(payload["global_step"]),
        stopped=bool(payload.get("stopped", False)),
    )
    meta = {
        "bz": FORMAT,
        "file": path.name,
        "sha256": entry.sha256,
        "size": entry.size,
        "signature": entry.signature,
        "epoch": entry.epoch,
        "batch": entry.batch,
        "step": entry.step,
        "stopped": entry.stopped,
    }
    text = json.dumps(meta, indent=1).encode("utf-8")
    try:
        side, _, _ = _write_tmp(sidecar(path), functools.partial(_write_bytes, text))
    except BaseException:
        with contextlib.suppress(OSError):
            body.unlink()
        raise
    try:
        os.replace(side, sidecar(path))
        os.replace(body, path)
    except BaseException:
        for tmp in (side, body):
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    _fsync_folder(path.parent)
    return entry


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def verify(entry: Entry) -> str | None:
    """Why the file does not match its sidecar (damaged, replaced, half-written), or None."""
    try:
        size, digest = _hash_file(entry.path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size != entry.size:
        return f"{size} bytes where bz wrote {entry.size} (truncated or replaced)"
    if digest != entry.sha256:
        return "its checksum does not match what bz wrote (damaged or replaced)"
    return None


def remove_stray_files(folder: Path) -> None:
    """Delete what killed writes left: temporary files, and sidecars whose checkpoint was
    never renamed into place (or was deleted).

    Only for the process holding the run's lock: a temporary file is otherwise possibly
    another process's write in progress.
    """
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        name = path.name
        if name.startswith(".") and name.endswith(_TMP_SUFFIX) and _STRAY.fullmatch(name):
            with contextlib.suppress(OSError):
                path.unlink()
        elif name.endswith(SIDECAR_SUFFIX):
            target = path.with_name(name[: -len(SIDECAR_SUFFIX)])
            ours = _position(target) is not None or target.name == FINAL_MODEL
            if ours and not target.exists() and _is_bz_sidecar(path):
                with contextlib.suppress(OSError):
                    path.unlink()


def _is_bz_sidecar(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("bz") == FORMAT


class UnreadableCheckpoint(Exception):
    """A checkpoint file that cannot be used (truncated, corrupt, another run's)."""


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
    if not isinstance(saved_optimizer, Mapping) or not isinstance(
        saved_optimizer.get("param_groups"), list
    ):
        return "it holds no optimizer state"
    groups = saved_optimizer["param_groups"]
    if [len(g.get("params", ())) for g in groups] != [
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


# -- one writer per run ------------------------------------------------------------------------


class RunLocked(Exception):
    """Another live process holds the run's lock; ``owner`` describes it."""

    def __init__(self, folder: Path, owner: Mapping[str, Any]) -> None:
        pid, host = owner.get("pid", "?"), owner.get("host", "?")
        since = f", since {owner['since']}" if owner.get("since") else ""
        super().__init__(
            f"another bz process (pid {pid} on {host}{since}) is training this run "
            f"({folder}); wait for it to finish or stop it"
        )
        self.owner = dict(owner)


class RunLock:
    """An exclusive lock on a run's folder: ``.lock``, holding the owner's PID and host.

    The lock is the operating system's (``flock``; ``msvcrt.locking`` on Windows), taken
    on the open file, so it ends with the process that holds it: the lock of a process
    that was killed is free at once and the next run takes it over, with no PID guessing.
    The file itself is never deleted (deleting it would let two processes lock two
    different files); it only says who holds the lock, for the error message.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLocked` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                raise RunLocked(self.path.parent, _read_owner(fd))
            owner = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(owner).encode("utf-8"))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Free the lock (closing the file frees it in any case)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def writable_problem(folder: Path) -> str | None:
    """Why bz could not write checkpoints into ``folder`` (created if missing), or None.

    Checked by writing and deleting a small file, the only test that every
    filesystem, permission scheme and read-only mount answers truthfully.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".bz-write-test.{os.getpid()}{_TMP_SUFFIX}"
        with open(probe, "wb") as file:
            file.write(b"bz")
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except OSError as exc:
        return f"{folder}: cannot write checkpoints there: {exc.strerror or exc}"
    return None


# -- the store ----------------------------------------------------------------------------------


@attrs.define
class CheckpointStore:
    """The checkpoints of one run: ``<root>/<signature>/``.

    Only files with bz's sidecar and a matching checksum count: for resuming, for
    ``keep_last``, and for what is deleted. Anything else in the folder is left alone.
    Positions are ``(epoch, batch)``, so checkpoints written every N epochs, N steps or
    N seconds share one order.
    """

    folder: Path
    keep_last: int = 3
    _lock: RunLock | None = attrs.field(default=None, init=False)
    # Files checked in this process: name -> (size, mtime_ns, sha256). A file that has
    # not changed since is not hashed again when pruning.
    _checked: dict[str, tuple[int, int, str]] = attrs.field(factory=dict, init=False)

    # -- the lock ------------------------------------------------------------------------

    def lock(self) -> None:
        """Become the run's only writer (raises :class:`RunLocked`), then delete what
        killed writes left behind, which only the lock makes safe."""
        if self._lock is None:
            lock = RunLock(self.folder)
            try:
                lock.acquire()
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                # Some network and FUSE filesystems have no locks at all. Training there
                # is still possible, just not guarded; nothing is cleaned up unguarded.
                _log.warning(
                    "run_lock_unavailable",
                    path=str(lock.path),
                    error=exc.strerror or str(exc),
                    hint="this filesystem has no file locks: make sure no other bz "
                    "process trains this run",
                )
                return
            self._lock = lock
        remove_stray_files(self.folder)

    def unlock(self) -> None:
        """Let the next process write this run."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- reading --------------------------------------------------------------------------

    def ignored(self) -> list[Path]:
        """Files named like checkpoints that bz will not use: no sidecar of bz's."""
        return [path for path in list_checkpoints(self.folder) if read_entry(path) is None]

    def _verify(self, entry: Entry) -> str | None:
        try:
            stat = entry.path.stat()
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        known = self._checked.get(entry.path.name)
        if known == (stat.st_size, stat.st_mtime_ns, entry.sha256):
            return None
        problem = verify(entry)
        if problem is None:
            self._checked[entry.path.name] = (stat.st_size, stat.st_mtime_ns, entry.sha256)
        return problem

    def verified(self) -> list[Entry]:
        """The checkpoints that bz wrote and whose bytes still match, newest first."""
        return [entry for entry in list_entries(self.folder) if self._verify(entry) is None]

    def newest(
        self,
        signature: str | None = None,
        usable: Callable[[Mapping[str, Any]], str | None] | None = None,
    ) -> tuple[Path, CheckpointPayload] | None:
        """The newest checkpoint that is verified, loads, and ``usable`` accepts.

        Each one passed over is reported in one line (``checkpoint_unreadable`` or
        ``checkpoint_unusable``, with the reason) and the previous one is tried.
        """
        for entry in list_entries(self.folder):
            try:
                problem = self._verify(entry)
                if problem is not None:
                    raise UnreadableCheckpoint(problem)
                payload = read_checkpoint(entry.path, signature, verified=False)
            except UnreadableCheckpoint as exc:
                _log.warning(
                    "checkpoint_unreadable",
                    path=str(entry.path),
                    error=str(exc),
                    hint="skipping it; trying the previous checkpoint",
                )
                continue
            reason = usable(payload) if usable is not None else None
            if reason is not None:
                _log.warning(
                    "checkpoint_unusable",
                    path=str(entry.path),
                    error=reason,
                    hint="skipping it; trying the previous checkpoint",
                )
                continue
            return entry.path, payload
        return None

    def final(self, signature: str, at_least_step: int) -> tuple[Path, ModelPayload] | None:
        """The run's final model, unless it is missing, damaged (reported) or older
        than step ``at_least_step`` (written before the run was trained further)."""
        path = self.folder / FINAL_MODEL
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

    # -- writing (only while holding the lock) ------------------------------------------------

    def save(self, payload: Mapping[str, Any], epoch: int, batch: int) -> Path:
        """Write a checkpoint atomically, then drop all but the newest ``keep_last``."""
        path = self.folder / checkpoint_name(epoch, batch)
        entry = atomic_save(payload, path)
        with contextlib.suppress(OSError):
            stat = path.stat()
            self._checked[path.name] = (stat.st_size, stat.st_mtime_ns, entry.sha256)
        self.prune(keep=path)
        return path

    def save_final(self, payload: Mapping[str, Any]) -> Path:
        """Write the run's final model (:data:`FINAL_MODEL`) atomically."""
        path = self.folder / FINAL_MODEL
        atomic_save(payload, path)
        return path

    def prune(self, keep: Path) -> None:
        """Delete all but the newest ``keep_last`` verified checkpoints (never ``keep``).

        Files bz did not write, and checkpoints whose bytes no longer match, are neither
        counted nor deleted: junk can never push a good checkpoint out.
        """
        others = [entry.path for entry in self.verified() if entry.path != keep]
        for path in others[self.keep_last - 1 :]:
            self.delete(path)

    def discard_all_but(self, keep: Path) -> int:
        """Delete every verified checkpoint except ``keep``, and the final model (a run
        that was started over); returns how many checkpoints went."""
        doomed = [entry.path for entry in self.verified() if entry.path != keep]
        for path in doomed:
            self.delete(path)
        if read_entry(self.folder / FINAL_MODEL) is not None:
            self.delete(self.folder / FINAL_MODEL)
        return len(doomed)

    def delete(self, path: Path) -> None:
        """Delete a checkpoint bz wrote and its sidecar (a warning if that fails)."""
        # The checkpoint first: a kill in between leaves a sidecar without its file,
        # which counts for nothing and which the next run removes.
        self._checked.pop(path.name, None)
        for target in (path, sidecar(path)):
            try:
                target.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                _log.warning("checkpoint_not_deleted", path=str(target), error=str(exc))
                return


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
