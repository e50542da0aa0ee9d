"""The checksum sidecars record, and a bz whose ``xxhash`` package is missing.

New sidecars name XXH3-128 (the ``xxhash`` package, a dependency of bz); sidecars that
name no hash are SHA-256 (``hashlib``). Without ``xxhash``, writing or verifying an XXH3
checkpoint is one clear error (exit 2), never a checkpoint passed over as junk, and old
SHA-256 checkpoints still verify.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bz._errors import UsageError
from bz.training.checkpoint.files import FORMAT, UnreadableCheckpoint, read_checkpoint
from bz.training.checkpoint.sidecars import HASH, XXHASH_MISSING, read_entry, sidecar
from bz.training.checkpoint.store import atomic_save, writable_problem


def _payload(value: float) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "signature": "run",
        "epoch": 1,
        "batch": 0,
        "global_step": 4,
        "model": {"weight": torch.full((8,), value)},
        "optimizer": {"state": {}, "param_groups": []},
        "rng": {},
    }


@pytest.fixture
def no_xxhash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xxhash", None)  # `import xxhash` now fails


def test_new_sidecars_name_xxh3(tmp_path: Path) -> None:
    path = tmp_path / "epoch-0001.pt"
    atomic_save(_payload(1.0), path)
    meta = json.loads(sidecar(path).read_text())
    assert meta["hash"] == HASH == "xxh3_128"
    assert read_checkpoint(path)["model"]["weight"][0] == 1.0


@pytest.mark.usefixtures("no_xxhash")
def test_without_xxhash_a_save_is_one_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    assert writable_problem(tmp_path / "checkpoints") == XXHASH_MISSING
    path = tmp_path / "epoch-0001.pt"
    path.write_bytes(b"what was there")
    with pytest.raises(UsageError) as raised:
        atomic_save(_payload(1.0), path)
    assert str(raised.value) == XXHASH_MISSING
    assert raised.value.exit_code == 2
    assert "\n" not in XXHASH_MISSING
    assert path.read_bytes() == b"what was there"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.pt"]


def test_without_xxhash_an_xxh3_checkpoint_is_an_error_not_junk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "epoch-0001.pt"
    atomic_save(_payload(1.0), path)
    monkeypatch.setitem(sys.modules, "xxhash", None)
    assert read_entry(path) is not None  # still bz's checkpoint
    with pytest.raises(UsageError, match="xxhash package is missing"):
        read_checkpoint(path)


def test_old_sha256_sidecars_verify_without_xxhash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "epoch-0001.pt"
    atomic_save(_payload(2.0), path)
    meta = json.loads(sidecar(path).read_text())
    # As bz wrote sidecars before they named their hash: the SHA-256 under "sha256".
    del meta["hash"], meta["digest"]
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar(path).write_text(json.dumps(meta))
    monkeypatch.setitem(sys.modules, "xxhash", None)
    assert read_checkpoint(path)["model"]["weight"][0] == 2.0
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte: still caught
    path.write_bytes(bytes(damaged))
    with pytest.raises(UnreadableCheckpoint, match="checksum does not match"):
        read_checkpoint(path)
