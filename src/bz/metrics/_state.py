"""The state every built-in metric keeps: a few tensors on the device, merged by summing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from bz.metrics._inputs import accumulator_dtype

if TYPE_CHECKING:
    from collections.abc import Sequence


class PendingCounts(Protocol):
    """Counts a metric shares with others and has not folded into its own state yet.

    A :class:`~bz.metrics._fused.ClassificationGroup` updates several metrics with one
    computation per batch; its ``flush`` adds what it holds into each member's state.
    """

    def flush(self) -> None:
        """Fold the pending counts into every member's state (a no-op when none are)."""
        ...


def no_samples() -> torch.Tensor:
    """The result of a metric that has seen no sample: NaN (on the host, as no state exists)."""
    return torch.tensor(float("nan"), dtype=torch.float64)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, and 0 where the denominator is 0 (``zero_division=0``)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), 0.0)


class SummedStateMetric:
    """Base of the built-in metrics: state is a fixed list of tensors that merge by summing.

    The tensors are created by the first ``update``, on the device of its inputs, and
    stay there: ``reset`` zeroes them in place rather than reallocating, so an epoch
    costs no allocation and a caller holding ``state_tensors()`` keeps valid references.
    A metric that has seen no sample computes NaN.

    Subclasses implement ``update`` (calling :meth:`_state_on`), ``_new_state`` and
    ``_compute``.
    """

    display_name: str = ""
    """The key the result is reported under."""

    # A class-level default too, for subclasses whose __init__ does not call ours.
    _pending: PendingCounts | None = None

    def __init__(self) -> None:
        self._state: list[torch.Tensor] | None = None
        self._pending: PendingCounts | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy (the loop deep-copies metrics for validation) or a pickle takes the
        # counts seen so far but not the group: the group would go on feeding the
        # original metrics, never the copy.
        self._fold_pending()
        state = self.__dict__.copy()
        state["_pending"] = None
        return state

    def compute(self) -> torch.Tensor:
        """The metric over everything seen since the last reset; NaN if nothing was seen.

        Runs on the device and returns a 0-dim tensor there: no host read.
        """
        self._fold_pending()
        if self._state is None:
            return no_samples()
        return self._compute(self._state)

    def reset(self) -> None:
        """Forget everything seen (the state is zeroed in place, on its device)."""
        self._fold_pending()  # the group's counts belong to every member; drop only ours
        for tensor in self.state_tensors():
            tensor.zero_()

    def state_tensors(self) -> list[torch.Tensor]:
        """The state tensors themselves (not copies), merged across processes by summing.

        Empty before the first ``update``.
        """
        self._fold_pending()
        return [] if self._state is None else list(self._state)

    def _state_on(self, device: torch.device) -> list[torch.Tensor]:
        """The state on ``device``, created (zeroed) or moved there first if needed."""
        # Tensors made under inference_mode cannot be updated outside it, and a metric
        # may first see a batch in a validation loop run under inference_mode and then
        # be reset or updated outside one: state is therefore always a normal tensor.
        if self._state is None:
            with torch.inference_mode(False):
                self._state = self._new_state(device)
        elif self._state[0].device != device:
            with torch.inference_mode(False):
                self._state = [_moved(tensor, device) for tensor in self._state]
        return self._state

    def _fold_pending(self) -> None:
        if self._pending is not None:
            self._pending.flush()

    def _new_state(self, device: torch.device) -> list[torch.Tensor]:
        """Zeroed state tensors on ``device``."""
        raise NotImplementedError

    def _compute(self, state: Sequence[torch.Tensor]) -> torch.Tensor:
        """The result from the state (as returned by ``_new_state``, then summed into)."""
        raise NotImplementedError


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Float sums may need a narrower type on the new device (MPS has no float64).
    dtype = accumulator_dtype(device) if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=dtype)
