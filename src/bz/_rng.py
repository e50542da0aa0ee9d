"""Random states: every generator a training step can draw from, captured and put back."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def loader_generators(*loaders: object) -> list[torch.Generator]:
    """The ``torch.Generator`` objects data loaders draw their shuffling from, each once.

    A ``DataLoader`` built with ``generator=`` (or a sampler with its own generator, as
    torchdata's ``StatefulDataLoader`` gives a shuffled one) does not use torch's global
    generator; these must be saved alongside it. The first loader's come first: a
    checkpoint that holds fewer (written before the others were saved) still restores
    them.
    """
    found: list[torch.Generator] = []
    for loader in loaders:
        batches = getattr(loader, "batch_sampler", None)
        owners = [loader, getattr(loader, "sampler", None), getattr(batches, "sampler", None)]
        for owner in owners:
            candidate = getattr(owner, "generator", None)
            if isinstance(candidate, torch.Generator) and all(candidate is not g for g in found):
                found.append(candidate)
    return found


def capture_rng(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """Every random state a training step can draw from, in a ``weights_only`` form."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": [generator.get_state() for generator in generators],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": None,
    }
    numpy = sys.modules.get("numpy")  # only when something imported it: never import it here
    if numpy is not None:
        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (str(kind), [int(k) for k in keys], int(position), int(has_gauss), cached)
    return state


def restore_rng(state: Mapping[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    """Put back what :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for generator, saved in zip(generators, state["generators"], strict=False):
        generator.set_state(saved)
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    saved_numpy = state.get("numpy")
    numpy = sys.modules.get("numpy")
    if saved_numpy is not None and numpy is not None:
        kind, keys, position, has_gauss, cached = saved_numpy
        numpy.random.set_state(
            (kind, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, cached)
        )
