"""``distributed.timeout``: any value the config accepts is a wait torch can hold."""

from __future__ import annotations

import datetime
import math
import socket

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from bz._distributed import LONGEST_COLLECTIVE_WAIT_S, collective_timeout
from bz.config import DistributedConfig


@given(st.floats(min_value=1.0, allow_nan=False))
def test_every_accepted_timeout_becomes_a_wait_of_at_most_ten_years(seconds: float) -> None:
    """Short waits pass unchanged; a huge one or Infinity (accepted: >= 1) is capped."""
    config = DistributedConfig(timeout=seconds)
    wait = collective_timeout(config.timeout)
    assert wait.total_seconds() == pytest.approx(min(seconds, LONGEST_COLLECTIVE_WAIT_S))
    assert wait <= datetime.timedelta(days=3650)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize("seconds", [1e15, math.inf])
def test_torch_takes_the_capped_wait(seconds: float) -> None:
    """A one-process gloo group with the capped wait connects and reduces: uncapped,
    ``timedelta(seconds=1e15)`` raises OverflowError and ``timedelta.max`` times out at
    once (a negative wait)."""
    with pytest.raises(OverflowError):
        datetime.timedelta(seconds=seconds)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=collective_timeout(seconds),
    )
    try:
        total = torch.ones(2)
        dist.all_reduce(total)
        assert total.tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()
