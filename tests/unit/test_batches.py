"""Batches of any structure: moved to the device keeping their types, counted by one rule.

The device here is ``meta``: moving a tensor there is a real move (the result has no
data and says so), so the tests see every tensor that was moved and every one that
was not, on a machine without a GPU.
"""

from __future__ import annotations

import collections
import dataclasses
from collections import OrderedDict, UserDict, defaultdict
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bz
from bz.training.device import count_samples, samples_of_pair, to_device

META = torch.device("meta")


class Pair(NamedTuple):
    features: torch.Tensor
    label: torch.Tensor


@dataclasses.dataclass
class Readings:
    signal: torch.Tensor
    sensor: torch.Tensor
    name: str = "a"


@dataclasses.dataclass(frozen=True)
class Frozen:
    signal: torch.Tensor
    cached: int = dataclasses.field(default=0, init=False)


class Encoding(UserDict[str, Any]):
    """Like Hugging Face's BatchEncoding: a UserDict with attributes of its own."""

    def __init__(self, data: dict[str, Any], tag: str = "") -> None:
        super().__init__(data)
        self.tag = tag


class OwnMove:
    """A batch that knows how to move itself (and records that it did)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def to(self, device: torch.device) -> OwnMove:
        return OwnMove(self.tensor.to(device))


def tensors_of(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [t for item in batch for t in tensors_of(item)]
    if isinstance(batch, collections.abc.Mapping):
        return [t for item in batch.values() for t in tensors_of(item)]
    if dataclasses.is_dataclass(batch):
        return [t for f in dataclasses.fields(batch) for t in tensors_of(getattr(batch, f.name))]
    return []


def test_every_container_keeps_its_type_and_every_tensor_moves() -> None:
    x, y = torch.ones(4, 3), torch.zeros(4, dtype=torch.long)
    encoding = Encoding({"input_ids": x, "labels": y}, tag="kept")
    factory: defaultdict[str, Any] = defaultdict(list, {"a": x})
    batch = (
        Pair(x, y),
        [x, (y, "text", 3, None)],
        OrderedDict(a=x, b=[y]),
        encoding,
        factory,
        Readings(x, y, name="kept"),
        {"nested": {"deep": Pair(x, y)}},
    )
    moved = to_device(batch, META)
    assert type(moved) is tuple
    assert [type(part) for part in moved] == [type(part) for part in batch]
    assert isinstance(moved[0], Pair)
    assert moved[0].features.is_meta
    assert moved[1][1][1:] == ("text", 3, None)
    assert isinstance(moved[3], Encoding)
    assert moved[3].tag == "kept"
    assert moved[3] is not encoding
    assert not encoding["input_ids"].is_meta  # a copy
    assert moved[4].default_factory is list
    assert moved[5].name == "kept"
    assert tensors_of(moved)
    assert all(t.is_meta for t in tensors_of(moved))
    assert not any(t.is_meta for t in tensors_of(batch))


def test_objects_with_their_own_to_are_moved_by_it() -> None:
    moved = to_device({"custom": OwnMove(torch.ones(2))}, META)
    assert isinstance(moved["custom"], OwnMove)
    assert moved["custom"].tensor.is_meta


def test_frozen_dataclasses_and_read_only_mappings_move_too() -> None:
    frozen = to_device(Frozen(torch.ones(2)), META)
    assert isinstance(frozen, Frozen)
    assert frozen.signal.is_meta
    proxy = to_device(MappingProxyType({"a": torch.ones(2)}), META)
    assert proxy["a"].is_meta


def test_a_hugging_face_batch_encoding_keeps_its_type() -> None:
    transformers = pytest.importorskip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(2, 5, dtype=torch.long)})
    moved = to_device(encoding, META)
    assert isinstance(moved, transformers.BatchEncoding)
    assert moved["input_ids"].is_meta
    assert moved.input_ids.is_meta


# -- counting: the first dimension of the first tensor ----------------------------------------

leaves = st.one_of(
    st.integers(1, 9).map(lambda n: torch.zeros(n, 2)),
    st.just(torch.tensor(1.5)),
    st.sampled_from(["text", 3, None, 2.5]),
)


def structures(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
            st.tuples(inner, inner).map(lambda p: Pair(*p)),
        ),
        max_leaves=8,
    )


@given(structures(leaves))
def test_a_batch_counts_the_first_dimension_of_its_first_tensor(batch: Any) -> None:
    found = tensors_of(batch)
    if not found:
        assert count_samples(batch) is None
    else:
        first = found[0]
        assert count_samples(batch) == (first.shape[0] if first.ndim else 1)


@given(structures(leaves), structures(leaves))
def test_a_pair_counts_its_inputs_first(inputs: Any, targets: Any) -> None:
    expected = count_samples(inputs)
    if expected is None:
        expected = count_samples(targets)
    if expected is None:
        with pytest.raises(bz.UsageError, match="no tensor to count its samples by"):
            samples_of_pair(inputs, targets, "train_loader")
    else:
        assert samples_of_pair(inputs, targets, "train_loader") == expected


@given(structures(leaves))
def test_moving_keeps_the_count(batch: Any) -> None:
    assert count_samples(to_device(batch, META)) == count_samples(batch)
