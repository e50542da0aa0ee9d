"""Text classification with a Hugging Face model, trained the way HF datasets feed it.

A tiny ``BertForSequenceClassification`` is built from a ``BertConfig`` (nothing is
downloaded) and trained on generated sentences: token ids, an attention mask and a
label per sentence, batched as a ``BatchEncoding`` (what a tokenizer returns). There is
no ``loss_fn``: bz calls ``model(**batch)`` and trains on the output's ``loss``; the
``accuracy`` metric in bzconfig.json reads the output's ``logits`` and
``batch["labels"]``. Run it from this folder with ``bz train`` (needs ``bz-cli[hf]``).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import BatchEncoding, BertConfig, BertForSequenceClassification

import bz

VOCABULARY = 64
LENGTH = 16
PAD, CLS = 0, 1


def sentences(count: int, seed: int) -> TensorDataset:
    """``count`` sentences of 4 to 16 tokens; the label says whether most of a
    sentence's words come from the lower half of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCABULARY, (count, LENGTH), generator=generator)
    lengths = torch.randint(4, LENGTH + 1, (count,), generator=generator)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, PAD)
    ids[:, 0] = CLS
    words = mask.clone()
    words[:, 0] = 0
    low = ((ids < VOCABULARY // 2) & words.bool()).sum(dim=1)
    labels = (2 * low > words.sum(dim=1)).long()
    return TensorDataset(ids, mask, labels)


def encode(rows: list[tuple[torch.Tensor, ...]]) -> BatchEncoding:
    """Collate rows into what a tokenizer returns (a mapping, a ``UserDict``)."""
    ids, mask, labels = (torch.stack(column) for column in zip(*rows, strict=True))
    return BatchEncoding({"input_ids": ids, "attention_mask": mask, "labels": labels})


def setup(config: bz.RunConfig) -> bz.TrainingSetup:
    """A two-layer BERT, AdamW, batches of 32 sentences."""
    hp = config.hyperparameters
    seed = config.seed or 0
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCABULARY,
            hidden_size=int(hp.get("hidden", 32)),
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=LENGTH,
            id2label={0: "mostly high", 1: "mostly low"},
        )
    )
    batch_size = int(hp.get("batch_size", 32))
    return bz.TrainingSetup(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=float(hp.get("lr", 3e-3))),
        train_loader=DataLoader(
            sentences(int(hp.get("sentences", 512)), seed),
            batch_size=batch_size,
            shuffle=True,
            collate_fn=encode,
        ),
        val_loader=DataLoader(sentences(256, seed + 1), batch_size=128, collate_fn=encode),
    )
