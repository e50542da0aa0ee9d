"""``bz validate`` as a library function: a trained run, or one checkpoint of it,
evaluated on the validation data by the loop's own validation pass."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from bz._errors import UsageError
from bz._logging import get_logger
from bz._run import config_and_base

if TYPE_CHECKING:
    import torch

    from bz.config import RunConfig
    from bz.training.checkpoint.files import ModelPayload
    from bz.training.checkpoint.store import CheckpointStore
    from bz.training.evaluate import Evaluation

_log = get_logger("bz")


def validate(
    config: RunConfig | str | os.PathLike[str] | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    best: bool = False,
) -> tuple[Path, ModelPayload, Evaluation]:
    """Evaluate a checkpoint on the validation data: what ``bz validate`` does.

    ``checkpoint`` names a file (a checkpoint or a final ``model.pt``); without it, the
    run the configuration describes is evaluated as it ended (its ``model.pt``) when it
    finished, else its newest verified checkpoint that fits the model. A finished run
    whose ``model.pt`` is missing is an error (``bz train`` rebuilds it), and so is a
    damaged ``model.pt`` of any run: its last checkpoint may hold other weights than
    the run ended with (early stopping's restored best). ``best``: the
    checkpoint ``keep_best`` ranks first instead. Returns the file,
    its contents (``epoch``, ``global_step``, ...) and the
    :class:`~bz.training.evaluate.Evaluation`.
    """
    import torch

    from bz._setup import call_setup, load_setup_function
    from bz.metrics import build_metrics
    from bz.plugins.ema import load_average, validates_with_average
    from bz.training.checkpoint.files import (
        STATE_FILE,
        UnreadableCheckpoint,
        read_checkpoint,
        read_entry,
        run_signature,
    )
    from bz.training.checkpoint.store import CheckpointStore
    from bz.training.device import seed_everything
    from bz.training.evaluate import evaluate
    from bz.training.modules import materialize

    run_config, base = config_and_base(config, overrides, base_dir)
    metrics = build_metrics(run_config.metrics)
    script = base / run_config.train_script
    setup_function = load_setup_function(script, run_config.train_script)
    if run_config.seed is not None:
        seed_everything(run_config.seed)
    setup = call_setup(setup_function, run_config, script)
    materialize(setup)  # lazy modules shaped as training shaped them: the same signature
    signature = run_signature(setup, run_config)
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir() and not (path / STATE_FILE).is_file():
            raise UsageError(
                f"{path}: a folder that holds no sharded checkpoint (no {STATE_FILE} in it); "
                "pass a checkpoint file, model.pt, or a sharded checkpoint's .dcp folder"
            )
        verified = read_entry(path) is not None
        if not verified:
            _log.warning(
                "checkpoint_unverified",
                path=str(path),
                hint="no sidecar with its checksum beside it (copied alone, or not "
                "written by bz); evaluating it anyway",
            )
        try:
            payload = read_checkpoint(path, model_only=True, verified=verified)
        except UnreadableCheckpoint as exc:
            raise UsageError(f"{path}: cannot be used as a checkpoint: {exc}") from None
        if payload["signature"] != signature:
            _log.warning(
                "checkpoint_signature_differs",
                path=str(path),
                hint="it was written by a run with another model, optimizer or "
                "hyperparameters; evaluating it anyway",
            )
    elif best:
        path, payload = _best_checkpoint(
            CheckpointStore(base / run_config.checkpoint_dir / signature, 1, run_config.keep_best),
            signature,
        )
    else:
        folder = base / run_config.checkpoint_dir / signature
        path, payload = _as_it_ended(folder, signature, setup.model, run_config)
    try:
        if payload.get("sharded"):  # an unfinished FSDP run: its newest checkpoint's shards
            from bz.training.checkpoint.sharded import load_model_shards

            load_model_shards(path, setup.model)
        else:
            setup.model.load_state_dict(payload["model"])
        loss_state = payload.get("loss")
        if loss_state is not None and isinstance(setup.loss_fn, torch.nn.Module):
            setup.loss_fn.load_state_dict(loss_state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UsageError(
            f"{path}: does not fit the model train.py builds: {_misfit(exc)}"
        ) from None
    weights = "model"
    if validates_with_average(run_config.plugins):
        average = _validated_average(path, payload, signature)
        if average is None:
            _log.warning(
                "ema_average_missing",
                path=str(path),
                hint="validate_with_ema is on but no checkpoint at this step holds ema's "
                "average; evaluating the weights in the file",
            )
        else:
            load_average(setup.model, average)
            weights = "ema"
    _log.info(
        "validating",
        path=str(path),
        epoch=payload["epoch"],
        step=payload["global_step"],
        weights=weights,
    )
    evaluation = evaluate(setup, run_config, metrics)
    return path, payload, attrs.evolve(evaluation, weights=weights)


def _as_it_ended(
    folder: Path, signature: str, model: torch.nn.Module, run_config: RunConfig
) -> tuple[Path, ModelPayload]:
    """The run in ``folder`` as it ended: its final model when it is as new as its
    newest checkpoint (a finished run: the weights it ended with, early stopping's
    restored best included), else its newest verified checkpoint that fits ``model``."""
    from bz.training.checkpoint.files import FINAL_MODEL, is_finished, model_fit_problem
    from bz.training.checkpoint.store import CheckpointStore

    latest = CheckpointStore(folder).newest(
        signature, lambda payload: model_fit_problem(payload.get("model"), model)
    )
    final = _final_model(folder / FINAL_MODEL, signature, latest)
    if final is not None:
        return final
    if latest is None:
        raise UsageError(
            f"no checkpoint of this run in {folder} (train first, or pass --checkpoint)"
        )
    if is_finished(latest[1], run_config.epochs, run_config.max_steps):
        raise UsageError(
            f"this run finished but its final weights ({folder / FINAL_MODEL}) are "
            "missing: run `bz train` to rebuild them, or pass --checkpoint"
        )
    return latest


def _final_model(
    path: Path, signature: str, latest: tuple[Path, ModelPayload] | None
) -> tuple[Path, ModelPayload] | None:
    """``model.pt`` and its contents; None when there is none, or it was written before
    the run's newest checkpoint (the run was trained further since).

    A damaged one (its bytes, its sidecar) that is not known to be older is refused in
    one line: evaluating the newest checkpoint in its place would report other weights
    than the run ended with, under the final weights' name.
    """
    from bz.training.checkpoint.files import UnreadableCheckpoint, read_checkpoint, read_entry

    newest_step = latest[1]["global_step"] if latest is not None else 0
    if not path.is_file():
        return None
    entry = read_entry(path)
    if entry is not None and entry.signature == signature and entry.step < newest_step:
        return None  # older than the newest checkpoint, as its sidecar says
    try:
        payload = read_checkpoint(path, signature, model_only=True)
    except UnreadableCheckpoint as exc:
        instead = (
            f", or evaluate the newest checkpoint with --checkpoint {latest[0]}"
            if latest is not None
            else ""
        )
        raise UsageError(
            f"{path}: the run's final weights are damaged ({exc}); bz validate evaluates no "
            f"other weights in their place: run `bz train` to write them again{instead}"
        ) from None
    if payload["global_step"] < newest_step:
        return None
    return path, payload


def _validated_average(
    path: Path, payload: ModelPayload, signature: str
) -> dict[str, torch.Tensor] | None:
    """``ema``'s average the run validated with at ``payload``'s step: a checkpoint's own;
    for a final model (which holds no plugin states), the run's newest checkpoint's when
    it was written at the same step (the end of the last epoch)."""
    from bz.plugins.ema import saved_average
    from bz.training.checkpoint.files import FINAL_MODEL
    from bz.training.checkpoint.store import CheckpointStore

    states = payload.get("plugins")
    if states is None and path.name == FINAL_MODEL:
        newest = CheckpointStore(path.parent).newest(signature)
        if newest is not None and newest[1]["global_step"] == payload["global_step"]:
            states = newest[1].get("plugins")
    return saved_average(states if isinstance(states, dict) else None)


def _misfit(exc: BaseException) -> str:
    """torch's ``load_state_dict`` error in one line: its heading and first problem
    (``size mismatch for 0.weight: ...``), and how many more there are."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, problems = lines[0], lines[1:]
    if not problems:
        return head
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{head} {problems[0]}{more}"


def _best_checkpoint(store: CheckpointStore, signature: str) -> tuple[Path, ModelPayload]:
    """The checkpoint ``keep_best`` ranks first (``bz validate --best``)."""
    from bz.training.checkpoint.files import UnreadableCheckpoint, read_checkpoint

    keep_best = store.keep_best
    if keep_best is None:
        raise UsageError("--best needs keep_best in the configuration (which value ranks them)")
    entry = store.best()
    if entry is None:
        raise UsageError(
            f"no verified checkpoint in {store.folder} recorded {keep_best.monitor!r} "
            "(keep_best records it at the end of each epoch)"
        )
    try:
        return entry.path, read_checkpoint(entry.path, signature, model_only=True)
    except UnreadableCheckpoint as exc:
        raise UsageError(f"{entry.path}: cannot be used as a checkpoint: {exc}") from None


__all__ = ["validate"]
