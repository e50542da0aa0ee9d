"""A resumed run, and a rewound one, validate on exactly what the uninterrupted run
validated on: the same validation loss, bit for bit, whatever shuffles ``val_loader``.

A shuffled validation loader draws its order from torch's global generator (a plain
``shuffle=True``), from a generator of its own (``DataLoader(generator=...)``, a
sampler's ``generator``) or, for torchdata's ``StatefulDataLoader``, from the generator
its ``RandomSampler`` makes for itself. The order changes which samples share a batch,
so the loss (a sum of per-batch means) differs in its last digits when the order does.
A run stopped in the middle of an epoch (``max_steps`` writes the checkpoint a kill
would leave) or at an epoch's end, then resumed by a new ``fit`` with everything built
again (as a new process does), must report the validation losses and end with the
weights of the run never interrupted; so must a run whose plugin failed after
validation (rewound), against the run without that plugin.

``persistent_workers`` loaders are here too: torch draws their workers' base seed from
the random state when it starts them, once in an uninterrupted run and once more in
the epoch a resumed one starts in, and torchdata's ``StatefulDataLoader`` draws its
permutation twice when it starts them (once when it resets them for a later epoch);
neither must reach the run's random streams, for the validation loader and the
training loader alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from tests._support import Events, assert_same_weights, quick_first, weights
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import bz
from bz.plugins import PluginContext

EPOCHS, TRAIN_BATCHES = 3, 6
CONFIG = bz.RunConfig(epochs=EPOCHS, device="cpu", seed=0, plugins=[])
STOPS = {
    "mid-epoch": attrs.evolve(CONFIG, max_steps=TRAIN_BATCHES + 3),
    "epoch end": attrs.evolve(CONFIG, epochs=1, checkpoint_interval=1),
}
"""How the interrupted run stops: three batches into its second epoch (the checkpoint
``max_steps`` writes there is what Ctrl-C or ``checkpoint_every_steps`` writes), or
after its first epoch."""


def _data(seed: int, samples: int) -> TensorDataset:
    inputs = torch.randn(samples, 4, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(inputs, (inputs.sum(dim=1) > 0).long())


VAL_SAMPLES = 23


def _window(passes: int) -> list[int]:
    """The samples a stateful validation loader validates on in its ``passes``-th pass:
    another 12 each time, so a pass that forgot its count reports another loss."""
    return [(7 * passes + i) % VAL_SAMPLES for i in range(12)]


class EpochLoader:
    """A loader of the user's own (no DataLoader) that keeps its pass count."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data
        self.passes = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        window = _window(self.passes)
        self.passes += 1
        for start in range(0, len(window), 5):
            inputs, targets = self.data[window[start : start + 5]]
            yield inputs, targets

    def state_dict(self) -> dict[str, Any]:
        return {"passes": self.passes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.passes = int(state["passes"])


class Positioned(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """A stream whose ``state_dict()`` is its position in the pass, and a loaded
    position is where every later pass starts, as in ``datasets``' ``IterableDataset``
    (until its ``set_epoch``): in an uninterrupted run each pass starts at 0."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data
        self.position = 0
        self.start: int | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.position = self.start or 0
        while self.position < len(self.data):
            self.position += 1
            yield self.data[self.position - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = int(state["position"])


def _val_loader(kind: str) -> Any:
    data = _data(1, VAL_SAMPLES)  # batches of 5: the last one short, so order changes the sum
    if kind == "stateful loader":
        return EpochLoader(data)
    if kind == "StatefulDataLoader, positioned stream":
        return StatefulDataLoader(Positioned(data), batch_size=5)
    if kind == "shuffled":
        return DataLoader(data, batch_size=5, shuffle=True)
    if kind == "loader generator":
        generator = torch.Generator().manual_seed(7)
        return DataLoader(data, batch_size=5, shuffle=True, generator=generator)
    if kind == "sampler generator":
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(7))
        return DataLoader(data, batch_size=5, sampler=sampler)
    if kind == "StatefulDataLoader":
        return StatefulDataLoader(data, batch_size=5, shuffle=True)
    persistent: dict[str, Any] = {"num_workers": 1, "persistent_workers": True}
    if kind == "StatefulDataLoader, persistent workers":
        return StatefulDataLoader(data, batch_size=5, shuffle=True, **persistent)
    assert kind == "persistent workers"
    return DataLoader(data, batch_size=5, shuffle=True, **persistent)


def _setup(val_kind: str, *, persistent_train: str | None = None) -> bz.TrainingSetup:
    """``persistent_train``: the class of a training loader with a persistent worker
    (``DataLoader`` or ``StatefulDataLoader``); None: a DataLoader without workers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    workers: dict[str, Any] = {"shuffle": True, "batch_size": 8}
    data = _data(0, 8 * TRAIN_BATCHES)
    if persistent_train is not None:
        workers.update(num_workers=1, persistent_workers=True)
    if persistent_train == "StatefulDataLoader":
        train_loader: Any = StatefulDataLoader(data, **workers)
    else:
        train_loader = DataLoader(data, **workers)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=train_loader,
        val_loader=_val_loader(val_kind),
    )


def _losses(result: bz.FitResult) -> list[float | None]:
    return [record.validation_loss for record in result.history]


_CLEAN: dict[tuple[str, str | None], tuple[list[float | None], dict[str, torch.Tensor]]] = {}


def _clean(kind: str, persistent_train: str | None = None) -> tuple[list[float | None], Any]:
    """The uninterrupted run's validation losses and final weights (once per kind)."""
    key = (kind, persistent_train)
    if key not in _CLEAN:
        setup = _setup(kind, persistent_train=persistent_train)
        result = bz.Trainer().fit(setup, CONFIG, [])
        _CLEAN[key] = (_losses(result), weights(setup.model))
    return _CLEAN[key]


VAL_KINDS = (
    "loader generator",
    "sampler generator",
    "StatefulDataLoader",
    "shuffled",
    "persistent workers",
    "StatefulDataLoader, persistent workers",
    "stateful loader",
    "StatefulDataLoader, positioned stream",
)
"""The validation loaders. ``stateful loader`` keeps a pass count it chooses its
samples by, which checkpoints hold through its ``state_dict()``; the positioned stream's
state says where a pass stands, which bz does not hand back to a DataLoader between
passes (its every later pass would start at the end)."""


@pytest.mark.parametrize("stop", sorted(STOPS))
@pytest.mark.parametrize("kind", quick_first(*VAL_KINDS))
def test_a_resumed_run_validates_as_the_uninterrupted_one(
    kind: str, stop: str, tmp_path: Path
) -> None:
    expected_losses, expected_weights = _clean(kind)
    bz.Trainer().fit(_setup(kind), STOPS[stop], [], checkpoint_dir=tmp_path)
    setup = _setup(kind)  # built again, as `bz train` in a new process does
    resumed = bz.Trainer().fit(setup, CONFIG, [], checkpoint_dir=tmp_path)
    assert resumed.resumed_from is not None
    losses = _losses(resumed)
    assert len(losses) == EPOCHS - 1  # the resumed run validates epochs 2 and 3
    assert losses == expected_losses[1:]  # ==, not approx: bit for bit
    assert_same_weights(weights(setup.model), expected_weights)


@pytest.mark.parametrize("kind", ["stateful loader"])
def test_checkpoints_before_a_validation_pass_keep_the_loader_state(
    kind: str, tmp_path: Path
) -> None:
    # Stopped and resumed three times: three batches into the first epoch (nothing
    # validated yet), at the first epoch's end, and three batches into the second (the
    # state resumed from is not handed back yet: the checkpoint keeps it).
    expected_losses, expected_weights = _clean(kind)
    stops = [
        attrs.evolve(CONFIG, max_steps=3),
        attrs.evolve(CONFIG, epochs=1),
        attrs.evolve(CONFIG, max_steps=TRAIN_BATCHES + 3),
    ]
    for config in stops:
        bz.Trainer().fit(_setup(kind), config, [], checkpoint_dir=tmp_path)
    setup = _setup(kind)
    resumed = bz.Trainer().fit(setup, CONFIG, [], checkpoint_dir=tmp_path)
    assert resumed.resumed_from is not None
    assert _losses(resumed) == expected_losses[1:]
    assert_same_weights(weights(setup.model), expected_weights)


@pytest.mark.parametrize("stop", sorted(STOPS))
@pytest.mark.parametrize("loader", quick_first("DataLoader", "StatefulDataLoader"))
def test_a_persistent_workers_training_loader_resumes_bit_identical(
    loader: str, stop: str, tmp_path: Path
) -> None:
    # Its workers start again in the resumed epoch: their base seed is drawn then (and
    # torchdata's loader draws its permutation twice where a reset draws it once), and
    # neither must move the shuffle or the dropout masks that follow.
    expected_losses, expected_weights = _clean("shuffled", persistent_train=loader)
    bz.Trainer().fit(
        _setup("shuffled", persistent_train=loader), STOPS[stop], [], checkpoint_dir=tmp_path
    )
    setup = _setup("shuffled", persistent_train=loader)
    resumed = bz.Trainer().fit(setup, CONFIG, [], checkpoint_dir=tmp_path)
    assert resumed.resumed_from is not None
    assert _losses(resumed) == expected_losses[1:]
    assert_same_weights(weights(setup.model), expected_weights)


def test_a_stateful_dataloader_over_a_positioned_stream_trains_whole_epochs_after_a_resume(
    tmp_path: Path,
) -> None:
    # As the training loader, resumed at an epoch's end: the next epoch starts from the
    # stream's beginning, as the uninterrupted run's does (its state is handed back only
    # in the middle of an epoch).
    def setup() -> bz.TrainingSetup:
        stream = _val_loader("StatefulDataLoader, positioned stream")
        return attrs.evolve(_setup("shuffled"), train_loader=stream)

    expected = setup()
    expected_losses = _losses(bz.Trainer().fit(expected, CONFIG, []))
    bz.Trainer().fit(setup(), STOPS["epoch end"], [], checkpoint_dir=tmp_path)
    resumed = setup()
    losses = _losses(bz.Trainer().fit(resumed, CONFIG, [], checkpoint_dir=tmp_path))
    assert losses == expected_losses[1:]
    assert_same_weights(weights(resumed.model), weights(expected.model))


class UnsavableLoader(EpochLoader):
    """Its ``state_dict()`` holds an object a checkpoint cannot hold."""

    def state_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "handle": object()}


def test_a_validation_loader_state_a_checkpoint_cannot_hold_is_reported_and_left_out(
    tmp_path: Path, events: Events
) -> None:
    setup = attrs.evolve(_setup("shuffled"), val_loader=UnsavableLoader(_data(1, VAL_SAMPLES)))
    result = bz.Trainer().fit(setup, STOPS["epoch end"], [], checkpoint_dir=tmp_path)
    assert result.checkpoint is not None
    skipped = [event for event in events if event["event"] == "loader_state_skipped"]
    assert [event["loader"] for event in skipped] == ["val_loader"]
    assert "object" in skipped[0]["error"]
    payload = torch.load(result.checkpoint, weights_only=True)
    assert "val_loaders" not in payload


class FailsAfterValidation:
    """Fails in the second epoch's ``end_validation_loop``: the epoch is rewound and its
    validation runs again."""

    name = "fails_after_validation"

    def end_validation_loop(self, context: PluginContext) -> None:
        if context.epoch == 1:
            raise RuntimeError("after validating")


@pytest.mark.parametrize(
    "kind", quick_first("loader generator", "StatefulDataLoader", "stateful loader")
)
def test_a_rewound_epoch_validates_as_the_run_without_the_plugin(kind: str) -> None:
    expected_losses, expected_weights = _clean(kind)
    setup = _setup(kind)
    result = bz.Trainer().fit(
        setup, attrs.evolve(CONFIG, plugin_errors="rewind"), [FailsAfterValidation()]
    )
    (report,) = result.plugins
    assert report.fault is not None
    assert report.fault.stage == "end_validation_loop"
    assert _losses(result) == expected_losses
    assert_same_weights(weights(setup.model), expected_weights)
