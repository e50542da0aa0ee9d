"""``kill -9`` and Ctrl-C in real subprocesses: resuming ends bit-identical to a clean run.

One seeded run is interrupted four times, each time somewhere else (points drawn from
a seeded generator): SIGKILL in the middle of an epoch, SIGKILL halfway through writing
a checkpoint file, SIGTERM (what a job scheduler sends) and Ctrl-C (SIGINT) after a
step. Each restart resumes by itself; the last, which nothing interrupts, runs in the
test's process (it reads only what the killed processes left on disk).
The final weights and optimizer state must equal those of a run never interrupted.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
from tests._checkpoint_support import final_state, start_child, train_here
from tests._fault_support import BATCHES_PER_EPOCH, RESUME_TRAIN_PY
from tests._support import TRAINING_DIED, assert_same_weights

EPOCHS = 5


def _project(folder: Path) -> Path:
    folder.mkdir()
    (folder / "train.py").write_text(RESUME_TRAIN_PY, encoding="utf-8")
    config = {"epochs": EPOCHS, "device": "cpu", "seed": 11, "plugins": []}
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _finish(process: subprocess.Popen[str], expected: int) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == expected, output[-3000:]
    return output


def _events(output: str, name: str) -> list[dict[str, object]]:
    found = []
    for line in output.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


@pytest.mark.slow
def test_killed_three_ways_and_resumed_ends_bit_identical(tmp_path: Path) -> None:
    points = random.Random(2024)
    kill_step = points.randint(BATCHES_PER_EPOCH + 1, 2 * BATCHES_PER_EPOCH - 1)
    term_step = points.randint(2 * BATCHES_PER_EPOCH + 1, 3 * BATCHES_PER_EPOCH - 1)
    interrupt_step = points.randint(3 * BATCHES_PER_EPOCH + 1, EPOCHS * BATCHES_PER_EPOCH - 1)
    clean_folder, folder = _project(tmp_path / "clean"), _project(tmp_path / "interrupted")
    clean = start_child(clean_folder)  # runs alongside the interrupted chain

    # 1. SIGKILL in the middle of the second epoch: epoch-0001.pt survives.
    _finish(
        start_child(folder, BZ_TEST_SIGNAL="KILL", BZ_TEST_SIGNAL_AT_STEP=str(kill_step)),
        TRAINING_DIED,
    )
    # 2. Resumes from epoch 1, writes epoch-0002.pt, then dies halfway through writing
    #    epoch-0003.pt: a half-written temporary file is all that is left of it.
    output = _finish(start_child(folder, BZ_TEST_KILL_IN_WRITE="2"), TRAINING_DIED)
    assert _events(output, "resumed")[0]["epoch"] == 1
    (run_dir,) = (folder / ".bz" / "checkpoints").iterdir()
    assert any(p.name.endswith(".tmp") for p in run_dir.iterdir())
    assert not (run_dir / "epoch-0003.pt").exists()
    # 3. Resumes from epoch 2; SIGTERM after a step: checkpoint, exit 143 (128 + 15).
    output = _finish(
        start_child(folder, BZ_TEST_SIGNAL="TERM", BZ_TEST_SIGNAL_AT_STEP=str(term_step)), 143
    )
    assert _events(output, "resumed")[0]["epoch"] == 2
    assert _events(output, "checkpoint_saved")[-1]["step"] == term_step
    assert _events(output, "interrupt_requested")[0]["signal"] == "SIGTERM"
    # 4. Resumes there; Ctrl-C after a later step: checkpoint, exit 130.
    output = _finish(
        start_child(folder, BZ_TEST_SIGNAL="INT", BZ_TEST_SIGNAL_AT_STEP=str(interrupt_step)), 130
    )
    assert _events(output, "resumed")[0]["step"] == term_step
    assert _events(output, "checkpoint_saved")[-1]["step"] == interrupt_step
    assert "bz: interrupted; checkpoint" in output
    # 5. Resumes where Ctrl-C stopped it and finishes.
    code, output = train_here(folder)
    assert code == 0, output[-3000:]
    resumed = _events(output, "resumed")[0]
    assert resumed["step"] == interrupt_step, (kill_step, term_step, interrupt_step)
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())

    _finish(clean, 0)
    assert_same_weights(final_state(folder, EPOCHS), final_state(clean_folder, EPOCHS))


@pytest.mark.slow
def test_ema_killed_mid_epoch_resumes_to_the_same_average(tmp_path: Path) -> None:
    # The average is the ema plugin's state: written with each checkpoint, continued
    # after kill -9 from the last one; model.pt (apply_at_end) and the last checkpoint's
    # average match a run never interrupted, bit for bit.
    ema = {"decay": 0.9, "validate_with_ema": True, "apply_at_end": True}
    changes = {"epochs": 3, "checkpoint_every_steps": 4, "plugins": [{"ema": ema}]}
    clean_folder, folder = _project(tmp_path / "clean"), _project(tmp_path / "interrupted")
    for project in (clean_folder, folder):
        config = json.loads((project / "bzconfig.json").read_text())
        (project / "bzconfig.json").write_text(json.dumps({**config, **changes}))
    clean = start_child(clean_folder)
    kill_step = BATCHES_PER_EPOCH + 3  # epoch 2, one step after the checkpoint at step 8
    _finish(
        start_child(folder, BZ_TEST_SIGNAL="KILL", BZ_TEST_SIGNAL_AT_STEP=str(kill_step)),
        TRAINING_DIED,
    )
    code, output = train_here(folder)
    assert code == 0, output[-3000:]
    assert _events(output, "resumed")[0]["step"] == 8
    _finish(clean, 0)

    def finished(project: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        (run_dir,) = (project / ".bz" / "checkpoints").iterdir()
        last = torch.load(run_dir / "epoch-0003.pt", weights_only=True)
        final = torch.load(run_dir / "model.pt", weights_only=True)
        return last["plugins"]["ema"]["weights"], final["model"]

    (average, model), (clean_average, clean_model) = finished(folder), finished(clean_folder)
    assert_same_weights(average, clean_average)
    assert_same_weights(model, clean_model)
    assert all(torch.equal(model[name], value) for name, value in average.items())
