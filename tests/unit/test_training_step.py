"""The three ways a batch becomes a loss, and schedulers stepped per optimizer step.

(1) ``loss_fn`` over ``(inputs, targets)`` pairs, (2) mapping batches with neither
``loss_fn`` nor ``step`` (``model(**batch).loss``, the Hugging Face convention), (3) a
user's ``step(model, batch)``. The same model trained the three ways ends with the same
weights, losses and metrics; every misuse is one ``UsageError`` naming what is wrong.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples
from torch import nn

import bz
from bz.config import MetricSpec, RunConfig
from bz.metrics import build_metrics
from bz.plugins import PluginContext
from bz.testing import count_host_reads

CONFIG = RunConfig(epochs=2, device="cpu", plugins=(), plugin_errors="raise", seed=0)
FEATURES, CLASSES = 5, 3


class Sample(NamedTuple):
    features: torch.Tensor
    labels: torch.Tensor


def batches(count: int = 6, size: int = 8, seed: int = 0) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count * size, FEATURES, generator=generator)
    targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
    return [
        Sample(inputs[i : i + size], targets[i : i + size]) for i in range(0, count * size, size)
    ]


class Classifier(nn.Module):
    """One linear layer; called with ``labels`` it computes its own loss, as HF models do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(FEATURES, CLASSES)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.linear(features)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def own_step(model: nn.Module, batch: Sample) -> bz.StepResult:
    logits = model(batch.features)
    loss = nn.functional.cross_entropy(logits, batch.labels)
    return bz.StepResult(loss, predictions=logits, targets=batch.labels)


def setup_for(way: str, data: list[Sample] | None = None, **keys: Any) -> bz.TrainingSetup:
    data = batches() if data is None else data
    model = Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    if way == "pairs":
        loaders: dict[str, Any] = {"train_loader": [tuple(b) for b in data]}
        how: dict[str, Any] = {"loss_fn": nn.CrossEntropyLoss()}
    elif way == "mapping":
        loaders = {"train_loader": [b._asdict() for b in data]}
        how = {}
    else:
        loaders, how = {"train_loader": data}, {"step": own_step}
    return bz.TrainingSetup(
        model=model,
        optimizer=optimizer,
        val_loader=loaders["train_loader"][:2],
        **loaders,
        **how,
        **keys,
    )


def fit(setup: bz.TrainingSetup, metrics: bool = True, **keys: Any) -> bz.FitResult:
    built = build_metrics([MetricSpec("accuracy")]) if metrics else {}
    return bz.Trainer().fit(setup, attrs.evolve(CONFIG, **keys), metrics=built)


# -- the three ways agree ----------------------------------------------------------------------


@pytest.mark.parametrize("keys", [{}, {"accumulate_grad_batches": 4}], ids=["plain", "accumulate"])
def test_pairs_mappings_and_a_step_train_the_same_model_the_same_way(keys: dict[str, Any]) -> None:
    outcomes = {}
    for way in ("pairs", "mapping", "step"):
        setup = setup_for(way)
        result = fit(setup, **keys)
        outcomes[way] = (result, _weights(setup)["linear.weight"])
    reference, weights = outcomes["pairs"]
    for way in ("mapping", "step"):
        result, trained = outcomes[way]
        assert torch.equal(trained, weights), way
        assert result.history == tuple(
            attrs.evolve(record, seconds=mine.seconds)
            for record, mine in zip(reference.history, result.history, strict=True)
        ), way
    assert reference.history[-1].training_metrics["accuracy"] > 0.5


def test_a_step_may_return_the_loss_alone() -> None:
    def loss_only(model: nn.Module, batch: Sample) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch.features), batch.labels)

    setup = attrs.evolve(setup_for("step"), step=loss_only)
    result = fit(setup, metrics=False)
    assert math.isfinite(result.history[-1].validation_loss or math.nan)


def test_a_step_gives_the_sample_count_of_a_batch_without_tensors() -> None:
    data = batches(count=3, size=4)

    def by_rows(model: nn.Module, batch: dict[str, Any]) -> bz.StepResult:
        rows = batch["rows"]
        features = torch.stack([row.features for row in rows])
        labels = torch.stack([row.labels for row in rows])
        loss = nn.functional.cross_entropy(model(features), labels)
        return bz.StepResult(loss, samples=len(rows))

    loader = [
        {"rows": [Sample(b.features[i], b.labels[i]) for i in range(4)], "note": "x"} for b in data
    ]
    setup = attrs.evolve(setup_for("step"), step=by_rows, train_loader=loader, val_loader=None)
    result = fit(setup, metrics=False, epochs=1)
    assert result.global_step == 3


def test_plugins_see_the_batch_as_it_came_and_the_step_s_loss() -> None:
    seen: list[tuple[str, Any, Any]] = []

    class Look:
        name = "look"

        def after_backward(self, context: PluginContext) -> None:
            seen.append((type(context.batch).__name__, context.loss, context.outputs))

    setup = setup_for("step")
    bz.Trainer().fit(setup, attrs.evolve(CONFIG, epochs=1), [Look()])
    kind, loss, outputs = seen[0]
    assert kind == "Sample"
    assert isinstance(loss, torch.Tensor)
    assert loss.requires_grad
    assert isinstance(outputs, torch.Tensor)
    assert outputs.shape == (8, CLASSES)


# -- misuse: one line each -------------------------------------------------------------------


def _step_returning(value: Any) -> Any:
    def step(model: nn.Module, batch: Sample) -> Any:
        model(batch.features)
        return value(model, batch)

    return step


def _loss(model: nn.Module, batch: Sample) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch.features), batch.labels)


MISUSES: dict[str, tuple[Any, bool, str]] = {
    "a step returning a float": (
        lambda: attrs.evolve(setup_for("step"), step=_step_returning(lambda m, b: 1.0)),
        False,
        r"step returned float; it must return the loss as a scalar tensor, or a bz.StepResult",
    ),
    "a step returning a vector": (
        lambda: attrs.evolve(
            setup_for("step"),
            step=_step_returning(
                lambda m, b: nn.functional.cross_entropy(m(b.features), b.labels, reduction="none")
            ),
        ),
        False,
        r"step returned a loss of shape \(8,\); it must be a scalar",
    ),
    "a StepResult with a float loss": (
        lambda: attrs.evolve(
            setup_for("step"),
            step=_step_returning(lambda m, b: bz.StepResult(2.0)),  # type: ignore[arg-type]  # wrong on purpose
        ),
        False,
        r"StepResult whose loss is float",
    ),
    "a tensor sample count": (
        lambda: attrs.evolve(
            setup_for("step"),
            step=_step_returning(
                lambda m, b: bz.StepResult(_loss(m, b), samples=torch.tensor(8))  # type: ignore[arg-type]  # wrong on purpose
            ),
        ),
        False,
        r"must be a Python int",
    ),
    "metrics with a step that feeds them nothing": (
        lambda: attrs.evolve(setup_for("step"), step=_loss),
        True,
        r"metrics are configured but step gave them nothing to read \(train_loader\)",
    ),
    "a mapping model without a loss": (
        lambda: attrs.evolve(
            setup_for("mapping"),
            train_loader=[{"features": b.features} for b in batches()],
            val_loader=None,
        ),
        False,
        r"model\(\*\*batch\) returned Tensor without a loss .* put the targets in the batch "
        r"as 'labels'",
    ),
    "metrics on a mapping model without labels": (
        lambda: attrs.evolve(
            setup_for("mapping"),
            model=(lambda: _LabelsInside())(),
            train_loader=[{"features": b.features, "target": b.labels} for b in batches()],
            val_loader=None,
        ),
        True,
        r"metrics read the output's 'logits' and the batch's 'labels', and the batch has no "
        r"labels",
    ),
    "mapping batches with a loss_fn": (
        lambda: attrs.evolve(setup_for("pairs"), train_loader=[b._asdict() for b in batches()]),
        False,
        r"train_loader yielded dict; with a loss_fn bz expects \(inputs, targets\) pairs: leave "
        r"loss_fn out",
    ),
    "pairs without loss_fn or step": (
        lambda: attrs.evolve(setup_for("mapping"), train_loader=[tuple(b) for b in batches()]),
        False,
        r"train_loader yielded tuple; with neither loss_fn nor step bz calls model\(\*\*batch\), "
        r"which needs mapping batches",
    ),
    "a batch without tensors": (
        lambda: attrs.evolve(
            setup_for("step"),
            step=lambda m, b: m(torch.ones(2, FEATURES)).sum(),
            train_loader=[("a", "b")] * 3,
            val_loader=None,
        ),
        False,
        r"train_loader yielded a tuple batch with no tensor to count its samples by",
    ),
}


class _LabelsInside(Classifier):
    def forward(  # type: ignore[override]  # a mapping model with another target name
        self, features: torch.Tensor, target: torch.Tensor
    ) -> Any:
        logits = self.linear(features)
        return {"loss": nn.functional.cross_entropy(logits, target), "logits": logits}


@pytest.mark.parametrize("case", list(MISUSES), ids=list(MISUSES))
def test_misuse_stops_at_the_first_batch_with_one_line(case: str) -> None:
    make, metrics, message = MISUSES[case]
    steps: list[int] = []

    class Count:
        name = "count"

        def end_training_batch(self, context: PluginContext) -> None:
            steps.append(context.global_step)

    with pytest.raises(bz.UsageError, match=message) as caught:
        bz.Trainer().fit(
            make(),
            attrs.evolve(CONFIG, epochs=1),
            [Count()],
            metrics=build_metrics([MetricSpec("accuracy")]) if metrics else {},
        )
    assert "\n" not in str(caught.value)
    assert steps == []  # before any step


def test_loss_fn_and_step_together_are_refused() -> None:
    with pytest.raises(bz.UsageError, match="give loss_fn or step, not both"):
        attrs.evolve(setup_for("pairs"), step=own_step)


def test_reduce_on_plateau_cannot_step_per_optimizer_step() -> None:
    setup = setup_for("pairs")
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(setup.optimizer)
    with pytest.raises(bz.UsageError, match="ReduceLROnPlateau cannot step per optimizer step"):
        attrs.evolve(setup, scheduler=plateau, scheduler_interval="step")
    with pytest.raises(bz.UsageError, match="scheduler_interval must be 'epoch' or 'step'"):
        attrs.evolve(setup, scheduler_interval="batch")  # type: ignore[arg-type]  # wrong on purpose


@given(st.text(max_size=8).filter(lambda text: text not in ("epoch", "step")))
def test_scheduler_interval_is_epoch_or_step_and_nothing_else(interval: str) -> None:
    setup = setup_for("pairs")
    with pytest.raises(bz.UsageError, match=r"scheduler_interval must be 'epoch' or 'step', got"):
        attrs.evolve(setup, scheduler_interval=interval)  # type: ignore[arg-type]  # any text
    scheduler = torch.optim.lr_scheduler.StepLR(setup.optimizer, 1)
    for accepted in ("epoch", "step"):
        chosen = attrs.evolve(setup, scheduler=scheduler, scheduler_interval=accepted)
        assert chosen.scheduler_interval == accepted


def test_scheduler_interval_step_without_a_scheduler_is_refused() -> None:
    with pytest.raises(bz.UsageError, match="no scheduler is given"):
        attrs.evolve(setup_for("pairs"), scheduler_interval="step")


def test_a_field_of_the_wrong_kind_is_bad_input() -> None:
    # bz train reports it as one line (the line of train.py that built it), exit 2.
    changes: dict[str, Any]
    for field, value in (("step", "x"), ("loss_fn", 3), ("train_loader", 3)):
        changes = {"loss_fn": None, field: value}
        with pytest.raises(bz.UsageError, match=f"TrainingSetup: {field} must be"):
            attrs.evolve(setup_for("pairs"), **changes)


# -- schedulers per optimizer step ---------------------------------------------------------


class Unsized:
    """A loader without a length: its last accumulation group ends when it runs out."""

    def __init__(self, data: list[Any]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)


class LearningRates:
    name = "rates"

    def __init__(self) -> None:
        self.rates: list[float] = []

    def before_optimizer_step(self, context: PluginContext) -> None:
        assert context.optimizer is not None
        self.rates.append(context.optimizer.param_groups[0]["lr"])


@settings(max_examples=examples(25), deadline=None)
@given(
    accumulate=st.integers(1, 4),
    count=st.integers(1, 7),
    epochs=st.integers(1, 3),
    sized=st.booleans(),
)
def test_a_per_step_scheduler_steps_once_per_optimizer_step(
    accumulate: int, count: int, epochs: int, sized: bool
) -> None:
    data = [tuple(b) for b in batches(count=count, size=2)]
    setup = setup_for("pairs")
    setup = attrs.evolve(
        setup,
        train_loader=data if sized else Unsized(data),
        scheduler=torch.optim.lr_scheduler.LambdaLR(setup.optimizer, lambda s: 1 / (1 + s)),
        scheduler_interval="step",
    )
    rates = LearningRates()
    result = bz.Trainer().fit(
        setup, attrs.evolve(CONFIG, epochs=epochs, accumulate_grad_batches=accumulate), [rates]
    )
    steps_per_epoch = math.ceil(count / accumulate)
    assert result.global_step == steps_per_epoch * epochs
    assert setup.scheduler.last_epoch == result.global_step
    assert rates.rates == pytest.approx([0.5 / (1 + s) for s in range(result.global_step)])


def test_the_default_interval_still_steps_once_per_epoch() -> None:
    setup = setup_for("pairs")
    setup = attrs.evolve(
        setup, scheduler=torch.optim.lr_scheduler.StepLR(setup.optimizer, 1, gamma=0.5)
    )
    rates = LearningRates()
    bz.Trainer().fit(setup, CONFIG, [rates])
    assert rates.rates == [0.5] * 6 + [0.25] * 6


def _warmup_setup(config: RunConfig) -> bz.TrainingSetup:
    """Dropout, shuffling, accumulation and a per-step warm-up: everything a resume or a
    rewind could get wrong."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    data: list[dict[str, torch.Tensor]] = [b._asdict() for b in batches(count=10, size=4)]

    def step(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(net(batch["features"]), batch["labels"])

    return bz.TrainingSetup(
        model=model,
        step=step,
        optimizer=optimizer,
        train_loader=torch.utils.data.DataLoader(
            data,  # type: ignore[arg-type]  # a list is a map-style dataset; torch's stubs say Dataset
            batch_size=None,
            shuffle=True,
            generator=torch.Generator().manual_seed(2),
        ),
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 7)),
        scheduler_interval="step",
    )


def _weights(setup: bz.TrainingSetup) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in setup.model.state_dict().items()}


WARMUP = attrs.evolve(CONFIG, epochs=3, accumulate_grad_batches=3)


def test_a_per_step_schedule_resumes_exactly_from_a_mid_epoch_checkpoint(tmp_path: Path) -> None:
    clean = _warmup_setup(WARMUP)
    bz.Trainer().fit(clean, WARMUP)
    stopped = _warmup_setup(WARMUP)
    first = bz.Trainer().fit(stopped, attrs.evolve(WARMUP, max_steps=5), checkpoint_dir=tmp_path)
    assert first.history[-1].partial  # step 5 is in the middle of epoch 2
    resumed = _warmup_setup(WARMUP)
    second = bz.Trainer().fit(resumed, WARMUP, checkpoint_dir=tmp_path)
    assert second.resumed_from is not None
    assert resumed.scheduler.last_epoch == stopped.scheduler.last_epoch + 12 - 5
    for key, value in _weights(clean).items():
        assert torch.equal(_weights(resumed)[key], value), key


class Meddler:
    """Steps the scheduler and changes the learning rate in the epoch where it then fails:
    rewind must undo both."""

    name = "meddler"

    def end_training_batch(self, context: PluginContext) -> None:
        if context.global_step < 5:  # the second epoch (steps 5 to 8) is where it fails
            return
        assert isinstance(context.scheduler, torch.optim.lr_scheduler.LRScheduler)
        assert context.optimizer is not None
        context.scheduler.step()
        context.optimizer.param_groups[0]["lr"] = 10.0
        if context.global_step == 7:
            raise RuntimeError("meddled")


def test_rewind_undoes_what_a_plugin_did_to_a_per_step_schedule() -> None:
    clean = _warmup_setup(WARMUP)
    bz.Trainer().fit(clean, WARMUP)
    meddled = _warmup_setup(WARMUP)
    result = bz.Trainer().fit(meddled, attrs.evolve(WARMUP, plugin_errors="rewind"), [Meddler()])
    assert [p.name for p in result.plugins if p.fault is not None] == ["meddler"]
    assert meddled.scheduler.last_epoch == clean.scheduler.last_epoch == 12
    for key, value in _weights(clean).items():
        assert torch.equal(_weights(meddled)[key], value), key


# -- no host reads per batch on the new paths ------------------------------------------------


def _reads(way: str, count: int, **keys: Any) -> Counter[str]:
    setup = setup_for(way, batches(count=count, size=4))
    counter: Counter[str] = Counter()
    with count_host_reads(counter):
        fit(setup, **keys)
    return counter


@pytest.mark.parametrize("way", ["mapping", "step"])
@pytest.mark.parametrize("keys", [{}, {"accumulate_grad_batches": 2}], ids=["plain", "accumulate"])
def test_mappings_and_steps_read_nothing_from_the_device_per_batch(
    way: str, keys: dict[str, Any]
) -> None:
    assert _reads(way, 8, **keys) == _reads(way, 16, **keys)
