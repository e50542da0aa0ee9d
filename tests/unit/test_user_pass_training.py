"""What a user's ``setup()`` gets wrong, found by using bz as shipped."""

from __future__ import annotations

from typing import Any, cast

import pytest
from tests._support import tiny_setup
from torch import nn

import bz
from bz.config import RunConfig
from bz.plugins import Plugin, PluginContext


def test_a_generator_train_loader_is_named_used_up_in_the_epoch_the_console_shows() -> None:
    # The console and the checkpoints number epochs from 1: the second epoch, the one
    # the generator had nothing left for, is epoch 2 (this said "epoch 1").
    setup = tiny_setup()
    one_pass = (batch for batch in list(setup.train_loader))
    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=setup.loss_fn,
        optimizer=setup.optimizer,
        train_loader=one_pass,
    )
    with pytest.raises(bz.UsageError, match=r"no batches in epoch 2 \(an iterator is used up"):
        bz.Trainer().fit(setup, RunConfig(epochs=2, device="cpu", plugins=()), [])


def test_a_loader_empty_from_the_start_is_refused_without_the_iterator_hint() -> None:
    setup = tiny_setup()
    nothing: list[Any] = []
    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=setup.loss_fn,
        optimizer=setup.optimizer,
        train_loader=(batch for batch in nothing),
    )
    with pytest.raises(bz.UsageError, match=r"no batches in epoch 1$"):
        bz.Trainer().fit(setup, RunConfig(epochs=2, device="cpu", plugins=()), [])


@pytest.mark.parametrize("field", ["loss_fn", "step"])
def test_a_loss_module_class_without_its_parentheses_is_refused_naming_the_fix(field: str) -> None:
    # Was a RuntimeError deep inside torch ("Boolean value of Tensor with more than one
    # value is ambiguous", named at torch/nn/_reduction.py) at the first batch.
    setup = tiny_setup()
    with pytest.raises(
        bz.UsageError,
        match=rf"{field} is the class CrossEntropyLoss.*"
        rf"{field}=CrossEntropyLoss\(\)",
    ):
        bz.TrainingSetup(
            model=setup.model,
            optimizer=setup.optimizer,
            train_loader=setup.train_loader,
            **{field: cast("Any", nn.CrossEntropyLoss)},
        )


def test_a_plain_function_or_a_loss_module_is_still_a_loss_fn() -> None:
    setup = tiny_setup()
    for loss_fn in (nn.functional.cross_entropy, nn.CrossEntropyLoss()):
        built = bz.TrainingSetup(
            model=setup.model,
            loss_fn=loss_fn,
            optimizer=setup.optimizer,
            train_loader=setup.train_loader,
        )
        assert built.loss_fn is loss_fn


class _Noted(Plugin):
    name = "noted"

    def end_epoch(self, context: PluginContext) -> None:
        self.logger.info("epoch_done", loss=context.training_loss)


def test_a_plugin_class_passed_to_fit_instead_of_an_instance_is_named_as_such() -> None:
    # Was one fault listing every hook: "start_training_session(self, context) cannot
    # be called as start_training_session(context); load_checkpoint(...) ...".
    config = RunConfig(epochs=1, device="cpu", plugins=(), plugin_errors="raise")
    with pytest.raises(
        bz.PluginFailure,
        match=r"_Noted is a class, not a plugin object: "
        r"pass an instance, _Noted\(\)",
    ):
        bz.Trainer().fit(tiny_setup(), config, [cast("Any", _Noted)])


@pytest.mark.parametrize(
    ("config", "plugins", "message"),
    [
        ({"epochs": 1}, [], r"fit: config must be a bz.RunConfig, got dict"),
        (None, _Noted(), r"fit: plugins must be a list of plugin objects, got _Noted"),
        (None, "console_out", r"fit: plugins must be a list of plugin objects, got str"),
    ],
)
def test_fit_names_an_argument_of_the_wrong_kind(config: Any, plugins: Any, message: str) -> None:
    # Were AttributeError: 'dict' object has no attribute 'seed', TypeError: '_Noted'
    # object is not iterable, and a fault per character of "console_out".
    with pytest.raises(TypeError, match=message):
        bz.Trainer().fit(tiny_setup(), config, plugins)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_loss_fn_that_does_not_reduce_is_named_not_torch(accumulate: int) -> None:
    # reduction="none" gives one loss per sample: backward refuses it inside torch
    # ("grad can be implicitly created only for scalar outputs", at autograd's file),
    # which named nothing of the user's. The plain and the accumulating step alike.
    setup = tiny_setup()
    setup = bz.TrainingSetup(
        model=setup.model,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        optimizer=setup.optimizer,
        train_loader=setup.train_loader,
    )
    config = RunConfig(epochs=1, device="cpu", plugins=(), accumulate_grad_batches=accumulate)
    with pytest.raises(bz.UsageError, match=r"loss_fn returned a loss of shape \(\d+,\); it must"):
        bz.Trainer().fit(setup, config, [])


class _NameRaises(Plugin):
    @property
    def name(self) -> str:  # type: ignore[override]  # a property, as a plugin may define it
        raise RuntimeError("no name yet")

    def end_epoch(self, context: PluginContext) -> None:
        """Never called: the plugin is set aside while loading."""


def test_a_plugin_whose_name_raises_is_its_own_fault_not_fits() -> None:
    # Was: the RuntimeError escaped Trainer.fit, before any plugin's boundary.
    config = RunConfig(epochs=1, device="cpu", plugins=())
    result = bz.Trainer().fit(tiny_setup(), config, [cast("Any", _NameRaises()), _Noted()])
    faults = {report.name: report.fault for report in result.plugins}
    assert faults["noted"] is None
    fault = faults["_NameRaises"]
    assert fault is not None
    assert "RuntimeError: no name yet" in fault.describe()
    assert result.epochs_completed == 1
