"""``check_finite``: where a non-finite loss (or gradient norm) stops a run; what it costs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from tests._support import assert_same_weights, quick_first, tiny_setup, weights
from torch import nn

import bz
from bz.config import RunConfig
from bz.testing import count_host_reads

CONFIG = RunConfig(epochs=3, device="cpu", plugins=())


class PoisonedLoss:
    """Cross-entropy, made ``nan`` (or its gradients ``nan``) at one call."""

    def __init__(self, model: nn.Module, at_call: int, *, gradient_only: bool = False) -> None:
        self.model = model
        self.at_call = at_call
        self.gradient_only = gradient_only
        self.calls = 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(outputs, targets)
        if not self.model.training:
            return loss
        self.calls += 1
        if self.calls != self.at_call:
            return loss
        if not self.gradient_only:
            return loss * float("nan")
        # sqrt at 0: the value is 0, its gradient inf * 0 = nan for every parameter.
        drift = sum(((p - p.detach()) ** 2).sum() for p in self.model.parameters())
        assert isinstance(drift, torch.Tensor)
        return loss + torch.sqrt(drift)


def poisoned_setup(at_call: int, *, gradient_only: bool = False) -> bz.TrainingSetup:
    setup = tiny_setup()
    loss = PoisonedLoss(setup.model, at_call, gradient_only=gradient_only)
    return attrs.evolve(setup, loss_fn=loss)


def test_step_stops_at_the_first_nan_loss_before_its_update_and_checkpoint(
    tmp_path: Path,
) -> None:
    config = CONFIG.with_overrides(check_finite="step", checkpoint_every_steps=2)
    setup = poisoned_setup(at_call=7)  # epoch 2, its third batch: step 7
    with pytest.raises(bz.NonFiniteLoss) as caught:
        bz.Trainer().fit(setup, config, checkpoint_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("the training loss is nan at step 7 (epoch 2, batch index 2)")
    # Nothing of the poisoned step reached the weights or a checkpoint.
    clean = tiny_setup()
    bz.Trainer().fit(clean, CONFIG.with_overrides(max_steps=6))
    assert_same_weights(weights(setup.model), weights(clean.model))
    (run_dir,) = tmp_path.iterdir()
    newest = max(run_dir.glob("epoch-*.pt"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "epoch-0001-batch-00002.pt"
    assert torch.load(newest, weights_only=True)["global_step"] == 6


def test_epoch_the_default_stops_at_the_end_of_the_epoch() -> None:
    setup = poisoned_setup(at_call=7)
    with pytest.raises(bz.NonFiniteLoss, match="in epoch 2:"):
        bz.Trainer().fit(setup, CONFIG)
    assert isinstance(setup.loss_fn, PoisonedLoss)
    assert setup.loss_fn.calls == 8


def test_step_stops_at_a_nan_gradient_norm_when_clipping_computes_one() -> None:
    config = CONFIG.with_overrides(check_finite="step", gradient_clip={"max_norm": 1.0})
    setup = poisoned_setup(at_call=3, gradient_only=True)
    with pytest.raises(bz.NonFiniteLoss, match=r"^the gradient norm is nan at step 3 \(epoch 1"):
        bz.Trainer().fit(setup, config)
    assert all(torch.isfinite(p).all() for p in setup.model.parameters())


def test_under_accumulation_every_batch_is_checked() -> None:
    config = CONFIG.with_overrides(check_finite="step", accumulate_grad_batches=2)
    setup = poisoned_setup(at_call=5)  # epoch 2's first batch, inside step 3
    with pytest.raises(bz.NonFiniteLoss, match=r"at step 3 \(epoch 2, batch index 0\)"):
        bz.Trainer().fit(setup, config)


def _reads(batches: int, **changes: Any) -> Counter[str]:
    counter: Counter[str] = Counter()
    with count_host_reads(counter):
        bz.Trainer().fit(tiny_setup(batches=batches), CONFIG.with_overrides(**changes))
    return counter


@pytest.mark.parametrize(
    "changes",
    quick_first({}, {"gradient_clip": {"max_norm": 5.0}}, {"accumulate_grad_batches": 2}),
    ids=["plain", "clipped", "accumulated"],
)
def test_epoch_reads_nothing_per_step_and_step_reads_once_per_batch(
    changes: dict[str, Any],
) -> None:
    assert _reads(4, **changes) == _reads(8, **changes)
    extra = _reads(8, check_finite="step", **changes) - _reads(4, check_finite="step", **changes)
    assert extra == Counter({"tolist": 4 * CONFIG.epochs})
