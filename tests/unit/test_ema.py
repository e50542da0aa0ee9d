"""``ema``: the average it keeps, what it validates on, what the run ends with, resuming."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._config_strategies import json_values
from tests._examples import examples
from tests._fault_support import fit_resumable
from tests._support import assert_same_weights, tiny_setup, weights

import bz
from bz.config import ConfigError, RunConfig, structure
from bz.plugins import NamedPlugin, PluginContext, model_of
from bz.plugins._loader import load_plugins
from bz.plugins.ema import Ema, EmaConfig
from bz.testing import count_host_reads

CONFIG = RunConfig(epochs=3, device="cpu", plugins=())


class Recorder:
    """Keeps a copy of the parameters after every optimizer step."""

    name = "recorder"

    def __init__(self) -> None:
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}
        self.at_start: dict[str, torch.Tensor] = {}

    def start_training_session(self, context: PluginContext) -> None:
        self.at_start = _params(model_of(context))

    def end_training_batch(self, context: PluginContext) -> None:
        self.after_step[context.global_step] = _params(model_of(context))


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def reference_average(recorder: Recorder, config: EmaConfig) -> dict[str, torch.Tensor]:
    """The average as the formula in the docs defines it, one tensor at a time."""
    average = {name: value.clone() for name, value in recorder.at_start.items()}
    updates = 0
    for step in sorted(recorder.after_step):
        if step % config.every_n_steps:
            continue
        decay = config.decay
        if config.warmup:
            decay = min(decay, (1 + updates) / (10 + updates))
        for name, value in recorder.after_step[step].items():
            average[name] = decay * average[name] + (1 - decay) * value
        updates += 1
    return average


@pytest.mark.parametrize(
    "options",
    [
        {"decay": 0.9},
        {"decay": 0.99, "warmup": False},
        {"decay": 0.5, "every_n_steps": 3},
    ],
)
def test_the_average_follows_the_documented_formula(options: dict[str, Any]) -> None:
    config = EmaConfig(**options)
    ema, recorder = Ema(config), Recorder()
    bz.Trainer().fit(tiny_setup(batches=5), CONFIG, [recorder, ema])
    assert ema.weights is not None
    assert ema.updates == 15 // config.every_n_steps
    expected = reference_average(recorder, config)
    assert ema.weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(ema.weights[name], value, rtol=1e-6, atol=1e-7)
    final = recorder.after_step[15]
    assert any(not torch.equal(ema.weights[n], final[n]) for n in final), "it averages"


def test_training_is_the_same_with_or_without_it() -> None:
    plain = tiny_setup()
    bz.Trainer().fit(plain, CONFIG)
    averaged = tiny_setup()
    options = EmaConfig(decay=0.8, validate_with_ema=True)
    result = bz.Trainer().fit(
        averaged, CONFIG.with_overrides(validate_every_steps=3), [Ema(options)]
    )
    assert not result.plugins[0].fault
    assert_same_weights(weights(averaged.model), weights(plain.model))


def test_validation_runs_on_the_average_when_asked() -> None:
    ema = Ema(EmaConfig(decay=0.8, validate_with_ema=True))
    setup = tiny_setup()
    result = bz.Trainer().fit(setup, CONFIG, [ema])
    plain = bz.Trainer().fit(tiny_setup(), CONFIG)
    assert ema.weights is not None
    averaged = tiny_setup()
    averaged.model.load_state_dict({**weights(setup.model), **ema.weights})
    assert setup.val_loader is not None
    assert averaged.loss_fn is not None
    with torch.no_grad():
        losses = [(averaged.loss_fn(averaged.model(x), y), len(x)) for x, y in setup.val_loader]
    expected = sum(float(loss) * n for loss, n in losses) / sum(n for _, n in losses)
    assert result.history[-1].validation_loss == pytest.approx(expected, rel=1e-6)
    assert result.history[-1].validation_loss != plain.history[-1].validation_loss
    # The training losses are those of the model's own weights.
    assert [r.training_loss for r in result.history] == [r.training_loss for r in plain.history]


def test_apply_at_end_puts_the_average_in_model_pt_and_keeps_checkpoints_trained(
    tmp_path: Path,
) -> None:
    ema = Ema(EmaConfig(decay=0.8, apply_at_end=True))
    setup = tiny_setup()
    result = bz.Trainer().fit(setup, CONFIG, [ema], checkpoint_dir=tmp_path)
    plain = tiny_setup()
    bz.Trainer().fit(plain, CONFIG)
    assert ema.weights is not None
    assert result.model is not None
    assert result.checkpoint is not None
    final = torch.load(result.model, weights_only=True)["model"]
    for name, value in ema.weights.items():
        assert torch.equal(final[name], value)
        assert torch.equal(setup.model.state_dict()[name], value)
    last = torch.load(result.checkpoint, weights_only=True)
    assert_same_weights(last["model"], weights(plain.model))
    assert last["plugins"]["ema"]["updates"] == 12


def test_a_failed_run_keeps_its_own_weights() -> None:
    class Breaks:
        name = "breaks"

        def end_validation_batch(self, context: PluginContext) -> None:
            raise RuntimeError("boom")

    setup = tiny_setup()
    ema = Ema(EmaConfig(decay=0.5, validate_with_ema=True, apply_at_end=True))
    config = CONFIG.with_overrides(plugin_errors="raise")
    with pytest.raises(bz.PluginFailure):
        bz.Trainer().fit(setup, config, [ema, Breaks()])
    assert ema.weights is not None
    trained = dict(setup.model.named_parameters())
    assert any(not torch.equal(trained[n], v) for n, v in ema.weights.items())


def test_no_step_reads_the_device() -> None:
    def reads(batches: int) -> Counter[str]:
        counter: Counter[str] = Counter()
        ema = Ema(EmaConfig(validate_with_ema=True, apply_at_end=True))
        with count_host_reads(counter):
            bz.Trainer().fit(tiny_setup(batches=batches), CONFIG, [ema])
        return counter

    assert reads(4) == reads(12)


def test_a_resumed_run_continues_the_average_exactly(tmp_path: Path) -> None:
    config = RunConfig(epochs=3, device="cpu", plugins=(), checkpoint_every_steps=4)
    options = EmaConfig(decay=0.9, validate_with_ema=True)
    whole = Ema(options)
    fit_resumable(tmp_path / "whole", config, [whole])
    first = Ema(options)
    fit_resumable(tmp_path / "split", config.with_overrides(max_steps=9), [first])
    second = Ema(options)
    result, _ = fit_resumable(tmp_path / "split", config, [second])
    assert result.resumed_from is not None
    assert result.resumed_from.name == "epoch-0001-batch-00003.pt"
    assert whole.weights is not None
    assert second.weights is not None
    assert second.updates == whole.updates == 18
    assert_same_weights(second.weights, whole.weights)


def test_added_to_a_run_that_started_without_it_the_average_starts_at_the_resume(
    tmp_path: Path,
) -> None:
    config = RunConfig(epochs=2, device="cpu", plugins=())
    fit_resumable(tmp_path, config.with_overrides(epochs=1))
    ema = Ema(EmaConfig(decay=1.0, warmup=False))  # never moves: it stays where it started
    result, _ = fit_resumable(tmp_path, config, [ema])
    assert result.resumed_from is not None
    assert ema.weights is not None
    resumed = torch.load(result.resumed_from, weights_only=True)["model"]
    for name, value in ema.weights.items():
        assert torch.equal(value, resumed[name])


@given(
    decay=st.floats(min_value=0.0, max_value=1.0),
    warmup=st.booleans(),
    updates=st.integers(min_value=0, max_value=10**9),
)
def test_the_decay_never_exceeds_the_option_and_grows_with_updates(
    decay: float, warmup: bool, updates: int
) -> None:
    ema = Ema(EmaConfig(decay=decay, warmup=warmup))
    now, later = ema.decay_at(updates), ema.decay_at(updates + 1)
    assert 0.0 <= now <= later <= decay
    assert now == decay or (warmup and now == (1 + updates) / (10 + updates))


@given(
    key=st.sampled_from(["decay", "every_n_steps", "warmup", "validate_with_ema", "apply_at_end"]),
    value=json_values,
)
@settings(max_examples=examples(200), deadline=None)
def test_options_are_accepted_exactly_within_their_bounds(key: str, value: Any) -> None:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    expected = {
        "decay": numeric and 0.0 <= value <= 1.0,
        "every_n_steps": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
    }.get(key, isinstance(value, bool))
    document = {"plugins": [{"ema": {key: value}}]}
    config = structure(document, RunConfig)
    if not expected:
        with pytest.raises(ConfigError) as caught:
            load_plugins(config.plugins, config, policy="raise")
        assert caught.value.problems[0][0] == f"plugins[0].ema.{key}"
        return
    loaded = load_plugins(config.plugins, config, policy="raise").active
    (plugin,) = loaded
    assert isinstance(plugin, Ema)
    assert getattr(plugin.config, key) == value


_EMA_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "validate_with_ema": st.booleans(),
        "apply_at_end": st.booleans(),
        "enabled": st.booleans(),
    },
)
_STOPPING_OPTIONS = st.fixed_dictionaries(
    {}, optional={"restore_best_weights": st.booleans(), "enabled": st.booleans()}
)


@given(ema=_EMA_OPTIONS, stopping=_STOPPING_OPTIONS, ema_first=st.booleans())
@settings(max_examples=examples(60), deadline=None)
def test_validating_the_average_and_restoring_best_weights_is_one_config_error(
    ema: dict[str, bool], stopping: dict[str, bool], ema_first: bool
) -> None:
    """The best epoch is judged by the average; restoring would put back trained weights
    never validated. Refused when both are on (``restore_best_weights`` by default),
    with the path of the option to change; any other combination loads."""
    entries: list[Any] = [{"ema": ema}, {"early_stopping": stopping}]
    if not ema_first:
        entries.reverse()
    config = structure({"plugins": entries, "device": "cpu"}, RunConfig)
    refused = (
        ema.get("enabled", True)
        and stopping.get("enabled", True)
        and ema.get("validate_with_ema", False)
        and stopping.get("restore_best_weights", True)
    )
    if not refused:
        assert len(load_plugins(config.plugins, config, policy="raise").active) == sum(
            entry.get("enabled", True) for entry in (ema, stopping)
        )
        return
    with pytest.raises(ConfigError) as caught:
        load_plugins(config.plugins, config, policy="raise")
    ((path, message),) = caught.value.problems
    assert path == f"plugins[{1 if ema_first else 0}].early_stopping.restore_best_weights"
    assert f'("validate_with_ema": true at plugins[{0 if ema_first else 1}].ema)' in message
    assert '"restore_best_weights": false' in message


def test_plugins_made_in_python_are_refused_the_same_way() -> None:
    from bz.plugins.early_stopping import EarlyStopping

    plugins: list[NamedPlugin] = [Ema(EmaConfig(validate_with_ema=True)), EarlyStopping()]
    with pytest.raises(ConfigError, match=r"plugins\.early_stopping\.restore_best_weights"):
        bz.Trainer().fit(tiny_setup(), CONFIG, plugins)
