"""A causal language model with a linear warm-up stepped per optimizer step.

A tiny GPT-2 (``GPT2LMHeadModel`` from a ``GPT2Config``, nothing downloaded) learns a
generated language: each sequence counts up from a random start by a random stride,
modulo the vocabulary, so every token after the second follows from the two before.
Batches are mappings ``{"input_ids", "labels"}`` (the model shifts the labels itself),
so there is no ``loss_fn``. bzconfig.json accumulates 4 batches per optimizer step and
clips the gradient norm at 1.0; the learning rate warms up linearly over the first
``warmup_steps`` optimizer steps, then decays linearly to 0 at the last one:
``scheduler_interval="step"`` steps the scheduler once per optimizer step, so once per
accumulation group. Run it from this folder with ``bz train`` (needs ``bz-cli[hf]``).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

import bz

VOCABULARY = 32
LENGTH = 24


def counting(count: int, seed: int) -> TensorDataset:
    """``count`` sequences ``start, start + stride, ...`` (mod the vocabulary)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCABULARY, (count, 1), generator=generator)
    strides = torch.randint(1, 4, (count, 1), generator=generator)
    return TensorDataset((starts + strides * torch.arange(LENGTH)) % VOCABULARY)


def as_mapping(rows: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A batch as the model takes it: the labels are the inputs (the model shifts them)."""
    ids = torch.stack([row for (row,) in rows])
    return {"input_ids": ids, "labels": ids}


def linear_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate times ``step / warmup`` for the first ``warmup`` steps, then
    falling linearly to 0 at step ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    """A two-layer GPT-2, AdamW, and the warm-up over the run's optimizer steps."""
    hp = config.hyperparameters
    seed = config.seed or 0
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCABULARY,
            n_positions=LENGTH,
            n_embd=32,
            n_layer=2,
            n_head=2,
            # No beginning or end of text in this language: GPT-2's own ids (50256) would
            # lie outside the 32-token vocabulary.
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    # Said outright: transformers finds no loss in the class name GPT2LMHeadModel, and
    # warns before using this one.
    model.loss_type = "ForCausalLM"
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(hp.get("lr", 3e-3)))
    batch_size = int(hp.get("batch_size", 8))
    train = counting(int(hp.get("sequences", 256)), seed)
    # Optimizer steps in the run: batches per epoch over the accumulation, rounded up
    # (an epoch's last, shorter group steps too), times the epochs.
    batches = math.ceil(len(train) / batch_size)
    total = config.epochs * math.ceil(batches / config.accumulate_grad_batches)
    return bz.TrainingSetup(
        model=model,
        optimizer=optimizer,
        train_loader=DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=as_mapping),
        val_loader=DataLoader(counting(64, seed + 1), batch_size=32, collate_fn=as_mapping),
        scheduler=linear_warmup(optimizer, int(hp.get("warmup_steps", 8)), total),
        scheduler_interval="step",
    )
