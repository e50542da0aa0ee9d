"""How one checkpoint is written: at once, or handed to the background writer
(``checkpoint_async``), and how its end is reported (the same either way).

Split from :mod:`bz.training.checkpoint.policy`, which decides what and when.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bz import _supervision
from bz._errors import describe_exception
from bz._logging import get_logger

if TYPE_CHECKING:
    from bz.training.checkpoint.background import BackgroundWriter
    from bz.training.checkpoint.files import CheckpointPayload
    from bz.training.checkpoint.store import CheckpointStore
    from bz.training.state import RunParts

_log = get_logger("bz")


class CheckpointWrites:
    """The writing half of :class:`~bz.training.checkpoint.policy.CheckpointPolicy`."""

    run: RunParts
    store: CheckpointStore | None
    last: Path | None
    lost: int
    async_group: Any
    _discard_old: bool
    _writer: BackgroundWriter[Path | None] | None
    _resumed_from: Path | None

    @property
    def resumed_from(self) -> Path | None:
        """The checkpoint this call resumed from (None: none yet)."""
        return self._resumed_from

    @resumed_from.setter
    def resumed_from(self, path: Path | None) -> None:
        # Also what a plugin that never returns names as where the run resumes.
        self._resumed_from = path
        _supervision.resuming_from(path)

    def _start_write(
        self,
        store: CheckpointStore,
        path: Path,
        payload: CheckpointPayload | None,
        shards: dict[str, Any] | None,
    ) -> Callable[[], Path | None]:
        """Start a write (the shards, on every process); what finishes it (rank 0's part)."""
        if shards is None:
            assert payload is not None  # rank 0 writes single-file checkpoints alone
            epoch, batch = payload["epoch"], payload["batch"]
            return functools.partial(store.save, payload, epoch, batch)
        from bz.training.checkpoint.sharded import save_sharded

        group = self.async_group if self._writer is not None else None
        complete = save_sharded(shards, payload, path, main=self.run.topology.is_main, group=group)

        def finish() -> Path | None:
            entry = complete()
            if entry is None:  # not rank 0, or its part could not be written
                return None
            store.adopt(entry)
            return entry.path

        return finish

    def settle(self, *, hooks: bool = True) -> None:
        """Wait for the background write in flight, if any, and report how it ended.

        ``hooks=False`` once the session is over (a run that failed): the write is
        logged, but no plugin hook runs after the plugins were closed.
        """
        done = None if self._writer is None else self._writer.wait()
        if done is None:
            return
        outcome, tag = done
        if outcome.error is not None:
            self._failed(tag, outcome.error)
        else:
            self._written(outcome.value, tag, hooks=hooks)

    def _failed(self, tag: tuple[Path, int, int], exc: BaseException) -> None:
        # A full disk must not end a run that is otherwise fine; the previous
        # checkpoints are intact, and the next interval tries again. The count
        # makes the run end non-zero: it asked for checkpoints it does not have.
        if not self.run.topology.is_main:
            return  # a failed shard fails rank 0's write too, which reports it
        self.lost += 1
        _log.error("checkpoint_write_failed", path=str(tag[0]), error=describe_exception(exc))

    def _written(
        self, path: Path | None, tag: tuple[Path, int, int], *, hooks: bool = True
    ) -> None:
        store = self.store
        if path is None or store is None:
            return
        if self._discard_old:
            self._discard_old = False
            discarded = store.discard_all_but(path)
            if discarded:
                _log.info("checkpoints_discarded", folder=str(store.folder), count=discarded)
        _supervision.checkpoint_written(path)
        self.last = path
        _log.info("checkpoint_saved", path=str(path), epoch=tag[1], step=tag[2])
        if hooks:
            self.run.checkpoint_hook("save_checkpoint", path)
