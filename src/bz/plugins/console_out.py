"""``console_out``: progress bars and a one-line summary per epoch, on stderr.

Bars are drawn only on a terminal (or with ``bars: "always"``) and redrawn at most
every ``update_interval`` seconds, so reading the running loss (one device sync) happens
a few times a second, never every step. Colour follows https://no-color.org
(``NO_COLOR``) and ``FORCE_COLOR``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING, Literal, TextIO

import attrs

from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, hook

if TYPE_CHECKING:
    from bz._context import PluginContext

_BAR_WIDTH = 24
_EPOCH_BAR_WIDTH = 10


def _bar(done: int, total: int, width: int) -> str:
    filled = min(width, width * done // total)
    return "█" * filled + "·" * (width - filled)


@attrs.frozen
class ConsoleOutConfig:
    """Options of ``console_out``."""

    update_interval: float = attrs.field(default=0.1, validator=at_least(0.0))
    """Seconds between progress-bar redraws."""
    bars: Literal["auto", "always", "never"] = "auto"
    """``auto`` draws bars only when stderr is a terminal."""
    summary: bool = True
    """Print one line per epoch with losses, metrics and time."""


def _use_color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


class ConsoleOut:
    """Progress bars for epochs and batches, and a summary line per epoch."""

    Config = ConsoleOutConfig

    def __init__(
        self, config: ConsoleOutConfig | None = None, stream: TextIO | None = None
    ) -> None:
        self.name = "console_out"
        self.config = config or ConsoleOutConfig()
        self._stream = stream
        self._bars = False
        self._color = False
        self._epoch_started = 0.0
        self._last_draw = 0.0
        self._drawn = False

    @property
    def stream(self) -> TextIO:
        """Where output goes (stderr unless given), looked up late so tests can swap it."""
        return self._stream or sys.stderr

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Decide once whether to draw bars and use colour."""
        stream = self.stream
        mode = self.config.bars
        self._bars = mode == "always" or (mode == "auto" and stream.isatty())
        self._color = _use_color(stream)

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Start the epoch's clock."""
        self._epoch_started = time.monotonic()
        self._last_draw = 0.0

    @hook
    def end_training_batch(self, context: PluginContext) -> None:
        """Redraw the bar when ``update_interval`` has passed."""
        if self._bars:
            self._maybe_draw(
                context, "train", context.training_batch_count, context.training_batches_per_epoch
            )

    @hook
    def end_validation_batch(self, context: PluginContext) -> None:
        """Redraw the bar during validation too."""
        if self._bars:
            self._maybe_draw(
                context,
                "val",
                context.validation_batch_count,
                context.validation_batches_per_epoch,
            )

    def _maybe_draw(
        self, context: PluginContext, phase: str, done: int, total: int | None
    ) -> None:
        now = time.monotonic()
        if now - self._last_draw < self.config.update_interval and done != total:
            return
        self._last_draw = now
        loss = context.training_loss if phase == "train" else context.validation_loss
        self._draw(self._bar_line(context, phase, done, total, loss, now))

    def _bar_line(
        self,
        context: PluginContext,
        phase: str,
        done: int,
        total: int | None,
        loss: float,
        now: float,
    ) -> str:
        epochs = max(context.epochs, 1)
        epoch_bar = _bar(context.epoch, epochs, _EPOCH_BAR_WIDTH)
        epoch = f"epoch {context.epoch + 1}/{context.epochs} {epoch_bar}"
        elapsed = _format_seconds(now - self._epoch_started)
        batches = f"{_bar(done, total, _BAR_WIDTH)} {done}/{total}" if total else f"{done}"
        return f"{epoch} {phase} {batches} loss {_format_value(loss)} {elapsed}"

    def _draw(self, line: str) -> None:
        self.stream.write(f"\r\x1b[2K{line}")
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self._drawn = False

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """Replace the bar with the epoch's summary line."""
        self._clear()
        if not self.config.summary:
            self.stream.flush()
            return
        parts = [f"epoch {context.epoch + 1}/{context.epochs}"]
        parts.append(f"loss {_format_value(context.training_loss)}")
        if context.validation_batch_count:
            parts.append(f"val_loss {_format_value(context.validation_loss)}")
        parts += [f"{k} {_format_value(v)}" for k, v in context.training_metrics.items()]
        parts += [f"val_{k} {_format_value(v)}" for k, v in context.validation_metrics.items()]
        parts.append(_format_seconds(time.monotonic() - self._epoch_started))
        line = "  ".join(parts)
        if self._color:
            line = f"\x1b[1m{parts[0]}\x1b[0m" + line[len(parts[0]) :]
        print(line, file=self.stream, flush=True)

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """Leave the terminal clean."""
        self._clear()
        self.stream.flush()

    @hook
    def on_exception(self, context: PluginContext) -> None:
        """Do not leave half a bar behind an error message."""
        self._clear()
        self.stream.flush()


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as ConsoleOut(ConsoleOutConfig(**options)).
_: ConfiguredPluginClass[ConsoleOutConfig] = ConsoleOut
