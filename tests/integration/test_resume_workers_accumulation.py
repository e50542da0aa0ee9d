"""``kill -9`` in the middle of an accumulation group, with torchdata's
``StatefulDataLoader`` and two workers, then ``bz train``: the weights, the optimizer
state and the logged losses of a run never killed.

Three epochs of 8 batches, ``accumulate_grad_batches: 3`` (three optimizer steps an
epoch: groups of 3, 3 and 2), a checkpoint every 2 steps: the newest before the kill
is after step 4, three batches into the second epoch; the kill comes at that epoch's
fifth batch, the second of a group whose first batch's gradients die with the process.
The resumed run trains that group again from its first batch, from the training
loader's saved state (its workers prefetched past it before the kill), and validates
with the validation loader's saved state. ``tests/unit/test_stateful_accumulation_kill.py``
covers every kill point without workers, in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests._checkpoint_support import final_state, run_child, train_here
from tests._support import TRAINING_DIED, assert_same_weights, json_events
from tests._workers_accumulation import BATCHES, TRAIN_PY

EPOCHS = 3
KILL_AT = BATCHES + 5
"""The training batch (counted from 1) whose forward pass the kill lands in."""


def _project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    config = {
        "epochs": EPOCHS,
        "device": "cpu",
        "seed": 3,
        "plugins": [],
        "accumulate_grad_batches": 3,
        "checkpoint_every_steps": 2,
    }
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _losses(output: str) -> dict[int, tuple[float, float]]:
    return {
        event["epoch"]: (event["training_loss"], event["validation_loss"])
        for event in json_events(output)
        if event["event"] == "epoch_finished"
    }


@pytest.mark.slow
def test_killed_inside_an_accumulation_group_with_workers_resumes_bit_identical(
    tmp_path: Path,
) -> None:
    clean = _project(tmp_path / "clean")
    code, clean_output = run_child(clean)
    assert code == 0, clean_output[-3000:]
    killed = _project(tmp_path / "killed")
    code, output = run_child(killed, BZ_TEST_KILL_AT_BATCH=str(KILL_AT))
    assert code == TRAINING_DIED, output[-3000:]
    code, output = train_here(killed)
    assert code == 0, output[-3000:]
    (resume,) = [event for event in json_events(output) if event["event"] == "resumed"]
    assert (resume["epoch"], resume["batch"], resume["step"]) == (2, 3, 4)
    assert_same_weights(final_state(killed, EPOCHS), final_state(clean, EPOCHS))
    expected, losses = _losses(clean_output), _losses(output)
    assert sorted(losses) == [2, 3]
    assert losses == {epoch: expected[epoch] for epoch in losses}  # bit for bit
