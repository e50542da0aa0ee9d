"""The checkpoint policy of a run: when to save, what to save, resuming, the final weights.

The file format lives in :mod:`bz.training.checkpoint.files`, writing and the store in
:mod:`bz.training.checkpoint.store`; this module
decides, for one run, which file to resume from, what goes into the next one, and
when a run that is started again has nothing left to train.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bz._errors import TrainingError, UsageError, describe_exception
from bz._logging import get_logger
from bz._rng import capture_rng
from bz.training.capture import (
    TrainingState,
    by_name,
    capture,
    checked_plugin_state,
    load_plugin_states,
    plugin_states,
    restore,
)
from bz.training.checkpoint.background import BackgroundWriter, cpu_copy
from bz.training.checkpoint.best import monitored_value
from bz.training.checkpoint.files import (
    FINAL_MODEL,
    FORMAT,
    CheckpointPayload,
    ModelPayload,
    RngStates,
    batch_loss_total,
    checkpoint_name,
    is_finished,
    list_entries,
    loadable_problem,
    rank_loader_state,
    rank_validation_state,
    unusable_reason,
)
from bz.training.checkpoint.lock import RunLocked
from bz.training.checkpoint.store import CheckpointStore, writable_problem
from bz.training.checkpoint.writes import CheckpointWrites
from bz.training.position import loader_states_by_rank, validation_states_by_rank
from bz.training.result import FitResult
from bz.training.state import ResumePoint

if TYPE_CHECKING:
    from bz.plugins._protocol import StatefulPlugin
    from bz.training.control import EndReason
    from bz.training.state import RunParts

_log = get_logger("bz")


class CheckpointPolicy(CheckpointWrites):
    """Finding, resuming from and writing the checkpoints of one run.

    ``store`` is None when checkpoints are off (no folder given, or neither saving nor
    resuming asked for); every method is then a no-op.
    """

    def __init__(
        self, run: RunParts, store: CheckpointStore | None, signature: str, *, saves: bool
    ) -> None:
        self.run = run
        self.store = store
        self.signature = signature
        self.interval = run.config.checkpoint_interval
        self._saves = saves
        self.last: Path | None = None
        """The newest checkpoint written (or, for a finished run, read)."""
        self.resumed_from = None  # a new call of fit (see CheckpointWrites.resumed_from)
        self.final_model: Path | None = None
        self.lost = 0
        """Checkpoints (and final models) this call failed to write."""
        self.rebuilding = False
        """The run had finished but its final model was missing, damaged or stale: this
        call trains nothing and writes it again (see :meth:`needs_final_model`)."""
        # A run started over (resume: false) replaces the old checkpoints of the same
        # signature once it has one of its own; until then they stay.
        self._discard_old = not run.config.resume
        # Where the newest checkpoint (resumed from or written) stands: (epoch, batch,
        # step). A final model written at that step carries its batches too (a run
        # ended mid-epoch, or finished where a mid-epoch checkpoint left it).
        self._position = (0, 0, 0)
        self.fsdp = run.config.distributed.strategy == "fsdp"
        """The model is sharded: checkpoints are too, and the final weights are gathered."""
        self._writer: BackgroundWriter[Path | None] | None = (
            BackgroundWriter() if run.config.checkpoint_async else None
        )
        self.async_group: Any = None
        """The process group of background sharded writes (set when the group is joined)."""

    @property
    def saving(self) -> bool:
        """Whether this run writes checkpoints at all (after epochs, steps or seconds)."""
        return self.store is not None and self._saves

    def epoch_due(self, epochs_done: int) -> bool:
        """Whether the epoch-based schedule asks for a checkpoint after ``epochs_done``."""
        return self.interval > 0 and epochs_done % self.interval == 0

    # -- finding -------------------------------------------------------------------

    def find(self) -> tuple[Path, CheckpointPayload] | None:
        """Lock the run, then the checkpoint to resume from, if resuming and one is usable.

        Raises :class:`~bz.UsageError` (exit 2) when the folder cannot be written or
        another process holds the run.
        """
        store = self.store
        if store is None:
            return None
        if self.saving and self.run.topology.is_main:  # the only writer; others only read
            self._lock(store)
        if not self.run.config.resume:
            return None
        for path in store.ignored():
            _log.warning(
                "checkpoint_ignored",
                path=str(path),
                hint="not written by bz (no sidecar with its checksum); left alone",
            )
        run = self.run

        def usable(payload: Mapping[str, Any]) -> str | None:
            return unusable_reason(payload, run.model, run.setup.optimizer)

        found = store.newest(self.signature, usable)
        if found is None and list_entries(store.folder):
            _log.warning(
                "resume_failed",
                folder=str(store.folder),
                hint="no checkpoint there could be used; training starts from scratch",
            )
        return found

    def _lock(self, store: CheckpointStore) -> None:
        problem = writable_problem(store.folder)
        if problem is not None:
            raise UsageError(problem)
        try:
            store.lock()
        except RunLocked as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(
                f"{store.folder}: cannot lock the run: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        """Let the next process write this run (the end of every ``fit``, however it ends)."""
        self.settle(hooks=False)
        if self.store is not None:
            self.store.unlock()

    def is_complete(self, payload: CheckpointPayload) -> bool:
        """Whether the run this checkpoint belongs to has nothing left to train.

        A checkpoint past ``epochs`` (a mid-epoch one from a longer run, then
        ``--epochs`` lowered) counts as finished: training cannot go back; so does one
        at ``max_steps``.
        """
        config = self.run.config
        return is_finished(payload, config.epochs, config.max_steps)

    def needs_final_model(self, payload: CheckpointPayload) -> bool:
        """Whether a finished run lacks its final model: missing, damaged, or older than
        its last checkpoint (a kill between the two writes). It is then rebuilt by
        resuming from that checkpoint and ending the session again, which trains nothing.
        """
        if self.store is None or not self.saving:
            return False
        final = self.store.final(self.signature, payload["global_step"])
        if final is not None:
            return False
        _log.warning(
            "model_rebuilding",
            path=str(self.store.folder / FINAL_MODEL),
            hint="the run finished but its final weights are missing, damaged or stale; "
            "rebuilding them from its last checkpoint",
        )
        self.rebuilding = True
        return True

    def already_complete(
        self, path: Path, payload: CheckpointPayload, started: float
    ) -> FitResult:
        """The result of a run that had finished before this call (nothing is trained)."""
        run = self.run
        # The caller still gets the trained model, as if this run had just trained it.
        self._restore_training_state(path, payload)
        assert self.store is not None  # a checkpoint was found in it
        final = self.store.final(self.signature, payload["global_step"])
        if final is not None:
            if self.fsdp:
                from bz.training.fsdp import load_full_weights

                load_full_weights(run.model, final[1]["model"])
            else:
                run.model.load_state_dict(final[1]["model"])
            self.final_model = final[0]
        _log.info(
            "already_complete",
            path=str(path),
            epoch=payload["epoch"],
            step=payload["global_step"],
            hint="this run has finished; raise epochs to train longer, "
            "or start over with --no-resume",
        )
        max_steps = run.config.max_steps
        stopped_by: EndReason | None = None
        if payload.get("stopped", False):
            stopped_by = "plugin"
        elif max_steps is not None and payload["global_step"] >= max_steps:
            stopped_by = "max_steps"
        return FitResult(
            epochs_completed=payload["epoch"],
            global_step=payload["global_step"],
            stopped_early=stopped_by is not None,
            stopped_by=stopped_by,
            history=(),
            plugins=tuple(run.plugins.report()),
            seconds=time.perf_counter() - started,
            resumed_from=path,
            checkpoint=path,
            already_complete=True,
            model=self.final_model,
        )

    # -- resuming ------------------------------------------------------------------

    def _restore_training_state(self, path: Path, payload: CheckpointPayload) -> None:
        run = self.run
        model, optimizer = run.model, run.setup.optimizer
        whole = not payload.get("sharded") and not self.fsdp
        try:
            if payload.get("sharded"):
                from bz.training.checkpoint.sharded import load_shards

                load_shards(path, model, optimizer)
            elif self.fsdp:  # one process, or DDP, wrote it whole
                from bz.training.fsdp import load_whole_state

                load_whole_state(model, optimizer, payload["model"], payload["optimizer"])
            training = TrainingState(
                payload["model"] if whole else None,  # else loaded above
                payload["optimizer"] if whole else None,
                payload.get("scheduler"),
                payload.get("loss"),
                payload.get("grad_scaler"),
            )
            restore(run, training)
        except Exception as exc:
            raise TrainingError(
                f"cannot resume from {path}: {describe_exception(exc)} "
                "(start over with --no-resume)"
            ) from exc

    def resume(self, path: Path, payload: CheckpointPayload) -> None:
        """Put the run back where ``payload`` left it, up to where its next loop starts."""
        run = self.run
        self._restore_training_state(path, payload)
        rng, batch, saved_world = payload["rng"], payload["batch"], payload.get("world_size", 1)
        same_world = saved_world == run.topology.world_size
        if batch and not same_world:
            # Mid-epoch positions are per-process batch counts; with another number of
            # processes the interrupted epoch is run again in full from its start.
            _log.warning(
                "resume_world_size_changed",
                path=str(path),
                saved=saved_world,
                now=run.topology.world_size,
                hint="the interrupted epoch is trained again from its first batch",
            )
            batch = 0
        # The saved totals are over all processes: one process carries them on.
        carries = bool(batch) and run.topology.is_main
        point = ResumePoint(
            rng["epoch_start"],
            rng["now"],
            batch,
            payload.get("loss_total", 0.0) if carries else 0.0,
            # Checkpoints written before these were kept hold neither.
            payload.get("samples", 0) if carries else 0,
            payload.get("metrics", {}) if carries else {},
            loader=rank_loader_state(payload, run.topology.rank) if same_world else None,
            batch_loss_total=batch_loss_total(payload, batch) if carries else 0.0,
        )
        run.state.resume_at(payload["epoch"], payload["global_step"], point)
        # Handed back before the next validation pass (another world size validates
        # on other shares: each loader then starts as a new one).
        run.state.val_loader_state = (
            rank_validation_state(payload, run.topology.rank) if same_world else None
        )
        states: Mapping[str, Any] = payload.get("plugins") or {}
        if self.fsdp:
            from bz.training.fsdp import shard_like_model

            # Copies of the model's state were saved whole: back into this run's shards.
            states = shard_like_model(run.model, states)
        load_plugin_states(run, by_name(run, states))
        self.resumed_from = path
        self._position = (payload["epoch"], payload["batch"], payload["global_step"])
        if self.rebuilding:
            self.last = path
        _log.info(
            "resumed",
            path=str(path),
            epoch=event_epoch(payload["epoch"], payload["batch"]),
            batch=payload["batch"],
            step=payload["global_step"],
        )
        run.checkpoint_hook("load_checkpoint", path)

    # -- saving --------------------------------------------------------------------

    def save(self, epoch: int, batch: int, *, stopped: bool = False) -> None:
        """Write a checkpoint of ``epoch`` completed epochs plus ``batch`` batches.

        Every process calls it (they gather the interrupted epoch's numbers, and under
        FSDP each writes its shards); rank 0 writes the rest. With ``checkpoint_async``
        the write is handed to a background thread once its state is copied.
        """
        store = self.store
        if store is None or not self._saves:
            return
        run = self.run
        self.settle()  # at most one write in flight
        # Every process takes part in gathering the interrupted epoch's numbers, and
        # its loader's own state (each rank is at its own place in its own share).
        partial = self._partial_epoch() if batch else (0.0, 0, {}, 0.0)
        loaders = loader_states_by_rank(run.train_loader)
        val_loaders = validation_states_by_rank(run.val_loader, run.state.val_loader_state)
        shards = plugins = None
        if self.fsdp:
            from bz.training.checkpoint.sharded import shard_state, sharded_name
            from bz.training.fsdp import whole_tensors

            shards = shard_state(run.model, run.setup.optimizer)
            path = store.folder / sharded_name(epoch, batch)
            # Every process gathers the plugins' sharded tensors whole (rank 0 writes them).
            plugins = whole_tensors(self._plugin_states(), keep=run.topology.is_main)
        else:
            path = store.folder / checkpoint_name(epoch, batch)
        payload = None
        if run.topology.is_main:
            self._position = (epoch, batch, run.state.global_step)
            payload = self._payload(epoch, batch, stopped, *partial, plugins, loaders, val_loaders)
            if payload is None and shards is None:
                return
        elif shards is None:
            return
        tag = (path, event_epoch(epoch, batch), run.state.global_step)
        try:
            job = self._start_write(store, path, payload, shards)
            if self._writer is not None:
                self._writer.submit(job, tag)
                return
            written = job()
        except Exception as exc:  # a write that fails is reported; training goes on
            self._failed(tag, exc)
            return
        self._written(written, tag)

    def _payload(
        self,
        epoch: int,
        batch: int,
        stopped: bool,
        loss_total: float,
        samples: int,
        metric_state: dict[str, list[torch.Tensor]],
        batch_loss_total: float,
        plugins: dict[str, Any] | None,
        loaders: list[dict[str, Any] | None] | None,
        val_loaders: list[dict[str, Any] | None] | None = None,
    ) -> CheckpointPayload | None:
        """What rank 0 writes, or None when something in it could not be read back.

        ``plugins``: the plugins' states, already gathered under FSDP, whose model and
        optimizer are then in the shards; None: a single-file checkpoint, whole.
        ``loaders``: every rank's loader state (:func:`loader_states_by_rank`);
        ``val_loaders`` the validation loader's (:func:`validation_states_by_rank`).
        """
        run, state = self.run, self.run.state
        training = capture(run, whole=plugins is None)
        now = capture_rng(run.generators)
        epoch_start = state.epoch_rng if batch and state.epoch_rng is not None else now
        payload: CheckpointPayload = {
            "format": FORMAT,
            "signature": self.signature,
            "epoch": epoch,
            "batch": batch,
            "global_step": state.global_step,
            "world_size": run.topology.world_size,
            "stopped": stopped,
            "loss_total": loss_total,
            "batch_loss_total": batch_loss_total,
            # The logging plugins' shared folder: a resumed run writes on into it.
            "run_dir": str(run.context.extra.get("run_dir") or ""),
            "samples": samples,
            "metrics": metric_state,
            "model": training.model or {},
            "optimizer": training.optimizer or {},
            "scheduler": training.scheduler,
            "loss": training.loss,
            "grad_scaler": training.grad_scaler,
            "rng": RngStates(epoch_start=epoch_start, now=now),
        }
        problem = loadable_problem(payload, "checkpoint")
        if problem is not None:
            _log.error("checkpoint_skipped", epoch=epoch, step=state.global_step, error=problem)
            return None
        keep_best = run.config.keep_best
        if keep_best is not None and batch == 0:
            value = monitored_value(keep_best.monitor, run.refresh_context())
            payload["monitored"] = (keep_best.monitor, value)
        payload["plugins"] = self._plugin_states() if plugins is None else plugins
        if loaders is not None and loaders[0] is not None:
            payload["loader"], payload["loaders"] = loaders[0], loaders  # rank 0's, all
        if val_loaders is not None and any(state is not None for state in val_loaders):
            payload["val_loaders"] = val_loaders
        # In the background, the live tensors change under the write: it gets copies.
        return cpu_copy(payload) if self._writer is not None else payload

    def _loss_state(self) -> dict[str, Any] | None:
        """The loss module's state (a loss function has none)."""
        loss_fn = self.run.setup.loss_fn
        return loss_fn.state_dict() if isinstance(loss_fn, torch.nn.Module) else None

    def save_final_model(self, epochs: int) -> None:
        """Write the weights the run ended with (after ``end_training_session``).

        Labelled with where training stands: ``epochs`` completed, plus the batches of
        a mid-epoch checkpoint when no further epoch was trained since resuming from it.
        """
        store, run = self.store, self.run
        if store is None or not self._saves:
            return
        self.settle()  # the run is not done before its last checkpoint is
        if self.fsdp:
            from bz.training.fsdp import full_weights

            weights = full_weights(run.model)  # every process takes part
        if not run.topology.is_main:
            return
        if not self.fsdp:
            weights = run.model.state_dict()
        epoch, batch, step = self._position
        global_step = run.state.global_step
        if step != global_step or epoch != epochs:
            batch = 0  # whole epochs were trained since
        payload: ModelPayload = {
            "format": FORMAT,
            "signature": self.signature,
            "epoch": epochs,
            "batch": batch,
            "global_step": global_step,
            "model": weights,
            "loss": self._loss_state(),
        }
        try:
            path = store.save_final(payload)
        except OSError as exc:  # the checkpoints hold the training state all the same
            self.lost += 1
            _log.error(
                "model_write_failed",
                path=str(store.folder / FINAL_MODEL),
                error=describe_exception(exc),
            )
            return
        self.final_model = path
        _log.info("model_saved", path=str(path), epoch=epochs, batch=batch, step=global_step)

    def _partial_epoch(self) -> tuple[float, int, dict[str, list[torch.Tensor]], float]:
        """The epoch's loss sum, sample count, metric state and sum of batch losses so
        far, summed over the processes (a resumed run has rank 0 carry them). Nothing in
        the run changes: the epoch may go on after a checkpoint."""
        run = self.run
        distributed = run.topology.distributed
        train = run.state.train.summed(run.device) if distributed else run.state.train
        metrics = run.train_metrics.state(summed=distributed)
        return train.loss.value(), train.samples, metrics, train.loss.batch_sum()

    def _plugin_states(self) -> dict[str, Any]:
        # Under FSDP, sharded tensors are gathered by every process: a plugin that
        # runs on rank 0 alone cannot keep any (the other shards are not there).
        fsdp = self.fsdp

        def read(plugin: StatefulPlugin) -> dict[str, Any]:
            return checked_plugin_state(
                plugin, alone=fsdp and getattr(plugin, "every_rank", False) is not True
            )

        return {plugin.name: state for plugin, state in plugin_states(self.run, read)}


def event_epoch(epochs_done: int, batch: int) -> int:
    """The epoch a checkpoint position lies in, counted from 1 as the console and
    ``training_interrupted`` count: ``epoch-0004.pt`` is the end of epoch 4,
    ``epoch-0004-batch-00001.pt`` is inside epoch 5."""
    return epochs_done + 1 if batch else epochs_done
