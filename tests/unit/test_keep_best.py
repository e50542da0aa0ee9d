"""``keep_best``: the best epoch-end checkpoints by a metric, kept beside the newest.

The rule, checked as a property over any sequence of checkpoints: after every write
the folder holds exactly the ``keep_last`` newest and the ``count`` best of all the
checkpoints ever written (ties going to the older), so a best one is never pruned while
it is among the best.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._config_strategies import any_documents
from tests._examples import examples
from tests._fault_support import RESUME_TRAIN_PY
from tests._support import tiny_setup

import bz
from bz.commands import cli
from bz.config import ConfigError, KeepBest, RunConfig, structure
from bz.training.checkpoint.best import monitor_names
from bz.training.checkpoint.files import FORMAT
from bz.training.checkpoint.sidecars import sidecar
from bz.training.checkpoint.store import CheckpointStore


def _payload(epoch: int, batch: int, value: float | None, monitor: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "format": FORMAT,
        "signature": "sig",
        "epoch": epoch,
        "batch": batch,
        "global_step": epoch * 10 + batch,
        "model": {},
        "optimizer": {},
        "rng": {},
    }
    if batch == 0:
        payload["monitored"] = (monitor, value)
    return payload


# -- the pruning rule -------------------------------------------------------------------


values = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True, width=16),
    st.integers(min_value=-3, max_value=3).map(float),  # ties
)


@settings(max_examples=examples(30), deadline=None)  # each example writes up to 10 files
@given(
    st.lists(st.tuples(values, st.booleans()), min_size=1, max_size=10),
    st.integers(min_value=1, max_value=3),
    st.integers(min_value=1, max_value=3),
    st.sampled_from(["min", "max"]),
)
def test_the_folder_holds_the_newest_and_the_best_ever_written(
    tmp_path_factory: pytest.TempPathFactory,
    saves: list[tuple[float | None, bool]],
    keep_last: int,
    count: int,
    mode: str,
) -> None:
    folder = tmp_path_factory.mktemp("best")
    keep_best = KeepBest(monitor="validation_loss", mode=mode, count=count)  # type: ignore[arg-type]  # drawn from the two modes
    store = CheckpointStore(folder, keep_last, keep_best)
    written: list[tuple[int, int, float | None]] = []
    for index, (value, mid_epoch) in enumerate(saves):
        epoch, batch = index + 1, 3 if mid_epoch else 0
        store.save(_payload(epoch, batch, value, "validation_loss"), epoch, batch)
        written.append((epoch, batch, value))
        newest = {(e, b) for e, b, _ in written[-keep_last:]}
        sign = 1.0 if mode == "min" else -1.0
        ranked = sorted(
            (
                (sign * v, e, b)
                for e, b, v in written
                if b == 0 and v is not None and math.isfinite(v)
            ),
        )
        best = {(e, b) for _, e, b in ranked[:count]}
        assert {entry.position for entry in store.verified()} == newest | best


def test_sidecars_record_the_monitored_value_and_only_at_epoch_ends(tmp_path: Path) -> None:
    keep_best = KeepBest(monitor="training_loss", count=2)
    config = RunConfig(epochs=3, device="cpu", plugins=(), keep_best=keep_best, keep_last=1)
    result = bz.Trainer().fit(tiny_setup(), config, [], checkpoint_dir=tmp_path)
    run = result.checkpoint.parent if result.checkpoint else tmp_path
    for record in result.history:
        path = run / f"epoch-{record.epoch + 1:04d}.pt"
        if not path.exists():
            continue
        meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
        assert meta["monitor"] == "training_loss"
        assert meta["value"] == pytest.approx(record.training_loss)
    kept = sorted(p.name for p in run.glob("epoch-*.pt"))
    losses = {f"epoch-{r.epoch + 1:04d}.pt": r.training_loss for r in result.history}
    best_two = sorted(losses, key=lambda name: losses[name])[:2]
    assert set(kept) == {"epoch-0003.pt", *best_two}


# -- the config contract -----------------------------------------------------------------


@given(any_documents())
def test_keep_best_is_accepted_exactly_when_its_table_is_valid(document: Any) -> None:
    table = document.get("keep_best") if isinstance(document, dict) else None
    valid = table is None or (
        isinstance(table, dict)
        and set(table) <= {"monitor", "mode", "count"}
        and isinstance(table.get("monitor", ""), str)
        and table.get("mode", "min") in ("min", "max")
        and type(table.get("count", 1)) is int
        and table.get("count", 1) >= 1
    )
    problems: tuple[tuple[str, str], ...] = ()
    try:
        config = structure(document, RunConfig)
    except ConfigError as exc:
        problems = exc.problems
    named = [path for path, _ in problems if path.startswith("keep_best")]
    if problems:
        # A valid table is never what is refused (another key may be).
        assert not (valid and named), problems
        return
    assert valid, document
    if table is not None:
        assert config.keep_best == KeepBest(**table)


@given(st.integers(max_value=0))
def test_a_count_below_one_is_refused_with_its_path(count: int) -> None:
    with pytest.raises(ConfigError, match=r"keep_best\.count"):
        structure({"keep_best": {"monitor": "validation_loss", "count": count}}, RunConfig)


@given(st.text(max_size=20))
def test_an_unknown_monitor_is_refused_before_training_naming_the_choices(
    monitor: str,
) -> None:
    names = monitor_names(["accuracy"], validates=True)
    config = RunConfig(
        device="cpu", plugins=(), metrics=("accuracy",), keep_best=KeepBest(monitor=monitor)
    )
    setup = tiny_setup()
    started: list[int] = []

    class Watch:
        name = "watch"

        def start_training_session(self, context: object) -> None:
            started.append(1)

    if monitor in names:
        return
    with pytest.raises(ConfigError) as raised:
        bz.Trainer().fit(setup, config, [Watch()])
    message = str(raised.value)
    assert message.count("\n") == 0
    assert message.startswith("keep_best.monitor: ")
    assert "validation_accuracy" in message.split("one of: ")[1]
    assert started == []


def test_validation_names_are_refused_without_validation_data() -> None:
    config = RunConfig(device="cpu", plugins=(), keep_best=KeepBest(monitor="validation_loss"))
    with pytest.raises(ConfigError, match="no val_loader"):
        bz.Trainer().fit(tiny_setup(validation=False), config, [])


# -- bz validate --best ----------------------------------------------------------------


def test_validate_best_evaluates_the_best_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    (tmp_path / "train.py").write_text(RESUME_TRAIN_PY, encoding="utf-8")
    config = {
        "epochs": 4,
        "device": "cpu",
        "seed": 1,
        "plugins": [],
        "keep_last": 1,
        "keep_best": {"monitor": "validation_loss", "mode": "max", "count": 1},
    }
    path = tmp_path / "bzconfig.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    runner = CliRunner()
    trained = runner.invoke(cli, ["train", "--config", str(path)])
    assert trained.exit_code == 0, trained.output
    (run,) = (tmp_path / ".bz" / "checkpoints").iterdir()
    values = {
        p.name.removesuffix(".json"): json.loads(p.read_text(encoding="utf-8"))["value"]
        for p in run.glob("epoch-*.pt.json")
    }
    worst = max(values, key=lambda name: values[name])  # mode max: the highest loss
    shown = runner.invoke(cli, ["validate", "--config", str(path), "--best", "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert Path(report["checkpoint"]).name == worst
    assert report["validation_loss"] == pytest.approx(values[worst])


def test_validate_best_without_keep_best_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    (tmp_path / "train.py").write_text(RESUME_TRAIN_PY, encoding="utf-8")
    path = tmp_path / "bzconfig.json"
    path.write_text(json.dumps({"epochs": 1, "device": "cpu", "plugins": []}), encoding="utf-8")
    shown = CliRunner().invoke(cli, ["validate", "--config", str(path), "--best"])
    assert shown.exit_code == 2
    assert shown.stderr.count("\n") == 1
    assert "keep_best" in shown.stderr


def test_sharded_checkpoints_are_kept_by_the_same_rule(tmp_path: Path) -> None:
    from bz.training.checkpoint.sharded import save_sharded, shard_state, sharded_name

    keep_best = KeepBest(monitor="validation_loss", count=1)
    store = CheckpointStore(tmp_path, 1, keep_best)
    setup = tiny_setup()
    for epoch, value in ((1, 0.5), (2, 0.2), (3, 0.9), (4, 0.4)):
        rest = _payload(epoch, 0, value, "validation_loss")
        shards = shard_state(setup.model, setup.optimizer)
        entry = save_sharded(shards, rest, tmp_path / sharded_name(epoch), main=True)()
        assert entry is not None
        store.adopt(entry)
    assert sorted(p.name for p in tmp_path.glob("*.dcp")) == ["epoch-0002.dcp", "epoch-0004.dcp"]
    best = store.best()
    assert best is not None
    assert best.path.name == "epoch-0002.dcp"
    assert best.value == 0.2
