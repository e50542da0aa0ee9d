"""Gradient norm, learning rate and batch loss every N steps, the same in every logger."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pandas
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tests._integration_support import run_config, tiny_setup

import bz
from bz.config import GradientClip
from bz.plugins import PluginContext
from bz.plugins._scalars import StepSchedule, gradient_norm_intervals
from bz.plugins.csv_logger import CsvLogger, CsvLoggerConfig
from bz.plugins.run_log import RunLog, RunLogConfig
from bz.plugins.tensorboard import TensorBoard, TensorBoardConfig
from bz.testing import count_host_reads
from bz.testing import tiny_setup as sized_setup


class _Reference:
    """Records, per optimizer step, the gradient norm before any clipping and the loss."""

    name = "reference"

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}
        self.losses: dict[int, float] = {}

    def after_backward(self, context: PluginContext) -> None:
        model = context.model
        assert model is not None
        assert context.loss is not None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        step = context.global_step + 1
        self.norms[step] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        self.losses[step] = float(context.loss.detach())


def _tensorboard_steps(folder: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {s.step: s.value for s in events.Scalars(tag)}


@pytest.mark.parametrize(
    "clip",
    [None, GradientClip(max_norm=0.01), GradientClip(value=0.001)],
    ids=["no-clip", "clip-norm", "clip-value"],
)
def test_every_logger_records_the_same_step_scalars(
    tmp_path: Path, clip: GradientClip | None
) -> None:
    reference = _Reference()
    plugins: list[Any] = [
        reference,
        TensorBoard(TensorBoardConfig(log_dir=str(tmp_path / "tb"), step_interval=3)),
        RunLog(RunLogConfig(log_dir=str(tmp_path / "log"), step_interval=3)),
        CsvLogger(CsvLoggerConfig(log_dir=str(tmp_path / "csv"), step_interval=3)),
    ]
    config = attrs.evolve(run_config(epochs=3), gradient_clip=clip)
    bz.Trainer().fit(tiny_setup(), config, plugins)

    steps = [3, 6, 9, 12]
    norms = [reference.norms[s] for s in steps]
    losses = [reference.losses[s] for s in steps]
    # The norm before clipping, whether the run clips by norm, by value or not at all.
    tb_norm = _tensorboard_steps(tmp_path / "tb", "step/grad_norm")
    assert list(tb_norm) == steps
    assert list(tb_norm.values()) == pytest.approx(norms, rel=1e-5)
    assert list(_tensorboard_steps(tmp_path / "tb", "step/lr").values()) == pytest.approx(
        [0.1] * 4
    )
    assert list(_tensorboard_steps(tmp_path / "tb", "step/loss").values()) == pytest.approx(
        losses, rel=1e-5
    )

    lines = [json.loads(line) for line in (tmp_path / "log" / "run_log.jsonl").open()]
    logged = [line for line in lines if line["event"] == "step"]
    assert [line["step"] for line in logged] == steps
    assert [line["grad_norm"] for line in logged] == pytest.approx(norms, rel=1e-6)
    assert [line["loss"] for line in logged] == pytest.approx(losses, rel=1e-6)
    assert [line["lr"] for line in logged] == [[0.1]] * 4

    table = pandas.read_csv(tmp_path / "csv" / "metrics.csv")
    rows = table[table["kind"] == "step"]
    assert list(rows["step"]) == steps
    assert list(rows["step/grad_norm"]) == pytest.approx(norms, rel=1e-6)


def test_several_parameter_groups_have_a_rate_each(tmp_path: Path) -> None:
    setup = tiny_setup()
    first, _, second = setup.model.children()
    optimizer = torch.optim.SGD(
        [
            {"params": first.parameters(), "lr": 0.1},
            {"params": second.parameters(), "lr": 0.01},
        ]
    )
    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=setup.loss_fn,
        optimizer=optimizer,
        train_loader=setup.train_loader,
    )
    plugin = CsvLogger(CsvLoggerConfig(log_dir=str(tmp_path), step_interval=2))
    bz.Trainer().fit(setup, run_config(epochs=1), [plugin])

    rows = pandas.read_csv(tmp_path / "metrics.csv").query("kind == 'step'")
    assert list(rows["step/lr/group0"]) == pytest.approx([0.1, 0.1])
    assert list(rows["step/lr/group1"]) == pytest.approx([0.01, 0.01])


def _reads(batches: int, interval: int) -> Counter[str]:
    plugins: list[Any] = [
        TensorBoard(TensorBoardConfig(log_dir=None, step_interval=interval)),
        RunLog(RunLogConfig(step_interval=interval)),
        CsvLogger(CsvLoggerConfig(step_interval=interval)),
    ]
    counter: Counter[str] = Counter()
    setup = sized_setup(batches=batches)
    with count_host_reads(counter):
        bz.Trainer().fit(setup, run_config(epochs=2, metrics=[]), plugins)
    return counter


def test_no_host_read_on_the_steps_nothing_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Never due: twice the steps, the same reads (the per-epoch ones).
    never = _reads(16, interval=1000)
    assert _reads(8, interval=1000) == never
    # Due every 4 steps: 8 of the 32 steps are logged, and each costs every logger one
    # read of the loss and one of the gradient norm.
    extra = _reads(16, interval=4) - never
    assert sum(extra.values()) == 8 * 3 * 2


def test_the_loop_computes_the_norm_only_when_asked() -> None:
    seen: list[float | None] = []

    class Watcher:
        name = "watcher"

        def end_training_batch(self, context: PluginContext) -> None:
            seen.append(context.gradient_norm)

    bz.Trainer().fit(tiny_setup(), run_config(epochs=1), [Watcher()])
    assert seen == [None] * 4

    class Asking(Watcher):
        gradient_norm_every = 2

    seen.clear()
    bz.Trainer().fit(tiny_setup(), run_config(epochs=1), [Asking()])
    assert [norm is not None for norm in seen] == [False, True, False, True]


@given(st.lists(st.one_of(st.integers(-3, 50), st.none(), st.booleans(), st.text(max_size=2))))
def test_only_positive_integers_ask_for_the_norm(values: list[object]) -> None:
    class Declares:
        def __init__(self, every: object) -> None:
            self.gradient_norm_every = every

    intervals = gradient_norm_intervals([Declares(v) for v in values])
    expected = {v for v in values if type(v) is int and v >= 1}
    assert intervals == tuple(sorted(expected))


@given(
    interval=st.integers(1, 6),
    accumulate=st.integers(1, 4),
    start=st.integers(0, 20),
    batches=st.integers(0, 30),
)
def test_a_step_is_due_once_on_the_batch_that_took_it(
    interval: int, accumulate: int, start: int, batches: int
) -> None:
    schedule = StepSchedule(interval)
    context = PluginContext()
    context.global_step = start
    schedule.start(context)
    due = []
    for batch in range(1, batches + 1):
        if batch % accumulate == 0:
            context.global_step += 1
        if schedule.due(context):
            due.append(context.global_step)
    taken = range(start + 1, start + batches // accumulate + 1)
    assert due == [step for step in taken if step % interval == 0]


@pytest.mark.slow
def test_fsdp_logs_the_same_gradient_norm_as_ddp(tmp_path: Path) -> None:
    # Two processes each: under FSDP the norm is over sharded gradients, made whole on
    # every process on the logged steps (a collective that must not hang rank 0).
    from tests.integration.test_fsdp import make_project, train

    logger = {"csv_logger": {"step_interval": 3, "log_dir": "csv"}}
    norms = {}
    for strategy in ("fsdp", "ddp"):
        folder = tmp_path / strategy
        env = make_project(
            folder,
            plugins=["fsdp_probe", logger],
            distributed={"strategy": strategy},
            checkpoint_every_steps=None,
            epochs=1,
        )
        done, _ = train(folder, env)
        assert done.returncode == 0, done.stderr
        table = pandas.read_csv(folder / "csv" / "metrics.csv").query("kind == 'step'")
        norms[strategy] = list(table["step/grad_norm"])
    assert len(norms["ddp"]) >= 3
    assert norms["fsdp"] == pytest.approx(norms["ddp"], rel=1e-4)


class _RatesUsed:
    """Records the learning rate the optimizer steps with, per optimizer step."""

    name = "rates_used"

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def before_optimizer_step(self, context: PluginContext) -> None:
        assert context.optimizer is not None
        self.rates[context.global_step + 1] = float(context.optimizer.param_groups[0]["lr"])


def test_step_lr_is_the_rate_that_step_used_under_a_per_step_scheduler(tmp_path: Path) -> None:
    setup = tiny_setup(validation=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(setup.optimizer, lambda done: 1 / (done + 1))
    setup = attrs.evolve(setup, scheduler=scheduler, scheduler_interval="step")
    used = _RatesUsed()
    plugins: list[Any] = [
        used,
        CsvLogger(CsvLoggerConfig(log_dir=str(tmp_path / "csv"), step_interval=1)),
        TensorBoard(TensorBoardConfig(log_dir=str(tmp_path / "tb"), step_interval=2)),
    ]
    bz.Trainer().fit(setup, run_config(epochs=2), plugins)

    # Step k (from 1) runs with 0.1 / k: LambdaLR has stepped k - 1 times before it.
    expected = {step: 0.1 / step for step in range(1, 9)}
    assert used.rates == pytest.approx(expected)
    rows = pandas.read_csv(tmp_path / "csv" / "metrics.csv").query("kind == 'step'")
    assert dict(zip(rows["step"], rows["step/lr"], strict=True)) == pytest.approx(expected)
    logged = _tensorboard_steps(tmp_path / "tb", "step/lr")
    assert logged == pytest.approx({step: expected[step] for step in (2, 4, 6, 8)})
