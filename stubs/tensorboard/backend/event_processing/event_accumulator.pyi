# The part of tensorboard.backend.event_processing.event_accumulator bz's tests use.

from collections.abc import Mapping, Sequence
from typing import Any

class ScalarEvent:
    wall_time: float
    step: int
    value: float

class HistogramValue:
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limit: Sequence[float]
    bucket: Sequence[int]

class HistogramEvent:
    wall_time: float
    step: int
    histogram_value: HistogramValue

SCALARS: str
HISTOGRAMS: str

class EventAccumulator:
    def __init__(
        self,
        path: str,
        size_guidance: Mapping[str, int] | None = None,
        compression_bps: Sequence[int] = ...,
        purge_orphaned_data: bool = True,
    ) -> None: ...
    def Reload(self) -> EventAccumulator: ...
    def Tags(self) -> dict[str, Any]: ...
    def Scalars(self, tag: str) -> list[ScalarEvent]: ...
    def Histograms(self, tag: str) -> list[HistogramEvent]: ...
