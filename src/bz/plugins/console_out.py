"""``console_out``: progress bars and a one-line summary per epoch, on stderr.

Bars are drawn only on a terminal (or with ``bars: "always"``) and redrawn at most
every ``update_interval`` seconds, so reading the running loss (one device sync) happens
a few times a second, never every step. Where no bar can be drawn (``bars: "never"``,
or ``auto`` with a stream that is not a terminal when the plugin is created) it has no
per-batch hook at all, so the loop calls nothing per batch for it. Colour follows https://no-color.org
(``NO_COLOR``) and ``FORCE_COLOR``.

Like tqdm, the training bar shows throughput (``12.3k samples/s``) and the time left
in the epoch (``ETA 01:23``), and the epoch bar the time left in the run (``run ETA
1:02:03``). They come from host-side counters and ``time.perf_counter()`` only, never
from the device. Timing starts at the epoch's first batch in this process, so start-up
(loader workers, compilation, batches skipped on resume) does not skew it. The run's ETA
is the smallest of: the epochs left at the measured pace (the last whole epoch's duration,
validation included, once one has been seen), the optimizer steps left to ``max_steps``,
and the time left to ``max_time``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING, Literal, TextIO

import attrs

from bz._model_summary import summarize, summary_lines
from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, Order, hook

if TYPE_CHECKING:
    from collections.abc import Callable

    from bz.plugins._context import PluginContext

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
    model_summary: bool = True
    """Print the model's parameters, size and top-level modules when training starts."""


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


def _format_rate(value: float) -> str:
    """Three significant digits and an SI prefix, as tqdm writes them: ``12.3k``."""
    for unit in ("", "k", "M", "G", "T"):
        if abs(value) < 999.5:
            if abs(value) < 99.95:
                if abs(value) < 9.995:
                    return f"{value:1.2f}{unit}"
                return f"{value:2.1f}{unit}"
            return f"{value:3.0f}{unit}"
        value /= 1000
    return f"{value:3.1f}P"


def _format_eta(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on, as tqdm writes them."""
    minutes, rest = divmod(int(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes:02d}:{rest:02d}"


def _terminal_width(stream: TextIO) -> int | None:
    """Columns of the terminal behind ``stream`` (or ``COLUMNS``); None when unknown."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        pass
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


class ConsoleOut:
    """Progress bars for epochs and batches, and a summary line per epoch."""

    Config = ConsoleOutConfig
    order = Order(last=True)
    """It reports the epoch: after every other plugin, so it sees the metrics they add."""

    def __init__(
        self,
        config: ConsoleOutConfig | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.name = "console_out"
        self.config = config or ConsoleOutConfig()
        self._stream = stream
        self._clock = clock or time.perf_counter
        self._bars = False
        self._color = False
        self._session_started = 0.0
        self._epoch_started = 0.0
        self._last_draw = -math.inf
        self._drawn = False
        # Pace, from host-side counters only (see the module's docstring).
        self._first: tuple[float, int, int] | None = None
        """(time, batches, samples) at the epoch's first training batch in this process."""
        self._train_done = 0
        """Training batches done in this epoch, as of the last training batch."""
        self._per_batch: float | None = None
        """Seconds per training batch: this epoch's, else the previous epoch's."""
        self._samples_per_second: float | None = None
        """This epoch's throughput (all processes), once two batches have been seen."""
        self._epoch_seconds: float | None = None
        """Duration of the last whole epoch (validation included) seen in this process."""
        # The per-batch hooks exist only where bars may be drawn: off a terminal (a log
        # file, a pipe, CI) the loop then calls nothing per batch for this plugin. The
        # loader reads a plugin's hooks when it is created, so ``auto`` asks the stream
        # here, and again when training starts.
        if self._may_draw():
            self.end_training_batch = self._end_training_batch
            self.end_validation_batch = self._end_validation_batch

    def _may_draw(self) -> bool:
        mode = self.config.bars
        return mode == "always" or (mode == "auto" and self.stream.isatty())

    @property
    def stream(self) -> TextIO:
        """Where output goes (stderr unless given), looked up late so tests can swap it."""
        return self._stream or sys.stderr

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Decide once whether to draw bars and use colour; start the run's clock; print
        the model's summary."""
        stream = self.stream
        # Only where the per-batch hooks were set up (see ``__init__``).
        self._bars = self._may_draw() and hasattr(self, "end_training_batch")
        self._color = _use_color(stream)
        self._session_started = self._clock()
        self._per_batch = self._epoch_seconds = None
        if self.config.model_summary and context.model is not None:
            print("\n".join(summary_lines(summarize(context.model))), file=stream, flush=True)

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Start the epoch's clock."""
        self._epoch_started = self._clock()
        self._last_draw = -math.inf
        self._first = None
        self._train_done = 0
        self._samples_per_second = None

    def _end_training_batch(self, context: PluginContext) -> None:
        """``end_training_batch`` where bars may be drawn: note the pace; redraw the bar
        when ``update_interval`` has passed."""
        if not self._bars:
            return
        now = self._clock()
        done = context.training_batch_count
        self._train_done = done
        if self._first is None:
            self._first = (now, done, context.training_sample_count)
        self._maybe_draw(context, "train", done, context.training_batches_per_epoch, now)

    def _end_validation_batch(self, context: PluginContext) -> None:
        """``end_validation_batch`` where bars may be drawn: redraw the bar."""
        if self._bars:
            self._maybe_draw(
                context,
                "val",
                context.validation_batch_count,
                context.validation_batches_per_epoch,
                self._clock(),
            )

    def _maybe_draw(
        self, context: PluginContext, phase: str, done: int, total: int | None, now: float
    ) -> None:
        if now - self._last_draw < self.config.update_interval and done != total:
            return
        self._last_draw = now
        if phase == "train":
            self._measure(context, done, now)
        loss = context.training_loss if phase == "train" else context.validation_loss
        self._draw(self._bar_line(context, phase, done, total, loss, now))

    def _measure(self, context: PluginContext, done: int, now: float) -> None:
        """The epoch's pace since its first batch in this process (no device read)."""
        if self._first is None:
            return
        started, first_done, first_samples = self._first
        seconds = now - started
        if done <= first_done or seconds <= 0:
            return
        self._per_batch = seconds / (done - first_done)
        samples = context.training_sample_count - first_samples
        # Only rank 0 draws; every process trains at its pace on its share of the data.
        self._samples_per_second = samples * max(context.world_size, 1) / seconds

    def _run_left(self, context: PluginContext, now: float) -> float | None:
        """Seconds left in the run: the smallest of the bounds that are known."""
        bounds: list[float] = []
        config = context.run_config
        if config is not None and config.max_time is not None:
            bounds.append(self._session_started + config.max_time - now)
        per_batch = self._per_batch
        if per_batch is not None:
            if config is not None and config.max_steps is not None:
                steps = config.max_steps - context.global_step
                bounds.append(steps * config.accumulate_grad_batches * per_batch)
            total = context.training_batches_per_epoch
            if total:
                epoch = self._epoch_seconds or total * per_batch
                epochs_after = context.epochs - context.epoch - 1
                this_epoch = max(total - self._train_done, 0) * per_batch
                bounds.append(this_epoch + max(epochs_after, 0) * epoch)
        return max(min(bounds), 0.0) if bounds else None

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
        epoch = f"epoch {context.epoch + 1}/{context.epochs}"
        run_left = self._run_left(context, now)
        run_eta = "" if run_left is None else f" run ETA {_format_eta(run_left)} |"
        pace = ""
        if phase == "train":
            if self._samples_per_second is not None:
                pace += f" {_format_rate(self._samples_per_second)} samples/s"
            if total and self._per_batch is not None:
                pace += f" ETA {_format_eta(max(total - done, 0) * self._per_batch)}"
        count = f"{done}/{total}" if total else f"{done}"
        loss_part = f"loss {_format_value(loss)}"
        elapsed = f" {_format_seconds(now - self._epoch_started)}"

        def line(epoch_width: int, width: int, with_elapsed: bool) -> str:
            epoch_bar = f" {_bar(context.epoch, epochs, epoch_width)}" if epoch_width else ""
            bar = f"{_bar(done, total, width)} " if total and width else ""
            shown = elapsed if with_elapsed else ""
            return f"{epoch}{epoch_bar}{run_eta} {phase} {bar}{count} {loss_part}{shown}{pace}"

        # A line wider than the terminal would wrap, and \r would redraw only its last
        # row: narrow the bars, then drop them and the elapsed time, then cut.
        text = line(_EPOCH_BAR_WIDTH, _BAR_WIDTH, True)
        columns = _terminal_width(self.stream)
        if columns is None or len(text) < columns:
            return text
        narrower = [(_EPOCH_BAR_WIDTH, width, True) for width in range(_BAR_WIDTH - 2, 7, -2)]
        for shape in [*narrower, (0, 8, True), (0, 0, True), (0, 0, False)]:
            text = line(*shape)
            if len(text) < columns:
                return text
        return text[: max(columns - 1, 0)]

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
        first, whole = self._first, context.training_batches_per_epoch
        if first is not None and first[1] == 1 and self._train_done == whole:
            # A whole epoch, from its first batch: the pace of the epochs to come.
            self._epoch_seconds = self._clock() - self._epoch_started
        if not self.config.summary:
            self.stream.flush()
            return
        parts = [f"epoch {context.epoch + 1}/{context.epochs}"]
        parts.append(f"loss {_format_value(context.training_loss)}")
        if context.validation_batch_count:
            parts.append(f"val_loss {_format_value(context.validation_loss)}")
        parts += [f"{k} {_format_value(v)}" for k, v in context.training_metrics.items()]
        parts += [f"val_{k} {_format_value(v)}" for k, v in context.validation_metrics.items()]
        parts.append(_format_seconds(self._clock() - self._epoch_started))
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
