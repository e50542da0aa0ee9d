"""A checkpoint write that meets a full disk says so (found by using bz as shipped).

On a full disk partway through a checkpoint, torch.save reports the refused write as its
own ``RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos 31424 vs
31316``; the ``checkpoint_write_failed`` line then named no cause a user could act on.
A file-size limit (``RLIMIT_FSIZE``) refuses writes past a size the same way a full disk
does, with ``EFBIG`` instead of ``ENOSPC``.
"""

from __future__ import annotations

import errno
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bz.training.checkpoint.store import _tmp_name, atomic_save

resource = pytest.importorskip("resource")


@pytest.fixture
def files_of_at_most_32_kib() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, no signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.usefixtures("files_of_at_most_32_kib")
def test_a_write_refused_partway_names_the_system_error_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "epoch-0001.pt"
    with pytest.raises(OSError, match="File too large") as caught:
        atomic_save({"model": {"w": torch.zeros(100_000)}}, path)
    assert caught.value.errno == errno.EFBIG
    assert not path.exists()
    assert not _tmp_name(path).exists()
