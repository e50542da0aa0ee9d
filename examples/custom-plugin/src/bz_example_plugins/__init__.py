"""Example bz plugins, installed through the ``bz.plugins`` entry points."""

from __future__ import annotations

from bz_example_plugins.epoch_timer import EpochTimer, EpochTimerConfig
from bz_example_plugins.loss_printer import LossPrinter

__all__ = ["EpochTimer", "EpochTimerConfig", "LossPrinter"]
