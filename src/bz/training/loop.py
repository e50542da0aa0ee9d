"""One run of :meth:`bz.Trainer.fit`: set-up, the epoch loop, the step, validation.

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
    on_rewind                        # after a plugin's fault, before its part runs again

The session's start, each epoch (with its checkpoint) and the session's end are
*parts*: under ``plugin_errors: "rewind"`` each starts from a snapshot and runs again
without a plugin that failed in it (see :mod:`bz.training.rewind`).

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
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import structlog
import torch
from torch.nn.parallel import DistributedDataParallel

from bz._checkpoint import (
    CheckpointPayload,
    CheckpointStore,
    capture_rng,
    loader_generators,
    restore_rng,
)
from bz._checkpoint import run_signature as _run_signature
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
)
from bz._errors import BzError, TrainingError
from bz._setup import user_frame
from bz.metrics._set import MetricSet
from bz.training.checkpoints import CheckpointPolicy, ResumePoint
from bz.training.device import (
    batch_size,
    loader_length,
    resolve_device,
    to_device,
    unpack,
)
from bz.training.evaluate import mean
from bz.training.guards import check_batches, check_epoch_loss, check_model
from bz.training.interrupts import InterruptGuard, InterruptVote, TrainingInterrupted
from bz.training.result import EpochRecord, FitResult
from bz.training.rewind import Rewinder

if TYPE_CHECKING:
    from bz._sandbox import PluginSet
    from bz._setup import TrainingSetup
    from bz.config import RunConfig
    from bz.metrics import Metric

_log = structlog.get_logger("bz")
T = TypeVar("T")


class Run:
    """One call of ``fit``: the loop's own state lives here.

    The constructor only describes the run; :meth:`fit` joins the process group, wraps
    the model and trains, inside the ``try``/``finally`` that undoes both.
    """

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
        signature = _run_signature(setup, config) if uses_checkpoints else ""
        store = (
            CheckpointStore(checkpoint_root / signature, config.keep_last)
            if checkpoint_root is not None and uses_checkpoints
            else None
        )
        self.checkpoints = CheckpointPolicy(self, store, signature)
        self.model = setup.model
        self.forward: torch.nn.Module = self.model
        self.train_metrics = MetricSet(metrics)
        self.val_metrics = MetricSet({name: copy.deepcopy(m) for name, m in metrics.items()})
        self.move_batches = self.device.type != "cpu"
        self.generators = loader_generators(self.train_loader)
        self.interrupt = InterruptGuard(plugins.interrupt_running)
        self.vote: InterruptVote | None = None
        self.owns_process_group = False
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
        self.resume_point: ResumePoint | None = None
        self.epoch_rng: dict[str, Any] | None = None
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
        self.context.training_batches_per_epoch = loader_length(self.train_loader)
        self.context.validation_batches_per_epoch = loader_length(self.val_loader)

    def _prepare(self) -> None:
        """Place the model and join the other processes (undone by :meth:`_leave`)."""
        config = self.config
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = choose_backend(config.distributed.backend, self.device)
        check_model(self.setup.model)
        self.owns_process_group = join(self.topology, backend, config.distributed.timeout)
        self.model = self.setup.model.to(self.device)
        self.forward = self.model
        if self.topology.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=device_ids)
            # Alone, Ctrl-C stops after the current step. Several processes must stop
            # after the same step: they vote on it every few steps.
            self.vote = InterruptVote(control_group(backend))
        if config.compile:
            self.forward = _compile(self.forward)
        self.train_metrics.to(self.device)
        self.val_metrics.to(self.device)

    # -- context ---------------------------------------------------------------------

    def refresh_context(self) -> PluginContext:
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
            self.plugins.call(hook, self.refresh_context())

    def checkpoint_hook(self, hook: str, path: Path) -> None:
        """Call ``save_checkpoint`` / ``load_checkpoint`` with ``checkpoint_path`` set."""
        self.context.checkpoint_path = path
        try:
            self._hook(hook)
        finally:
            self.context.checkpoint_path = None

    # -- the run ---------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train; the process group and the DDP wrapper never outlive this call."""
        try:
            self._prepare()
            return self._fit()
        finally:
            self.plugins.close()
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
        self.vote = None
        leave(self.owns_process_group)

    def _fit(self) -> FitResult:
        started = time.perf_counter()
        checkpoints = self.checkpoints
        found = checkpoints.find()
        if found is not None and checkpoints.is_complete(found[1]):
            return checkpoints.already_complete(*found, started)
        history: list[EpochRecord] = []
        stopped_early = False
        self.context.extra["active_plugins"] = self.plugins.active_names
        check_batches(self.context.training_batches_per_epoch)
        # Each part runs again from its start, without the plugin, when one fails in it.
        part = Rewinder(self).part if Rewinder.wanted(self) else _once
        with self.interrupt:
            try:
                part(lambda: self._start_session(found))
                for epoch in range(self.start_epoch, self.config.epochs):
                    record, stop = part(functools.partial(self._epoch_and_checkpoint, epoch))
                    history.append(record)
                    if stop:
                        stopped_early = epoch + 1 < self.config.epochs
                        _log.info("stop_requested", epoch=epoch, step=self.global_step)
                        break
                self.context.extra["plugin_reports"] = self._plugin_reports()
                part(lambda: self._end_session(self.start_epoch + len(history)))
            except TrainingInterrupted:
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
            resumed_from=checkpoints.resumed_from,
            checkpoint=checkpoints.last,
            model=checkpoints.final_model,
        )

    def _start_session(self, found: tuple[Path, CheckpointPayload] | None) -> None:
        self._hook("start_training_session")
        if found is not None:
            self.resume_point = self.checkpoints.resume(*found)

    def _epoch_and_checkpoint(self, epoch: int) -> tuple[EpochRecord, bool]:
        """One epoch and its checkpoint; whether a plugin asked to stop."""
        checkpoints = self.checkpoints
        self.epoch = epoch
        record = self._epoch()
        if record is None:  # Ctrl-C in the middle of the epoch
            checkpoints.save(epoch, self.train_batches)
            self._stop_interrupted()
        check_epoch_loss(record, self.train_batches)
        self._log_epoch(record)
        stop, interrupted = self._agree(
            self.context.should_stop_training, self.interrupt.requested
        )
        done = epoch + 1
        if stop or done == self.config.epochs or checkpoints.epoch_due(done):
            checkpoints.save(done, 0, stopped=stop)
        elif interrupted:
            checkpoints.save(done, 0)
        if interrupted:
            self._stop_interrupted()
        return record, stop

    def _end_session(self, epochs: int) -> None:
        self._hook("end_training_session")
        self.checkpoints.save_final_model(epochs)

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
        plugins.quarantine_slots(
            {i for i, v in enumerate(summed[2:]) if v > 0}, self.refresh_context()
        )
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
        last = self.checkpoints.last
        interrupted = TrainingInterrupted(last, self.interrupt.signal)
        self.context.exception = interrupted
        with self._isolated():
            self._hook("on_exception")
            self._hook("end_training_session")
        self.plugins.log_summary()
        _log.warning(
            "training_interrupted",
            epoch=self.epoch,
            step=self.global_step,
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

    # -- one epoch -------------------------------------------------------------------

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
        self.resume_point = ResumePoint(now, now)
        return EpochRecord(
            epoch=self.epoch,
            training_loss=mean(self.train_loss, self.train_batches),
            validation_loss=mean(self.val_loss, self.val_batches) if validated else None,
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
        point, self.resume_point = self.resume_point, None
        if point is not None:
            restore_rng(point.epoch_start, self.generators)
        # Needed only to write a checkpoint in the middle of this epoch.
        self.epoch_rng = capture_rng(self.generators) if self.checkpoints.saving else None
        set_epoch(self.train_loader, self.epoch)
        iterator = iter(self.train_loader)
        if point is None or point.batch == 0:
            return iterator, 0
        # Creating the iterator and drawing the batches already trained on consumes
        # the loader's random state exactly as the interrupted run did; the step's
        # own random state (dropout, augmentation) is then put back as it was.
        for _ in range(point.batch):
            next(iterator, None)
        restore_rng(point.now, self.generators)
        self.train_batches = point.batch
        self.train_samples = point.samples
        self.train_loss = DeviceSum(point.loss_total)
        self.train_metrics.carry(point.metrics)
        return iterator, point.batch

    def _step(self, batch: Any) -> None:
        # A method of its own so that the batch, outputs and graph die when it returns
        # instead of living in the loop's frame until the next batch replaces them.
        setup, hook = self.setup, self._hook
        if self.move_batches:
            batch = to_device(batch, self.device)
        inputs, targets = unpack(batch, "train_loader")
        self.train_samples += batch_size(inputs)
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

    # -- validation ------------------------------------------------------------------

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
        self.val_loss, self.val_batches = self._summed_over_processes(
            self.val_loss, self.val_batches
        )
        self.context.validation_metrics = metrics.compute()
        self._hook("end_validation_loop")

    def _validation_step(self, batch: Any) -> None:
        # Its own frame, like _step: outputs die before the next batch is fetched.
        if self.move_batches:
            batch = to_device(batch, self.device)
        inputs, targets = unpack(batch, "val_loader")
        outputs = self.forward(inputs)
        loss = self.setup.loss_fn(outputs, targets)
        self.val_loss.add(loss.detach())
        self.val_metrics.update(outputs, targets)
        self.val_batches += 1

    def _summed_over_processes(self, total: DeviceSum, count: int) -> tuple[DeviceSum, int]:
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
            scheduler.step(mean(loss, count))
        else:
            scheduler.step()


def _once(body: Callable[[], T]) -> T:
    """A part run without snapshots (``isolate`` and ``raise``, several processes)."""
    return body()


def _compile(model: torch.nn.Module) -> torch.nn.Module:
    compiled: torch.nn.Module = torch.compile(model)  # type: ignore[assignment]  # compile returns a callable wrapper typed loosely
    return compiled
