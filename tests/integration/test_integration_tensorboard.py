"""The tensorboard plugin: event files read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tests._integration_support import run_config, tiny_setup

import bz
from bz.plugins.run_log import RunLog
from bz.plugins.tensorboard import TensorBoard, TensorBoardConfig


def _events(log_dir: Path) -> EventAccumulator:
    return EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0}).Reload()


def _values(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    scalars = events.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


def test_scalars_equal_what_the_loop_computed(tmp_path: Path) -> None:
    plugin = TensorBoard(TensorBoardConfig(log_dir=str(tmp_path / "tb")))
    result = bz.Trainer().fit(tiny_setup(), run_config(epochs=3), [plugin])

    events = _events(tmp_path / "tb")
    history = result.history
    steps, training = _values(events, "loss/training")
    assert steps == [1, 2, 3]  # epochs counted from 1, as the console prints them
    # Event files store float32.
    assert training == pytest.approx([r.training_loss for r in history], rel=1e-6)
    _, validation = _values(events, "loss/validation")
    assert validation == pytest.approx([r.validation_loss for r in history], rel=1e-6)
    _, accuracy = _values(events, "accuracy/training")
    assert accuracy == pytest.approx([r.training_metrics["accuracy"] for r in history])
    _, val_accuracy = _values(events, "accuracy/validation")
    assert val_accuracy == pytest.approx([r.validation_metrics["accuracy"] for r in history])
    _, lr = _values(events, "lr")
    assert lr == pytest.approx([0.1, 0.1, 0.1])
    _, seconds = _values(events, "time/epoch_seconds")
    assert len(seconds) == 3
    assert all(s > 0 for s in seconds)
    assert events.Tags()["histograms"] == []  # off unless asked for


def test_learning_rate_is_the_one_each_epoch_trained_with(tmp_path: Path) -> None:
    setup = tiny_setup()
    import torch

    scheduler = torch.optim.lr_scheduler.StepLR(setup.optimizer, step_size=1, gamma=0.5)
    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=setup.loss_fn,
        optimizer=setup.optimizer,
        train_loader=setup.train_loader,
        scheduler=scheduler,
    )
    plugin = TensorBoard(TensorBoardConfig(log_dir=str(tmp_path)))
    bz.Trainer().fit(setup, run_config(epochs=3), [plugin])

    events = _events(tmp_path)
    _, lr = _values(events, "lr")
    assert lr == pytest.approx([0.1, 0.05, 0.025])
    assert "loss/validation" not in events.Tags()["scalars"]  # no validation data


def test_histograms_every_n_epochs(tmp_path: Path) -> None:
    plugin = TensorBoard(TensorBoardConfig(log_dir=str(tmp_path), histogram_interval=2))
    bz.Trainer().fit(tiny_setup(), run_config(epochs=4), [plugin])

    events = _events(tmp_path)
    tags = events.Tags()["histograms"]
    assert "weights/0.weight" in tags
    assert "gradients/0.weight" in tags
    assert [h.step for h in events.Histograms("weights/0.weight")] == [2, 4]
    weights = events.Histograms("weights/0.weight")[0].histogram_value
    assert weights.num == 8 * 4  # every element of the 8x4 weight matrix


def test_default_log_dir_is_a_fresh_folder_per_run_shared_with_run_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        bz.Trainer().fit(tiny_setup(), run_config(epochs=1), [TensorBoard(), RunLog()])

    runs = sorted(p for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2  # two runs in the same second still get two folders
    for run in runs:
        assert list(run.glob("events.out.tfevents.*"))
        assert (run / "run_log.jsonl").is_file()
        assert _values(_events(run), "loss/training")[0] == [1]
