"""One run of :meth:`bz.Trainer.fit`: set-up, the epoch loop, the step, validation.

Hook order for one run (``[...]`` only when there is validation data)::

    start_training_session
    for each epoch:
        start_epoch
        start_training_loop
        for each batch: start_training_batch, (forward, loss, backward), after_backward,
                        [every accumulate_grad_batches batches: (unscale, clip)
                         before_optimizer_step, (optimizer step)], end_training_batch,
                        [(scheduler step, under scheduler_interval "step")]
                        [every validate_every_steps steps: the validation loop below]
                        [every checkpoint_every_steps steps / _seconds: save_checkpoint]
        end_training_loop            # training_metrics are set
        [start_validation_loop
         for each batch: start_validation_batch, (forward, loss), end_validation_batch
         end_validation_loop]        # validation_metrics are set
        end_epoch                    # stop requests made here end the run after it
        [save_checkpoint]            # every checkpoint_interval epochs, and the last
    end_training_session
    on_exception                     # instead of the rest, when training fails
    on_rewind                        # after a plugin's fault, before its part runs again

The session's start, each epoch (with its checkpoint) and the session's end are
*parts*: under ``plugin_errors: "rewind"`` each starts from a snapshot and runs again
without a plugin that failed in it (see :mod:`bz.training.rewind`).

A stop in the middle of an epoch (``should_stop_training`` set by a plugin in a training
hook, ``max_steps``, ``max_time``) takes effect after the current optimizer step: a
checkpoint is written there (``save_checkpoint``), then the epoch ends early
(``end_training_loop`` with the batches done, validation, ``end_epoch``; the scheduler
is not stepped) and ``end_training_session`` follows.

With ``checkpoint_async``, a checkpoint's ``save_checkpoint`` comes once its background
write is complete: at the next checkpoint, or before ``end_training_session``.

When resuming, ``load_checkpoint`` follows ``start_training_session``. On Ctrl-C (or
SIGTERM) the loop finishes the step, writes a checkpoint (``save_checkpoint``), then calls
``on_exception`` and ``end_training_session`` and raises :class:`TrainingInterrupted`.

The loop owns every counter and the loss sums, in one
:class:`~bz.training.state.LoopState` (``run.state``). Before hooks run it copies them
into the context, so what a plugin writes there never changes what the loop does next.
Nothing here reads a device value back to the host per batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel

from bz import _supervision
from bz._distributed import (
    choose_backend,
    control_group,
    join,
    leave,
    local_device,
    shard_loader,
    sum_across,
    topology_from_env,
)
from bz._errors import BzError, UsageError, add_training_context
from bz._logging import get_logger
from bz._rng import loader_generators
from bz.metrics._set import MetricSet
from bz.plugins._context import PluginContext
from bz.plugins._scalars import gradient_norm_intervals
from bz.training.checkpoint.best import check_monitor
from bz.training.checkpoint.files import CheckpointPayload
from bz.training.checkpoint.files import run_signature as _run_signature
from bz.training.checkpoint.policy import CheckpointPolicy
from bz.training.checkpoint.store import CheckpointStore
from bz.training.control import StepControl
from bz.training.device import loader_length, resolve_device
from bz.training.epoch import EpochLoop, capped
from bz.training.forward import forward_for
from bz.training.guards import check_batches, check_epoch_loss, check_model
from bz.training.interrupts import (
    InterruptGuard,
    InterruptVote,
    StoppedAtOnce,
    TrainingInterrupted,
)
from bz.training.modules import materialize
from bz.training.precision import precision_for
from bz.training.result import EpochRecord, FitResult
from bz.training.rewind import Rewinder
from bz.training.state import LoopState

if TYPE_CHECKING:
    from bz._setup import TrainingSetup
    from bz.config import RunConfig
    from bz.metrics import Metric
    from bz.plugins._sandbox import PluginSet

_log = get_logger("bz")
T = TypeVar("T")


class Run(EpochLoop):
    """One call of ``fit``: the loop's own state lives here.

    The constructor only describes the run; :meth:`fit` joins the process group, wraps
    the model and trains, inside the ``try``/``finally`` that undoes both.
    ``limit_batches`` caps the batches of every loop (``bz train --smoke``).
    """

    def __init__(
        self,
        setup: TrainingSetup,
        config: RunConfig,
        plugins: PluginSet,
        metrics: Mapping[str, Metric],
        checkpoint_root: Path | None = None,
        *,
        limit_batches: int | None = None,
    ) -> None:
        self.setup = setup
        self.config = config
        self.state = LoopState()
        self.plugins = plugins
        self.topology = topology_from_env()
        self.device = local_device(resolve_device(config.device), self.topology)
        self.precision = precision_for(config.precision, self.device)
        # Read before the other ranks' loggers go dormant: every process must compute
        # the norm on the same steps (under FSDP it is a collective).
        self.norm_every = gradient_norm_intervals(plugins.active)
        plugins.for_rank(self.topology.rank)
        seed = config.seed or 0
        self.train_loader = shard_loader(setup.train_loader, self.topology, seed, training=True)
        self.val_loader = (
            None
            if setup.val_loader is None
            else shard_loader(setup.val_loader, self.topology, seed, training=False)
        )
        self.limit = limit_batches
        materialize(setup)  # lazy modules get their shapes, which all below needs
        # The signature describes the run as train.py built it, before any training.
        saves = (
            config.checkpoint_interval > 0
            or config.checkpoint_every_steps is not None
            or config.checkpoint_every_seconds is not None
        )
        uses_checkpoints = checkpoint_root is not None and (saves or config.resume)
        signature = _run_signature(setup, config) if uses_checkpoints else ""
        check_monitor(config.keep_best, metrics, validates=self.val_loader is not None)
        store = (
            CheckpointStore(checkpoint_root / signature, config.keep_last, config.keep_best)
            if checkpoint_root is not None and uses_checkpoints
            else None
        )
        self.checkpoints = CheckpointPolicy(self, store, signature, saves=saves)
        self.model = setup.model
        self.forward: torch.nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        self.train_metrics = MetricSet(metrics)
        self.val_metrics = MetricSet({name: copy.deepcopy(m) for name, m in metrics.items()})
        self.move_batches = self.device.type != "cpu"
        # How batches become losses is decided here, once, from the setup alone.
        self.train_forward = forward_for(setup, "train_loader", metrics=self.train_metrics.active)
        self.val_forward = forward_for(setup, "val_loader", metrics=self.val_metrics.active)
        self.step_scheduler = setup.scheduler if setup.scheduler_interval == "step" else None
        # The validation loader's too: its shuffle draws from them, and a resumed or
        # rewound run validates on the order the uninterrupted one did.
        self.generators = loader_generators(self.train_loader, self.val_loader)
        self.interrupt = InterruptGuard(plugins.interrupt_running, plugins.keep_handlers)
        self.vote: InterruptVote | None = None
        self.owns_process_group = False
        self.mesh: Any = None
        """FSDP's device mesh (see ``fsdp.release_groups``); None otherwise."""
        self.accumulate = config.accumulate_grad_batches
        self.clip = config.gradient_clip
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
        self.context.training_batches_per_epoch = capped(
            loader_length(self.train_loader), self.limit
        )
        self.context.validation_batches_per_epoch = capped(
            loader_length(self.val_loader), self.limit
        )
        lengthless = self.context.training_batches_per_epoch is None
        if self.accumulate > 1 and self.topology.distributed and lengthless:
            raise UsageError(
                "accumulate_grad_batches needs a train_loader with a length when "
                "training with several processes"
            )
        self.control = StepControl(config, self.interrupt, self.context, None, time.perf_counter())

    def _prepare(self) -> None:
        """Place the model and join the other processes (undone by :meth:`_leave`)."""
        config = self.config
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = choose_backend(config.distributed.backend, self.device)
        check_model(self.setup.model)
        fsdp = config.distributed.strategy == "fsdp"
        if fsdp:
            from bz.training import fsdp as sharding  # slow to import; only when asked

            sharding.check_shardable(
                self.setup.model, config.distributed.fsdp, self.topology, self.device
            )
        self.owns_process_group = join(self.topology, backend, config.distributed.timeout)
        self.model = self.setup.model.to(self.device)
        self.forward = self.model
        if fsdp:
            # Sharded in place: the model is its own forward, and gathers what it needs.
            fsdp_config = config.distributed.fsdp
            self.mesh = sharding.shard_model(
                self.model, self.setup.optimizer, fsdp_config, config.precision, self.device
            )
            self.vote = InterruptVote(control_group(backend))
            if config.checkpoint_async:
                # Background writes agree among themselves on a group of their own.
                self.checkpoints.async_group = torch.distributed.new_group(backend="gloo")
        elif self.topology.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
            # Alone, Ctrl-C stops after the current step. Several processes must stop
            # after the same step: they vote on it every few steps.
            self.vote = InterruptVote(control_group(backend))
        if config.compile:
            self.forward = _compile(self.forward)
        self.train_metrics.to(self.device)
        self.val_metrics.to(self.device)
        self.control = StepControl(
            config, self.interrupt, self.context, self.vote, time.perf_counter()
        )

    # -- the run ---------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train; the process group and the DDP wrapper never outlive this call."""
        finished = False
        try:
            self._prepare()
            result = self._fit()
            finished = True
            return result
        finally:
            self.plugins.close()
            self.checkpoints.close()
            self._leave(finished)

    def _leave(self, finished: bool = False) -> None:
        """Drop the DDP wrapper, then the process group, in that order.

        DDP's reducer holds a reference to the process group and torch frees the reducer
        without releasing the GIL. If the reducer held the last reference, the gloo
        group's destructor would join worker threads that need the GIL to free their
        last tensors: a deadlock at exit (5 runs in 37 on a loaded 2-core machine).
        Freed first, the reducer leaves the group to ``destroy_process_group``, which
        releases the GIL while it waits. Under FSDP the device mesh and the background
        writes' group keep groups too: let go of once they are destroyed, so that no gloo
        thread is left for the interpreter's shutdown (``fsdp.release_groups``).
        """
        if self.forward is not self.model:
            wrapper = weakref.ref(self.forward)
            self.forward = self.model
            self.ddp = None
            # Only if a reference cycle keeps it: a full collection costs ~0.2 s here.
            if wrapper() is not None:
                gc.collect()
        self.vote = self.control.vote = None
        mesh, self.mesh = self.mesh, None
        if leave(self.owns_process_group, wait_for_all=finished):
            self.checkpoints.async_group = None
            if mesh is not None:
                from bz.training.fsdp import release_groups

                release_groups(self.model, mesh)
                gc.collect()  # a group kept by a reference cycle: its threads end now too

    def _fit(self) -> FitResult:
        started = time.perf_counter()
        checkpoints, state = self.checkpoints, self.state
        found = checkpoints.find()
        # A supervising `bz train` says where a restart starts (the same command finds it).
        _supervision.training_starts(found[0] if found is not None else None)
        if (
            found is not None
            and checkpoints.is_complete(found[1])
            and not checkpoints.needs_final_model(found[1])
        ):
            return checkpoints.already_complete(*found, started)
        history: list[EpochRecord] = []
        self.context.extra["active_plugins"] = self.plugins.active_names
        self.context.extra["epochs"] = self.config.epochs  # where the original bz-cli had it
        previous = found[1].get("run_dir") if found is not None else None
        if previous and Path(previous).is_dir():
            # Resuming: the logging plugins write on into the run's folder.
            self.context.extra["run_dir"] = previous
        check_batches(self.context.training_batches_per_epoch)
        # Each part runs again from its start, without the plugin, when one fails in it.
        part = Rewinder(self).part if Rewinder.wanted(self) else _once
        with self.interrupt:
            try:
                part(lambda: self._start_session(found))
                # A finished run whose final model is rebuilt trains no epoch.
                first = state.start_epoch
                last = first if checkpoints.rebuilding else self.config.epochs
                for epoch in range(first, last):
                    record, stop = part(functools.partial(self._epoch_and_checkpoint, epoch))
                    history.append(record)
                    if stop:
                        break
                self.context.extra["plugin_reports"] = self._plugin_reports()
                part(lambda: self._end_session(self._epochs_done(history)))
            except TrainingInterrupted:
                raise
            except (StoppedAtOnce, BzError) as exc:
                self._fail_session(exc)
                raise
            except BaseException as exc:  # SystemExit, a KeyboardInterrupt code raised...
                self._fail_session(exc)
                # The user's exception leaves as itself (`except ValueError` still catches
                # it); where it happened travels with it as a note.
                add_training_context(
                    exc,
                    epoch=state.epoch + 1,
                    step=state.global_step,
                    where="in the training loop",
                )
                raise
        self.plugins.log_summary()
        return FitResult(
            epochs_completed=self._epochs_done(history),
            global_step=state.global_step,
            stopped_early=state.stopped_by is not None,
            history=tuple(history),
            plugins=tuple(self.plugins.report()),
            seconds=time.perf_counter() - started,
            resumed_from=checkpoints.resumed_from,
            checkpoint=checkpoints.last,
            model=checkpoints.final_model,
            stopped_by=state.stopped_by,
            checkpoints_lost=checkpoints.lost,
            model_rebuilt=checkpoints.rebuilding,
        )

    def _start_session(self, found: tuple[Path, CheckpointPayload] | None) -> None:
        self._hook("start_training_session")
        if found is not None:
            self.checkpoints.resume(*found)

    def _epoch_and_checkpoint(self, epoch: int) -> tuple[EpochRecord, bool]:
        """One epoch and its checkpoint; whether the run stops after it."""
        state = self.state
        state.epoch = epoch
        record = self._epoch()
        if record is None:  # Ctrl-C in the middle of the epoch
            self.checkpoints.save(epoch, state.train.batches)
            self._stop_interrupted()
        check_epoch_loss(record, state.train.batches)
        self._log_epoch(record)
        return record, record.partial or self._end_of_epoch()

    def _end_session(self, epochs: int) -> None:
        self.checkpoints.settle()  # its save_checkpoint comes before the session's end
        self._hook("end_training_session")
        self.checkpoints.save_final_model(epochs)

    def _epochs_done(self, history: list[EpochRecord]) -> int:
        return self.state.start_epoch + sum(1 for record in history if not record.partial)

    def _end_of_epoch(self) -> bool:
        """Stop requests, checkpoints and interrupts after a whole epoch; True to stop."""
        time_up, checkpoint_time = self.control.time_flags()
        stop, interrupted, time_up, checkpoint_time = self._agree(
            self.context.should_stop_training, self.interrupt.requested, time_up, checkpoint_time
        )
        state = self.state
        done = state.epoch + 1
        reason = self.control.at_epoch_end(state.global_step, stop, time_up)
        if (
            reason is not None
            or interrupted
            or checkpoint_time
            or done == self.config.epochs
            or self.checkpoints.epoch_due(done)
            or self.control.checkpoint_at_epoch_end
        ):
            self.checkpoints.save(done, 0, stopped=reason == "plugin")
            self.control.checkpoint_written()
        if interrupted:
            self._stop_interrupted()
        if reason is not None and done < self.config.epochs:
            self._stop(reason)
            return True
        return False

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

    def _agree(self, *flags: bool) -> list[bool]:
        """Every process's verdict at the end of an epoch: each flag raised if any rank
        raised it, and the plugins any rank quarantined quarantined on every rank (one
        collective)."""
        if not self.topology.distributed:
            return list(flags)
        plugins = self.plugins
        mask = [0.0] * len(plugins)
        for index in plugins.faulted_slots():
            mask[index] = 1.0
        summed = sum_across([*map(float, flags), *mask], self.device)
        count = len(flags)
        plugins.quarantine_slots(
            {i for i, v in enumerate(summed[count:]) if v > 0}, self.refresh_context()
        )
        return [value > 0 for value in summed[:count]]

    def _log_epoch(self, record: EpochRecord) -> None:
        _log.info(
            "epoch_finished",
            epoch=record.epoch + 1,  # numbered as the console and the checkpoints do
            step=self.state.global_step,
            training_loss=record.training_loss,
            validation_loss=record.validation_loss,
            training_metrics=record.training_metrics,
            validation_metrics=record.validation_metrics,
            seconds=round(record.seconds, 6),
            partial=record.partial,
        )

    def _fail_session(self, exc: BaseException | None = None) -> None:
        self.context.exception = exc
        # Plugins get to flush what they hold; the sandbox still guards them, but with
        # "raise" a second plugin fault must not hide the first error.
        with self._isolated():
            self._hook("on_exception")
        self.plugins.log_summary()

    def _stop_interrupted(self) -> NoReturn:
        self.checkpoints.settle()  # the checkpoint reported is on disk
        last = self.checkpoints.last
        interrupted = TrainingInterrupted(last, self.interrupt.signal)
        self.context.exception = interrupted
        with self._isolated():
            self._hook("on_exception")
            self._hook("end_training_session")
        self.plugins.log_summary()
        _log.warning(
            "training_interrupted",
            epoch=self.state.epoch + 1,
            step=self.state.global_step,
            checkpoint=str(last) if last else None,
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


_NO_CONTEXT = contextlib.nullcontext()


def _once(body: Callable[[], T]) -> T:
    """A part run without snapshots (``isolate`` and ``raise``, several processes)."""
    return body()


def _compile(model: torch.nn.Module) -> torch.nn.Module:
    compiled: torch.nn.Module = torch.compile(model)  # type: ignore[assignment]  # compile returns a callable wrapper typed loosely
    return compiled
