"""bz: a strictly typed PyTorch training loop with sandboxed plugins.

The names here are for people who train (``train.py``, ``bz.run``) and who embed bz
(``Trainer``, its results, the errors to catch). Plugin authors import from
:mod:`bz.plugins` and :mod:`bz.testing`; DEVELOPERS.md ("Public surface") says who
each public name is for, and ``test_public_surface.py`` pins the list.

Importing ``bz`` is cheap and silent: torch is imported when training starts, and
logging is left to the application (``bz train`` configures it for the command line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bz._errors import BzError, ConfigError, MetricInputError, TrainingError, UsageError
from bz.config import RunConfig, load_config

__version__ = "0.1.0"

if TYPE_CHECKING:
    from bz._run import run
    from bz._setup import StepResult, TrainingSetup
    from bz.plugins._order import OrderCycleError
    from bz.plugins._sandbox import PluginFailure, PluginFault, PluginReport
    from bz.training.device import seed_everything
    from bz.training.guards import NonFiniteLoss
    from bz.training.interrupts import TrainingInterrupted
    from bz.training.trainer import EpochRecord, FitResult, Trainer

# Names whose modules import torch: loaded on first access.
_LAZY = {
    "Trainer": "bz.training.trainer",
    "FitResult": "bz.training.trainer",
    "EpochRecord": "bz.training.trainer",
    "seed_everything": "bz.training.device",
    "TrainingInterrupted": "bz.training.interrupts",
    "NonFiniteLoss": "bz.training.guards",
    "TrainingSetup": "bz._setup",
    "StepResult": "bz._setup",
    "PluginFault": "bz.plugins._sandbox",
    "PluginFailure": "bz.plugins._sandbox",
    "OrderCycleError": "bz.plugins._order",
    "PluginReport": "bz.plugins._sandbox",
    "run": "bz._run",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bz' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "BzError",
    "ConfigError",
    "EpochRecord",
    "FitResult",
    "MetricInputError",
    "NonFiniteLoss",
    "OrderCycleError",
    "PluginFailure",
    "PluginFault",
    "PluginReport",
    "RunConfig",
    "StepResult",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "TrainingSetup",
    "UsageError",
    "__version__",
    "load_config",
    "run",
    "seed_everything",
]
