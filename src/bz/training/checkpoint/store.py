"""Writing checkpoints: atomic, verified files and the store of one run.

Reading and checking what was written (names, sidecars, payloads) is in
:mod:`bz.training.checkpoint.files`; the one-writer lock in
:mod:`bz.training.checkpoint.lock`; this module writes, prunes and guards a run's folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    BinaryIO,
    cast,
)

import attrs
import torch

from bz._errors import UsageError
from bz._logging import get_logger
from bz.training.checkpoint.best import ranked, retained
from bz.training.checkpoint.files import (
    FINAL_MODEL,
    FORMAT,
    HASH,
    SIDECAR_SUFFIX,
    CheckpointPayload,
    Entry,
    ModelPayload,
    UnreadableCheckpoint,
    _position,
    checkpoint_name,
    list_checkpoints,
    list_entries,
    read_checkpoint,
    read_entry,
    sidecar,
    verify,
)
from bz.training.checkpoint.lock import NO_LOCKS, RunLock
from bz.training.checkpoint.sidecars import new_hasher, read_sidecar

if TYPE_CHECKING:
    from bz.config import KeepBest

_log = get_logger("bz")

_TMP_SUFFIX = ".tmp"
_STRAY = re.compile(
    r"\.(?:epoch-\d{4,}(?:-batch-\d{5,})?\.(?:pt|dcp)|model\.pt)(?:\.json)?(?:\.\d+)?\.tmp"
)


def fsync_folder(folder: Path) -> None:
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


def release_cache(path: Path) -> None:
    """Hand the page cache of ``path``, a file bz wrote and fsynced, back to the kernel.

    Its bytes stay on disk, untouched; only the memory holding a copy goes. Called on
    the file a save is about to replace, so that the new file's pages are the ones the
    old file just gave back, as when ``torch.save`` truncates a file it overwrites. Left
    cached until the rename, the old copy makes the new one take memory that was free
    for a while, which on a virtual machine that reports free memory to its host costs
    a fault in the host per page: a 1 GB write then took twice as long. Does nothing
    where there is no such file, or no ``posix_fadvise`` (not Linux).
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # none yet, a folder (a sharded checkpoint), or unreadable: nothing to give
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """A file that hashes what is written through it, so checksumming costs no re-read
    (:data:`~bz.training.checkpoint.files.HASH`, at memory speed)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = new_hasher(HASH)
        self.size = 0
        self.error: OSError | None = None
        """The first write the file refused (a full disk): torch.save reports it only as
        its own "unexpected pos" RuntimeError."""

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def torch_save(payload: Mapping[str, Any], file: _HashingWriter) -> None:
    # torch.save takes any object with write(); its annotation names only IO[bytes].
    torch.save(dict(payload), cast("IO[bytes]", file))


def write_bytes(data: bytes, file: _HashingWriter) -> None:
    file.write(data)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")


def write_tmp(path: Path, write: Callable[[_HashingWriter], None]) -> tuple[Path, int, str]:
    """Write a temporary file beside ``path``, flushed and fsynced; its size and checksum."""
    tmp = _tmp_name(path)
    writer: _HashingWriter | None = None
    try:
        with open(tmp, "wb") as file:
            writer = _HashingWriter(file)
            write(writer)
            file.flush()
            os.fsync(file.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if writer is not None and writer.error is not None and exc is not writer.error:
            raise writer.error from None  # "No space left on device", not torch's words
        raise
    return tmp, writer.size, writer.digest.hexdigest()


def _not_in_the_way(path: Path) -> None:
    """Raise ``FileExistsError`` if ``path`` is a file bz did not write (no sidecar of
    bz's describing it): bz leaves such files alone, so it does not write over one."""
    if path.exists() and read_entry(path) is None:
        raise FileExistsError(
            f"{path} is a file bz did not write (no sidecar of bz's): it is left alone, "
            "and this checkpoint is not written; move it away to have bz write there"
        )


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
    release_cache(path)
    body, size, digest = write_tmp(path, functools.partial(torch_save, payload))
    entry = describe(payload, path, size, digest)
    try:
        text = sidecar_text(entry)
        side, _, _ = write_tmp(sidecar(path), functools.partial(write_bytes, text))
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
    fsync_folder(path.parent)
    return entry


def describe(payload: Mapping[str, Any], path: Path, size: int, digest: str) -> Entry:
    """The sidecar's description of ``payload`` written to ``path``."""
    monitored = payload.get("monitored")
    return Entry(
        path=path,
        digest=digest,
        hash=HASH,
        size=size,
        signature=str(payload["signature"]),
        epoch=int(payload["epoch"]),
        batch=int(payload.get("batch", 0)),
        step=int(payload["global_step"]),
        stopped=bool(payload.get("stopped", False)),
        monitor=monitored[0] if monitored else None,
        value=monitored[1] if monitored else None,
    )


def sidecar_text(entry: Entry) -> bytes:
    """The sidecar's bytes (see :func:`bz.training.checkpoint.files.read_entry`)."""
    meta: dict[str, Any] = {
        "bz": FORMAT,
        "file": entry.path.name,
        "hash": entry.hash,
        "digest": entry.digest,
        "size": entry.size,
        "signature": entry.signature,
        "epoch": entry.epoch,
        "batch": entry.batch,
        "step": entry.step,
        "stopped": entry.stopped,
    }
    if entry.monitor is not None:
        meta["monitor"] = entry.monitor
        meta["value"] = entry.value
    return json.dumps(meta, indent=1).encode("utf-8")


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
                _remove(path)
        elif name.endswith(SIDECAR_SUFFIX):
            target = path.with_name(name[: -len(SIDECAR_SUFFIX)])
            ours = _position(target) is not None or target.name == FINAL_MODEL
            if ours and not target.exists() and _describes(path, target):
                with contextlib.suppress(OSError):
                    path.unlink()


def _describes(path: Path, target: Path) -> bool:
    """Whether the sidecar ``path`` is bz's sidecar of ``target`` (anything else is junk,
    left alone)."""
    data = read_sidecar(path)
    return data is not None and data.get("file") == target.name


def writable_problem(folder: Path) -> str | None:
    """Why bz could not write checkpoints into ``folder`` (created if missing), or None.

    Checked by writing and deleting a small file, the only test that every
    filesystem, permission scheme and read-only mount answers truthfully; and that the
    checksum new sidecars record can be computed (the ``xxhash`` package).
    """
    try:
        new_hasher(HASH)
    except UsageError as exc:
        return str(exc)
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
    keep_best: KeepBest | None = None
    _lock: RunLock | None = attrs.field(default=None, init=False)
    # Files checked in this process: name -> (size, mtime_ns, checksum). A file that has
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
                if exc.errno not in NO_LOCKS:
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
            stamp = _stamp(entry.path)
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        known = self._checked.get(entry.path.name)
        if known == (*stamp, entry.digest):
            return None
        problem = verify(entry)
        if problem is None:
            self._checked[entry.path.name] = (*stamp, entry.digest)
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
        """Write a checkpoint atomically, then drop all but the newest ``keep_last``.

        Raises ``FileExistsError`` (an ``OSError``: the write is reported as failed, the
        run goes on) where a file bz did not write already has the checkpoint's name.
        """
        path = self.folder / checkpoint_name(epoch, batch)
        _not_in_the_way(path)
        self.adopt(atomic_save(payload, path))
        return path

    def adopt(self, entry: Entry) -> None:
        """Count a checkpoint just written (verified), then drop all but ``keep_last``."""
        path = entry.path
        with contextlib.suppress(OSError):
            self._checked[path.name] = (*_stamp(path), entry.digest)
        self.prune(keep=path)

    def save_final(self, payload: Mapping[str, Any]) -> Path:
        """Write the run's final model (:data:`FINAL_MODEL`) atomically (refused, as
        :meth:`save` refuses, over a file of that name that bz did not write)."""
        path = self.folder / FINAL_MODEL
        _not_in_the_way(path)
        atomic_save(payload, path)
        return path

    def prune(self, keep: Path) -> None:
        """Delete the verified checkpoints that are neither among the newest
        ``keep_last`` nor among ``keep_best``'s best (never ``keep``).

        Files bz did not write, and checkpoints whose bytes no longer match, are neither
        counted nor deleted: junk can never push a good checkpoint out.
        """
        verified = self.verified()
        # ``keep`` (just written) counts as the newest, whatever its name says.
        entries = sorted(verified, key=lambda entry: entry.path != keep)
        kept = {entry.path for entry in retained(entries, self.keep_last, self.keep_best)}
        for entry in entries:
            if entry.path != keep and entry.path not in kept:
                self.delete(entry.path)

    def best(self) -> Entry | None:
        """The verified checkpoint ``keep_best`` ranks first, if any recorded its value."""
        if self.keep_best is None:
            return None
        ranking = ranked(self.verified(), self.keep_best)
        return ranking[0] if ranking else None

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
                _remove(target)
            except FileNotFoundError:
                pass
            except OSError as exc:
                _log.warning("checkpoint_not_deleted", path=str(target), error=str(exc))
                return


def _remove(path: Path) -> None:
    """Delete a file, or a sharded checkpoint's folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _stamp(path: Path) -> tuple[int, int]:
    """Size and newest modification time: of a file, or of a sharded folder's files
    (the folder's own times do not change when a file in it is rewritten)."""
    if not path.is_dir():
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
    stats = [file.stat() for file in path.iterdir()]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
