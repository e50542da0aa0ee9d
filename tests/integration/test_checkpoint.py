"""Checkpoints and resume, in process: what a user sees when a run stops and restarts."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from tests._fault_support import BATCHES_PER_EPOCH, RESUME_TRAIN_PY, fit_resumable, resume_setup
from tests._support import assert_same_weights, quick_first

import bz
from bz.commands import cli
from bz.config import RunConfig, structure
from bz.plugins import PluginContext
from bz.training.checkpoint import files as _checkpoint
from bz.training.checkpoint import store as _checkpoint_store
from bz.training.checkpoint.files import list_checkpoints, read_checkpoint, run_signature
from bz.training.interrupts import TrainingInterrupted

CONFIG = RunConfig(epochs=4, device="cpu", plugins=(), seed=5)


def fit(
    folder: Path | None, config: RunConfig = CONFIG, plugins: list[Any] | None = None
) -> tuple[bz.FitResult, dict[str, torch.Tensor]]:
    return fit_resumable(folder, config, plugins)


@pytest.fixture(scope="module")
def clean() -> dict[str, torch.Tensor]:
    """Final weights of the uninterrupted four-epoch run (no checkpoints at all)."""
    return fit(None)[1]


class Interrupter:
    """Presses Ctrl-C (a real SIGINT) right after optimizer step ``at_step``."""

    name = "interrupter"

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.calls: list[str] = []

    def end_training_batch(self, context: PluginContext) -> None:
        if context.global_step == self.at_step:
            signal.raise_signal(signal.SIGINT)

    def on_exception(self, context: PluginContext) -> None:
        self.calls.append(f"on_exception:{type(context.exception).__name__}")

    def end_training_session(self, context: PluginContext) -> None:
        self.calls.append("end_training_session")


class Counter:
    """A stateful plugin: counts epochs, and sees the checkpoint hooks' paths."""

    name = "counter"

    def __init__(self) -> None:
        self.epochs = 0
        self.paths: list[tuple[str, Path | None]] = []

    def end_epoch(self, context: PluginContext) -> None:
        self.epochs += 1

    def save_checkpoint(self, context: PluginContext) -> None:
        self.paths.append(("save", context.checkpoint_path))

    def load_checkpoint(self, context: PluginContext) -> None:
        self.paths.append(("load", context.checkpoint_path))

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = int(state["epochs"])


def test_extending_epochs_resumes_and_ends_bit_identical(
    tmp_path: Path, clean: dict[str, torch.Tensor], events: list[dict[str, Any]]
) -> None:
    first, _ = fit(tmp_path, CONFIG.with_overrides(epochs=2))
    assert first.checkpoint is not None
    assert first.checkpoint.name == "epoch-0002.pt"
    counter = Counter()
    result, final = fit(tmp_path, plugins=[counter])
    assert_same_weights(final, clean)
    assert result.resumed_from == first.checkpoint
    assert result.epochs_completed == 4
    assert len(result.history) == 2
    assert counter.epochs == 2  # a plugin that was not there before starts fresh
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed == [
        {
            "event": "resumed",
            "log_level": "info",
            "path": str(first.checkpoint),
            "epoch": 2,
            "batch": 0,
            "step": 2 * BATCHES_PER_EPOCH,
        }
    ]
    assert counter.paths[0] == ("load", first.checkpoint)
    assert all(path is not None and path.exists() for _, path in counter.paths)


class EpochNumbers:
    """Records what plugins see at the end of each epoch."""

    name = "epoch_numbers"

    def __init__(self) -> None:
        self.seen: dict[int, tuple[int, int, float, dict[str, float]]] = {}

    def end_epoch(self, context: PluginContext) -> None:
        self.seen[context.epoch] = (
            context.training_batch_count,
            context.training_sample_count,
            context.training_loss_total,
            dict(context.training_metrics),
        )


@pytest.mark.parametrize("at_step", quick_first(3, BATCHES_PER_EPOCH + 4))
def test_the_epoch_interrupted_by_ctrl_c_reports_the_numbers_of_the_whole_epoch(
    tmp_path: Path, at_step: int
) -> None:
    metrics = [
        "accuracy",
        {"f1_score": {"average": "macro"}},
        {"precision": {"average": "weighted"}},
    ]
    config = CONFIG.with_overrides(metrics=metrics)
    uninterrupted = EpochNumbers()
    fit(None, config, plugins=[uninterrupted])
    with pytest.raises(TrainingInterrupted):
        fit(tmp_path, config, plugins=[Interrupter(at_step)])
    resumed = EpochNumbers()
    fit(tmp_path, config, plugins=[resumed])
    epoch = at_step // BATCHES_PER_EPOCH
    batches, samples, loss, values = resumed.seen[epoch]
    expected = uninterrupted.seen[epoch]
    assert (batches, samples) == expected[:2]
    assert loss == pytest.approx(expected[2], rel=1e-6)
    assert set(values) == {"accuracy", "f1_score", "precision"}
    assert values == pytest.approx(expected[3], rel=1e-6)


@pytest.mark.parametrize("at_step", quick_first(3, BATCHES_PER_EPOCH + 4, BATCHES_PER_EPOCH))
def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_bit_identical(
    tmp_path: Path, clean: dict[str, torch.Tensor], at_step: int
) -> None:
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupter, counter = Interrupter(at_step), Counter()
    with pytest.raises(TrainingInterrupted) as caught:
        fit(tmp_path, plugins=[interrupter, counter])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous
    assert caught.value.signal is signal.SIGINT
    assert interrupter.calls == ["on_exception:TrainingInterrupted", "end_training_session"]
    saved = caught.value.checkpoint
    assert saved is not None
    payload = read_checkpoint(saved)
    assert payload["global_step"] == at_step
    epochs, batch = divmod(at_step, BATCHES_PER_EPOCH)
    if batch == 0:  # the last batch of an epoch: that epoch completes first
        assert saved.name == f"epoch-{epochs:04d}.pt"
    else:
        assert saved.name == f"epoch-{epochs:04d}-batch-{batch:05d}.pt"
    assert payload["plugins"] == {"counter": {"epochs": epochs}}
    resumed_counter = Counter()
    result, final = fit(tmp_path, plugins=[resumed_counter])
    assert_same_weights(final, clean)
    assert resumed_counter.epochs == CONFIG.epochs
    assert result.global_step == CONFIG.epochs * BATCHES_PER_EPOCH


def test_a_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(
    tmp_path: Path, clean: dict[str, torch.Tensor], events: list[dict[str, Any]]
) -> None:
    fit(tmp_path, CONFIG.with_overrides(epochs=3))
    newest, previous = list_checkpoints(next(tmp_path.iterdir()))[:2]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as a lying disk leaves it
    result, final = fit(tmp_path)
    assert_same_weights(final, clean)
    assert result.resumed_from == previous
    warnings = [e for e in events if e["event"] == "checkpoint_unreadable"]
    assert len(warnings) == 1
    assert warnings[0]["path"] == str(newest)


def test_keep_last_prunes_old_checkpoints_and_stray_temporary_files(tmp_path: Path) -> None:
    run_dir = tmp_path / run_signature(resume_setup(CONFIG), CONFIG)
    run_dir.mkdir()
    stray = run_dir / ".epoch-0001.pt.4242.tmp"
    stray.write_bytes(b"half a checkpoint")
    fit(tmp_path, CONFIG.with_overrides(keep_last=2))
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [
        ".lock",
        "epoch-0003.pt",
        "epoch-0003.pt.json",
        "epoch-0004.pt",
        "epoch-0004.pt.json",
        "model.pt",
        "model.pt.json",
    ]


def test_checkpoint_interval_and_the_final_epoch(tmp_path: Path) -> None:
    fit(tmp_path, CONFIG.with_overrides(epochs=5, checkpoint_interval=2, keep_last=10))
    (run_dir,) = tmp_path.iterdir()
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == ["epoch-0005.pt", "epoch-0004.pt", "epoch-0002.pt"]


def test_interval_zero_writes_nothing(tmp_path: Path) -> None:
    result, _ = fit(tmp_path, CONFIG.with_overrides(checkpoint_interval=0))
    assert result.checkpoint is None
    assert not any(tmp_path.rglob("*.pt"))


def test_signature_ignores_epochs_but_not_hyperparameters_or_seed() -> None:
    base = run_signature(resume_setup(CONFIG), CONFIG)
    longer = CONFIG.with_overrides(epochs=40)
    assert run_signature(resume_setup(longer), longer) == base
    for changed in (
        CONFIG.with_overrides(seed=6),
        CONFIG.with_overrides(hyperparameters={"lr": 0.02}),
    ):
        assert run_signature(resume_setup(changed), changed) != base


def test_a_changed_model_does_not_resume_from_another_run(tmp_path: Path) -> None:
    fit(tmp_path, CONFIG.with_overrides(epochs=1))
    other = CONFIG.with_overrides(hyperparameters={"lr": 0.05})
    result, _ = fit(tmp_path, other)
    assert result.resumed_from is None
    assert len(list(tmp_path.iterdir())) == 2


def test_a_finished_run_reports_it_trains_nothing_and_returns_the_trained_model(
    tmp_path: Path, clean: dict[str, torch.Tensor], events: list[dict[str, Any]]
) -> None:
    fit(tmp_path)
    counter = Counter()
    result, final = fit(tmp_path, plugins=[counter])
    assert result.already_complete
    assert result.history == ()
    assert counter.paths == []
    assert result.epochs_completed == CONFIG.epochs
    assert_same_weights(final, clean)
    assert [e["event"] for e in events].count("already_complete") == 1


class RestoresOtherWeights:
    """Changes the weights at the end, as early_stopping does when it restores the best."""

    name = "restores_other_weights"

    def end_training_session(self, context: PluginContext) -> None:
        assert context.model is not None
        with torch.no_grad():
            for parameter in context.model.parameters():
                parameter.mul_(0.5)


def test_the_final_model_holds_the_weights_the_run_ended_with(
    tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    result, ended_with = fit(tmp_path, plugins=[RestoresOtherWeights()])
    assert result.model is not None
    assert result.model.name == "model.pt"
    assert result.checkpoint is not None
    assert result.model.parent == result.checkpoint.parent
    final = torch.load(result.model, weights_only=True)
    assert final["epoch"] == CONFIG.epochs
    assert_same_weights(dict(final["model"]), ended_with)
    # The last checkpoint keeps the weights training would go on from.
    last = read_checkpoint(result.checkpoint)["model"]
    assert not all(torch.equal(last[name], ended_with[name]) for name in ended_with)
    saved = [e for e in events if e["event"] == "model_saved"]
    assert [e["path"] for e in saved] == [str(result.model)]

    # Asked to train the finished run again, bz hands back the weights it ended with.
    again, weights_again = fit(tmp_path)
    assert again.already_complete
    assert again.model == result.model
    assert_same_weights(weights_again, ended_with)


def test_starting_over_removes_the_old_final_model(tmp_path: Path) -> None:
    first, _ = fit(tmp_path)
    assert first.model is not None
    assert first.model.exists()
    with pytest.raises(TrainingInterrupted):
        fit(tmp_path, CONFIG.with_overrides(resume=False), plugins=[Interrupter(3)])
    assert not first.model.exists(), "it belonged to the run that was started over"


def test_no_resume_starts_over_and_replaces_the_old_checkpoints(
    tmp_path: Path, clean: dict[str, torch.Tensor]
) -> None:
    fit(tmp_path)
    result, final = fit(tmp_path, CONFIG.with_overrides(resume=False, epochs=2))
    assert result.resumed_from is None
    assert result.epochs_completed == 2
    (run_dir,) = tmp_path.iterdir()
    # The old run's epochs 3 and 4 are gone: they would otherwise look newer.
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0002.pt", "epoch-0001.pt"]
    result, final = fit(tmp_path)  # and resuming that fresh run still ends identically
    assert_same_weights(final, clean)


def test_a_failed_write_is_reported_and_training_goes_on(
    tmp_path: Path,
    clean: dict[str, torch.Tensor],
    events: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def disk_full(payload: object, path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_checkpoint_store, "atomic_save", disk_full)
    result, final = fit(tmp_path)
    assert_same_weights(final, clean)
    assert result.checkpoint is None
    failures = [e for e in events if e["event"] == "checkpoint_write_failed"]
    assert len(failures) == CONFIG.epochs
    assert "No space left on device" in failures[0]["error"]
    assert [e["event"] for e in events].count("model_write_failed") == 1
    assert result.checkpoints_lost == CONFIG.epochs + 1


def test_atomic_save_leaves_nothing_behind_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "epoch-0001.pt"
    target.write_bytes(b"previous good file")

    def replace_crashes(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", replace_crashes)
    with pytest.raises(KeyboardInterrupt):
        _checkpoint_store.atomic_save(
            {"signature": "s", "epoch": 1, "global_step": 6, "x": torch.ones(2)}, target
        )
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-0001.pt"]
    assert target.read_bytes() == b"previous good file"


def test_checkpoints_cannot_run_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    path = tmp_path / "epoch-0001.pt"
    torch.save({"evil": Payload()}, path)
    with pytest.raises(_checkpoint.UnreadableCheckpoint, match=r"Unpickl|[Ww]eights only"):
        read_checkpoint(path, verified=False)


def test_plugin_state_that_a_checkpoint_cannot_hold_quarantines_only_that_plugin(
    tmp_path: Path, clean: dict[str, torch.Tensor], events: list[dict[str, Any]]
) -> None:
    class Hoarder(Counter):
        name = "hoarder"

        def state_dict(self) -> dict[str, Any]:
            return {"socket": object()}

    counter = Counter()
    result, final = fit(tmp_path, plugins=[Hoarder(), counter])
    assert_same_weights(final, clean)
    failed = [e for e in events if e["event"] == "plugin_failed"]
    assert [(e["plugin"], e["hook"]) for e in failed] == [("hoarder", "state_dict")]
    assert result.checkpoint is not None
    assert read_checkpoint(result.checkpoint)["plugins"] == {"counter": {"epochs": 4}}


def test_early_stopping_resumes_with_its_counters(tmp_path: Path) -> None:
    from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig

    def plugin() -> EarlyStopping:
        return EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=10.0, verbose=False))

    config = CONFIG.with_overrides(epochs=8)
    uninterrupted = plugin()
    straight, _ = fit(None, config, [uninterrupted])
    fit(tmp_path, config.with_overrides(epochs=2), [plugin()])
    resumed = plugin()
    result, _ = fit(tmp_path, config, [resumed])
    assert result.epochs_completed == straight.epochs_completed < 8
    assert resumed.stopped_epoch == uninterrupted.stopped_epoch
    assert resumed.history == uninterrupted.history


# -- configuration and command line -----------------------------------------------------------


@given(st.integers(max_value=-1))
def test_negative_checkpoint_interval_is_rejected_with_its_path(value: int) -> None:
    with pytest.raises(bz.ConfigError, match=r"^checkpoint_interval: must be >= 0"):
        structure({"checkpoint_interval": value}, RunConfig)


@given(st.integers(max_value=0))
def test_keep_last_below_one_is_rejected_with_its_path(value: int) -> None:
    with pytest.raises(bz.ConfigError, match=r"^keep_last: must be >= 1"):
        structure({"keep_last": value}, RunConfig)


@given(
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=1, max_value=1000),
    st.booleans(),
    st.text(min_size=1, max_size=20),
)
def test_checkpoint_options_round_trip(
    interval: int, keep: int, resume: bool, folder: str
) -> None:
    data = {
        "checkpoint_interval": interval,
        "keep_last": keep,
        "resume": resume,
        "checkpoint_dir": folder,
    }
    config = structure(data, RunConfig)
    assert (config.checkpoint_interval, config.keep_last, config.resume) == (
        interval,
        keep,
        resume,
    )
    assert structure(bz.config.unstructure(config), RunConfig) == config


def _project(folder: Path, **config: Any) -> Path:
    (folder / "train.py").write_text(RESUME_TRAIN_PY, encoding="utf-8")
    data = {"epochs": 2, "device": "cpu", "seed": 1, "plugins": [], "metrics": ["accuracy"]}
    (folder / "bzconfig.json").write_text(json.dumps({**data, **config}), encoding="utf-8")
    return folder / "bzconfig.json"


def test_cli_resumes_by_default_and_validate_reports_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    config = str(_project(tmp_path))
    runner = CliRunner()
    first = runner.invoke(cli, ["train", "--config", config, "--log-format", "json"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli, ["train", "--config", config])
    assert again.exit_code == 0
    assert "nothing to train: this run already finished 2 epoch(s)" in again.stderr
    longer = runner.invoke(cli, ["train", "--config", config, "--epochs", "3"])
    assert longer.exit_code == 0
    assert "resumed from" in longer.stderr
    assert "epoch-0002.pt" in longer.stderr
    shown = runner.invoke(cli, ["validate", "--config", config, "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert report["epoch"] == 3
    assert report["checkpoint"].endswith("model.pt"), "a finished run is shown as it ended"
    last = str(Path(report["checkpoint"]).with_name("epoch-0003.pt"))
    for chosen in (report["checkpoint"], last):
        shown = runner.invoke(cli, ["validate", "--config", config, "--checkpoint", chosen])
        assert shown.exit_code == 0, shown.output
        assert chosen in shown.output
    assert set(report["metrics"]) == {"accuracy"}
    assert report["validation_loss"] > 0


def test_cli_no_resume_and_checkpoint_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    monkeypatch.chdir(tmp_path)
    config = str(_project(tmp_path))
    args = ["train", "--config", config, "--checkpoint-dir", "ckpt", "--checkpoint-interval", "2"]
    runner = CliRunner()
    assert runner.invoke(cli, [*args, "--epochs", "3"]).exit_code == 0
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0003.pt", "epoch-0002.pt"]
    fresh = runner.invoke(cli, [*args, "--epochs", "2", "--no-resume"])
    assert fresh.exit_code == 0
    assert "resumed" not in fresh.stderr
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0002.pt"]


def test_validate_without_a_checkpoint_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    config = str(_project(tmp_path))
    result = CliRunner().invoke(cli, ["validate", "--config", config])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "no checkpoint of this run" in result.stderr


_SIGNATURE_OF_TRAIN_PY = """
import sys
from pathlib import Path
from bz._setup import load_setup_function
from bz.config import RunConfig
from bz.training.checkpoint.files import run_signature
config = RunConfig(epochs=1, device="cpu", plugins=(), seed=5)
print(run_signature(load_setup_function(Path(sys.argv[1]))(config), config))
"""

_TRAIN_PY_WITH_A_LOSS_FUNCTION = """
import torch
import bz

def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(outputs, targets)

def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    model = torch.nn.Linear(2, 1)
    data = [(torch.zeros(4, 2), torch.zeros(4, 1))]
    return bz.TrainingSetup(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=loss_fn, train_loader=data,
    )
"""


@pytest.mark.slow
def test_a_loss_function_in_train_py_is_the_same_run_in_every_process_and_folder(
    tmp_path: Path,
) -> None:
    # train.py's functions were named by a module name holding hash(path), which Python
    # salts per process: a run with a loss function never found its own checkpoints.
    import os
    import subprocess
    import sys

    signatures = set()
    for seed, folder in (("1", "a"), ("2", "a"), ("3", "b")):
        (tmp_path / folder).mkdir(exist_ok=True)
        script = tmp_path / folder / "train.py"
        script.write_text(_TRAIN_PY_WITH_A_LOSS_FUNCTION)
        done = subprocess.run(
            [sys.executable, "-c", _SIGNATURE_OF_TRAIN_PY, str(script)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        signatures.add(done.stdout.strip())
    assert len(signatures) == 1
