"""Metrics that accumulate on the device and are read back once per epoch.

The loop calls the function :func:`batch_update` made for its metrics on every batch
(built-in classification metrics share one computation there), then, once per epoch,
:func:`reduce_across_processes` (distributed runs), :func:`compute_all` (the one host
read) and :func:`reset_all`. Metrics are named in ``bzconfig.json`` (``"accuracy"`` or
``{"top_k_accuracy": {"k": 5}}``) and built by :func:`build_metrics`; any object with
``update``/``compute``/``reset`` (a torchmetrics metric, say) is a :class:`Metric` too.
See ``docs/metrics.md`` for definitions and edge cases.
"""

from __future__ import annotations

from bz.metrics._classification import (
    Accuracy,
    AveragingConfig,
    F1Score,
    Precision,
    Recall,
    TopKAccuracy,
    TopKConfig,
)
from bz.metrics._collection import compute_all, reduce_across_processes, reset_all
from bz.metrics._fused import batch_update
from bz.metrics._options import MetricOption
from bz.metrics._protocol import MergeableMetric, Metric
from bz.metrics._registry import (
    BUILTIN_METRICS,
    ENTRY_POINT_GROUP,
    MetricInfo,
    available_metrics,
    build_metrics,
)
from bz.metrics._regression import MeanAbsoluteError, MeanSquaredError

__all__ = [
    "BUILTIN_METRICS",
    "ENTRY_POINT_GROUP",
    "Accuracy",
    "AveragingConfig",
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
    "TopKConfig",
    "available_metrics",
    "batch_update",
    "build_metrics",
    "compute_all",
    "reduce_across_processes",
    "reset_all",
]
