"""``profiler``: a ``torch.profiler`` trace of a few training steps, throughput, peak memory.

Built in (``torch.profiler`` ships with torch). Two independent parts:

**The trace.** After ``skip_steps`` training steps (let caches, the allocator and
autotuning settle) and ``warmup_steps`` more, ``active_steps`` steps are recorded.
Then the plugin writes ``profiler.pt.trace.json`` into the run directory — a Chrome
trace: open it at https://ui.perfetto.dev or ``chrome://tracing`` — plus
``profiler_top_operators.txt``, and prints the top operators (by self CUDA time on
CUDA, self CPU time otherwise) to stderr. Profiling happens on rank 0 only.

**Per-epoch numbers**, on every rank, published for other plugins::

    context.extra["profiler"] = {"epoch": 0, "seconds": ..., "batches_per_second": ...,
                                 "samples_per_second": ..., "peak_memory_bytes": ...,
                                 "memory": "cuda_max_allocated" | "process_max_rss"}
    context.extra["scalars"]["perf/samples_per_second"]  # and perf/batches_per_second,
    context.extra["scalars"]["perf/peak_memory_mb"]      # logged by tensorboard, wandb, run_log

They are set at ``end_training_loop`` (peak memory updated after validation), so any
plugin reads them in ``end_epoch`` whatever the plugin order. Throughput is timed over
the training loop only; on CUDA the device is synchronised at both ends of the loop (two
syncs per epoch). Samples per second needs the batch size, which plugins cannot see:
give ``batch_size``, or it is read from ``hyperparameters.batch_size`` when that is an
integer; the last, partial batch of an epoch is counted as full. Peak memory is CUDA's
``max_memory_allocated`` for the epoch on CUDA, the process's peak resident set size
(since it started) elsewhere. The epoch that contains the recorded steps is slower than
the others: profiling has a cost.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Literal

import attrs

from bz.config import at_least
from bz.plugins import ConfiguredPluginClass, hook, plugin_logger
from bz.plugins._run_dir import run_directory
from bz.plugins._scalars import EXTRA_SCALARS_KEY

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import torch
    from structlog.typing import FilteringBoundLogger
    from torch.profiler import profile

    from bz.plugins._context import PluginContext

TRACE_FILE = "profiler.pt.trace.json"
"""The Chrome trace (the ``.pt.trace.json`` suffix is what TensorBoard's viewer expects)."""
TOP_OPERATORS_FILE = "profiler_top_operators.txt"

SortKey = Literal["auto", "self_cpu_time", "cpu_time", "self_device_time", "device_time"]


@attrs.frozen
class ProfilerConfig:
    """Options of ``profiler``."""

    trace: bool = True
    """Record a trace of a few training steps (false: only throughput and memory)."""
    skip_steps: int = attrs.field(default=5, validator=at_least(0))
    """Training steps to let pass before profiling starts."""
    warmup_steps: int = attrs.field(default=1, validator=at_least(0))
    """Steps traced but discarded (the profiler's own start-up cost)."""
    active_steps: int = attrs.field(default=5, validator=at_least(1))
    """Steps recorded in the trace."""
    record_shapes: bool = True
    """Record operator input shapes."""
    profile_memory: bool = True
    """Record tensor allocations."""
    with_stack: bool = False
    """Record Python stacks (larger traces, more overhead)."""
    log_dir: str | None = None
    """Folder for the trace; default: the run directory (``runs/<timestamp>``)."""
    top_operators: int = attrs.field(default=15, validator=at_least(0))
    """Operators in the printed and saved table (0: print nothing)."""
    sort_by: SortKey = "auto"
    """Table order; ``auto`` is self device time on CUDA, self CPU time otherwise."""
    batch_size: int | None = attrs.field(default=None, validator=at_least(1))
    """Samples per batch, for samples/s (default: ``hyperparameters.batch_size``)."""
    log_interval: int | None = attrs.field(default=1, validator=at_least(1))
    """Log throughput and memory every this many epochs (null: never)."""


@attrs.frozen
class OperatorStats:
    """One row of the top-operators table (times in microseconds)."""

    name: str
    calls: int
    self_cpu_time: float
    cpu_time: float
    self_device_time: float
    device_time: float
    self_cpu_memory: int


def _operator_stats(prof: profile) -> list[OperatorStats]:
    # ProfilerStep#N rows are the steps themselves, not operators.
    return [
        OperatorStats(
            name=str(event.key),
            calls=int(event.count),
            self_cpu_time=float(event.self_cpu_time_total),
            cpu_time=float(event.cpu_time_total),
            self_device_time=float(event.self_device_time_total),
            device_time=float(event.device_time_total),
            self_cpu_memory=int(event.self_cpu_memory_usage),
        )
        for event in prof.key_averages()
        if not str(event.key).startswith("ProfilerStep")
    ]


def render_table(rows: list[OperatorStats]) -> str:
    """The top operators as a fixed-width text table (times in milliseconds)."""
    width = max([len("operator"), *(len(r.name) for r in rows)])
    width = min(width, 60)
    header = (
        f"{'operator':<{width}}  {'calls':>7}  {'self CPU ms':>11}  {'CPU ms':>9}"
        f"  {'self dev ms':>11}  {'dev ms':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        name = r.name if len(r.name) <= width else r.name[: width - 1] + "…"
        lines.append(
            f"{name:<{width}}  {r.calls:>7}  {r.self_cpu_time / 1e3:>11.3f}"
            f"  {r.cpu_time / 1e3:>9.3f}  {r.self_device_time / 1e3:>11.3f}"
            f"  {r.device_time / 1e3:>9.3f}"
        )
    return "\n".join(lines)


def peak_memory(device: torch.device | None) -> tuple[int | None, str]:
    """Peak memory in bytes and what it measures."""
    import torch

    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return int(peak if sys.platform == "darwin" else peak * 1024), "process_max_rss"


class Profiler:
    """Traces a few training steps with ``torch.profiler``; per-epoch throughput and memory.

    The trace is recorded and written on rank 0 only; throughput and peak memory are
    measured on every rank (each rank's own) and published in ``context.extra``.
    """

    Config = ProfilerConfig

    needs_training_process = (
        "torch's profiler and the memory it reports are the training process's"
    )
    """``"isolation": "process"`` is refused: it measures the training process itself."""

    def __init__(self, config: ProfilerConfig | None = None) -> None:
        self.name = "profiler"
        self.config = config or ProfilerConfig()
        self.trace_path: Path | None = None
        """The trace file, once written."""
        self.top: list[OperatorStats] = []
        """The top operators of the trace, once written."""
        self._profile: profile | None = None
        self._finished = False
        self._directory: Path | None = None
        self._device: torch.device | None = None
        self._loop_started = 0.0
        # The per-batch hook exists only when tracing, so that with `trace: false` the
        # loop makes no call into this plugin per batch.
        if self.config.trace:
            self.end_training_batch = self._advance

    end_training_batch: Callable[[PluginContext], None]
    """Advances the profiler's schedule; present only with ``trace``."""

    # -- the trace ------------------------------------------------------------------------

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Start the profiler (idle until ``skip_steps`` have passed), on rank 0."""
        self._device = context.device
        if not self.config.trace or not context.is_main_process:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        config = self.config
        self._directory = run_directory(context, config.log_dir)
        activities = [ProfilerActivity.CPU]
        if self._on_cuda():
            activities.append(ProfilerActivity.CUDA)
        self._profile = profile(
            activities=activities,
            schedule=schedule(
                skip_first=config.skip_steps,
                wait=0,
                warmup=config.warmup_steps,
                active=config.active_steps,
                repeat=1,
            ),
            on_trace_ready=self._trace_ready,
            record_shapes=config.record_shapes,
            profile_memory=config.profile_memory,
            with_stack=config.with_stack,
        )
        self._profile.start()

    def _advance(self, context: PluginContext) -> None:
        """Advance the profiler's schedule; stop it once the trace is written."""
        prof = self._profile
        if prof is None:
            return
        if self._finished:
            self._profile = None
            prof.stop()
            context.extra.setdefault("profiler", {})["trace"] = str(self.trace_path)
            return
        prof.step()

    def _trace_ready(self, prof: profile) -> None:
        assert self._directory is not None
        self._finished = True
        path = self._directory / TRACE_FILE
        prof.export_chrome_trace(str(path))
        self.trace_path = path
        rows = _operator_stats(prof)
        rows.sort(key=self._sort_key(), reverse=True)
        self.top = rows[: self.config.top_operators]
        table = render_table(self.top)
        (self._directory / TOP_OPERATORS_FILE).write_text(table + "\n", encoding="utf-8")
        if self.top:
            print(f"\nprofiler: top operators ({path})\n{table}\n", file=sys.stderr)
        self.logger.info(
            "profiler_trace_written",
            path=str(path),
            top_operators=[row.name for row in self.top[:5]],
        )

    def _sort_key(self) -> Any:
        key = self.config.sort_by
        if key == "auto":
            key = "self_device_time" if self._on_cuda() else "self_cpu_time"
        return lambda row: getattr(row, key)

    def _on_cuda(self) -> bool:
        return self._device is not None and self._device.type == "cuda"

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """Write the trace if training ended while steps were still being recorded."""
        self._stop()
        if self.trace_path is not None:
            context.extra.setdefault("profiler", {})["trace"] = str(self.trace_path)
        elif self.config.trace and context.is_main_process:
            needed = self.config.skip_steps + self.config.warmup_steps + 1
            self.logger.warning(
                "profiler_no_trace",
                hint=f"training took fewer than {needed} steps; lower skip_steps",
            )

    @hook
    def on_exception(self, context: PluginContext) -> None:
        """Stop the profiler (whatever it recorded is written)."""
        self._stop()

    def _stop(self) -> None:
        prof, self._profile = self._profile, None
        if prof is not None:
            prof.stop()

    # -- throughput and memory ------------------------------------------------------------

    def _synchronize(self) -> None:
        if self._on_cuda():
            import torch

            torch.cuda.synchronize(self._device)

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Reset CUDA's peak-memory counter for the epoch."""
        if self._on_cuda():
            import torch

            torch.cuda.reset_peak_memory_stats(self._device)

    @hook
    def start_training_loop(self, context: PluginContext) -> None:
        """Start timing the training loop."""
        self._synchronize()
        self._loop_started = time.perf_counter()

    @hook
    def end_training_loop(self, context: PluginContext) -> None:
        """Publish the epoch's throughput and peak memory so far."""
        self._synchronize()
        seconds = time.perf_counter() - self._loop_started
        batches = context.training_batch_count
        batch_size = self._batch_size(context)
        # The loop counts samples exactly (last partial batch included); a configured
        # batch size is the fallback for inputs whose first dimension is not the batch.
        samples = context.training_sample_count or (
            batches * batch_size if batch_size is not None else None
        )
        stats: dict[str, Any] = {
            "epoch": context.epoch,
            "seconds": seconds,
            "batches_per_second": batches / seconds if seconds > 0 else None,
            "samples_per_second": (
                samples / seconds if samples is not None and seconds > 0 else None
            ),
            "batch_size": batch_size,
        }
        previous = context.extra.get("profiler")
        if isinstance(previous, dict) and "trace" in previous:
            stats["trace"] = previous["trace"]
        context.extra["profiler"] = stats
        self._publish_memory(context)
        scalars = context.extra.setdefault(EXTRA_SCALARS_KEY, {})
        for key in ("batches_per_second", "samples_per_second"):
            if stats[key] is not None:
                scalars[f"perf/{key}"] = stats[key]

    @hook
    def end_validation_loop(self, context: PluginContext) -> None:
        """Include validation in the epoch's peak memory."""
        self._publish_memory(context)

    def _publish_memory(self, context: PluginContext) -> None:
        stats = context.extra.get("profiler")
        if not isinstance(stats, dict):
            return
        peak, kind = peak_memory(self._device)
        stats["peak_memory_bytes"] = peak
        stats["memory"] = kind
        if peak is not None:
            context.extra.setdefault(EXTRA_SCALARS_KEY, {})["perf/peak_memory_mb"] = peak / 2**20

    def _batch_size(self, context: PluginContext) -> int | None:
        if self.config.batch_size is not None:
            return self.config.batch_size
        declared = context.hyperparameters.get("batch_size")
        if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
            return declared
        return None

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """Log the epoch's numbers every ``log_interval`` epochs (rank 0)."""
        interval = self.config.log_interval
        if interval is None or not context.is_main_process or (context.epoch + 1) % interval:
            return
        stats = context.extra.get("profiler")
        if isinstance(stats, dict):
            self.logger.info("profiler_epoch", **stats)

    @property
    def logger(self) -> FilteringBoundLogger:
        """Events carry ``plugin=<name>`` and follow the host's logging set-up."""
        return plugin_logger(self)


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as Profiler(ProfilerConfig(**options)).
_: ConfiguredPluginClass[ProfilerConfig] = Profiler
