"""The loop's levers: precision, accumulation, clipping, step and time limits,
step-based validation and checkpoints, what per-batch hooks see, sample-weighted losses.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from tests._checkpoint_support import train_here
from tests._child import FAULT_CHILD
from tests._fault_support import REPO_ROOT, RESUME_TRAIN_PY
from tests._support import TRAINING_DIED, assert_same_weights, quick_first, tiny_setup, weights
from torch import nn

import bz
from bz import commands as cli
from bz.config import GradientClip, MetricSpec, RunConfig, structure
from bz.metrics import build_metrics
from bz.plugins import PluginContext
from bz.testing import count_host_reads

CONFIG = RunConfig(epochs=1, device="cpu", plugins=(), plugin_errors="raise", seed=0)


def _linear_setup(batches: list[int], *, lr: float = 0.1, seed: int = 0) -> bz.TrainingSetup:
    """A linear regression trained by plain SGD on batches of the given sizes."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(batches)
    inputs = torch.randn(total, 3, generator=generator)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(
        total, 1, generator=generator
    )
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    loader, start = [], 0
    for size in batches:
        loader.append((inputs[start : start + size], targets[start : start + size]))
        start += size
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        train_loader=loader,
        val_loader=loader[:1],
    )


class Recorder:
    """Records, per hook, what the context shows."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, bool, bool, bool]] = []
        self.norms: list[float] = []
        self.grad_norms_seen: list[float] = []
        self.max_abs_grad: list[float] = []

    def _record(self, hook: str, context: PluginContext) -> None:
        self.seen.append(
            (
                hook,
                context.global_step,
                context.batch is not None,
                context.outputs is not None,
                context.loss is not None,
            )
        )

    def start_training_batch(self, context: PluginContext) -> None:
        self._record("start_training_batch", context)

    def after_backward(self, context: PluginContext) -> None:
        self._record("after_backward", context)

    def before_optimizer_step(self, context: PluginContext) -> None:
        self._record("before_optimizer_step", context)
        assert context.model is not None
        grads = [p.grad for p in context.model.parameters() if p.grad is not None]
        self.grad_norms_seen.append(
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        )
        self.max_abs_grad.append(max(float(g.abs().max()) for g in grads))
        if context.gradient_norm is not None:
            self.norms.append(context.gradient_norm)

    def end_training_batch(self, context: PluginContext) -> None:
        self._record("end_training_batch", context)

    def start_validation_batch(self, context: PluginContext) -> None:
        self._record("start_validation_batch", context)

    def end_validation_batch(self, context: PluginContext) -> None:
        self._record("end_validation_batch", context)

    def end_epoch(self, context: PluginContext) -> None:
        self._record("end_epoch", context)

    def count(self, hook: str) -> int:
        return sum(1 for entry in self.seen if entry[0] == hook)


# -- configuration contracts ---------------------------------------------------------


@given(
    days=st.integers(0, 3),
    hours=st.integers(0, 99),
    minutes=st.integers(0, 59),
    seconds=st.integers(0, 59),
)
def test_max_time_reads_clock_strings_and_seconds_alike(
    days: int, hours: int, minutes: int, seconds: int
) -> None:
    expected = float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    if days:
        clock = f"{days}:{clock}"
    assert structure({"max_time": clock}, RunConfig).max_time == expected
    assert structure({"max_time": expected}, RunConfig).max_time == expected
    # In Python the same values work, and the configuration round-trips through JSON.
    assert RunConfig(max_time=clock).max_time == expected


@given(st.one_of(st.text(max_size=12), st.floats(max_value=-0.001), st.booleans()))
def test_max_time_refuses_what_is_not_a_duration(value: object) -> None:
    if isinstance(value, str):
        try:
            RunConfig(max_time=value)
        except (ValueError, TypeError):
            pass
        else:  # hypothesis found a real clock string: fine, it must then be accepted
            return
    with pytest.raises(bz.ConfigError, match=r"max_time: expected"):
        structure({"max_time": value}, RunConfig)


@pytest.mark.parametrize("table", [{"max_norm": 0}, {"value": 0.0}, {"max_norm": -1.0}])
def test_a_clipping_threshold_of_zero_or_less_is_refused(table: dict[str, float]) -> None:
    # 0 would zero every gradient: a run that trains nothing, silently.
    (key,) = table
    with pytest.raises(bz.ConfigError, match=rf"^gradient_clip\.{key}: must be > 0\.0, got"):
        structure({"gradient_clip": table}, RunConfig)


@given(
    max_norm=st.one_of(st.none(), st.floats(0.0, 1e6)),
    value=st.one_of(st.none(), st.floats(0.0, 1e6)),
)
def test_gradient_clip_takes_exactly_one_of_max_norm_and_value(
    max_norm: float | None, value: float | None
) -> None:
    data = {key: v for key, v in (("max_norm", max_norm), ("value", value)) if v is not None}
    if (max_norm is None) == (value is None):
        # Both given: "exactly one", unless a 0 is refused first.
        with pytest.raises(bz.ConfigError, match=r"exactly one|must be > 0\.0, got 0\.0"):
            structure({"gradient_clip": data}, RunConfig)
    elif 0.0 in data.values():  # a threshold of 0 would zero every gradient
        with pytest.raises(bz.ConfigError, match=r"must be > 0\.0, got 0\.0"):
            structure({"gradient_clip": data}, RunConfig)
    else:
        clip = structure({"gradient_clip": data}, RunConfig).gradient_clip
        assert clip == GradientClip(max_norm=max_norm, value=value)


@given(
    key=st.sampled_from(
        ["accumulate_grad_batches", "max_steps", "validate_every_steps", "checkpoint_every_steps"]
    ),
    number=st.integers(-5, 50),
)
def test_step_counts_are_positive_integers(key: str, number: int) -> None:
    if number >= 1:
        assert getattr(structure({key: number}, RunConfig), key) == number
    else:
        with pytest.raises(bz.ConfigError, match=f"{key}: must be >= 1"):
            structure({key: number}, RunConfig)


def test_every_new_key_is_in_the_schema_and_agrees_with_the_converter() -> None:
    import jsonschema

    from bz.commands.schema import bzconfig_schema

    schema = bzconfig_schema()
    documents: list[tuple[dict[str, Any], bool]] = [
        ({"precision": "bf16-mixed"}, True),
        ({"precision": "bf16"}, False),
        ({"accumulate_grad_batches": 4}, True),
        ({"accumulate_grad_batches": 0}, False),
        ({"gradient_clip": {"max_norm": 1.0, "norm_type": 2.0}}, True),
        ({"gradient_clip": {"value": 0.5}}, True),
        ({"max_steps": 100}, True),
        ({"max_time": "01:30:00"}, True),
        ({"max_time": 5400}, True),
        ({"max_time": "90 minutes"}, False),
        ({"validate_every_steps": 50}, True),
        ({"checkpoint_every_steps": 200}, True),
        ({"checkpoint_every_seconds": "00:10:00"}, True),
    ]
    for document, valid in documents:
        schema_says = jsonschema.Draft202012Validator(schema).is_valid(document)
        try:
            structure(document, RunConfig)
            converter_says = True
        except bz.ConfigError:
            converter_says = False
        assert schema_says == converter_says == valid, document


# -- accumulation --------------------------------------------------------------------


def test_accumulating_equal_micro_batches_matches_one_large_batch() -> None:
    micro = _linear_setup([8] * 12)
    large = _linear_setup([32] * 3)
    accumulated = bz.Trainer().fit(micro, attrs.evolve(CONFIG, accumulate_grad_batches=4))
    plain = bz.Trainer().fit(large, CONFIG)
    assert accumulated.global_step == plain.global_step == 3
    for key, value in weights(micro.model).items():
        torch.testing.assert_close(value, weights(large.model)[key], rtol=1e-5, atol=1e-6)


def test_an_epochs_last_short_group_still_steps_with_its_own_mean() -> None:
    # 10 batches in groups of 4: 4 + 4 + 2; the last group is the mean of its 2 batches.
    micro = _linear_setup([8] * 10)
    large = _linear_setup([32, 32, 16])
    result = bz.Trainer().fit(micro, attrs.evolve(CONFIG, accumulate_grad_batches=4, epochs=2))
    bz.Trainer().fit(large, attrs.evolve(CONFIG, epochs=2))
    assert result.global_step == 6
    for key, value in weights(micro.model).items():
        torch.testing.assert_close(value, weights(large.model)[key], rtol=1e-5, atol=1e-6)


def test_optimizer_hooks_run_once_per_group_and_batch_hooks_per_batch() -> None:
    recorder = Recorder()
    bz.Trainer().fit(
        _linear_setup([8] * 10), attrs.evolve(CONFIG, accumulate_grad_batches=4), [recorder]
    )
    assert recorder.count("start_training_batch") == 10
    assert recorder.count("after_backward") == 10
    assert recorder.count("before_optimizer_step") == 3
    steps_at_batch_end = [s for hook, s, *_ in recorder.seen if hook == "end_training_batch"]
    assert steps_at_batch_end == [0, 0, 0, 1, 1, 1, 1, 2, 2, 3]


# -- clipping --------------------------------------------------------------------------


def test_clipping_by_norm_bounds_what_plugins_see_and_reports_the_norm_before() -> None:
    recorder = Recorder()
    clip = GradientClip(max_norm=0.05)
    bz.Trainer().fit(
        _linear_setup([8] * 6, lr=0.01), attrs.evolve(CONFIG, gradient_clip=clip), [recorder]
    )
    assert len(recorder.grad_norms_seen) == 6
    assert max(recorder.grad_norms_seen) <= 0.05 * (1 + 1e-4)
    assert len(recorder.norms) == 6
    assert max(recorder.norms) > 0.05, "the norm before clipping"


def test_clipping_by_value_bounds_every_gradient_element() -> None:
    recorder = Recorder()
    clip = GradientClip(value=0.01)
    bz.Trainer().fit(_linear_setup([8] * 6), attrs.evolve(CONFIG, gradient_clip=clip), [recorder])
    assert max(recorder.max_abs_grad) <= 0.01
    assert recorder.norms == [], "no norm is computed when clipping by value"


# -- step and time limits ----------------------------------------------------------------


def test_max_steps_stops_at_exactly_that_step_in_the_middle_of_an_epoch(tmp_path: Path) -> None:
    recorder = Recorder()
    setup = tiny_setup(batches=4)
    result = bz.Trainer().fit(
        setup, attrs.evolve(CONFIG, epochs=5, max_steps=7), [recorder], checkpoint_dir=tmp_path
    )
    assert result.global_step == 7
    assert result.stopped_by == "max_steps"
    assert result.epochs_completed == 1
    assert result.final is not None
    assert result.final.partial
    assert recorder.count("start_training_batch") == 7
    assert result.checkpoint is not None
    assert result.checkpoint.name == "epoch-0001-batch-00003.pt"
    # Started again with the same limit there is nothing left; raised, it goes on.
    again = bz.Trainer().fit(
        tiny_setup(batches=4), attrs.evolve(CONFIG, epochs=5, max_steps=7), checkpoint_dir=tmp_path
    )
    assert again.already_complete
    assert again.stopped_by == "max_steps"
    more = bz.Trainer().fit(
        tiny_setup(batches=4),
        attrs.evolve(CONFIG, epochs=5, max_steps=10),
        checkpoint_dir=tmp_path,
    )
    assert more.global_step == 10
    assert more.resumed_from == result.checkpoint


def test_resuming_past_max_steps_matches_one_uninterrupted_run(tmp_path: Path) -> None:
    clean = tiny_setup(batches=4)
    bz.Trainer().fit(clean, attrs.evolve(CONFIG, epochs=3))
    bz.Trainer().fit(
        tiny_setup(batches=4), attrs.evolve(CONFIG, epochs=3, max_steps=5), checkpoint_dir=tmp_path
    )
    resumed = tiny_setup(batches=4)
    bz.Trainer().fit(resumed, attrs.evolve(CONFIG, epochs=3), checkpoint_dir=tmp_path)
    assert_same_weights(weights(resumed.model), weights(clean.model))


def test_max_time_stops_at_the_next_step_with_a_checkpoint_and_continues(tmp_path: Path) -> None:
    first = bz.Trainer().fit(
        tiny_setup(batches=4), attrs.evolve(CONFIG, epochs=2, max_time=0), checkpoint_dir=tmp_path
    )
    assert first.global_step == 1
    assert first.stopped_by == "max_time"
    assert first.checkpoint is not None
    assert first.checkpoint.name == "epoch-0000-batch-00001.pt"
    second = bz.Trainer().fit(
        tiny_setup(batches=4), attrs.evolve(CONFIG, epochs=2), checkpoint_dir=tmp_path
    )
    assert second.resumed_from == first.checkpoint
    assert second.global_step == 8
    assert second.stopped_by is None


# -- step-based validation and checkpoints -------------------------------------------------


def test_validation_every_n_steps_comes_on_top_of_each_epochs() -> None:
    recorder = Recorder()
    bz.Trainer().fit(
        tiny_setup(batches=4), attrs.evolve(CONFIG, epochs=2, validate_every_steps=3), [recorder]
    )
    # Steps 3 and 6 fall inside epochs; each epoch also ends with its own validation.
    assert recorder.count("start_validation_batch") == (2 + 2) * 2


def test_checkpoints_every_n_steps_are_written_mid_epoch(tmp_path: Path) -> None:
    result = bz.Trainer().fit(
        tiny_setup(batches=4),
        attrs.evolve(CONFIG, epochs=2, checkpoint_every_steps=3, keep_last=10),
        checkpoint_dir=tmp_path,
    )
    assert result.checkpoint is not None
    names = sorted(path.name for path in result.checkpoint.parent.glob("epoch-*.pt"))
    assert names == [
        "epoch-0000-batch-00003.pt",
        "epoch-0001-batch-00002.pt",
        "epoch-0001.pt",
        "epoch-0002.pt",
    ]


def test_checkpoints_by_the_clock_are_written_between_steps(tmp_path: Path) -> None:
    result = bz.Trainer().fit(
        tiny_setup(batches=4),
        attrs.evolve(CONFIG, checkpoint_every_seconds=0, keep_last=10, checkpoint_interval=0),
        checkpoint_dir=tmp_path,
    )
    assert result.checkpoint is not None
    names = {path.name for path in result.checkpoint.parent.glob("epoch-*.pt")}
    assert {"epoch-0000-batch-00001.pt", "epoch-0000-batch-00003.pt", "epoch-0001.pt"} <= names


# -- what per-batch hooks see ------------------------------------------------------------


def test_batch_hooks_see_the_batch_outputs_and_loss_by_reference() -> None:
    setup = tiny_setup(batches=2)
    first_inputs = setup.train_loader[0][0]  # type: ignore[index]  # a list of batches
    seen_inputs: list[torch.Tensor] = []

    class Keeper(Recorder):
        def start_training_batch(self, context: PluginContext) -> None:
            super().start_training_batch(context)
            assert context.batch is not None
            seen_inputs.append(context.batch[0])

    keeper = Keeper()
    bz.Trainer().fit(setup, CONFIG, [keeper])
    assert seen_inputs[0] is first_inputs, "a reference, not a copy"
    shown = {hook: (batch, outputs, loss) for hook, _, batch, outputs, loss in keeper.seen}
    assert shown["start_training_batch"] == (True, False, False)
    assert shown["after_backward"] == (True, True, True)
    assert shown["end_training_batch"] == (True, True, True)
    assert shown["start_validation_batch"] == (True, False, False)
    assert shown["end_validation_batch"] == (True, True, True)
    assert shown["end_epoch"] == (False, False, False)


# -- sample-weighted losses --------------------------------------------------------------


def test_epoch_losses_are_the_mean_over_samples_with_a_short_last_batch() -> None:
    setup = _linear_setup([37, 37, 18])  # 92 samples: the shape the issue reported
    setup = attrs.evolve(setup, val_loader=setup.train_loader)
    metrics = build_metrics([MetricSpec("mean_squared_error")])
    result = bz.Trainer().fit(setup, attrs.evolve(CONFIG, epochs=1), metrics=metrics)
    assert result.final is not None
    assert result.final.validation_loss is not None
    with torch.no_grad():
        inputs = torch.cat([x for x, _ in setup.train_loader])
        targets = torch.cat([y for _, y in setup.train_loader])
        by_hand = float(nn.functional.mse_loss(setup.model(inputs), targets))
    assert math.isclose(result.final.validation_loss, by_hand, rel_tol=1e-6)
    assert math.isclose(
        result.final.validation_metrics["mean_squared_error"], by_hand, rel_tol=1e-6
    )


# -- precision -----------------------------------------------------------------------------


def test_bf16_mixed_trains_on_cpu_with_float32_sums() -> None:
    setup = tiny_setup(batches=4)
    reference = tiny_setup(batches=4)
    result = bz.Trainer().fit(setup, attrs.evolve(CONFIG, epochs=3, precision="bf16-mixed"))
    plain = bz.Trainer().fit(reference, attrs.evolve(CONFIG, epochs=3))
    assert result.final is not None
    assert plain.final is not None
    assert math.isfinite(result.final.training_loss)
    assert math.isclose(result.final.training_loss, plain.final.training_loss, rel_tol=0.05)
    assert all(p.dtype == torch.float32 for p in setup.model.parameters())


def test_16_mixed_without_cuda_is_refused_before_setup_runs(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "train.py").write_text(
        "def setup(config):\n    raise SystemExit('setup() ran')\n", encoding="utf-8"
    )
    (tmp_path / "bzconfig.json").write_text('{"precision": "16-mixed", "device": "cpu"}')
    outcome = CliRunner().invoke(cli.cli, ["train", "--config", str(tmp_path / "bzconfig.json")])
    assert outcome.exit_code == 2, outcome.output
    assert "precision '16-mixed' needs a CUDA device" in outcome.output
    assert "setup() ran" not in outcome.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_16_mixed_on_cuda_trains_and_saves_the_scaler(tmp_path: Path) -> None:
    setup = tiny_setup(batches=4)
    result = bz.Trainer().fit(
        setup, attrs.evolve(CONFIG, device="cuda", precision="16-mixed"), checkpoint_dir=tmp_path
    )
    assert result.checkpoint is not None
    payload = torch.load(result.checkpoint, weights_only=True)
    assert payload["grad_scaler"]["scale"] > 0


# -- host reads ----------------------------------------------------------------------------


def _reads(batches: int, **keys: Any) -> Counter[str]:
    setup = tiny_setup(batches=batches)
    metrics = build_metrics([MetricSpec("accuracy")])
    counter: Counter[str] = Counter()
    with count_host_reads(counter):
        bz.Trainer().fit(setup, attrs.evolve(CONFIG, epochs=2, **keys), metrics=metrics)
    return counter


@pytest.mark.parametrize(
    "keys",
    quick_first(
        {"precision": "bf16-mixed"},
        {"accumulate_grad_batches": 2},
        {"gradient_clip": GradientClip(max_norm=1.0)},
        {"gradient_clip": GradientClip(value=0.1)},
        {"max_steps": 10_000},
        {"max_time": 10_000},
    ),
    ids=lambda keys: next(iter(keys)),
)
def test_no_new_key_reads_from_the_device_per_batch(keys: dict[str, Any]) -> None:
    assert _reads(8, **keys) == _reads(16, **keys)


def test_validation_every_n_steps_reads_only_per_validation() -> None:
    # Each validation reads its loss and metrics once; steps in between read nothing.
    few = _reads(8, validate_every_steps=3)
    many = _reads(16, validate_every_steps=3)
    per_validation = sum((many - few).values()) / ((16 - 8) * 2 / 3)
    assert sum(few.values()) > 0
    assert per_validation <= sum(_reads(8).values())


# -- --smoke -------------------------------------------------------------------------------


@pytest.mark.slow  # bz train --smoke in its own process
def test_smoke_runs_one_batch_each_way_and_writes_nothing(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(RESUME_TRAIN_PY, encoding="utf-8")
    config = {"epochs": 50, "device": "cpu", "plugins": ["console_out", "run_log"]}
    (project / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    outcome = subprocess.run(
        [sys.executable, "-m", "bz", "train", "--smoke", "--log-format", "json"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    events = [json.loads(line) for line in outcome.stdout.splitlines() if line.startswith("{")]
    finished = [e for e in events if e["event"] == "epoch_finished"]
    assert len(finished) == 1
    assert finished[0]["step"] == 1
    assert not (project / ".bz").exists(), "a smoke run writes no checkpoint"
    summary = next(e for e in events if e["event"] == "plugin_summary")
    assert set(summary["plugins"]) == {"console_out", "run_log"}
    assert all(p["status"] == "ok" for p in summary["plugins"].values())


# -- slow: the digits example, kills, two processes ------------------------------------------


@pytest.mark.slow
def test_bf16_mixed_trains_the_digits_example_to_095(tmp_path: Path) -> None:
    example = REPO_ROOT / "examples" / "digits"
    outcome = subprocess.run(
        [
            sys.executable, "-m", "bz", "train", "--log-format", "json",
            "--set", "precision=bf16-mixed", "--checkpoint-dir", str(tmp_path),
        ],
        cwd=example,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    events = [json.loads(line) for line in outcome.stdout.splitlines() if line.startswith("{")]
    best = max(
        e["validation_metrics"]["accuracy"] for e in events if e["event"] == "epoch_finished"
    )
    assert best >= 0.95


def _kill_project(folder: Path) -> Path:
    folder.mkdir()
    (folder / "train.py").write_text(RESUME_TRAIN_PY, encoding="utf-8")
    config = {
        "epochs": 3,
        "device": "cpu",
        "seed": 5,
        "plugins": [],
        "precision": "bf16-mixed",
        "accumulate_grad_batches": 2,
        "checkpoint_every_steps": 2,
        "checkpoint_interval": 0,
    }
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _child(folder: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("BZ_TEST_")}
    clean_env["PYTHONPATH"] = str(REPO_ROOT)
    child = FAULT_CHILD
    return subprocess.run(
        [sys.executable, "-c", child, "train", "--log-format", "json"],
        cwd=folder,
        env={**clean_env, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_kill_after_a_step_checkpoint_resumes_bit_identical(tmp_path: Path) -> None:
    clean, killed = _kill_project(tmp_path / "clean"), _kill_project(tmp_path / "killed")
    assert _child(clean).returncode == 0
    # Six batches per epoch, two per step: step 5 is inside the second epoch, one step
    # after the step-4 checkpoint.
    died = _child(killed, BZ_TEST_SIGNAL="KILL", BZ_TEST_SIGNAL_AT_STEP="5")
    assert died.returncode == TRAINING_DIED
    # The resume reads only what the killed process left on disk: in this process.
    code, resumed = train_here(killed)
    assert code == 0, resumed[-4000:]
    assert '"resumed"' in resumed
    assert '"step": 4' in resumed

    def final(folder: Path) -> dict[str, torch.Tensor]:
        (run,) = (folder / ".bz" / "checkpoints").iterdir()
        payload = torch.load(run / "model.pt", weights_only=True)
        return dict(payload["model"])

    assert_same_weights(final(killed), final(clean))


def test_configs_copy_cleanly() -> None:
    # RunConfig stays a frozen value: the new nested key survives copies and evolve.
    config = attrs.evolve(CONFIG, gradient_clip=GradientClip(max_norm=2.0))
    assert copy.deepcopy(config) == config


# -- RunConfig built in Python -------------------------------------------------------------

_WRONG: dict[str, list[object]] = {
    "epochs": [1.5, True, "3"],
    "precision": ["fp16", 32, None],
    "accumulate_grad_batches": [2.0, False],
    "max_steps": [1.5, "10"],
    "max_time": [True, "soon"],
    "validate_every_steps": [0.5],
    "checkpoint_every_steps": ["5"],
    "plugin_errors": ["ignore"],
    "compile": [1, "yes"],
    "device": [0],
}


@given(st.sampled_from([(key, value) for key, values in _WRONG.items() for value in values]))
def test_a_config_built_in_python_refuses_what_json_would_refuse(case: tuple[str, object]) -> None:
    key, value = case
    with pytest.raises((TypeError, ValueError, bz.ConfigError), match=key):
        RunConfig(**{key: value})  # type: ignore[arg-type]  # wrong types on purpose


def test_nested_tables_may_be_dicts_in_python_and_nan_is_not_a_number_here() -> None:
    config = RunConfig(gradient_clip={"max_norm": 1.0}, distributed={"backend": "gloo"})
    assert config.gradient_clip == GradientClip(max_norm=1.0)
    assert config.distributed.backend == "gloo"
    for table in ({"max_norm": float("nan")}, {"value": float("nan")}):
        with pytest.raises(bz.ConfigError, match=r"must be > 0\.0, got nan"):
            RunConfig(gradient_clip=table)
    with pytest.raises(bz.ConfigError, match=r"plugin_timeout: must be >= 0\.001, got nan"):
        structure({"plugin_timeout": float("nan")}, RunConfig)
