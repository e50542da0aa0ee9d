"""The model summary: counted right, in the run_started event and console_out's start."""

from __future__ import annotations

import io

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bz
from bz._model_summary import format_bytes, format_count, summarize, summary_lines
from bz.config import RunConfig
from bz.plugins.console_out import ConsoleOut, ConsoleOutConfig
from bz.testing import capture_logs, tiny_setup


class _Tied(nn.Module):
    """An embedding and an output layer sharing one weight, a frozen part, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_totals_count_a_shared_parameter_once_and_know_frozen_ones() -> None:
    summary = summarize(_Tied())
    # embed 40 (shared with head), norm 8, frozen 20
    assert summary.parameters == 40 + 8 + 20
    assert summary.trainable == 40 + 8
    # float32 parameters, plus BatchNorm's buffers: two of 4 floats and one int64 counter
    assert summary.bytes == (40 + 8 + 20) * 4 + 2 * 4 * 4 + 8
    names = [(m.name, m.type, m.parameters) for m in summary.modules]
    assert names == [
        ("embed", "Embedding", 40),
        ("head", "Linear", 40),
        ("norm", "BatchNorm1d", 8),
        ("frozen", "Linear", 20),
    ]
    assert summary.modules[3].trainable == 0


def test_bytes_follow_the_dtype() -> None:
    model = nn.Linear(8, 8).to(torch.bfloat16)
    assert summarize(model).bytes == (64 + 8) * 2


def test_lazy_modules_count_nothing_until_built() -> None:
    summary = summarize(nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1)))
    assert summary.parameters == 4
    assert summary.modules[0].parameters == 0


def test_run_started_carries_the_summary() -> None:
    setup = tiny_setup()
    with capture_logs() as events:
        bz.Trainer().fit(setup, RunConfig(epochs=1, device="cpu", plugins=()))
    (started,) = [e for e in events if e["event"] == "run_started"]
    model = started["model"]
    total = sum(p.numel() for p in setup.model.parameters())
    assert model["parameters"] == model["trainable"] == total
    assert model["bytes"] == total * 4
    assert model["type"] == "Sequential"
    assert [m["name"] for m in model["modules"]] == ["0", "1", "2"]
    assert sum(m["parameters"] for m in model["modules"]) == total


def test_console_out_prints_it_when_training_starts() -> None:
    stream = io.StringIO()
    plugin = ConsoleOut(ConsoleOutConfig(bars="never"), stream=stream)
    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, device="cpu", plugins=()), [plugin])
    lines = stream.getvalue().splitlines()
    assert lines[0] == "model Sequential: 58 parameters (58 trainable), 232 B"
    assert lines[1].split() == ["0", "Linear", "40", "parameters", "160", "B"]
    assert lines[2].split() == ["1", "ReLU", "0", "parameters", "0", "B"]
    assert lines[4].startswith("epoch 1/1")


def test_console_out_can_leave_it_out() -> None:
    stream = io.StringIO()
    plugin = ConsoleOut(ConsoleOutConfig(bars="never", model_summary=False), stream=stream)
    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=1, device="cpu", plugins=()), [plugin])
    assert stream.getvalue().startswith("epoch 1/1")


def test_a_long_list_of_modules_is_cut() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    lines = summary_lines(summarize(model))
    assert len(lines) == 1 + 20 + 1
    assert lines[-1] == "  ... and 10 more"


@given(st.integers(0, 10**14))
def test_counts_and_sizes_read_as_at_most_four_significant_characters(value: int) -> None:
    count = format_count(value)
    number = count.rstrip("kMBT")
    assert float(number) < 1000
    assert "e" not in number
    size = format_bytes(value)
    assert size.split()[1] in {"B", "KiB", "MiB", "GiB", "TiB"}
    assert float(size.split()[0]) < 1024 or size.endswith("TiB")
