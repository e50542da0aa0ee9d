"""The checkpoint store on its own: sidecars, verification, junk, pruning, the lock.

What the store promises, checked without a training loop: only files bz wrote and can
verify count; nothing else is ever deleted; a half-done write leaves the previous
state; one process at a time holds a run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples
from torch import nn

from bz import _rng
from bz.training.checkpoint import lock as _run_lock
from bz.training.checkpoint.files import (
    FINAL_MODEL,
    FORMAT,
    UnreadableCheckpoint,
    checkpoint_name,
    read_checkpoint,
    sidecar,
    unusable_reason,
)
from bz.training.checkpoint.lock import LOCK_FILE, RunLock, RunLocked
from bz.training.checkpoint.store import CheckpointStore, atomic_save, writable_problem


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _payload(epoch: int, batch: int = 0, model: nn.Module | None = None) -> dict[str, Any]:
    model = model or _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = _rng.capture_rng()
    return {
        "format": FORMAT,
        "signature": "sig",
        "epoch": epoch,
        "batch": batch,
        "global_step": epoch * 10 + batch,
        "stopped": False,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"epoch_start": rng, "now": rng},
    }


def _store(folder: Path, keep_last: int = 3, *epochs: int) -> CheckpointStore:
    store = CheckpointStore(folder, keep_last)
    for epoch in epochs:
        store.save(_payload(epoch), epoch, 0)
    return store


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# -- verified files -------------------------------------------------------------------------


def test_a_saved_checkpoint_has_a_sidecar_with_its_checksum(tmp_path: Path) -> None:
    path = _store(tmp_path, 3, 2).folder / "epoch-0002.pt"
    meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
    assert meta["file"] == "epoch-0002.pt"
    assert meta["size"] == path.stat().st_size
    assert (meta["epoch"], meta["batch"], meta["step"]) == (2, 0, 20)
    assert read_checkpoint(path)["epoch"] == 2
    # Still a plain torch file for anyone who wants the weights.
    assert "model" in torch.load(path, weights_only=True)


def test_a_flipped_byte_with_the_size_unchanged_is_detected(tmp_path: Path) -> None:
    store = _store(tmp_path, 3, 1, 2)
    newest = tmp_path / "epoch-0002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.raises(UnreadableCheckpoint, match="checksum"):
        read_checkpoint(newest)
    found = store.newest("sig")
    assert found is not None
    assert found[0].name == "epoch-0001.pt"


@pytest.mark.parametrize(
    "junk",
    [b"junk\n", b"", b"PK\x03\x04 not really a zip"],
    ids=["text", "empty", "fake-zip-header"],
)
def test_junk_named_like_checkpoints_is_never_used_counted_or_deleted(
    tmp_path: Path, junk: bytes
) -> None:
    store = _store(tmp_path, 2, 1, 2)
    for name in ("epoch-0098.pt", "epoch-0099.pt", "epoch-0003-batch-00001.pt"):
        (tmp_path / name).write_bytes(junk)
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    found = store.newest("sig")
    assert found is not None
    assert found[0].name == "epoch-0002.pt"
    store.save(_payload(3), 3, 0)
    store.save(_payload(4), 4, 0)
    names = _names(tmp_path)
    assert [n for n in names if n.endswith(".pt") and n.startswith("epoch-00")] == [
        "epoch-0003-batch-00001.pt",
        "epoch-0003.pt",
        "epoch-0004.pt",
        "epoch-0098.pt",
        "epoch-0099.pt",
    ]
    assert (tmp_path / "epoch-0098.pt").read_bytes() == junk
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in store.ignored()) == [
        "epoch-0003-batch-00001.pt",
        "epoch-0098.pt",
        "epoch-0099.pt",
    ]


def test_a_damaged_checkpoint_of_bz_is_neither_counted_nor_deleted(tmp_path: Path) -> None:
    store = _store(tmp_path, 2, 1, 2, 3)
    damaged = tmp_path / "epoch-0003.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    store.save(_payload(4), 4, 0)
    # keep_last=2 counts the verified ones: 4 and 2 stay; 3 is left for a person to see.
    assert [e.path.name for e in store.verified()] == ["epoch-0004.pt", "epoch-0002.pt"]
    assert damaged.exists()
    assert not (tmp_path / "epoch-0001.pt").exists()
    assert not sidecar(tmp_path / "epoch-0001.pt").exists()


def test_a_sidecar_copied_onto_another_file_does_not_vouch_for_it(tmp_path: Path) -> None:
    _store(tmp_path, 3, 1)
    other = tmp_path / "epoch-0005.pt"
    torch.save(_payload(5), other)
    sidecar(other).write_bytes(sidecar(tmp_path / "epoch-0001.pt").read_bytes())
    with pytest.raises(UnreadableCheckpoint):
        read_checkpoint(other)
    assert [e.path.name for e in CheckpointStore(tmp_path).verified()] == ["epoch-0001.pt"]


@settings(max_examples=examples(40))  # each example writes up to 12 files
@given(
    st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12, unique=True),
    st.integers(min_value=1, max_value=5),
)
def test_keep_last_keeps_exactly_the_newest_verified(
    tmp_path_factory: pytest.TempPathFactory, epochs: list[int], keep_last: int
) -> None:
    folder = tmp_path_factory.mktemp("store")
    (folder / "epoch-9999.pt").write_bytes(b"junk")
    store = CheckpointStore(folder, keep_last)
    for epoch in epochs:
        store.save(_payload(epoch, 1), epoch, 1)
    expected = sorted(epochs, reverse=True)[:keep_last]
    # The last one written is always kept, even when an older position.
    if epochs[-1] not in expected:
        expected = sorted([*expected[: keep_last - 1], epochs[-1]], reverse=True)
    assert [e.epoch for e in store.verified()] == expected
    assert (folder / "epoch-9999.pt").read_bytes() == b"junk"


# -- atomic writes --------------------------------------------------------------------------


@pytest.mark.parametrize("dies_at", [0, 1], ids=["before-sidecar-rename", "before-file-rename"])
def test_a_write_killed_between_renames_leaves_the_previous_file_counting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_at: int
) -> None:
    store = _store(tmp_path, 3, 1)
    path = tmp_path / "epoch-0001.pt"
    before = path.read_bytes()
    real_replace = os.replace
    calls = [0]

    def replace(src: str, dst: str) -> None:
        if calls[0] == dies_at:
            raise KeyboardInterrupt  # the closest a test gets to SIGKILL between renames
        calls[0] += 1
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    changed = _payload(1)
    changed["global_step"] = 99
    with pytest.raises(KeyboardInterrupt):
        atomic_save(changed, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    if dies_at == 0:  # nothing renamed: the old file still verifies
        assert read_checkpoint(path)["global_step"] == 10
    else:  # new sidecar, old file: nothing there counts, and the writer retries
        with pytest.raises(UnreadableCheckpoint):
            read_checkpoint(path)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    store.save(_payload(1), 1, 0)
    assert read_checkpoint(path)["global_step"] == 10


def test_stray_files_of_killed_writes_go_and_nothing_else(tmp_path: Path) -> None:
    store = _store(tmp_path, 3, 1)
    strays = [".epoch-0002.pt.4242.tmp", ".epoch-0002.pt.json.4242.tmp", ".model.pt.7.tmp"]
    for name in strays:
        (tmp_path / name).write_bytes(b"half")
    orphan = sidecar(tmp_path / "epoch-0003.pt")  # its checkpoint never arrived
    orphan.write_text(json.dumps({"bz": FORMAT, "file": "epoch-0003.pt"}), encoding="utf-8")
    kept = [".hidden.tmp", "epoch-0004.pt.json", ".bashrc"]
    for name in kept:
        (tmp_path / name).write_text("someone else's", encoding="utf-8")
    store.lock()
    try:
        names = _names(tmp_path)
    finally:
        store.unlock()
    assert not set(strays) & set(names)
    assert orphan.name not in names
    assert set(kept) <= set(names)
    assert {"epoch-0001.pt", "epoch-0001.pt.json", LOCK_FILE} <= set(names)


def test_the_final_model_is_verified_like_a_checkpoint(tmp_path: Path) -> None:
    store = _store(tmp_path, 3, 2)
    final = {k: v for k, v in _payload(2).items() if k not in ("optimizer", "rng")}
    store.save_final(final)
    assert store.final("sig", 20) is not None
    assert store.final("sig", 21) is None, "older than the newest checkpoint"
    (tmp_path / FINAL_MODEL).write_bytes(b"garbage")
    assert store.final("sig", 0) is None


# -- a checkpoint that loads but does not fit --------------------------------------------------


def test_unusable_reason_names_what_does_not_fit() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert unusable_reason(_payload(1, model=model), model, optimizer) is None
    other = _payload(1, model=nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))
    assert "model entry '0.weight' is (5, 3)" in str(unusable_reason(other, model, optimizer))
    no_rng = _payload(1, model=model)
    del no_rng["rng"]["epoch_start"]
    assert unusable_reason(no_rng, model, optimizer) == "random state 'epoch_start' is missing"
    missing = _payload(1, model=model)
    del missing["model"]["2.bias"]
    assert "missing ['2.bias']" in str(unusable_reason(missing, model, optimizer))
    two_groups = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=0.1)
    assert "parameter groups" in str(unusable_reason(_payload(1, model=model), model, two_groups))


def test_newest_passes_over_an_unusable_checkpoint_with_one_line(
    tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    store = _store(tmp_path, 3, 1, 2)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    broken = _payload(3)
    del broken["rng"]["now"]
    store.save(broken, 3, 0)
    found = store.newest("sig", lambda payload: unusable_reason(payload, model, optimizer))
    assert found is not None
    assert found[0].name == "epoch-0002.pt"
    lines = [e for e in events if e["event"].startswith("checkpoint_")]
    assert [(e["event"], Path(e["path"]).name) for e in lines] == [
        ("checkpoint_unusable", "epoch-0003.pt")
    ]
    assert lines[0]["error"] == "random state 'now' is missing"


# -- the lock -----------------------------------------------------------------------------------


def test_a_second_lock_on_the_run_names_the_holder(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(RunLocked) as caught:
            second.acquire()
    finally:
        first.release()
    assert f"pid {os.getpid()} on {socket.gethostname()}" in str(caught.value)
    second.acquire()  # free again once released
    second.release()
    assert (tmp_path / LOCK_FILE).exists(), "never deleted: it would split the lock"


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    script = (
        "import os, sys; from pathlib import Path; "
        "from bz.training.checkpoint.lock import RunLock; "
        "RunLock(Path(sys.argv[1])).acquire(); os._exit(0)"  # dies without releasing
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    owner = json.loads((tmp_path / LOCK_FILE).read_text(encoding="utf-8"))
    assert owner["pid"] != os.getpid(), "the dead process wrote its PID"
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text(encoding="utf-8"))["pid"] == os.getpid()
    lock.release()


def test_a_locked_run_is_not_cleaned_by_a_second_store(tmp_path: Path) -> None:
    holder = _store(tmp_path, 3, 1)
    holder.lock()
    in_flight = tmp_path / ".epoch-0002.pt.4242.tmp"
    in_flight.write_bytes(b"the holder is writing this")
    try:
        with pytest.raises(RunLocked):
            CheckpointStore(tmp_path).lock()
        assert in_flight.exists()
    finally:
        holder.unlock()


# -- writability --------------------------------------------------------------------------------


def test_writable_problem_creates_the_folder_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    assert writable_problem(folder) is None
    assert list(folder.iterdir()) == []


def test_writable_problem_reports_a_file_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "ckpt"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    problem = writable_problem(blocker / "run")
    assert problem is not None
    assert problem.startswith(f"{blocker / 'run'}: cannot write checkpoints there")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_writable_problem_reports_a_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert "Permission denied" in str(writable_problem(folder))
    finally:
        folder.chmod(0o700)


def test_checkpoint_names_order_like_training(tmp_path: Path) -> None:
    assert checkpoint_name(3) == "epoch-0003.pt"
    assert checkpoint_name(2, 17) == "epoch-0002-batch-00017.pt"


def test_a_filesystem_without_locks_warns_and_still_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]
) -> None:
    import errno

    def no_locks(fd: int) -> bool:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_run_lock, "_try_lock", no_locks)
    stray = tmp_path / ".epoch-0002.pt.4242.tmp"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"maybe someone's write in progress")
    store = CheckpointStore(tmp_path)
    store.lock()
    store.save(_payload(1), 1, 0)
    assert [e["event"] for e in events if e["event"] == "run_lock_unavailable"] == [
        "run_lock_unavailable"
    ]
    assert stray.exists(), "without the lock nothing is cleaned up"


def test_a_file_bz_did_not_write_is_never_written_over(tmp_path: Path) -> None:
    # "Left alone": a file named like the next checkpoint (or the final model) but
    # without bz's sidecar, a checkpoint whose sidecar was deleted or a file of the
    # user's, is not replaced; the write fails as a full disk's would (an OSError the
    # run reports and goes on from), and the checkpoints before it stay.
    store = _store(tmp_path, 2, 1, 2)
    for name in ("epoch-0003.pt", "model.pt"):
        (tmp_path / name).write_text("my own file", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"epoch-0003\.pt is a file bz did not write"):
        store.save(_payload(3), 3, 0)
    with pytest.raises(FileExistsError, match=r"model\.pt is a file bz did not write"):
        store.save_final(_payload(3))
    for name in ("epoch-0003.pt", "model.pt"):
        assert (tmp_path / name).read_text(encoding="utf-8") == "my own file"
    assert [entry.path.name for entry in store.verified()] == ["epoch-0002.pt", "epoch-0001.pt"]
    store.save(_payload(4), 4, 0)  # the next one is written, and keep_last counts bz's only
    assert sorted(entry.path.name for entry in store.verified()) == [
        "epoch-0002.pt",
        "epoch-0004.pt",
    ]
    assert (tmp_path / "epoch-0003.pt").read_text(encoding="utf-8") == "my own file"
    store.save(_payload(2), 2, 0)  # bz's own file of that name is replaced as before
