"""Bad input before training is one line and exit 2; silent bad runs are stopped.

``bz check-config`` on plugins that cannot be imported or configured, seeds torch cannot
take, a model on the meta device, an unusable ``--device`` (found before ``setup()``
runs), a bad config with ``--nproc-per-node`` (found once, before any process starts),
an empty training loader; a non-finite training loss (exit 1, naming the epoch, or with
``check_finite: "step"`` the step and batch); an op without a deterministic kernel under
``deterministic: true`` (exit 1); and
``early_stopping`` on a NaN monitor.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import textwrap
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, NoReturn

import pytest
import structlog
import torch
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st
from tests._fault_support import no_rendering
from tests._support import TINY_TRAIN_PY, assert_same_weights, tiny_setup, weights

import bz
import bz._run
from bz import _logging
from bz.commands import cli
from bz.config import SEED_MAX, SEED_MIN, ConfigError, RunConfig, structure, unstructure
from bz.plugins import PluginContext
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig
from bz.training.interrupts import StoppedAtOnce, TrainingInterrupted


def _project(folder: Path, train_py: str = TINY_TRAIN_PY, **config: Any) -> Path:
    (folder / "train.py").write_text(train_py, encoding="utf-8")
    settings = {"epochs": 2, "device": "cpu", "plugins": [], **config}
    path = folder / "bzconfig.json"
    path.write_text(json.dumps(settings), encoding="utf-8")
    return path


def _bz(*args: str) -> tuple[Result, list[MutableMapping[str, Any]]]:
    with pytest.MonkeyPatch.context() as patch, structlog.testing.capture_logs() as events:
        patch.setattr(_logging, "configure", no_rendering)
        result = CliRunner().invoke(cli, list(args))
    return result, events


def _one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# -- check-config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "stage"),
    [
        ("broken_import", "import"),
        # No "create": check-config creates no plugin (tests/integration/test_first_hour.py).
        ({"faulty": {"fail_in": "config"}}, "config"),
    ],
)
def test_check_config_exits_2_when_a_plugin_cannot_be_loaded(
    entry: Any, stage: str, plugin_path: Path, tmp_path: Path
) -> None:
    config = _project(tmp_path, plugins=[entry])
    result, _ = _bz("check-config", "--config", str(config))
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert f"failed in {stage}" in line
    assert "injected fault" in line
    with_traceback, _ = _bz("check-config", "--config", str(config), "--traceback")
    assert with_traceback.exit_code == 2
    assert "Traceback" in with_traceback.stderr


def test_check_config_still_passes_a_good_config(plugin_path: Path, tmp_path: Path) -> None:
    config = _project(tmp_path, plugins=["faulty"])
    result, _ = _bz("check-config", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout


# -- seeds, devices, models, loaders ------------------------------------------------------------


def test_a_seed_torch_cannot_take_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = _project(tmp_path)
    result, _ = _bz("train", "--config", str(config), "--seed", "18446744073709551616")
    assert result.exit_code == 2
    assert "seed" in _one_error_line(result)


@given(st.integers(min_value=SEED_MIN, max_value=SEED_MAX))
def test_every_seed_the_config_accepts_torch_accepts(seed: int) -> None:
    config = RunConfig().with_overrides(seed=seed)
    assert config.seed == seed
    torch.Generator().manual_seed(seed)


@given(st.integers(min_value=SEED_MAX + 1) | st.integers(max_value=SEED_MIN - 1))
def test_every_seed_outside_torchs_range_is_a_config_error(seed: int) -> None:
    with pytest.raises(ConfigError, match="seed"):
        RunConfig().with_overrides(seed=seed)


@given(st.sampled_from(["rewind", "isolate", "raise"]) | st.text(max_size=8))
def test_plugin_errors_takes_exactly_three_policies(policy: str) -> None:
    if policy in ("rewind", "isolate", "raise"):
        assert RunConfig().with_overrides(plugin_errors=policy).plugin_errors == policy
    else:
        with pytest.raises(ConfigError, match="plugin_errors"):
            RunConfig().with_overrides(plugin_errors=policy)


@given(st.none() | st.floats(allow_nan=False, allow_infinity=False))
def test_plugin_timeout_is_positive_seconds_or_null(seconds: float | None) -> None:
    if seconds is None or seconds >= 0.001:
        assert RunConfig().with_overrides(plugin_timeout=seconds).plugin_timeout == seconds
    else:
        with pytest.raises(ConfigError, match="plugin_timeout"):
            RunConfig().with_overrides(plugin_timeout=seconds)


@given(
    st.none()
    | st.floats()  # NaN and the infinities too (Python's JSON reads NaN and Infinity)
    | st.integers(min_value=-(2**53), max_value=2**53)  # exact as floats
    | st.booleans()
    | st.text(max_size=6)
)
def test_plugin_start_timeout_is_positive_seconds_or_null(seconds: Any) -> None:
    """Like plugin_timeout: null, or at least a millisecond; anything else is refused
    naming the key. What is accepted comes back out of JSON as it went in."""
    is_number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    if seconds is None or (is_number and seconds >= 0.001):
        config = RunConfig().with_overrides(plugin_start_timeout=seconds)
        assert config.plugin_start_timeout == seconds
        again = structure(json.loads(json.dumps(unstructure(config))), RunConfig)
        assert again.plugin_start_timeout == seconds
    else:
        with pytest.raises(ConfigError, match=r"^plugin_start_timeout: "):
            RunConfig().with_overrides(plugin_start_timeout=seconds)


def test_plugin_start_timeout_from_the_command_line_is_checked_like_the_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "bzconfig.json").write_text('{"plugin_start_timeout": 0}', encoding="utf-8")
    (tmp_path / "good.json").write_text('{"plugin_start_timeout": 30}', encoding="utf-8")
    for args in (
        ["check-config", "--config", str(tmp_path / "bzconfig.json")],
        ["train", "--config", str(tmp_path / "bzconfig.json")],
        ["train", "--set", "plugin_start_timeout=-1", "--config", str(tmp_path / "good.json")],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.splitlines()
        assert re.fullmatch(
            r"bz: error: .*plugin_start_timeout: must be >= 0\.001, got -?[01]\.0", line
        )


_MARKER_TRAIN_PY = TINY_TRAIN_PY.replace(
    "def setup(config: bz.RunConfig) -> bz.TrainingSetup:\n",
    "def setup(config: bz.RunConfig) -> bz.TrainingSetup:\n    open('setup-ran', 'w').close()\n",
)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="the machine has a cuda:7")
def test_an_unusable_device_is_found_before_setup_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _project(tmp_path, _MARKER_TRAIN_PY)
    result, _ = _bz("train", "--config", str(config), "--device", "cuda:7")
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert line.startswith("bz: error: the command line: device 'cuda:7' requested"), line
    assert not (tmp_path / "setup-ran").exists()


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="the machine has a cuda:7")
def test_an_unusable_device_in_the_file_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _project(tmp_path, _MARKER_TRAIN_PY, device="cuda:7")
    result, _ = _bz("train", "--config", str(config))
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert line.startswith(f"bz: error: {config}: device 'cuda:7' requested"), line
    assert not (tmp_path / "setup-ran").exists()


def test_with_several_processes_a_bad_config_is_reported_once_before_any_starts(
    tmp_path: Path,
) -> None:
    config = _project(tmp_path, epochs=0)
    result, _ = _bz("train", "--config", str(config), "--nproc-per-node", "2")
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "epochs" in line
    assert "exitcode" not in result.output


_META_TRAIN_PY = textwrap.dedent(
    """
    import torch
    from torch import nn

    import bz


    def setup(config: bz.RunConfig) -> bz.TrainingSetup:
        with torch.device("meta"):
            model = nn.Linear(4, 2)
        data = [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))]
        return bz.TrainingSetup(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_loader=data,
        )
    """
)


def test_a_model_on_the_meta_device_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = _project(tmp_path, _META_TRAIN_PY)
    result, _ = _bz("train", "--config", str(config))
    assert result.exit_code == 2
    assert "meta device" in _one_error_line(result)


def test_an_empty_training_loader_is_an_error_before_the_first_epoch() -> None:
    setup = tiny_setup()
    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=setup.loss_fn,
        optimizer=setup.optimizer,
        train_loader=[],
    )

    class Watcher:
        name = "watcher"
        epochs = 0

        def start_epoch(self, context: PluginContext) -> None:
            Watcher.epochs += 1

    with pytest.raises(bz.UsageError, match="no batches"):
        bz.Trainer().fit(setup, RunConfig(epochs=2, device="cpu"), [Watcher()])
    assert Watcher.epochs == 0


# -- silent bad runs ----------------------------------------------------------------------------


_NAN_TRAIN_PY = TINY_TRAIN_PY.replace(
    "optimizer=torch.optim.SGD(model.parameters(), lr=0.1)",
    "optimizer=torch.optim.SGD(model.parameters(), lr=1e30)",
)


def test_a_non_finite_training_loss_stops_the_run_naming_the_epoch(tmp_path: Path) -> None:
    config = _project(tmp_path, _NAN_TRAIN_PY, epochs=5)
    result, events = _bz("train", "--config", str(config))
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "in epoch 1:" in line
    assert "non-finite" in line
    assert not [e for e in events if e["event"] == "epoch_finished"]


def test_check_finite_step_stops_at_the_first_non_finite_batch(tmp_path: Path) -> None:
    config = _project(tmp_path, _NAN_TRAIN_PY, epochs=5)
    args = ["train", "--config", str(config), "--set", "check_finite=step"]
    result, _ = _bz(*args)
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "the training loss is" in line
    assert "at step 2 (epoch 1, batch index 1)" in line


_PUT_TRAIN_PY = TINY_TRAIN_PY.replace(
    "def setup(config: bz.RunConfig) -> bz.TrainingSetup:",
    """class Put(nn.Module):  # Tensor.put_ has no deterministic kernel on the CPU
    def forward(self, x):
        return x + torch.zeros(x.numel()).put_(torch.tensor([0]), torch.tensor([1.0])).view_as(x)


def setup(config: bz.RunConfig) -> bz.TrainingSetup:""",
).replace("nn.Linear(8, 2))", "nn.Linear(8, 2), Put())")


def test_deterministic_with_an_op_that_has_no_deterministic_kernel_is_one_line(
    tmp_path: Path,
) -> None:
    config = _project(tmp_path, _PUT_TRAIN_PY)
    result, _ = _bz("train", "--config", str(config), "--set", "deterministic=true")
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert '"deterministic": true, but put_ has no deterministic implementation' in line
    assert _bz("train", "--config", str(config))[0].exit_code == 0


def test_early_stopping_counts_a_nan_monitor_as_no_improvement() -> None:
    plugin = EarlyStopping(EarlyStoppingConfig(monitor="accuracy", mode="max", patience=2))
    context = PluginContext()
    for epoch, value in enumerate([0.5, math.nan, math.nan]):
        context.epoch = epoch
        context.validation_metrics = {"accuracy": value}
        plugin.end_epoch(context)
    assert context.should_stop_training
    assert plugin.best == 0.5


# -- a second signal -------------------------------------------------------------------------


@pytest.mark.parametrize(("number", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_stops_at_once_and_exits_with_that_signals_code(
    number: signal.Signals, code: int, tmp_path: Path
) -> None:
    flushed: list[BaseException | None] = []
    setup = tiny_setup()
    loss_fn = setup.loss_fn
    assert loss_fn is not None

    def signalling_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The user's own code, not a plugin's: nobody to blame, so bz stops at once.
        os.kill(os.getpid(), number)  # the first asks for a stop after the step
        os.kill(os.getpid(), number)  # the second stops at once
        return loss_fn(outputs, targets)

    class Flusher:
        name = "flusher"

        def on_exception(self, context: PluginContext) -> None:
            flushed.append(context.exception)

    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=signalling_loss,
        optimizer=setup.optimizer,
        train_loader=setup.train_loader,
    )
    with pytest.raises(StoppedAtOnce) as raised:
        bz.Trainer().fit(setup, RunConfig(epochs=2, device="cpu"), [Flusher()])
    assert raised.value.signal == number
    assert flushed == [raised.value]  # plugins still get to flush
    # And bz train turns it into the shell's 128 + signal.
    config = _project(tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_logging, "configure", no_rendering)
        patch.setattr(bz._run, "run", _raiser(StoppedAtOnce(number)))
        result = CliRunner().invoke(cli, ["train", "--config", str(config)])
    assert result.exit_code == code
    assert "Traceback" not in result.output


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_inside_a_hung_hook_blames_the_plugin_and_stops_with_a_checkpoint(
    number: signal.Signals, tmp_path: Path
) -> None:
    class Hangs:
        name = "hangs"

        def end_training_batch(self, context: PluginContext) -> None:
            os.kill(os.getpid(), number)  # the first: stop after this step, please
            os.kill(os.getpid(), number)  # the second, while this hook still runs
            time.sleep(600)

    config = RunConfig(epochs=2, device="cpu", plugin_timeout=None)
    with pytest.raises(TrainingInterrupted) as raised:
        bz.Trainer().fit(tiny_setup(), config, [Hangs()], checkpoint_dir=tmp_path)
    assert raised.value.signal == number  # bz train exits 128 + this
    assert raised.value.checkpoint is not None
    # The interrupted run resumes to exactly the weights of a run without the plugin.
    resumed = tiny_setup()
    bz.Trainer().fit(resumed, config, [], checkpoint_dir=tmp_path)
    clean = tiny_setup()
    bz.Trainer().fit(clean, config, [])
    assert_same_weights(weights(resumed.model), weights(clean.model))


def _raiser(error: BaseException) -> Any:
    def run(*args: Any, **kwargs: Any) -> NoReturn:
        raise error

    return run


# -- how a batch becomes a loss: misuse found when TrainingSetup is built or at the first batch --

_STEP_TRAIN_PY = """
import torch
from torch import nn

import bz


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [{{"x": torch.ones(4, 3), "labels": torch.zeros(4, dtype=torch.long)}}] * 3
    return bz.TrainingSetup(
        model=model,
        optimizer=optimizer,
        train_loader=batches,
        {extra}
    )
"""

_STEP_MISUSES = {
    "plateau_per_step": (
        "scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer), "
        'scheduler_interval="step",',
        r"train\.py:\d+: TrainingSetup: ReduceLROnPlateau cannot step per optimizer step",
    ),
    "per_step_without_a_scheduler": (
        'scheduler_interval="step",',
        r"train\.py:\d+: TrainingSetup: scheduler_interval='step' steps a scheduler, and no "
        "scheduler is given",
    ),
    "a_step_that_is_not_callable": (
        'step="x",',
        r"train\.py:\d+: TrainingSetup: step must be callable, got str$",
    ),
    "a_step_of_one_argument": (
        "step=lambda batch: batch['x'].sum(),",
        r"train\.py:\d+: TrainingSetup: step cannot be called as step\(model, batch\): "
        r"<lambda>\(batch\) takes",
    ),
    "a_loss_fn_of_three_arguments": (
        "loss_fn=lambda outputs, targets, weights: outputs.sum(),",
        r"train\.py:\d+: TrainingSetup: loss_fn cannot be called as loss_fn\(outputs, "
        r"targets\): <lambda>\(outputs, targets, weights\) takes",
    ),
    "a_loader_that_is_not_iterable": (
        "val_loader=3,",
        r"train\.py:\d+: TrainingSetup: val_loader must be iterable, got int$",
    ),
    "a_loss_without_grad": (
        "step=lambda m, b: m(b['x']).sum().detach(),",
        r"train\.py:\d+: step returned a loss that does not require grad: it must be the "
        r"loss computed from the model's forward",
    ),
    "loss_fn_and_step": (
        "loss_fn=nn.CrossEntropyLoss(), step=lambda m, b: m(b['x']).sum(),",
        r"train\.py:\d+: TrainingSetup: give loss_fn or step, not both",
    ),
    "no_loss_in_the_output": (
        "",
        r"model\(\*\*batch\) returned Tensor without a loss",
    ),
    "a_vector_loss": (
        "step=lambda m, b: m(b['x']).sum(dim=1),",
        r"step returned a loss of shape \(4,\); it must be a scalar",
    ),
}


@pytest.mark.parametrize("case", sorted(_STEP_MISUSES))
def test_a_misused_step_or_schedule_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    extra, message = _STEP_MISUSES[case]
    # nn.Linear takes no keyword "x": model(**batch) fails in the model, not in bz; a
    # model that takes the batch's keys and returns no loss is what the third case needs.
    train_py = _STEP_TRAIN_PY.format(extra=extra)
    if case == "no_loss_in_the_output":
        train_py = train_py.replace(
            "model = nn.Linear(3, 2)",
            "class Net(nn.Linear):\n"
            "        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:\n"
            "            return super().forward(x)\n"
            "    model = Net(3, 2)",
        )
    config = _project(tmp_path, train_py)
    result, _ = _bz("train", "--config", str(config))
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert re.search(message, line), line


# -- validate_every_steps without validation data -------------------------------------------


def test_validate_every_steps_without_a_val_loader_is_refused_before_training(
    tmp_path: Path,
) -> None:
    # It failed at the Nth step with an AssertionError inside bz's epoch loop (exit 1).
    train_py = TINY_TRAIN_PY.replace("val_loader=DataLoader(data, batch_size=32),", "")
    assert train_py != TINY_TRAIN_PY
    config = _project(tmp_path, train_py, validate_every_steps=2)
    result, events = _bz("train", "--config", str(config))
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert line == (
        f"bz: error: {config}: validate_every_steps: 2, and setup() returns no val_loader: "
        "nothing to validate (give TrainingSetup a val_loader, or leave validate_every_steps "
        "out)"
    )
    assert not [e for e in events if e["event"] == "epoch_finished"]


def test_fit_refuses_validate_every_steps_without_a_val_loader() -> None:
    config = RunConfig(epochs=1, plugins=[], validate_every_steps=2)
    with pytest.raises(ConfigError, match=r"validate_every_steps: 2, and .* no val_loader"):
        bz.Trainer().fit(tiny_setup(validation=False), config)
