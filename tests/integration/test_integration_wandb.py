"""The wandb plugin, offline: what W&B wrote to disk is read back and compared."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
from tests._integration_support import fails_in_second_epoch, run_config, tiny_setup

import bz
from bz.plugins.wandb_logger import Wandb, WandbConfig

# The .wandb file is a LevelDB-style log of protobuf records (W&B's own format).
_BLOCK = 32768
_HEADER = 7  # ":W&B", 2-byte magic, 1-byte version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing may reach the network or the user's home directory.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _records(run_file: Path) -> list[Any]:
    # wandb's generated protobuf module has no type information, hence the dynamic import.
    proto = importlib.import_module("wandb.proto.wandb_internal_pb2")
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, records = _HEADER, b"", []
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:  # block trailer padding
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        elif kind in (_MIDDLE, _LAST):
            pending += chunk
        else:
            continue
        if kind in (_FULL, _LAST):
            record = proto.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _item_key(item: Any) -> str:
    return str(item.key) if item.key else "/".join(item.nested_key)


def _history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
    return rows


def _config(records: list[Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else ()
        if kind == "config":
            updates = record.config.update
        for item in updates:
            config[_item_key(item)] = json.loads(item.value_json)
    return config


def _run_file(root: Path) -> Path:
    import wandb

    # run.finish() hands the last records to W&B's service process, which writes them
    # a moment later; tearing the service down waits for that (as exiting would).
    wandb.teardown()
    (found,) = root.glob("**/offline-run-*/run-*.wandb")
    return found


@pytest.mark.slow
def test_offline_run_holds_the_scalars_and_the_config(tmp_path: Path) -> None:
    plugin = Wandb(WandbConfig(mode="offline", project_name="bz-test", dir=str(tmp_path / "w")))
    config = run_config(epochs=2, hyperparameters={"lr": 0.1, "hidden": 8})
    result = bz.Trainer().fit(tiny_setup(), config, [plugin])

    assert plugin.run is None  # finished
    records = _records(_run_file(tmp_path / "w"))
    history = _history(records)
    assert [row["epoch"] for row in history] == [1, 2]
    for row, epoch in zip(history, result.history, strict=True):
        assert row["loss/training"] == epoch.training_loss
        assert row["loss/validation"] == epoch.validation_loss
        assert row["accuracy/training"] == epoch.training_metrics["accuracy"]
        assert row["accuracy/validation"] == epoch.validation_metrics["accuracy"]
        assert row["lr"] == pytest.approx(0.1)
        assert row["time/epoch_seconds"] > 0
    logged = _config(records)
    assert logged["hyperparameters"] == {"lr": 0.1, "hidden": 8}
    assert logged["run"]["epochs"] == 2


@pytest.mark.slow
def test_step_scalars_have_the_global_step_as_their_axis(tmp_path: Path) -> None:
    plugin = Wandb(WandbConfig(mode="offline", dir=str(tmp_path / "w"), step_interval=2))
    bz.Trainer().fit(tiny_setup(), run_config(epochs=2), [plugin])

    records = _records(_run_file(tmp_path / "w"))
    steps = [row for row in _history(records) if "global_step" in row]
    assert [row["global_step"] for row in steps] == [2, 4, 6, 8]
    assert all(row["step/grad_norm"] > 0 for row in steps)
    assert [row["step/lr"] for row in steps] == pytest.approx([0.1] * 4)
    assert [row["epoch"] for row in _history(records) if "epoch" in row] == [1, 2]
    axes = {
        r.metric.name: r.metric.step_metric
        for r in records
        if r.WhichOneof("record_type") == "metric" and r.metric.name
    }
    assert axes["step/grad_norm"] == axes["step/loss"] == "global_step"


@pytest.mark.slow
def test_a_failed_run_is_finished_and_keeps_what_was_logged(tmp_path: Path) -> None:
    setup = fails_in_second_epoch()
    plugin = Wandb(WandbConfig(mode="offline", dir=str(tmp_path / "w")))
    with pytest.raises(RuntimeError, match="boom"):  # the user's error, as itself
        bz.Trainer().fit(setup, run_config(epochs=3), [plugin])

    assert plugin.run is None
    records = _records(_run_file(tmp_path / "w"))
    assert [row["epoch"] for row in _history(records)] == [1]
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]


def test_other_ranks_create_no_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plugin = Wandb(WandbConfig(mode="offline"))
    context = bz.plugins.PluginContext(rank=1, world_size=2, epochs=1)
    plugin.start_training_session(context)
    plugin.end_epoch(context)
    plugin.end_training_session(context)
    assert plugin.run is None
    assert not list(tmp_path.iterdir())
