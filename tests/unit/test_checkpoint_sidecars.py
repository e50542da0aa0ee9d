"""Sidecars: the checksum they name, old SHA-256 sidecars, and junk that never blocks a run.

A file named like a sidecar that bz did not write (nested 100,000 deep, binary, huge, a
folder, JSON of the wrong shape) is ignored and left exactly as it was, by the store,
by the clean-up of killed writes and by a whole training run, which goes on as if it
were not there.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tests._support import tiny_setup

import bz
from bz import _rng
from bz.training.checkpoint.files import FORMAT, read_checkpoint
from bz.training.checkpoint.lock import RunLocked
from bz.training.checkpoint.sidecars import (
    HASH,
    SIDECAR_MAX_BYTES,
    read_entry,
    read_sidecar,
    sidecar,
)
from bz.training.checkpoint.store import CheckpointStore, remove_stray_files


def _payload(epoch: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    rng = _rng.capture_rng()
    return {
        "format": FORMAT,
        "signature": "sig",
        "epoch": epoch,
        "batch": 0,
        "global_step": epoch * 10,
        "model": model.state_dict(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        "rng": {"epoch_start": rng, "now": rng},
    }


def _saved(folder: Path, *epochs: int) -> CheckpointStore:
    store = CheckpointStore(folder, keep_last=10)
    for epoch in epochs:
        store.save(_payload(epoch), epoch, 0)
    return store


# -- which checksum ----------------------------------------------------------------------


def test_a_sidecar_says_which_checksum_it_holds(tmp_path: Path) -> None:
    path = _saved(tmp_path, 1).folder / "epoch-0001.pt"
    meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
    assert meta["hash"] == HASH == "xxh3_128"
    assert len(meta["digest"]) == 32
    assert "sha256" not in meta


def test_an_old_sha256_sidecar_still_verifies_and_resumes(tmp_path: Path) -> None:
    store = _saved(tmp_path, 1)
    path = store.folder / "epoch-0001.pt"
    meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
    del meta["hash"], meta["digest"]
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # as bz wrote it before
    sidecar(path).write_text(json.dumps(meta), encoding="utf-8")
    fresh = CheckpointStore(tmp_path)
    assert [entry.path for entry in fresh.verified()] == [path]
    found = fresh.newest("sig")
    assert found is not None
    assert found[0] == path
    # ... and a flipped byte is caught by the old checksum as by the new one.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert CheckpointStore(tmp_path).verified() == []


def test_a_flipped_byte_is_caught_by_the_new_checksum(tmp_path: Path) -> None:
    path = _saved(tmp_path, 1).folder / "epoch-0001.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    assert CheckpointStore(tmp_path).verified() == []


def test_a_checksum_this_bz_does_not_know_makes_the_file_count_for_nothing(
    tmp_path: Path,
) -> None:
    path = _saved(tmp_path, 1).folder / "epoch-0001.pt"
    meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
    meta["hash"] = "md4-from-the-future"
    sidecar(path).write_text(json.dumps(meta), encoding="utf-8")
    assert read_entry(path) is None
    assert CheckpointStore(tmp_path).verified() == []
    assert path.exists()


# -- junk ------------------------------------------------------------------------------------


def _junk(kind: str) -> bytes:
    if kind == "nested":
        return b"[" * 100_000 + b"]" * 100_000
    if kind == "nested_object":
        return b'{"bz": ' * 100_000 + b"2" + b"}" * 100_000
    if kind == "binary":
        return bytes(range(256)) * 40
    if kind == "huge":  # valid JSON of bz's shape, far larger than any sidecar
        return json.dumps({"bz": FORMAT, "pad": "x" * (SIDECAR_MAX_BYTES * 4)}).encode()
    if kind == "wrong_shape":
        return json.dumps({"bz": FORMAT, "file": "epoch-0007.pt", "epoch": "Infinity"}).encode()
    if kind == "infinite":
        return (
            b'{"bz": 2, "file": "epoch-0007.pt", "size": 1, "sha256": "", "signature": "s",'
            b'"epoch": Infinity, "batch": 0, "step": 0}'
        )
    raise ValueError(kind)


JUNK = ["nested", "nested_object", "binary", "huge", "wrong_shape", "infinite"]


@pytest.mark.parametrize("kind", JUNK)
def test_a_junk_sidecar_is_read_as_nothing(tmp_path: Path, kind: str) -> None:
    junk = tmp_path / "epoch-0007.pt.json"
    junk.write_bytes(_junk(kind))
    if kind not in ("wrong_shape", "infinite"):  # those are JSON with bz's mark, at least
        assert read_sidecar(junk) is None
    (tmp_path / "epoch-0007.pt").write_bytes(b"a file beside it")
    assert read_entry(tmp_path / "epoch-0007.pt") is None


@pytest.mark.parametrize("kind", JUNK)
def test_junk_sidecars_are_left_alone_by_the_store(tmp_path: Path, kind: str) -> None:
    store = _saved(tmp_path, 1, 2)
    beside = tmp_path / "epoch-0007.pt.json"  # beside a file named like a checkpoint
    alone = tmp_path / "epoch-0008.pt.json"  # and one whose checkpoint is missing
    (tmp_path / "epoch-0007.pt").write_bytes(b"not bz's")
    for path in (beside, alone):
        path.write_bytes(_junk(kind))
    remove_stray_files(tmp_path)
    assert [entry.epoch for entry in store.verified()] == [2, 1]
    assert store.ignored() == [tmp_path / "epoch-0007.pt"]
    store.prune(keep=tmp_path / "epoch-0002.pt")
    for path in (beside, alone):
        assert path.read_bytes() == _junk(kind)


def test_a_folder_or_a_pipe_named_like_a_sidecar_is_junk(tmp_path: Path) -> None:
    (tmp_path / "epoch-0005.pt.json").mkdir()
    os.mkfifo(tmp_path / "epoch-0006.pt.json")  # opening it to read would wait forever
    (tmp_path / "epoch-0006.pt").write_bytes(b"x")
    store = _saved(tmp_path, 1)
    remove_stray_files(tmp_path)
    assert [entry.epoch for entry in store.verified()] == [1]
    assert (tmp_path / "epoch-0005.pt.json").is_dir()
    assert (tmp_path / "epoch-0006.pt.json").exists()


@pytest.mark.parametrize("kind", ["nested", "binary", "huge"])
def test_training_goes_on_beside_junk_sidecars(tmp_path: Path, kind: str) -> None:
    config = bz.RunConfig(epochs=2, device="cpu", seed=0, plugins=())
    first = bz.Trainer().fit(
        tiny_setup(), config.with_overrides(epochs=1), [], checkpoint_dir=tmp_path
    )
    assert first.checkpoint is not None
    run = first.checkpoint.parent
    stray = run / "epoch-0009.pt.json"  # no checkpoint beside it: what killed writes leave
    newest = run / "epoch-0003.pt.json"  # beside a file named like the newest checkpoint
    (run / "epoch-0003.pt").write_bytes(b"not bz's")
    for path in (stray, newest):
        path.write_bytes(_junk(kind))
    result = bz.Trainer().fit(tiny_setup(), config, [], checkpoint_dir=tmp_path)
    assert result.resumed_from == run / "epoch-0001.pt"
    assert result.epochs_completed == 2
    for path in (stray, newest):
        assert path.read_bytes() == _junk(kind)
    assert read_checkpoint(run / "epoch-0002.pt")["epoch"] == 2


def test_junk_in_the_lock_file_is_never_a_recursion_error(tmp_path: Path) -> None:
    holder = _saved(tmp_path)
    holder.lock()
    (tmp_path / ".lock").write_bytes(b"[" * 4000)  # deeper than the JSON parser goes
    with pytest.raises(RunLocked, match="another bz process"):
        CheckpointStore(tmp_path).lock()  # names nobody, but says the run is taken
    holder.unlock()
