"""Metrics that accumulate on the device and are read back once per epoch.

Metrics are named in ``bzconfig.json`` (``"accuracy"`` or ``{"top_k_accuracy": {"k":
5}}``) and built by :func:`build_metrics`; any object with ``update``/``compute``/
``reset`` (a torchmetrics metric, say) is a :class:`Metric` too. A loop of your own
calls :func:`reduce_across_processes` (distributed runs), :func:`compute_all` (one host
read for all of them) and :func:`reset_all` once per epoch, as bz's loop does (its
metric set, in ``_set.py``, also counts the built-in classification metrics of a loop
together, once per batch). See ``docs/metrics.md`` for definitions and edge cases.
"""

from __future__ import annotations

from bz.metrics._classification import Accuracy, F1Score, Precision, Recall, TopKAccuracy
from bz.metrics._collection import compute_all, reduce_across_processes, reset_all
from bz.metrics._options import MetricOption
from bz.metrics._protocol import MergeableMetric, Metric
from bz.metrics._registry import MetricInfo, available_metrics, build_metrics
from bz.metrics._regression import MeanAbsoluteError, MeanSquaredError

__all__ = [
    "Accuracy",
    "F1Score",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "MergeableMetric",
    "Metric",
    "MetricInfo",
    "MetricOption",
    "Precision",
    "Recall",
    "TopKAccuracy",
    "available_metrics",
    "build_metrics",
    "compute_all",
    "reduce_across_processes",
    "reset_all",
]
