"""The training loop.

Hook order for one run (``[...]`` only when there is validation data)::

    start_training_session
    for each epoch:
        start_epoch
        start_training_loop
        for each batch: start_training_batch, (forward, loss, backward)
                        after_backward, before_optimizer_step, (step), end_training_batch
        end_training_loop            # training_metrics are set
        [start_validation_loop
         for each batch: start_validation_batch, (forward, loss), end_validation_batch
         end_validation_loop]        # validation_metrics are set
        end_epoch                    # stop requests are read after this hook
        [save_checkpoint]            # every checkpoint_interval epochs, and the last
    end_training_session
    on_exception                     # instead of the rest, when training fails

When resuming, ``load_checkpoint`` follows ``start_training_session``. On Ctrl-C (or
SIGTERM) the loop finishes the step, writes a checkpoint (``save_checkpoint``), then calls
``on_exception`` and ``end_training_session`` and raises :class:`TrainingInterrupted`.

The loop owns every counter and the loss sums. Before hooks run it copies them into
the context, so what a plugin writes there never changes what the loop does next.
Nothing here reads a device value back to the host per batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import math
import os
import random
import signal
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import structlog
import torch
from torch.nn.parallel import DistributedDataParallel

from bz._checkpoint import (
    FINAL_MODEL,
    CheckpointStore,
    atomic_save,
    capture_rng,
    checkpoint_name,
    guarded,
    list_checkpoints,
    loadable_problem,
    loader_generators,
    read_final_model,
    read_latest,
    remove_stray_files,
    restore_rng,
    run_signature,
)
from bz._checkpoint import (
    FORMAT as CHECKPOINT_FORMAT,
)
from bz._context import DeviceSum, PluginContext
from bz._distributed import (
    choose_backend,
    control_group,
    join,
    leave,
    local_device,
    set_epoch,
    shard_loader,
    sum_across,
    topology_from_env,
    vote_across,
)
from bz._errors import BzError, TrainingError, UsageError
from bz._loader import plugin_set
from bz._plugin import StatefulPlugin
from bz._sandbox import PluginFailure, PluginReport, PluginSet, describe_exception
from bz._setup import user_frame
from bz.config import RunConfig

if TYPE_CHECKING:
    from types import FrameType

    from bz._plugin import NamedPlugin
    from bz._setup import TrainingSetup
    from bz.metrics import Metric

_log = structlog.get_logger("bz")


@attrs.frozen
class EpochRecord:
    """What one epoch produced."""

    epoch: int
    training_loss: float
    validation_loss: float | None
    training_metrics: dict[str, float]
    validation_metrics: dict[str, float]
    seconds: float


@attrs.frozen
class FitResult:
    """The outcome of :meth:`Trainer.fit`.

    ``epochs_completed`` counts the run's epochs, resumed ones included; ``history``
    holds only the epochs this call trained.
    """

    epochs_completed: int
    global_step: int
    stopped_early: bool
    history: tuple[EpochRecord, ...]
    plugins: tuple[PluginReport, ...]
    seconds: float
    resumed_from: Path | None = None
    """The checkpoint this call resumed from (None for a fresh start)."""
    checkpoint: Path | None = None
    """The newest checkpoint written (or, when already complete, read) by this call."""
    already_complete: bool = False
    """The run had already finished when this call resumed it; nothing was trained."""
    model: Path | None = None
    """The file with the weights the run ended with (``model.pt`` beside the checkpoints;
    None when checkpoints are off, the run did not finish, or the write failed)."""

    @property
    def final(self) -> EpochRecord | None:
        """The last completed epoch."""
        return self.history[-1] if self.history else None


def resolve_device(name: str) -> torch.device:
    """The device ``RunConfig.device`` names; ``auto`` prefers CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UsageError(
                f"device {name!r} requested but this machine has {count} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r} requested but MPS is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(item, device) for item in batch)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch


def _unpack(batch: Any, loader: str) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise UsageError(
        f"{loader} yielded {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "; bz expects (inputs, targets) pairs"
    )


def _batch_size(inputs: Any) -> int:
    """Samples in a batch's inputs: the first dimension (shape metadata, no sync)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.ndim else 1
    if isinstance(inputs, Mapping):
        return next((_batch_size(v) for v in inputs.values()), 0)
    if isinstance(inputs, (list, tuple)) and inputs:
        return _batch_size(inputs[0])
    return 0


def _length(loader: Iterable[Any] | None) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]  # loaders may or may not have a length
    except TypeError:
        return None


class _Metrics:
    """The metrics of one loop (training or validation): update per batch, compute once."""

    def __init__(self, metrics: Mapping[str, Metric]) -> None:
        self._metrics = dict(metrics)
        self._items = tuple(self._metrics.values())
        self.active = bool(self._items)
        self._carried: dict[str, list[torch.Tensor]] = {}

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        for metric in self._items:
            metric.update(outputs, targets)

    def compute(self) -> dict[str, float]:
        """One host read for all metrics together (merged over processes first)."""
        if not self._metrics:
            return {}
        from bz.metrics import compute_all

        self.reduce()
        return compute_all(self._metrics)

    def reset(self) -> None:
        self._carried = {}
        for metric in self._items:
            metric.reset()

    def reduce(self) -> None:
        """Merge every metric's state over the processes, in place."""
        from bz.metrics import reduce_across_processes

        self._merge_carried()
        for metric in self._items:
            reduce_across_processes(metric)

    def state(self) -> dict[str, list[torch.Tensor]]:
        """Copies (on the host) of the state of every mergeable metric, for a checkpoint."""
        from bz.metrics import MergeableMetric

        self._merge_carried()  # an epoch resumed once and interrupted again
        return {
            name: [tensor.detach().cpu().clone() for tensor in metric.state_tensors()]
            for name, metric in self._metrics.items()
            if isinstance(metric, MergeableMetric)
        }

    def carry(self, saved: Mapping[str, Sequence[torch.Tensor]]) -> None:
        """Add ``saved`` (from :meth:`state`) into the state before the next ``compute``.

        Mergeable state merges by element-wise sum, so the batches of an interrupted
        epoch and those after its resume add up to what the whole epoch would have.
        """
        self._carried = {name: list(tensors) for name, tensors in saved.items() if tensors}

    def _merge_carried(self) -> None:
        from bz.metrics import MergeableMetric

        carried, self._carried = self._carried, {}
        for name, saved in carried.items():
            metric = self._metrics.get(name)
            if not isinstance(metric, MergeableMetric):
                continue
            state = metric.state_tensors()
            if not state:  # no batch since the resume: the metric starts from nothing
                continue
            if [t.shape for t in state] != [t.shape for t in saved]:
                _log.warning(
                    "metric_state_not_resumed",
                    metric=name,
                    hint="its state changed shape; the epoch's value covers the batches "
                    "after the resume only",
                )
                continue
            for tensor, part in zip(state, saved, strict=True):
                tensor.add_(part.to(device=tensor.device, dtype=tensor.dtype))

    def to(self, device: torch.device) -> None:
        for metric in self._items:
            move = getattr(metric, "to", None)
            if callable(move):
                move(device)


class _InterruptVote:
    """How several processes stop after the same step when one of them is interrupted.

    Every few steps they take a vote, on a CPU group (see ``control_group``): was any
    of them interrupted, and how long do steps take. Every process gets the same answer,
    so all stop after the same step and all count the same number of steps to the next
    vote: about ``INTERVAL_S`` seconds of training. A vote takes 0.5-0.7 ms between two
    CPU processes on a 2-core machine (``benchmarks/distributed.py``), so the loop spends
    under 1% on them
    and honours Ctrl-C within about a tenth of a second (plus a step), far inside the
    30 s torchrun gives processes before it kills them.
    """

    INTERVAL_S = 0.1

    def __init__(self, group: Any) -> None:
        self.group = group
        self.period = 1  # the first vote comes after one step and measures it
        self.countdown = 1
        self.since = 0.0

    def start_epoch(self) -> None:
        self.countdown = self.period
        self.since = time.perf_counter()

    def due(self) -> bool:
        self.countdown -= 1
        return self.countdown == 0

    def __call__(self, interrupted: bool) -> bool:
        """Whether any process was interrupted (call when :meth:`due`)."""
        now = time.perf_counter()
        anyone, step_seconds = vote_across(
            interrupted, (now - self.since) / self.period, self.group
        )
        self.period = max(1, min(1024, math.ceil(self.INTERVAL_S / max(step_seconds, 1e-6))))
        self.countdown, self.since = self.period, now
        return anyone


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped training cleanly: the step finished and a checkpoint
    was written.

    ``checkpoint`` is the file training resumes from (None when checkpoints are off or
    the write failed); ``signal`` is the signal that asked for the stop (on the other
    processes of a distributed run, the one the asking process got, else SIGINT). It is
    a ``KeyboardInterrupt``, so code that handles Ctrl-C handles it.
    """

    def __init__(self, checkpoint: Path | None, signal_number: int = signal.SIGINT.value) -> None:
        super().__init__("training interrupted")
        self.checkpoint = checkpoint
        self.signal = signal.Signals(signal_number)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _InterruptGuard:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request the loop honours after
    the step.

    SIGTERM is what job schedulers, ``kill`` and torchrun's launcher send before they
    resort to SIGKILL. Installed only while ``fit`` runs and only in the main thread
    (the one Python delivers signals to); the previous handlers are put back afterwards.
    A second signal raises ``KeyboardInterrupt`` at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal: int = signal.SIGINT.value
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for number in _STOP_SIGNALS:
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum
        _log.warning(
            "interrupt_requested",
            signal=signal.Signals(signum).name,
            hint="finishing the current step and writing a checkpoint; "
            "press Ctrl-C again to stop at once",
        )


@attrs.define
class _Pending:
    """How the next training loop starts: random states and batches already done."""

    epoch_start: dict[str, Any]
    """Random states right before the loop's ``iter(train_loader)``."""
    now: dict[str, Any]
    """Random states after the last finished step (differs only mid-epoch)."""
    batch: int = 0
    loss_total: float = 0.0
    samples: int = 0
    metrics: Mapping[str, Sequence[torch.Tensor]] = attrs.Factory(dict)
    """Training-metric state of the batches already done (see ``_Metrics.carry``)."""


class Trainer:
    """Trains a :class:`~bz.TrainingSetup` with plugins; what ``bz train`` runs.

    ::

        result = Trainer().fit(setup, RunConfig(epochs=5), plugins=[MyPlugin()])

    ``plugins`` are plugin objects (or a :class:`PluginSet` from the loader). Every call
    into them goes through the sandbox with ``config.plugin_errors`` as the policy.
    """

    def fit(
        self,
        setup: TrainingSetup,
        config: RunConfig | None = None,
        plugins: Sequence[NamedPlugin] | PluginSet = (),
        *,
        metrics: Mapping[str, Metric] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> FitResult:
        """Train for ``config.epochs`` epochs (or until a plugin asks to stop).

        ``metrics`` overrides the metrics built from ``config.metrics``; the setup's own
        ``metrics`` are always added.

        ``checkpoint_dir`` turns checkpoints on: the run's files go to
        ``<checkpoint_dir>/<signature>/`` every ``config.checkpoint_interval`` epochs,
        and with ``config.resume`` training continues from the newest one (``bz train``
        passes ``checkpoint_dir`` from the config; in code it is off unless given).
        Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and raises
        :class:`TrainingInterrupted`.
        """
        config = config or RunConfig()
        if not isinstance(plugins, PluginSet):
            plugins = plugin_set(list(plugins), config.plugin_errors)
        if metrics is None:
            from bz.metrics import build_metrics

            metrics = build_metrics(config.metrics)
        if config.seed is not None:
            seed_everything(config.seed)
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        run = _Run(setup, config, plugins, {**metrics, **setup.metrics}, folder)
        return run.fit()


class _Run:
    """One call of ``fit``: the loop's own state lives here."""

    def __init__(
        self,
        setup: TrainingSetup,
        config: RunConfig,
        plugins: PluginSet,
        metrics: Mapping[str, Metric],
        checkpoint_root: Path | None = None,
    ) -> None:
        self.setup = setup
        self.config = config
        self.plugins = plugins
        self.topology = topology_from_env()
        self.device = local_device(resolve_device(config.device), self.topology)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = choose_backend(config.distributed.backend, self.device)
        self.owns_process_group = join(self.topology, backend, config.distributed.timeout)
        plugins.for_rank(self.topology.rank)
        seed = config.seed or 0
        self.train_loader = shard_loader(setup.train_loader, self.topology, seed, training=True)
        self.val_loader = (
            None
            if setup.val_loader is None
            else shard_loader(setup.val_loader, self.topology, seed, training=False)
        )
        # The signature describes the run as train.py built it, before any training.
        uses_checkpoints = checkpoint_root is not None and (
            config.checkpoint_interval > 0 or config.resume
        )
        self.signature = run_signature(setup, config) if uses_checkpoints else ""
        self.store = (
            CheckpointStore(checkpoint_root / self.signature, config.keep_last)
            if checkpoint_root is not None and uses_checkpoints
            else None
        )
        self.model = setup.model.to(self.device)
        self.forward: torch.nn.Module = self.model
        if self.topology.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.forward = self._compile(self.forward)
        self.train_metrics = _Metrics(metrics)
        self.val_metrics = _Metrics({name: copy.deepcopy(m) for name, m in metrics.items()})
        self.train_metrics.to(self.device)
        self.val_metrics.to(self.device)
        self.move_batches = self.device.type != "cpu"
        self.generators = loader_generators(self.train_loader)
        self.interrupt = _InterruptGuard()
        # Alone, Ctrl-C stops after the current step. Several processes must stop after
        # the same step: they vote on it every few steps.
        self.vote = _InterruptVote(control_group(backend)) if self.topology.distributed else None
        # Loop state (the context only ever shows copies of these).
        self.start_epoch = 0
        self.epoch = 0
        self.global_step = 0
        self.batch_index = 0
        self.train_batches = 0
        self.train_samples = 0
        self.val_batches = 0
        self.train_loss = DeviceSum()
        self.val_loss = DeviceSum()
        self.pending: _Pending | None = None
        self.epoch_rng: dict[str, Any] | None = None
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self.final_model: Path | None = None
        # A run started over (resume: false) replaces the old checkpoints of the same
        # signature once it has one of its own; until then they stay.
        self.discard_old_checkpoints = not config.resume
        self.context = PluginContext(
            model=setup.model,
            optimizer=setup.optimizer,
            device=self.device,
            hyperparameters=config.hyperparameters,
            epochs=config.epochs,
            rank=self.topology.rank,
            world_size=self.topology.world_size,
        )
        self.context.scheduler = setup.scheduler
        self.context.run_config = config
        self.context.training_batches_per_epoch = _length(self.train_loader)
        self.context.validation_batches_per_epoch = _length(self.val_loader)

    @staticmethod
    def _compile(model: torch.nn.Module) -> torch.nn.Module:
        compiled: torch.nn.Module = torch.compile(model)  # type: ignore[assignment]  # compile returns a callable wrapper typed loosely
        return compiled

    # -- context ---------------------------------------------------------------------

    def _show(self) -> PluginContext:
        """Copy the loop's state into the context (undoing any plugin's scribbles)."""
        ctx = self.context
        ctx.epoch = self.epoch
        ctx.global_step = self.global_step
        ctx.batch_index = self.batch_index
        ctx.training_batch_count = self.train_batches
        ctx.training_sample_count = self.train_samples
        ctx.validation_batch_count = self.val_batches
        ctx._training_loss = self.train_loss
        ctx._validation_loss = self.val_loss
        return ctx

    def _hook(self, hook: str) -> None:
        # The context is refreshed only when someone will look at it.
        if self.plugins.implements(hook):
            self.plugins.call(hook, self._show())

    def _checkpoint_hook(self, hook: str, path: Path) -> None:
        self.context.checkpoint_path = path
        try:
            self._hook(hook)
        finally:
            self.context.checkpoint_path = None

    # -- the run ---------------------------------------------------------------------

    def fit(self) -> FitResult:
        try:
            return self._fit()
        finally:
            self._leave()

    def _leave(self) -> None:
        """Drop the DDP wrapper, then the process group, in that order.

        DDP's reducer holds a reference to the process group and torch frees the reducer
        without releasing the GIL. If the reducer held the last reference, the gloo
        group's destructor would join worker threads that need the GIL to free their
        last tensors: a deadlock at exit (5 runs in 37 on a loaded 2-core machine).
        Freed first, the reducer leaves the group to ``destroy_process_group``, which
        releases the GIL while it waits.
        """
        if self.forward is not self.model:
            wrapper = weakref.ref(self.forward)
            self.forward = self.model
            # Only if a reference cycle keeps it: a full collection costs ~0.2 s here.
            if wrapper() is not None:
                gc.collect()
        leave(self.owns_process_group)

    def _fit(self) -> FitResult:
        started = time.perf_counter()
        found = self._find_checkpoint()
        if found is not None and self._is_complete(found[1]):
            return self._already_complete(*found, started)
        history: list[EpochRecord] = []
        stopped_early = False
        self.context.extra["active_plugins"] = self.plugins.active_names
        with self.interrupt:
            try:
                self._hook("start_training_session")
                if found is not None:
                    self._resume(*found)
                for epoch in range(self.start_epoch, self.config.epochs):
                    self.epoch = epoch
                    record = self._epoch()
                    if record is None:  # Ctrl-C in the middle of the epoch
                        self._save(epoch, self.train_batches)
                        self._stop_interrupted()
                    history.append(record)
                    self._log_epoch(record)
                    stop, interrupted = self._agree(
                        self.context.should_stop_training, self.interrupt.requested
                    )
                    done = epoch + 1
                    if stop or done == self.config.epochs or self._due(done):
                        self._save(done, 0, stopped=stop)
                    elif interrupted:
                        self._save(done, 0)
                    if interrupted:
                        self._stop_interrupted()
                    if stop:
                        stopped_early = done < self.config.epochs
                        _log.info("stop_requested", epoch=epoch, step=self.global_step)
                        break
                self.context.extra["plugin_reports"] = self._plugin_reports()
                self._hook("end_training_session")
                self._save_final_model(self.start_epoch + len(history))
            except TrainingInterrupted:
                raise
            except PluginFailure as exc:
                self._fail_session(exc)
                raise
            except (KeyboardInterrupt, BzError) as exc:
                self._fail_session(exc)
                raise
            except Exception as exc:
                self._fail_session(exc)
                raise TrainingError(
                    f"training failed at epoch {self.epoch}, step {self.global_step}: "
                    f"{user_frame(exc)}"
                ) from exc
        self.plugins.log_summary()
        return FitResult(
            epochs_completed=self.start_epoch + len(history),
            global_step=self.global_step,
            stopped_early=stopped_early,
            history=tuple(history),
            plugins=tuple(self.plugins.report()),
            seconds=time.perf_counter() - started,
            resumed_from=self.resumed_from,
            checkpoint=self.last_checkpoint,
            model=self.final_model,
        )

    def _plugin_reports(self) -> dict[str, dict[str, Any]]:
        """Time and faults per plugin so far, for plugins that summarise the run."""
        return {
            report.name: {
                "calls": report.calls,
                "seconds": report.seconds,
                "fault": report.fault.describe() if report.fault else None,
            }
            for report in self.plugins.report()
        }

    def _agree(self, stop: bool, interrupted: bool) -> tuple[bool, bool]:
        """Every process's verdict at the end of an epoch: stop if any rank asks to, and
        quarantine on every rank the plugins any rank quarantined (one collective)."""
        if not self.topology.distributed:
            return stop, interrupted
        plugins = self.plugins
        mask = [0.0] * len(plugins)
        for index in plugins.faulted_slots():
            mask[index] = 1.0
        summed = sum_across([float(stop), float(interrupted), *mask], self.device)
        plugins.quarantine_slots({i for i, v in enumerate(summed[2:]) if v > 0}, self._show())
        return summed[0] > 0, summed[1] > 0

    def _log_epoch(self, record: EpochRecord) -> None:
        _log.info(
            "epoch_finished",
            epoch=record.epoch,
            step=self.global_step,
            training_loss=record.training_loss,
            validation_loss=record.validation_loss,
            training_metrics=record.training_metrics,
            validation_metrics=record.validation_metrics,
            seconds=round(record.seconds, 6),
        )

    def _fail_session(self, exc: BaseException | None = None) -> None:
        self.context.exception = exc
        # Plugins get to flush what they hold; the sandbox still guards them, but with
        # "raise" a second plugin fault must not hide the first error.
        with self._isolated():
            self._hook("on_exception")
        self.plugins.log_summary()

    def _stop_interrupted(self) -> NoReturn:
        interrupted = TrainingInterrupted(self.last_checkpoint, self.interrupt.signal)
        self.context.exception = interrupted
        with self._isolated():
            self._hook("on_exception")
            self._hook("end_training_session")
        self.plugins.log_summary()
        _log.warning(
            "training_interrupted",
            epoch=self.epoch,
            step=self.global_step,
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
        )
        raise interrupted

    @contextlib.contextmanager
    def _isolated(self) -> Iterator[None]:
        policy = self.plugins.policy
        self.plugins.policy = "isolate"
        try:
            yield
        finally:
            self.plugins.policy = policy

    def _epoch(self) -> EpochRecord | None:
        """One epoch; None when Ctrl-C stopped it after a training step."""
        started = time.perf_counter()
        ctx = self.context
        ctx.extra["active_plugins"] = self.plugins.active_names
        ctx.training_metrics = {}
        ctx.validation_metrics = {}
        self.train_batches = self.val_batches = self.batch_index = self.train_samples = 0
        self.train_loss = DeviceSum()
        self.val_loss = DeviceSum()
        self._hook("start_epoch")
        if not self._train_loop():
            return None
        validated = self.val_loader is not None
        if validated:
            self._validation_loop()
        self._step_scheduler(validated)
        self._hook("end_epoch")
        # The next epoch starts from the random state of this moment, whether or not a
        # checkpoint records it, so what plugins draw between epochs, and whether the
        # run was resumed here, never changes the batches or dropout masks that follow.
        now = capture_rng(self.generators)
        self.pending = _Pending(now, now)
        return EpochRecord(
            epoch=self.epoch,
            training_loss=_mean(self.train_loss, self.train_batches),
            validation_loss=_mean(self.val_loss, self.val_batches) if validated else None,
            training_metrics=dict(ctx.training_metrics),
            validation_metrics=dict(ctx.validation_metrics),
            seconds=time.perf_counter() - started,
        )

    def _train_loop(self) -> bool:
        """The training batches of one epoch; False when Ctrl-C stopped it early."""
        metrics, hook, step = self.train_metrics, self._hook, self._step
        interrupt, batches = self.interrupt, self.context.training_batches_per_epoch
        vote = self.vote
        self.model.train()
        metrics.reset()
        self._hook("start_training_loop")
        iterator, skipped = self._batches()
        if vote is not None:
            vote.start_epoch()
        for index, batch in enumerate(iterator, start=skipped):
            self.batch_index = index
            hook("start_training_batch")
            step(batch)
            hook("end_training_batch")
            # After the last batch the epoch finishes normally and stops at its end.
            if vote is None:
                if interrupt.requested and index + 1 != batches:
                    return False
            elif vote.due() and index + 1 != batches and vote(interrupt.requested):
                return False
        if vote is not None:
            total, batch_count, samples = sum_across(
                [self.train_loss.value(), float(self.train_batches), float(self.train_samples)],
                self.device,
            )
            self.train_loss = DeviceSum(total)
            self.train_batches, self.train_samples = int(batch_count), int(samples)
        self.context.training_metrics = metrics.compute()
        self._hook("end_training_loop")
        return True

    def _batches(self) -> tuple[Iterator[Any], int]:
        """The training iterator, positioned where a resumed epoch left off."""
        pending, self.pending = self.pending, None
        if pending is not None:
            restore_rng(pending.epoch_start, self.generators)
        # Needed only to write a checkpoint in the middle of this epoch.
        self.epoch_rng = capture_rng(self.generators) if self.store is not None else None
        set_epoch(self.train_loader, self.epoch)
        iterator = iter(self.train_loader)
        if pending is None or pending.batch == 0:
            return iterator, 0
        # Creating the iterator and drawing the batches already trained on consumes
        # the loader's random state exactly as the interrupted run did; the step's
        # own random state (dropout, augmentation) is then put back as it was.
        for _ in range(pending.batch):
            next(iterator, None)
        restore_rng(pending.now, self.generators)
        self.train_batches = pending.batch
        self.train_samples = pending.samples
        self.train_loss = DeviceSum(pending.loss_total)
        self.train_metrics.carry(pending.metrics)
        return iterator, pending.batch

    def _step(self, batch: Any) -> None:
        # A method of its own so that the batch, outputs and graph die when it returns
        # instead of living in the loop's frame until the next batch replaces them.
        setup, hook = self.setup, self._hook
        if self.move_batches:
            batch = _to_device(batch, self.device)
        inputs, targets = _unpack(batch, "train_loader")
        self.train_samples += _batch_size(inputs)
        setup.optimizer.zero_grad(set_to_none=True)
        outputs = self.forward(inputs)
        loss = setup.loss_fn(outputs, targets)
        # torch.autograd.backward is what Tensor.backward calls (and it is typed).
        torch.autograd.backward(loss)
        hook("after_backward")
        hook("before_optimizer_step")
        setup.optimizer.step()
        detached = loss.detach()
        self.train_loss.add(detached)
        if self.train_metrics.active:
            self.train_metrics.update(outputs.detach(), targets)
        self.global_step += 1
        self.train_batches += 1
        self.context.last_loss = detached

    def _validation_loop(self) -> None:
        assert self.val_loader is not None
        metrics, hook, step = self.val_metrics, self._hook, self._validation_step
        self.model.eval()
        metrics.reset()
        self.batch_index = 0
        self._hook("start_validation_loop")
        with torch.no_grad():
            for index, batch in enumerate(self.val_loader):
                self.batch_index = index
                hook("start_validation_batch")
                step(batch)
                hook("end_validation_batch")
        self.val_loss, self.val_batches = self._global(self.val_loss, self.val_batches)
        self.context.validation_metrics = metrics.compute()
        self._hook("end_validation_loop")

    def _validation_step(self, batch: Any) -> None:
        # Its own frame, like _step: outputs die before the next batch is fetched.
        if self.move_batches:
            batch = _to_device(batch, self.device)
        inputs, targets = _unpack(batch, "val_loader")
        outputs = self.forward(inputs)
        loss = self.setup.loss_fn(outputs, targets)
        self.val_loss.add(loss.detach())
        self.val_metrics.update(outputs, targets)
        self.val_batches += 1

    def _global(self, total: DeviceSum, count: int) -> tuple[DeviceSum, int]:
        """A loop's loss sum and batch count over all processes (so plugins see global
        numbers); unchanged when training alone."""
        if not self.topology.distributed:
            return total, count
        summed, batches = sum_across([total.value(), float(count)], self.device)
        return DeviceSum(summed), int(batches)

    def _step_scheduler(self, validated: bool) -> None:
        scheduler = self.setup.scheduler
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            loss = self.val_loss if validated else self.train_loss
            count = self.val_batches if validated else self.train_batches
            scheduler.step(_mean(loss, count))
        else:
            scheduler.step()

    # -- checkpoints -----------------------------------------------------------------

    def _due(self, epochs_done: int) -> bool:
        interval = self.config.checkpoint_interval
        return interval > 0 and epochs_done % interval == 0

    def _find_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        store = self.store
        if store is None:
            return None
        if self.topology.is_main:  # the only writer; others must not race it
            remove_stray_files(store.folder)
        if not self.config.resume:
            return None
        found = read_latest(store.folder, self.signature)
        if found is None and list_checkpoints(store.folder):
            _log.warning(
                "resume_failed",
                folder=str(store.folder),
                hint="no checkpoint there could be read; training starts from scratch",
            )
        return found

    def _is_complete(self, payload: Mapping[str, Any]) -> bool:
        return bool(payload.get("stopped")) or (
            payload["epoch"] >= self.config.epochs
            and (payload["batch"] == 0 or payload["epoch"] > self.config.epochs)
        )

    def _already_complete(
        self, path: Path, payload: Mapping[str, Any], started: float
    ) -> FitResult:
        # The caller still gets the trained model, as if this run had just trained it.
        self._restore_training_state(path, payload)
        assert self.store is not None  # a checkpoint was found in it
        final = read_final_model(self.store.folder, self.signature, int(payload["global_step"]))
        if final is not None:
            self.model.load_state_dict(final[1]["model"])
            self.final_model = final[0]
        _log.info(
            "already_complete",
            path=str(path),
            epoch=payload["epoch"],
            step=payload["global_step"],
            hint="this run has finished; raise epochs to train longer, "
            "or start over with --no-resume",
        )
        return FitResult(
            epochs_completed=payload["epoch"],
            global_step=payload["global_step"],
            stopped_early=bool(payload.get("stopped")) and payload["epoch"] < self.config.epochs,
            history=(),
            plugins=tuple(self.plugins.report()),
            seconds=time.perf_counter() - started,
            resumed_from=path,
            checkpoint=path,
            already_complete=True,
            model=self.final_model,
        )

    def _restore_training_state(self, path: Path, payload: Mapping[str, Any]) -> None:
        setup = self.setup
        try:
            self.model.load_state_dict(payload["model"])
            setup.optimizer.load_state_dict(payload["optimizer"])
            if payload.get("scheduler") is not None and hasattr(setup.scheduler, "state_dict"):
                setup.scheduler.load_state_dict(payload["scheduler"])
            if payload.get("loss") is not None and isinstance(setup.loss_fn, torch.nn.Module):
                setup.loss_fn.load_state_dict(payload["loss"])
        except Exception as exc:
            raise TrainingError(
                f"cannot resume from {path}: {describe_exception(exc)} "
                "(start over with --no-resume)"
            ) from exc

    def _resume(self, path: Path, payload: Mapping[str, Any]) -> None:
        self._restore_training_state(path, payload)
        self.start_epoch = self.epoch = int(payload["epoch"])
        self.global_step = int(payload["global_step"])
        rng = payload["rng"]
        batch = int(payload["batch"])
        saved_world = int(payload.get("world_size", 1))
        if batch and saved_world != self.topology.world_size:
            # Mid-epoch positions are per-process batch counts; with another number of
            # processes the interrupted epoch is run again in full from its start.
            _log.warning(
                "resume_world_size_changed",
                path=str(path),
                saved=saved_world,
                now=self.topology.world_size,
                hint="the interrupted epoch is trained again from its first batch",
            )
            batch = 0
        # The saved totals are over all processes: one process carries them on.
        carries = batch and self.topology.is_main
        self.pending = _Pending(
            rng["epoch_start"],
            rng["now"],
            batch,
            float(payload["loss_total"]) if carries else 0.0,
            # Checkpoints written before these were kept hold neither.
            int(payload.get("samples", 0)) if carries else 0,
            (payload.get("metrics") or {}) if carries else {},
        )
        states: Mapping[str, Any] = payload.get("plugins") or {}
        for plugin in self.plugins.active:
            if isinstance(plugin, StatefulPlugin) and plugin.name in states:
                restore = functools.partial(plugin.load_state_dict, states[plugin.name])
                guarded(self.plugins, plugin, "load_state_dict", self._show(), restore)
        self.resumed_from = path
        _log.info(
            "resumed",
            path=str(path),
            epoch=self.epoch,
            batch=int(payload["batch"]),
            step=self.global_step,
        )
        self._checkpoint_hook("load_checkpoint", path)

    def _save(self, epoch: int, batch: int, *, stopped: bool = False) -> None:
        """Write a checkpoint of ``epoch`` completed epochs plus ``batch`` batches."""
        store = self.store
        if store is None or self.config.checkpoint_interval == 0:
            return
        # Every process takes part in gathering the interrupted epoch's numbers.
        loss_total, samples, metric_state = self._partial_epoch() if batch else (0.0, 0, {})
        if not self.topology.is_main:
            return
        setup = self.setup
        now = capture_rng(self.generators)
        payload: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "signature": self.signature,
            "epoch": epoch,
            "batch": batch,
            "global_step": self.global_step,
            "world_size": self.topology.world_size,
            "stopped": stopped,
            "loss_total": loss_total,
            "samples": samples,
            "metrics": metric_state,
            "model": self.model.state_dict(),
            "optimizer": setup.optimizer.state_dict(),
            "scheduler": (
                setup.scheduler.state_dict() if hasattr(setup.scheduler, "state_dict") else None
            ),
            "loss": self._loss_state(),
            "rng": {"epoch_start": self.epoch_rng if batch else now, "now": now},
        }
        problem = loadable_problem(payload, "checkpoint")
        if problem is not None:
            _log.error("checkpoint_skipped", epoch=epoch, step=self.global_step, error=problem)
            return
        payload["plugins"] = self._plugin_states()
        try:
            path = store.save(payload, epoch, batch)
        except OSError as exc:
            # A full disk must not end a run that is otherwise fine; the previous
            # checkpoints are intact, and the next interval tries again.
            _log.error(
                "checkpoint_write_failed",
                path=str(store.folder / checkpoint_name(epoch, batch)),
                error=describe_exception(exc),
            )
            return
        if self.discard_old_checkpoints:
            self.discard_old_checkpoints = False
            discarded = store.discard_all_but(path)
            if discarded:
                _log.info("checkpoints_discarded", folder=str(store.folder), count=discarded)
        self.last_checkpoint = path
        _log.info("checkpoint_saved", path=str(path), epoch=epoch, step=self.global_step)
        self._checkpoint_hook("save_checkpoint", path)

    def _loss_state(self) -> dict[str, Any] | None:
        """The loss module's state (a loss function has none)."""
        loss_fn = self.setup.loss_fn
        return loss_fn.state_dict() if isinstance(loss_fn, torch.nn.Module) else None

    def _save_final_model(self, epochs: int) -> None:
        """Write the weights the run ended with (after ``end_training_session``)."""
        store = self.store
        if store is None or self.config.checkpoint_interval == 0 or not self.topology.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "signature": self.signature,
            "epoch": epochs,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "loss": self._loss_state(),
        }
        path = store.folder / FINAL_MODEL
        try:
            atomic_save(payload, path)
        except OSError as exc:  # the checkpoints hold the training state all the same
            _log.error("model_write_failed", path=str(path), error=describe_exception(exc))
            return
        self.final_model = path
        _log.info("model_saved", path=str(path), epoch=epochs, step=self.global_step)

    def _partial_epoch(self) -> tuple[float, int, dict[str, list[torch.Tensor]]]:
        """The interrupted epoch's loss sum, sample count and metric state so far, summed
        over the processes (a resumed run has rank 0 carry them)."""
        loss_total, samples = self.train_loss.value(), self.train_samples
        if self.topology.distributed:
            loss_total, summed_samples = sum_across([loss_total, float(samples)], self.device)
            samples = int(summed_samples)
            self.train_metrics.reduce()  # in place: this epoch goes no further
        return loss_total, samples, self.train_metrics.state()

    def _plugin_states(self) -> dict[str, Any]:
        states: dict[str, Any] = {}
        context = self._show()
        for plugin in self.plugins.active:
            if not isinstance(plugin, StatefulPlugin):
                continue
            read = functools.partial(_checked_state, plugin)
            state = guarded(self.plugins, plugin, "state_dict", context, read)
            if state is not None:
                states[plugin.name] = state
        return states


def _checked_state(plugin: StatefulPlugin) -> dict[str, Any]:
    state = plugin.state_dict()
    problem = loadable_problem(state, "state_dict()")
    if problem is not None:
        raise TypeError(problem)
    return state


@attrs.frozen
class Evaluation:
    """What ``bz validate`` reports: the validation loss and metrics of a model."""

    loss: float
    metrics: dict[str, float]
    batches: int


def evaluate(setup: TrainingSetup, config: RunConfig, metrics: Mapping[str, Metric]) -> Evaluation:
    """Run ``setup.model`` over ``setup.val_loader`` once, as the loop's validation does."""
    if setup.val_loader is None:
        raise UsageError("setup() returned no val_loader; there is nothing to validate on")
    device = resolve_device(config.device)
    model = setup.model.to(device)
    tracked = _Metrics({**metrics, **setup.metrics})
    tracked.to(device)
    tracked.reset()
    total, batches = DeviceSum(), 0
    model.eval()
    with torch.no_grad():
        for batch in setup.val_loader:
            inputs, targets = _unpack(_to_device(batch, device), "val_loader")
            outputs = model(inputs)
            total.add(setup.loss_fn(outputs, targets).detach())
            tracked.update(outputs, targets)
            batches += 1
    return Evaluation(_mean(total, batches), tracked.compute(), batches)


def _mean(total: DeviceSum, count: int) -> float:
    return total.value() / count if count else float("nan")
