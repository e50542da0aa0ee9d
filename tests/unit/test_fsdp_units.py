"""Which submodules FSDP shards as units (:func:`bz.training.fsdp.units`): no process
group needed, so this runs in one process."""

from __future__ import annotations

import torch
from torch import nn

from bz.training.fsdp import units


class Tied(nn.Module):
    """An embedding whose weight the output layer shares (a language model's tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.mid(self.embed(x))))
        return out


class Pair(nn.Module):
    """Holds both ends of a tie: a unit that may own the shared weight."""

    def __init__(self) -> None:
        super().__init__()
        self.tied = Tied()
        self.out = nn.Linear(12, 2)


def test_modules_that_share_a_parameter_with_another_unit_are_left_to_the_root() -> None:
    # fully_shard refuses a parameter already managed by another unit: the two ends of
    # a tie must not be units of their own; the root (or an enclosing unit) takes them.
    model = Tied()
    assert units(model, None) == [model.mid]
    assert units(model, ("Embedding", "Linear")) == [model.mid]


def test_a_unit_that_holds_both_ends_of_a_tie_is_kept() -> None:
    model = Pair()
    assert units(model, ("Tied", "Linear")) == [model.out, model.tied.mid, model.tied]


def test_a_class_at_several_depths_is_sharded_innermost_first() -> None:
    inner = nn.Sequential(nn.Linear(2, 2))
    outer = nn.Sequential(inner, nn.Linear(2, 2))
    model = nn.Sequential(outer)
    assert units(model, ("Sequential",)) == [inner, outer]
