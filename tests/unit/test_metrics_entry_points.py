"""Third-party metrics, found through the ``bz.metrics`` entry-point group.

Each test installs a small distribution into a temporary folder on ``sys.path`` (a
``.dist-info`` with ``entry_points.txt`` beside its modules), so discovery runs through
``importlib.metadata`` exactly as for a package installed with pip.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import structlog
import torch

from bz._errors import ConfigError
from bz.config import RunConfig, structure
from bz.metrics import Accuracy, MergeableMetric, Metric, available_metrics, build_metrics

METRIC_MODULE = '''
import attrs
import torch


@attrs.frozen
class CountConfig:
    scale: float = 1.0
    """Multiplies the count."""
    label: str | None = None


class SampleCount:
    """Counts the samples seen, times a scale.

    A second paragraph.
    """

    Config = CountConfig

    def __init__(self, scale: float = 1.0, label: str | None = None) -> None:
        self.scale = scale
        self.label = label
        self.count = torch.zeros(())

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        self.count += targets.shape[0]

    def compute(self) -> torch.Tensor:
        return self.count * self.scale

    def reset(self) -> None:
        self.count.zero_()


class Refusing:
    """Fails to be created."""

    def __init__(self) -> None:
        raise RuntimeError("no GPU here")


class WithBadConfig:
    """Its Config is not an attrs class."""

    Config = dict


def not_a_metric() -> int:
    """Returns a number, not a metric."""
    return 42
'''

ENTRY_POINTS = """
[bz.metrics]
sample_count = fake_bz_metrics:SampleCount
refusing = fake_bz_metrics:Refusing
bad_config = fake_bz_metrics:WithBadConfig
not_a_metric = fake_bz_metrics:not_a_metric
missing_attribute = fake_bz_metrics:Nowhere
broken = fake_bz_broken:Metric
accuracy = fake_bz_metrics:SampleCount
"""


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution ``fake-bz-metrics`` 1.2.3 registering metrics, some of them broken."""
    (tmp_path / "fake_bz_metrics.py").write_text(METRIC_MODULE)
    (tmp_path / "fake_bz_broken.py").write_text("import a_module_that_does_not_exist\n")
    info = tmp_path / "fake_bz_metrics-1.2.3.dist-info"
    info.mkdir()
    metadata = "Metadata-Version: 2.1\nName: fake-bz-metrics\nVersion: 1.2.3\n"
    (info / "METADATA").write_text(metadata)
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("fake_bz_metrics", "fake_bz_broken"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return tmp_path


def build(entries: list[object]) -> dict[str, Metric]:
    return build_metrics(structure({"metrics": entries}, RunConfig).metrics)


@pytest.mark.usefixtures("installed")
def test_a_third_party_metric_is_listed_with_its_distribution_and_options() -> None:
    info = available_metrics()["sample_count"]
    assert info.error is None
    assert (info.distribution, info.version) == ("fake-bz-metrics", "1.2.3")
    assert info.source == "fake_bz_metrics:SampleCount"
    assert not info.builtin
    assert info.summary == "Counts the samples seen, times a scale."
    scale, label = info.options
    assert (scale.name, scale.type, scale.default, scale.doc) == (
        "scale",
        "number",
        "1.0",
        "Multiplies the count.",
    )
    assert (label.type, label.default, label.doc) == ("string | null", "null", "")


@pytest.mark.usefixtures("installed")
def test_a_third_party_metric_is_built_from_its_options() -> None:
    metric = build([{"sample_count": {"scale": 2}}])["sample_count"]
    assert isinstance(metric, Metric)
    assert not isinstance(metric, MergeableMetric)
    metric.update(torch.zeros(3, 2), torch.zeros(3))
    assert float(metric.compute()) == 6.0


@pytest.mark.usefixtures("installed")
def test_a_third_party_metric_option_error_names_its_path() -> None:
    with pytest.raises(ConfigError) as caught:
        build(["accuracy", {"sample_count": {"scale": "big"}}])
    assert caught.value.problems == (
        ("metrics[1].sample_count.scale", 'expected number, got "big"'),
    )


@pytest.mark.usefixtures("installed")
def test_entry_points_that_fail_to_load_are_listed_with_the_reason() -> None:
    metrics = available_metrics()
    reasons = {name: metrics[name].error or "" for name in ("broken", "missing_attribute")}
    assert "ModuleNotFoundError" in reasons["broken"]
    assert "a_module_that_does_not_exist" in reasons["broken"]
    assert "AttributeError" in reasons["missing_attribute"]
    assert "must be an attrs class" in (metrics["bad_config"].error or "")
    assert all(metrics[name].factory is None for name in ("broken", "bad_config"))


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken", 'metric "broken" could not be loaded from fake_bz_broken:Metric'),
        ("refusing", 'could not create metric "refusing": RuntimeError: no GPU here'),
        ("not_a_metric", "returned an object of type int, which is not a metric"),
    ],
)
def test_building_a_metric_that_cannot_load_or_be_made_is_a_config_error(
    name: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build(["accuracy", name])
    ((path, problem),) = caught.value.problems
    assert path == "metrics[1]"
    assert message in problem


@pytest.mark.usefixtures("installed")
def test_a_third_party_package_cannot_take_a_builtin_name() -> None:
    with structlog.testing.capture_logs() as events:
        metrics = available_metrics()
    assert metrics["accuracy"].builtin
    assert isinstance(build(["accuracy"])["accuracy"], Accuracy)
    taken = [event for event in events if event["event"] == "metric_name_taken"]
    assert taken
    assert taken[0]["metric"] == "accuracy"
    assert taken[0]["distribution"] == "fake-bz-metrics"


def test_two_packages_registering_one_name_follow_the_plugin_rule(
    installed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second distribution, "aa-metrics", also registers sample_count. It sorts before
    # fake-bz-metrics, so it wins wherever it sits on sys.path (as for plugins).
    other = installed / "elsewhere"
    other.mkdir()
    (other / "aa_metrics.py").write_text(
        "from fake_bz_metrics import SampleCount\n\n\nclass Other(SampleCount):\n"
        '    """Another sample counter."""\n'
    )
    info = other / "aa_metrics-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aa-metrics\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bz.metrics]\nsample_count = aa_metrics:Other\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(other)])
    with structlog.testing.capture_logs() as events:
        metrics = available_metrics()
    assert metrics["sample_count"].source == "aa_metrics:Other"
    assert metrics["sample_count"].distribution == "aa-metrics"
    (taken,) = [
        e for e in events if e["event"] == "metric_name_taken" and e["metric"] != "accuracy"
    ]
    assert taken["ignored"] == "fake_bz_metrics:SampleCount"
    assert "the first distribution in alphabetical order is used" in taken["hint"]


class TorchmetricsStyle:
    """The shape of a torchmetrics metric: update, compute, reset and nothing else."""

    def __init__(self) -> None:
        self.total = torch.zeros(())

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        self.total += (preds == targets).sum()

    def compute(self) -> torch.Tensor:
        return self.total

    def reset(self) -> None:
        self.total = torch.zeros(())


def test_a_torchmetrics_style_object_is_a_metric_as_is() -> None:
    metric: Metric = TorchmetricsStyle()
    assert isinstance(metric, Metric)
    assert not isinstance(metric, MergeableMetric)
