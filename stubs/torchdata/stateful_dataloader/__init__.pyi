from typing import Any, TypeVar

from torch.utils.data import DataLoader

_T_co = TypeVar("_T_co", covariant=True)

class StatefulDataLoader(DataLoader[_T_co]):
    snapshot_every_n_steps: int | None
    def __init__(
        self, dataset: Any, *args: Any, snapshot_every_n_steps: int | None = 1, **kwargs: Any
    ) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...
