"""``kill -9`` in the middle of an epoch, then ``bz train``, for every kind of loader.

Each kind (:data:`tests._loader_kinds.KINDS`) trains three epochs with a checkpoint
every ``B + 1`` steps (``B`` batches per epoch), so the newest checkpoint before the
kill is two batches into the third epoch. The resumed run must end with exactly
(``torch.equal``) the weights and optimizer state of a run never interrupted, and must
not have read the batches already trained, except for an iterable dataset without
state, which is replayed and says so.

The killed run of each kind is a process of its own; the resumed one, which reads only
what that process left on disk, runs in the test's process
(:func:`tests._checkpoint_support.train_here`); the ten clean runs they are compared
with share one process (:func:`tests._checkpoint_support.train_each`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests._checkpoint_support import (
    EXIT_CODE_FILE,
    final_state,
    run_child,
    train_each,
    train_here,
)
from tests._loader_kinds import KINDS, TRAIN_PY
from tests._support import TRAINING_DIED, assert_same_weights, json_events

EPOCHS = 3
BATCHES = {"distributed_sampler": 3, "drop_last": 5}
"""Batches per epoch where not six."""


def _every(kind: str) -> int:
    return BATCHES.get(kind, 6) + 1


def _project(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    config = {
        "epochs": EPOCHS,
        "device": "cpu",
        "seed": 11,
        "plugins": [],
        "checkpoint_every_steps": _every(kind),
        "hyperparameters": {"loader": kind},
    }
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind's run never interrupted: the reference the resumed runs must match,
    trained once for the module, all ten in one process (nothing interrupts them)."""
    root = tmp_path_factory.mktemp("clean")
    folders = {kind: _project(root / kind, kind) for kind in KINDS}
    train_each(list(folders.values()))
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_killed_mid_epoch_resumes_bit_identical(
    tmp_path: Path, kind: str, clean_runs: dict[str, Path]
) -> None:
    batches, every = BATCHES.get(kind, 6), _every(kind)
    folder = _project(tmp_path / "killed", kind)
    kill_at = 2 * every + 1  # right after the step following the checkpoint at 2 * every
    code, output = run_child(folder, BZ_TEST_SIGNAL="KILL", BZ_TEST_SIGNAL_AT_STEP=str(kill_at))
    assert code == TRAINING_DIED, output[-3000:]
    code, output = train_here(folder)
    assert code == 0, output[-3000:]
    events = json_events(output)
    (resume,) = [event for event in events if event["event"] == "resumed"]
    # The checkpoint lies inside epoch 3: events count epochs from 1, as the console does.
    assert (resume["epoch"], resume["batch"]) == (3, 2 * every - 2 * batches)
    replayed = [event for event in events if event["event"] == "resume_replaying"]
    assert bool(replayed) == (kind == "iterable"), replayed
    clean = clean_runs[kind]
    assert (clean / EXIT_CODE_FILE).read_text() == "0", f"the clean {kind} run failed"
    assert_same_weights(final_state(folder, EPOCHS), final_state(clean, EPOCHS))
