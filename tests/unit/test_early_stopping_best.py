"""``early_stopping``: ``min_delta`` decides when to stop; the epoch restored is the one
with the best value seen, however small its lead (README, the plugin's docstring)."""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples

from bz.plugins import PluginContext
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig


def _marked_model() -> torch.nn.Linear:
    return torch.nn.Linear(1, 1, bias=False)


def _run(values: list[float], **options: Any) -> tuple[EarlyStopping, list[bool], float]:
    """Feed ``values`` as successive epochs' watched value (the model's one weight set
    to the epoch's number) until a stop; then the end of the session. Returns the
    plugin, the stop requests and the weight the model ends with."""
    plugin = EarlyStopping(EarlyStoppingConfig(monitor="accuracy", verbose=False, **options))
    model = _marked_model()
    stops: list[bool] = []
    context = PluginContext(epochs=len(values), model=model)
    for epoch, value in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(epoch + 1)
        context = PluginContext(epochs=len(values), model=model)
        context.epoch = epoch
        context.validation_metrics["accuracy"] = value
        plugin.end_epoch(context)
        stops.append(context.should_stop_training)
        if context.should_stop_training:
            break
    plugin.end_training_session(context)
    return plugin, stops, float(model.weight.item())


def _beats(value: float, reference: float | None, delta: float, mode: str) -> bool:
    if reference is None:
        return True
    return value < reference - delta if mode == "min" else value > reference + delta


def _stops_by_the_old_rule(values: list[float], **options: Any) -> list[bool]:
    """The stop decisions of the rule bz had (and the predecessor's): patience measured
    from the last improvement of more than min_delta, which was also the best."""
    mode, delta = options["mode"], options["min_delta"]
    patience, baseline = options["patience"], options["baseline"]
    best, wait, history, stops = None, 0, [], []
    for value in values:
        history.append(value)
        if math.isnan(value):
            wait += 1
        elif (baseline is None or _beats(value, baseline, delta, mode)) and _beats(
            value, best, delta, mode
        ):
            best, wait = value, 0
        else:
            wait += 1
        if options["strategy"] == "patience":
            stop = wait >= patience
        else:
            window = history[-(patience + 1) :]
            stop = len(window) == patience + 1 and max(window) - min(window) <= delta
        stops.append(stop)
        if stop:
            break
    return stops


_values = st.lists(
    st.one_of(
        st.sampled_from([1.0, 0.5, 0.0015, 0.0013, 0.0012, 0.0008, 0.0]),
        st.floats(0, 1, allow_nan=False),
        st.just(math.nan),
    ),
    min_size=1,
    max_size=25,
)
_options = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["min", "max"]),
        "min_delta": st.sampled_from([0.0, 0.001, 0.01, 0.3]),
        "patience": st.integers(1, 5),
        "strategy": st.sampled_from(["patience", "plateau"]),
        "baseline": st.one_of(st.none(), st.floats(0, 1, allow_nan=False)),
        "restore_best_weights": st.booleans(),
    }
)


@settings(max_examples=examples(300), deadline=None)
@given(_values, _options)
def test_the_restored_epoch_is_the_best_value_seen_and_stops_are_unchanged(
    values: list[float], options: dict[str, Any]
) -> None:
    plugin, stops, weight = _run(values, **options)
    assert stops == _stops_by_the_old_rule(values, **options)  # min_delta: when to stop
    seen = values[: len(stops)]
    mode, delta, baseline = options["mode"], options["min_delta"], options["baseline"]
    eligible = [
        (value, epoch)
        for epoch, value in enumerate(seen, start=1)
        if not math.isnan(value) and (baseline is None or _beats(value, baseline, delta, mode))
    ]
    if not eligible:
        assert plugin.best_epoch is None
        assert weight == len(seen)  # nothing to restore: the last epoch's weights
        return
    # The argmin (argmax) of the values seen, the earliest of equal ones.
    pick = min if mode == "min" else max
    best_value = pick(value for value, _ in eligible)
    best_epoch = next(epoch for value, epoch in eligible if value == best_value)
    assert (plugin.best, plugin.best_epoch) == (best_value, best_epoch)
    assert weight == (best_epoch if options["restore_best_weights"] else len(seen))


def test_a_creeping_loss_restores_its_lowest_epoch_not_the_last_big_step() -> None:
    # The `bz init` project's validation losses, epochs 14-20 (seed 0): each step below
    # 0.0013 is smaller than min_delta 0.001, yet epoch 20 is clearly the best.
    values = [0.0018, 0.0018, 0.0013, 0.0013, 0.0012, 0.0014, 0.0008]
    plugin, stops, weight = _run(values, patience=5, min_delta=0.001)
    assert stops == [False] * 5 + [True]  # five epochs without a lead of 0.001: as before
    assert plugin.best_epoch == 5
    assert weight == 5
    plugin, stops, weight = _run(values, patience=10, min_delta=0.001)
    assert not any(stops)
    assert (plugin.best, plugin.best_epoch, weight) == (0.0008, 7, 7)


def test_a_state_saved_before_the_reference_was_kept_resumes() -> None:
    plugin, _, _ = _run([0.5, 0.4, 0.3999], patience=5, min_delta=0.01)
    state = plugin.state_dict()
    assert (state["best"], state["reference"], state["wait"]) == (0.3999, 0.4, 1)
    # A checkpoint written before the two were kept apart has no reference: its best
    # was what patience measured from.
    old = {key: value for key, value in state.items() if key != "reference"}
    old["best"] = 0.4
    copy = EarlyStopping(plugin.config)
    copy.load_state_dict(old)
    assert (copy.best, copy.reference, copy.wait) == (0.4, 0.4, 1)
    again = EarlyStopping(plugin.config)
    again.load_state_dict(state)
    assert (again.best, again.best_epoch, again.reference) == (0.3999, 3, 0.4)
