"""A file that cannot be a checkpoint is refused in one line of bz's words.

torch's own messages for such files run to several sentences, and for a pickle holding
other objects advise ``torch.load(weights_only=False)``, which would run whatever code
the file names; torch also printed a ``UserWarning`` with its source line on stderr for
a plain pickle. ``bz validate --checkpoint FILE`` and resuming show this reason.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bz.training.checkpoint.files import UnreadableCheckpoint, read_checkpoint


class Opaque:
    """An object a weights-only load refuses."""


def _good(path: Path) -> None:
    torch.save({"model": {"weight": torch.zeros(2)}}, path)


def _cut_short(path: Path) -> None:
    _good(path)
    path.write_bytes(path.read_bytes()[:200])


_FILES: dict[str, tuple[Callable[[Path], object], str]] = {
    "text": (
        lambda p: p.write_text("garbage\n", encoding="utf-8"),
        "not a file torch.save wrote (it is no zip archive)",
    ),
    "empty": (lambda p: p.write_bytes(b""), "not a file torch.save wrote (it is no zip archive)"),
    "a_plain_pickle": (
        lambda p: p.write_bytes(pickle.dumps({"x": 1}, protocol=4)),
        "not a file torch.save wrote (it is no zip archive)",
    ),
    "cut_short": (_cut_short, "damaged or cut short (torch cannot read its zip archive)"),
    "python_objects": (
        lambda p: torch.save({"model": Opaque()}, p),
        "it holds Python objects besides tensors and plain values, which bz does not load "
        "(torch.load(weights_only=True))",
    ),
}


@pytest.mark.parametrize("kind", sorted(_FILES))
def test_an_unloadable_file_is_one_line_saying_why(kind: str, tmp_path: Path) -> None:
    make, reason = _FILES[kind]
    path = tmp_path / "epoch-0001.pt"
    make(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's pickle-protocol warning must not show
        with pytest.raises(UnreadableCheckpoint) as caught:
            read_checkpoint(path, model_only=True, verified=False)
    assert str(caught.value) == reason
    assert "weights_only=False" not in str(caught.value)
