"""Metrics named in ``bzconfig.json``: building them, and the errors bad entries give."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._examples import examples

from bz._errors import ConfigError
from bz.config import MetricSpec, RunConfig, structure
from bz.metrics import (
    Accuracy,
    F1Score,
    Metric,
    TopKAccuracy,
    available_metrics,
    build_metrics,
)
from bz.metrics._registry import BUILTIN_METRICS


def build(entries: list[Any]) -> dict[str, Metric]:
    """Build the metrics of a config whose ``metrics`` list is ``entries``."""
    return build_metrics(structure({"metrics": entries}, RunConfig).metrics)


def outcome(entries: list[Any]) -> dict[str, Metric] | ConfigError:
    """The metrics built, or the config error raised (anything else propagates)."""
    try:
        return build(entries)
    except ConfigError as error:
        return error


def problems_of(entries: list[Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        build(entries)
    return dict(caught.value.problems)


# -- building -------------------------------------------------------------------------


def test_metrics_are_keyed_by_the_name_their_results_go_under() -> None:
    metrics = build(
        [
            "accuracy",
            {"top_k_accuracy": {"k": 5}},
            {"f1_score": {"average": "weighted"}},
            "mean_squared_error",
        ]
    )
    assert list(metrics) == ["accuracy", "top_5_accuracy", "f1_score", "mean_squared_error"]
    assert isinstance(metrics["accuracy"], Accuracy)
    top_k = metrics["top_5_accuracy"]
    assert isinstance(top_k, TopKAccuracy)
    assert top_k.config.k == 5
    f1 = metrics["f1_score"]
    assert isinstance(f1, F1Score)
    assert f1.config.average == "weighted"


def test_every_builtin_builds_with_its_defaults() -> None:
    metrics = build(sorted(BUILTIN_METRICS))
    assert set(metrics) == {*BUILTIN_METRICS, "top_5_accuracy"} - {"top_k_accuracy"}


def test_two_top_k_accuracies_with_different_k_coexist() -> None:
    metrics = build([{"top_k_accuracy": {"k": 1}}, {"top_k_accuracy": {"k": 3}}])
    assert list(metrics) == ["top_1_accuracy", "top_3_accuracy"]


def test_null_options_mean_the_defaults() -> None:
    assert list(build([{"precision": None}])) == ["precision"]


def test_specs_made_in_python_need_no_path() -> None:
    metrics = build_metrics([MetricSpec("recall"), MetricSpec("top_k_accuracy", {"k": 2})])
    assert list(metrics) == ["recall", "top_2_accuracy"]
    with pytest.raises(ConfigError) as caught:
        build_metrics([MetricSpec("recall"), MetricSpec("top_k_accuracy", {"k": "2"})])
    assert caught.value.problems[0][0] == "metrics[1].top_k_accuracy.k"


def test_built_metrics_work() -> None:
    metric = build([{"precision": {"average": "micro"}}])["precision"]
    metric.update(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
    assert float(metric.compute()) == 0.5


# -- errors ---------------------------------------------------------------------------


def test_an_unknown_name_names_the_path_and_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError) as caught:
        build(["accuracy", "acuracy"])
    assert (
        caught.value.render() == 'metrics[1]: unknown metric "acuracy" (did you mean "accuracy"?)'
    )
    assert caught.value.exit_code == 2


def test_an_unknown_name_with_options_names_its_key() -> None:
    suggestion = 'unknown metric "top_k_acuracy" (did you mean "top_k_accuracy"?)'
    problems = problems_of([{"top_k_acuracy": {"k": 3}}])
    assert problems == {"metrics[0].top_k_acuracy": suggestion}


def test_a_name_like_nothing_lists_the_metrics_available() -> None:
    (message,) = problems_of(["zzzz"]).values()
    assert "available: accuracy, f1_score" in message


def test_an_option_of_the_wrong_type_names_its_path() -> None:
    assert problems_of([{"top_k_accuracy": {"k": "5x"}}]) == {
        "metrics[0].top_k_accuracy.k": 'expected int, got "5x"'
    }


def test_an_out_of_range_option_names_its_path() -> None:
    assert problems_of(["accuracy", {"top_k_accuracy": {"k": 0}}]) == {
        "metrics[1].top_k_accuracy.k": "must be >= 1, got 0"
    }


def test_an_unknown_option_suggests_the_nearest_key() -> None:
    assert problems_of([{"f1_score": {"averge": "micro"}}]) == {
        "metrics[0].f1_score.averge": 'unknown key (did you mean "average"?)'
    }


def test_an_unknown_average_lists_the_choices() -> None:
    (message,) = problems_of([{"recall": {"average": "samples"}}]).values()
    assert message.startswith('expected one of "macro", "micro", "weighted"')


def test_options_for_a_metric_without_any_are_refused() -> None:
    assert problems_of([{"accuracy": {"top": 5}}]) == {
        "metrics[0].accuracy.top": "unknown key (accuracy takes no options)"
    }


def test_two_metrics_reporting_under_one_name_are_refused() -> None:
    assert problems_of(["accuracy", "f1_score", {"accuracy": {}}]) == {
        "metrics[2].accuracy": 'reports "accuracy", as metrics[0] already does'
    }


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(["acuracy", {"top_k_accuracy": {"k": "x"}}, {"recall": {"a": 1}}])
    assert sorted(problems) == [
        "metrics[0]",
        "metrics[1].top_k_accuracy.k",
        "metrics[2].recall.a",
    ]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
OPTION_KEYS = st.sampled_from(["k", "average", "num_classes", "enabled"]) | st.text(max_size=8)


@settings(max_examples=examples(75), deadline=None)
@given(
    name=st.sampled_from(sorted(BUILTIN_METRICS)),
    options=st.dictionaries(OPTION_KEYS, JSON | st.sampled_from(["macro", "micro"]), max_size=3),
)
def test_any_json_options_build_or_give_a_config_error(name: str, options: dict[str, Any]) -> None:
    result = outcome([{name: options}])
    if isinstance(result, ConfigError):
        assert result.problems
        assert all(path.startswith(f"metrics[0].{name}") for path, _ in result.problems)
    else:
        assert len(result) == 1


@settings(max_examples=examples(40), deadline=None)
@given(name=st.text(max_size=20))
def test_any_name_builds_or_gives_a_config_error(name: str) -> None:
    result = outcome([name])
    if isinstance(result, ConfigError):
        assert name not in BUILTIN_METRICS
        assert "unknown metric" in result.render()
    else:
        assert name in BUILTIN_METRICS
        assert len(result) == 1


# -- listing --------------------------------------------------------------------------


def test_every_builtin_is_listed_as_loaded_and_documented() -> None:
    metrics = available_metrics()
    assert set(BUILTIN_METRICS) <= set(metrics)
    for name in BUILTIN_METRICS:
        info = metrics[name]
        assert info.error is None
        assert info.factory is not None
        assert info.builtin
        assert info.distribution == "bz-cli"
        assert info.summary


def test_listed_options_carry_types_defaults_and_docs() -> None:
    metrics = available_metrics()
    (k,) = metrics["top_k_accuracy"].options
    assert (k.name, k.type, k.default, k.required) == ("k", "integer", "5", False)
    assert "k" in k.doc
    average, num_classes = metrics["f1_score"].options
    assert average.type == '"macro" | "micro" | "weighted"'
    assert average.default == '"macro"'
    assert (num_classes.type, num_classes.default) == ("integer | null", "null")
    assert metrics["accuracy"].options == ()


def test_a_metric_with_no_samples_reports_nan_after_building() -> None:
    metric = build(["mean_absolute_error"])["mean_absolute_error"]
    assert math.isnan(float(metric.compute()))


def test_pyproject_registers_exactly_the_builtins() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    registered = pyproject["project"].get("entry-points", {}).get("bz.metrics")
    if registered is None:
        pytest.skip('pyproject.toml has no [project.entry-points."bz.metrics"] table yet')
    assert registered == dict(BUILTIN_METRICS)
