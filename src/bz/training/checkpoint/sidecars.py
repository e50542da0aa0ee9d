"""Sidecars: what says that bz wrote a checkpoint, and the checksum that verifies it.

Each file bz writes, ``epoch-0003.pt``, has a small JSON sidecar beside it,
``epoch-0003.pt.json``: its size, its checksum (and which checksum), its position in
training and, with ``keep_best``, the monitored value. Only files whose sidecar matches
their bytes count; a file named like a sidecar that bz did not write is junk, never read
past its first 64 KiB, never an error, never deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs

from bz._errors import UsageError

FORMAT = 2
"""Version of the checkpoint layout; files of another version are not resumed from.
(Version 1 had no sidecars: such files are left alone like any file bz did not write.)"""

HASH = "xxh3_128"
"""The checksum new sidecars record: XXH3 (128 bits) guards against damage (a flipped
bit, a truncated or half-written file), not against someone forging a file, and runs at
memory speed, about six times faster than SHA-256 (``benchmarks/checkpoint_io.py``).
It comes from the ``xxhash`` package, a dependency of bz: where it is missing (a broken
install), writing or verifying such a checkpoint is one error line, exit 2
(:data:`XXHASH_MISSING`), never a checkpoint silently passed over, and never a
fallback whose sidecars another bz could not read."""
XXHASH_MISSING = (
    "checkpoints are checksummed with XXH3 and the xxhash package is missing; it is a "
    "dependency of bz: pip install 'xxhash>=3.0'"
)
LEGACY_HASH = "sha256"
"""The checksum of sidecars that do not name one (written by bz before :data:`HASH`)."""


class Hasher(Protocol):
    """What bz needs of a checksum: ``hashlib``'s and ``xxhash``'s objects both fit."""

    def update(self, data: bytes | memoryview | mmap.mmap, /) -> None: ...

    def hexdigest(self) -> str: ...


def _xxh3_128() -> Hasher:
    try:
        import xxhash
    except ImportError:
        raise UsageError(XXHASH_MISSING) from None
    return xxhash.xxh3_128()


HASHES: dict[str, Callable[[], Hasher]] = {
    HASH: _xxh3_128,
    LEGACY_HASH: hashlib.sha256,
}
"""The checksums bz can verify, by the name a sidecar's ``"hash"`` gives."""

SIDECAR_SUFFIX = ".json"
"""``epoch-0003.pt.json`` describes ``epoch-0003.pt`` (see :func:`atomic_save`)."""
# ``.pt``: one file; ``.dcp``: a folder of shards (``distributed.strategy: "fsdp"``).
_NAME = re.compile(r"epoch-(\d{4,})(?:-batch-(\d{5,}))?\.(?:pt|dcp)")
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
    digest: str
    """The checksum of its bytes (hex), by :attr:`hash`."""
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
    monitor: str | None = None
    """With ``keep_best``, at the end of an epoch: the name of the value recorded."""
    value: float | None = None
    """That value (None when the epoch did not produce it, or it was not finite)."""
    hash: str = LEGACY_HASH
    """Which checksum :attr:`digest` is (:data:`HASHES`); sidecars that name none are
    SHA-256, as bz wrote them before."""

    @property
    def position(self) -> tuple[int, int]:
        """How far into training it is, for ordering: ``(epoch, batch)``."""
        return self.epoch, self.batch


SIDECAR_MAX_BYTES = 1 << 16
"""A sidecar bz writes is a few hundred bytes; a larger file is not one (and is not read)."""


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The JSON object in the sidecar file ``path`` when it could be one bz wrote, else None.

    Anything else named like a sidecar is junk that must never stop a run: a folder, a
    pipe, a file over :data:`SIDECAR_MAX_BYTES`, bytes that are not UTF-8 JSON, JSON
    nested deeper than the parser goes (a ``RecursionError``), or JSON that is not an
    object with bz's ``"bz": FORMAT`` mark. It is only read, never changed or deleted.
    """
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode) or status.st_size > SIDECAR_MAX_BYTES:
            return None
        with open(path, "rb") as file:
            raw = file.read(SIDECAR_MAX_BYTES + 1)
        if len(raw) > SIDECAR_MAX_BYTES:
            return None
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("bz") != FORMAT:
        return None
    return data


def read_entry(path: Path) -> Entry | None:
    """The sidecar of ``path`` when it is bz's and describes this file, else None."""
    data = read_sidecar(sidecar(path))
    if data is None or data.get("file") != path.name:
        return None
    try:
        algorithm = str(data.get("hash", LEGACY_HASH))
        if algorithm not in HASHES:
            return None  # a checksum this bz cannot compute: nothing to verify it with
        return Entry(
            path=path,
            digest=str(data["digest" if "hash" in data else LEGACY_HASH]),
            hash=algorithm,
            size=int(data["size"]),
            signature=str(data["signature"]),
            epoch=int(data["epoch"]),
            batch=int(data["batch"]),
            step=int(data["step"]),
            stopped=bool(data.get("stopped", False)),
            monitor=_text_or_none(data.get("monitor")),
            value=_finite_or_none(data.get("value")),
        )
    except (ValueError, KeyError, TypeError, OverflowError):
        return None


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _finite_or_none(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


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


def new_hasher(algorithm: str = HASH) -> Hasher:
    """A fresh checksum of kind ``algorithm`` (one of :data:`HASHES`)."""
    return HASHES[algorithm]()


def hash_path(path: Path, algorithm: str = HASH) -> tuple[int, str]:
    """Size and checksum of a checkpoint: of its bytes, or for a sharded checkpoint (a
    folder) the total size and the checksum of every file's name, size and checksum."""
    if not path.is_dir():
        return _hash_file(path, algorithm)
    manifest = new_hasher(algorithm)
    total = 0
    for file in sorted(path.iterdir()):
        size, digest = _hash_file(file, algorithm)
        total += size
        manifest.update(f"{file.name}\0{size}\0{digest}\n".encode())
    return total, manifest.hexdigest()


def _hash_file(path: Path, algorithm: str) -> tuple[int, str]:
    # Through a memory map: the hash reads the page cache where it lies, with no copy
    # into a buffer of ours (a third faster than reading in chunks); a file that cannot
    # be mapped (empty, or on a filesystem without mmap) is read in chunks.
    hasher = new_hasher(algorithm)
    with open(path, "rb", buffering=0) as file:
        with (
            contextlib.suppress(OSError, ValueError),
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view,
        ):
            if hasattr(view, "madvise"):
                view.madvise(mmap.MADV_SEQUENTIAL)
            hasher.update(view)
            return len(view), hasher.hexdigest()
        size = 0
        chunk = bytearray(1 << 20)
        while count := file.readinto(chunk):
            hasher.update(memoryview(chunk)[:count])
            size += count
    return size, hasher.hexdigest()


def verify(entry: Entry) -> str | None:
    """Why the file does not match its sidecar (damaged, replaced, half-written), or None."""
    try:
        size, digest = hash_path(entry.path, entry.hash)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size != entry.size:
        return f"{size} bytes where bz wrote {entry.size} (truncated or replaced)"
    if digest != entry.digest:
        return "its checksum does not match what bz wrote (damaged or replaced)"
    return None
