"""Metrics on a Hugging Face language model: refused per token, fine through a step.

docs/training.md ("The Hugging Face convention"): metrics read ``logits`` and
``batch["labels"]`` as a classifier has them, ``(N, C)`` and ``(N,)``. A causal LM's
token logits ``(B, T, V)`` and labels ``(B, T)`` are refused at the first batch with an
error naming the metric, before any step; a step that shifts and flattens them (and
drops the ``-100`` positions) gives per-token accuracy. Real parts: a GPT-2 built
from a config, nothing downloaded.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import bz
from bz.config import MetricSpec, RunConfig
from bz.metrics._registry import build_metrics

pytestmark = pytest.mark.slow  # building a GPT-2 imports most of transformers (~10 s)
transformers = pytest.importorskip("transformers")

CONFIG = RunConfig(epochs=1, device="cpu", plugins=(), seed=0)
VOCAB, LENGTH = 32, 8


def _setup(step: Any = None) -> bz.TrainingSetup:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2
        )
    )
    ids = torch.randint(0, VOCAB, (8, LENGTH), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, -2:] = -100  # padding, as Hugging Face's collators mark it
    data = [{"input_ids": ids[i : i + 4], "labels": labels[i : i + 4]} for i in (0, 4)]
    return bz.TrainingSetup(
        model=model,
        step=step,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        train_loader=data,
    )


def test_token_logits_are_refused_at_the_first_batch_naming_the_metric() -> None:
    steps: list[int] = []

    class Count:
        name = "count"

        def end_training_batch(self, context: bz.plugins.PluginContext) -> None:
            steps.append(context.global_step)

    with pytest.raises(ValueError, match=r"^accuracy: targets must be class indices") as caught:
        bz.Trainer().fit(
            _setup(), CONFIG, [Count()], metrics=build_metrics([MetricSpec("accuracy")])
        )
    assert "\n" not in str(caught.value)
    assert steps == []


def per_token(model: nn.Module, batch: Any) -> bz.StepResult:
    """The model's own loss; its next-token predictions flattened for the metrics."""
    outputs = model(**batch)
    logits = outputs.logits[:, :-1].reshape(-1, VOCAB)
    targets = batch["labels"][:, 1:].reshape(-1)
    kept = targets != -100
    return bz.StepResult(outputs.loss, predictions=logits[kept], targets=targets[kept])


def test_a_step_that_flattens_the_tokens_gets_per_token_accuracy() -> None:
    result = bz.Trainer().fit(
        _setup(per_token), CONFIG, [], metrics=build_metrics([MetricSpec("accuracy")])
    )
    assert result.final is not None
    accuracy = result.final.training_metrics["accuracy"]
    assert 0.0 <= accuracy <= 1.0
