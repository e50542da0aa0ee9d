# The reference implementations bz's metric tests compare against (scikit-learn >= 1.3).
from typing import Literal

from numpy.typing import ArrayLike

_Average = Literal["micro", "macro", "weighted", "samples", "binary"]
_ZeroDivision = Literal["warn"] | float

def accuracy_score(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    normalize: bool = ...,
    sample_weight: ArrayLike | None = ...,
) -> float: ...
def precision_score(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    labels: ArrayLike | None = ...,
    pos_label: int | str = ...,
    average: _Average = ...,
    sample_weight: ArrayLike | None = ...,
    zero_division: _ZeroDivision = ...,
) -> float: ...
def recall_score(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    labels: ArrayLike | None = ...,
    pos_label: int | str = ...,
    average: _Average = ...,
    sample_weight: ArrayLike | None = ...,
    zero_division: _ZeroDivision = ...,
) -> float: ...
def f1_score(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    labels: ArrayLike | None = ...,
    pos_label: int | str = ...,
    average: _Average = ...,
    sample_weight: ArrayLike | None = ...,
    zero_division: _ZeroDivision = ...,
) -> float: ...
def top_k_accuracy_score(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    k: int = ...,
    normalize: bool = ...,
    sample_weight: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
) -> float: ...
def mean_squared_error(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    sample_weight: ArrayLike | None = ...,
    multioutput: Literal["raw_values", "uniform_average"] | ArrayLike = ...,
) -> float: ...
def mean_absolute_error(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    sample_weight: ArrayLike | None = ...,
    multioutput: Literal["raw_values", "uniform_average"] | ArrayLike = ...,
) -> float: ...
