"""``checkpoint_async`` and the sharded checkpoint layout, in one process.

The two-process FSDP runs are in ``test_fsdp.py``; here the single-file format's
background writes, and a sharded checkpoint folder as the store sees it (written by one
process, which DCP allows), so that listing, verifying, pruning and clean-up are
checked without starting processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from tests._fault_support import fit_resumable, resume_setup
from tests._support import TRAINING_DIED, assert_same_weights

import bz
from bz.config import RunConfig
from bz.plugins import PluginContext
from bz.training.checkpoint import store as _checkpoint_store
from bz.training.checkpoint.files import STATE_FILE, list_entries, read_checkpoint, verify
from bz.training.checkpoint.sharded import save_sharded, shard_state, sharded_name
from bz.training.checkpoint.store import CheckpointStore

CONFIG = RunConfig(epochs=3, device="cpu", plugins=(), seed=5)
ASYNC = CONFIG.with_overrides(checkpoint_async=True)


class HookRecorder:
    """Records the checkpoint hooks and the session's end, with the paths it is shown."""

    name = "hook_recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def save_checkpoint(self, context: PluginContext) -> None:
        path = context.checkpoint_path
        self.calls.append(("save_checkpoint", path.name if path else None))

    def end_training_session(self, context: PluginContext) -> None:
        self.calls.append(("end_training_session", None))


def fit(
    folder: Path | None, config: RunConfig = CONFIG, plugins: list[Any] | None = None
) -> tuple[bz.FitResult, dict[str, torch.Tensor]]:
    return fit_resumable(folder, config, plugins)


# -- background writes of single files ---------------------------------------------------


def test_background_writes_give_the_checkpoints_and_weights_of_synchronous_ones(
    tmp_path: Path,
) -> None:
    often = CONFIG.with_overrides(checkpoint_every_steps=4)
    sync_hooks, async_hooks = HookRecorder(), HookRecorder()
    _, sync_final = fit(tmp_path / "sync", often, [sync_hooks])
    background, final = fit(
        tmp_path / "async", often.with_overrides(checkpoint_async=True), [async_hooks]
    )
    # Every checkpoint's hook, once it is on disk, all before the session ends.
    assert async_hooks.calls == sync_hooks.calls
    assert async_hooks.calls[-1] == ("end_training_session", None)
    assert_same_weights(final, sync_final)
    assert background.checkpoints_lost == 0
    assert background.checkpoint is not None
    assert background.checkpoint.name == "epoch-0003.pt"
    (sync_dir,) = (tmp_path / "sync").iterdir()
    (run_dir,) = (tmp_path / "async").iterdir()
    names = [entry.path.name for entry in list_entries(run_dir)]
    assert len(names) == often.keep_last
    assert names == [entry.path.name for entry in list_entries(sync_dir)]
    for name in [*names, "model.pt"]:
        # What the thread wrote is the state at the step it was handed over, although
        # training changed the live tensors while it wrote.
        written = read_checkpoint(run_dir / name, model_only=True)
        expected = read_checkpoint(sync_dir / name, model_only=True)
        assert written["global_step"] == expected["global_step"]
        assert_same_weights(written["model"], expected["model"])


def test_a_failed_background_write_is_reported_like_a_synchronous_one(
    tmp_path: Path, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(payload: object, path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_checkpoint_store, "atomic_save", disk_full)
    result, _ = fit(tmp_path, ASYNC)
    failures = [e for e in events if e["event"] == "checkpoint_write_failed"]
    assert len(failures) == CONFIG.epochs
    assert "No space left on device" in failures[0]["error"]
    assert result.checkpoint is None
    assert result.checkpoints_lost == CONFIG.epochs + 1  # and the final model


KILLING_TRAIN_PY = textwrap.dedent(
    """
    import os
    import threading
    from pathlib import Path

    from bz.training.checkpoint import store as _checkpoint_store
    from tests._fault_support import resume_setup as setup

    _save = _checkpoint_store.torch_save
    _calls = []


    def _dies_in_the_second_write(payload, file):
        # The second checkpoint: half of it written, by the background thread, then kill -9.
        _calls.append(1)
        marker = Path("killed")
        if len(_calls) == 2 and not marker.exists():
            assert threading.current_thread().name == "bz-checkpoint-writer"
            marker.write_text("")
            file.write(b"half a checkpoint")
            file.flush()
            os.kill(os.getpid(), 9)
        _save(payload, file)


    _checkpoint_store.torch_save = _dies_in_the_second_write
    """
)


def _project(folder: Path, *, kills: bool) -> None:
    folder.mkdir()
    (folder / "train.py").write_text(KILLING_TRAIN_PY, encoding="utf-8")
    config = {"epochs": 3, "device": "cpu", "plugins": [], "seed": 5, "checkpoint_async": True}
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    if not kills:
        (folder / "killed").write_text("")


def _start(folder: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-m", "bz", "train", "--log-format", "json"]
    return subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )


def _train(folder: Path) -> tuple[int, list[dict[str, Any]]]:
    process = _start(folder)
    stdout, _ = process.communicate(timeout=240)
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
    return process.returncode, lines


@pytest.mark.slow
def test_kill_9_during_a_background_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    folder, clean = tmp_path / "killed", tmp_path / "clean"
    _project(folder, kills=True)
    _project(clean, kills=False)
    uninterrupted = _start(clean)  # alongside the interrupted one
    code, _ = _train(folder)
    assert code == TRAINING_DIED
    (run_dir,) = (folder / ".bz" / "checkpoints").iterdir()
    assert [entry.path.name for entry in list_entries(run_dir)] == ["epoch-0001.pt"]
    assert list(run_dir.glob(".epoch-0002.pt.*.tmp")), "the write was cut off half-way"

    code, lines = _train(folder)
    assert code == 0
    (event,) = [line for line in lines if line["event"] == "resumed"]
    assert Path(event["path"]).name == "epoch-0001.pt"
    assert not list(run_dir.glob(".*.tmp")), "the next run removed the half-written file"
    uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0
    (clean_dir,) = (clean / ".bz" / "checkpoints").iterdir()
    final = read_checkpoint(run_dir / "model.pt", model_only=True)["model"]
    assert_same_weights(final, read_checkpoint(clean_dir / "model.pt", model_only=True)["model"])


# -- sharded checkpoints as the store sees them ----------------------------------------------


def _write_sharded(folder: Path, epoch: int) -> Path:
    setup = resume_setup(CONFIG)
    rest = {"format": 2, "signature": "run", "epoch": epoch, "batch": 0, "global_step": epoch}
    path = folder / sharded_name(epoch)
    complete = save_sharded(shard_state(setup.model, setup.optimizer), rest, path, main=True)
    entry = complete()
    assert entry is not None
    CheckpointStore(folder, keep_last=2).adopt(entry)
    return path


def test_a_sharded_checkpoint_is_a_verified_folder_that_keep_last_prunes(tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        _write_sharded(tmp_path, epoch)
    entries = list_entries(tmp_path)
    assert [entry.path.name for entry in entries] == ["epoch-0003.dcp", "epoch-0002.dcp"]
    assert not (tmp_path / "epoch-0001.dcp").exists()
    assert not (tmp_path / "epoch-0001.dcp.json").exists()
    newest = entries[0]
    assert newest.path.is_dir()
    assert {p.name for p in newest.path.iterdir()} >= {".metadata", STATE_FILE}
    assert verify(newest) is None
    payload = read_checkpoint(newest.path, "run", model_only=True)
    assert payload.get("sharded") is True
    assert set(payload["model"]) == set(resume_setup(CONFIG).model.state_dict())


def test_a_damaged_shard_makes_the_sharded_checkpoint_count_for_nothing(tmp_path: Path) -> None:
    path = _write_sharded(tmp_path, 1)
    store = CheckpointStore(tmp_path)
    assert [entry.path for entry in store.verified()] == [path]  # and remembered as checked
    (shard,) = path.glob("*.distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (entry,) = list_entries(tmp_path)
    assert verify(entry) == "its checksum does not match what bz wrote (damaged or replaced)"
    assert store.verified() == [], "a rewritten shard is checked again, not remembered"
    assert store.newest("run") is None


def test_a_killed_sharded_write_leaves_a_folder_the_next_writer_removes(tmp_path: Path) -> None:
    _write_sharded(tmp_path, 1)
    half = tmp_path / ".epoch-0002.dcp.tmp"  # every process writes here first
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"half a shard")
    assert [entry.path.name for entry in list_entries(tmp_path)] == ["epoch-0001.dcp"]
    store = CheckpointStore(tmp_path)
    store.lock()
    try:
        assert not half.exists()
        assert (tmp_path / "epoch-0001.dcp").is_dir()
    finally:
        store.unlock()
