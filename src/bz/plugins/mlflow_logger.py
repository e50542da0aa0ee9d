"""``mlflow``: the run's parameters, per-epoch scalars and final weights in MLflow.

Needs the ``mlflow`` extra (``pip install 'bz-cli[mlflow]'``). Everything goes through
an ``mlflow.MlflowClient`` of the plugin's own (never MLflow's global active run), so
several bz runs in one process (``bz tune``), or a program with an MLflow run of its
own, each get their own MLflow run.

* **Where:** ``tracking_uri`` (default: MLflow's own, ``MLFLOW_TRACKING_URI`` first),
  ``experiment_name`` (default: ``MLFLOW_EXPERIMENT_NAME``, else MLflow's ``Default``).
* **Params:** the ``hyperparameters`` table under its own names (nested tables dotted:
  ``optim.lr``) and the rest of the run's configuration as ``config.<key>``. Values
  longer than MLflow accepts are cut, keys with characters it refuses have them
  replaced by ``_``: logging params never fails a run.
* **Metrics:** the tags of :mod:`bz.plugins._scalars`, as ``tensorboard`` names them,
  at step = the epoch counted from 1; with ``step_interval`` the step scalars
  (``step/loss``, ``step/grad_norm``, ``step/lr``) at step = the global step.
* **Status:** ``FINISHED`` at the end, ``FAILED`` when training fails or is interrupted.
* **Resume:** the MLflow run's id is the plugin's checkpointed state, so a resumed bz
  run continues the same MLflow run (``RUNNING`` again); params it already has are
  kept (MLflow cannot change them), new ones are added.
* **log_model:** the weights the run ended with (after ``early_stopping`` restored the
  best ones) as the artifact ``model.pt``, a ``state_dict`` that
  ``torch.load(path, weights_only=True)`` reads.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from bz.config import at_least, unstructure
from bz.plugins import ConfiguredPluginClass, Order, hook, plugin_logger
from bz.plugins._scalars import LoggerClock, step_scalars

if TYPE_CHECKING:
    from collections.abc import Callable

    from mlflow import MlflowClient

    from bz.plugins._context import PluginContext

MAX_KEY_LENGTH = 250
"""The longest param or metric key MLflow stores."""
MAX_VALUE_LENGTH = 6000
"""The longest param value MLflow stores (``mlflow.utils.validation`` when installed)."""
_BATCH = 100  # MLflow takes at most 100 params in one log_batch
_UNSAFE = re.compile(r"[^\w\-. /:]")

_log = plugin_logger("mlflow")


@attrs.frozen
class MlflowConfig:
    """Options of ``mlflow``."""

    tracking_uri: str | None = None
    """Tracking server or store URI; default: MLflow's own (``MLFLOW_TRACKING_URI`` first)."""
    experiment_name: str | None = None
    """Experiment (created if missing); default: ``MLFLOW_EXPERIMENT_NAME``, else ``Default``."""
    run_name: str | None = None
    """Name of the MLflow run (default: MLflow picks one)."""
    tags: dict[str, str] = attrs.field(factory=dict)
    """Tags set on the run."""
    log_model: bool = False
    """Log the weights the run ended with as the artifact ``model.pt``."""
    step_interval: int | None = attrs.field(default=None, validator=at_least(1))
    """Also log the batch loss, gradient norm and learning rate every N steps (null: never)."""


def safe_key(key: str) -> str:
    """``key`` as MLflow accepts it: refused characters become ``_``, at most 250 long."""
    return _UNSAFE.sub("_", key)[:MAX_KEY_LENGTH] or "_"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, separators=(",", ":"))


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_params(context: PluginContext, limit: int = MAX_VALUE_LENGTH) -> dict[str, str]:
    """The params of a run: hyperparameters by name, the configuration as ``config.*``;
    keys made safe, values cut to ``limit`` characters."""
    config: dict[str, Any] = {}
    if context.run_config is not None:
        config = dict(unstructure(context.run_config))
        config.pop("hyperparameters", None)
    raw = {**_flatten(config, "config."), **_flatten(context.hyperparameters)}
    return {safe_key(key): _text(value)[:limit] for key, value in raw.items()}


class Mlflow:
    """Logs params, per-epoch scalars and the final weights to MLflow; rank 0 only.

    Other ranks of a distributed run create no MLflow run.
    """

    Config = MlflowConfig
    # Its end_training_session sees the weights early_stopping (or ema) leaves.
    order = Order(after=("early_stopping", "ema"))

    def __init__(self, config: MlflowConfig | None = None) -> None:
        # Checked here (cheaply: no import) so that a missing extra is reported when the
        # plugins are loaded, by `bz check-config` too, rather than once training runs.
        if importlib.util.find_spec("mlflow") is None:
            raise ImportError("the mlflow plugin needs MLflow: pip install 'bz-cli[mlflow]'")
        self.name = "mlflow"
        self.config = config or MlflowConfig()
        self.client: MlflowClient | None = None
        """The client (set when training starts, on rank 0)."""
        self.run_id: str | None = None
        """The MLflow run being logged to (checkpointed: a resumed run continues it)."""
        self._experiment_id: str | None = None
        self._started = False
        """This session has started (or resumed) ``run_id``."""
        self._clock = LoggerClock(self, self.config.step_interval, self._log_step)

    @property
    def needs_training_process(self) -> str | None:
        """Why ``"isolation": "process"`` is refused with these options (None: it is not)."""
        return "log_model saves the model's weights" if self.config.log_model else None

    end_training_batch: Callable[[PluginContext], None]
    """The step scalars; present only with ``step_interval``."""
    gradient_norm_every: int
    """Asks the loop for the gradient norm on the steps logged (with ``step_interval``)."""

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The MLflow run's id, so that a resumed bz run continues it."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the checkpoint's MLflow run (from the next epoch on)."""
        run_id = state.get("run_id")
        if isinstance(run_id, str) and run_id != self.run_id:
            self.run_id = run_id
            self._started = False

    # -- hooks ---------------------------------------------------------------------------

    @hook
    def start_training_session(self, context: PluginContext) -> None:
        """Connect to the tracking store and find the experiment (rank 0 only).

        The MLflow run itself starts with the first epoch, once a resumed run has
        said which MLflow run to continue.
        """
        if not context.is_main_process:
            return
        # Imported here: importing MLflow takes seconds.
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.config.tracking_uri)
        name = self.config.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name is None:
            self._experiment_id = "0"  # MLflow's Default experiment, in every store
        else:
            experiment = client.get_experiment_by_name(name)
            self._experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(name)
            )
        self.client = client
        self.run_id = None
        self._started = False

    def _run(self, context: PluginContext) -> tuple[MlflowClient, str] | None:
        """The MLflow run of this session: started, or resumed, on first use."""
        client = self.client
        if client is None:
            return None
        if self.run_id is not None and not self._started:
            self._resume(client, self.run_id, context)
        if self.run_id is None:
            assert self._experiment_id is not None
            run = client.create_run(
                self._experiment_id,
                run_name=self.config.run_name,
                tags=dict(self.config.tags),
            )
            self.run_id = run.info.run_id
            self._log_params(client, self.run_id, run_params(context, _value_limit()))
        self._started = True
        return client, self.run_id

    def _resume(self, client: MlflowClient, run_id: str, context: PluginContext) -> None:
        from mlflow.exceptions import MlflowException

        try:
            existing = client.get_run(run_id).data.params
        except MlflowException as exc:
            _log.warning("mlflow_run_not_found", run_id=run_id, error=str(exc))
            self.run_id = None  # a new run is started instead
            return
        client.update_run(run_id, status="RUNNING")
        params = run_params(context, _value_limit())
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            # MLflow params cannot change; the run keeps the values it started with.
            _log.warning("mlflow_params_kept", run_id=run_id, params=changed)
        new = {key: value for key, value in params.items() if key not in existing}
        self._log_params(client, run_id, new)

    @staticmethod
    def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), _BATCH):
            client.log_batch(run_id, params=items[start : start + _BATCH])

    @hook
    def start_epoch(self, context: PluginContext) -> None:
        """Start (or resume) the MLflow run; note the epoch's learning rate and clock."""
        if self._run(context) is None:
            return
        self._clock.start_epoch(context)

    def _log_step(self, context: PluginContext) -> None:
        """Every ``step_interval`` steps, the step scalars (the only per-step host reads)."""
        if self.client is None or not self._clock.due(context):
            return
        self._log_metrics(context, step_scalars(context), context.global_step)

    @hook
    def end_epoch(self, context: PluginContext) -> None:
        """Log the epoch's scalars at step = the epoch counted from 1."""
        if self.client is None:
            return
        self._log_metrics(context, self._clock.epoch_scalars(context), context.epoch + 1)

    def _log_metrics(
        self, context: PluginContext, scalars: Mapping[str, float], step: int
    ) -> None:
        from mlflow.entities import Metric

        found = self._run(context)
        if found is None:
            return
        client, run_id = found
        now = int(time.time() * 1000)
        metrics = [
            Metric(safe_key(tag), _finite(value), now, step) for tag, value in scalars.items()
        ]
        client.log_batch(run_id, metrics=metrics)

    @hook
    def end_training_session(self, context: PluginContext) -> None:
        """Log the model if asked; mark the run ``FINISHED`` (unless it failed)."""
        found = self._run(context) if self.client is not None else None
        if found is None:
            return
        client, run_id = found
        self.client = None
        if self.config.log_model:
            self._log_model(client, run_id, context)
        client.set_terminated(run_id, status="FINISHED")

    def _log_model(self, client: MlflowClient, run_id: str, context: PluginContext) -> None:
        import torch

        model = context.model
        config = context.run_config
        if model is None:
            return
        if config is not None and config.distributed.strategy == "fsdp":
            # Rank 0 holds only its shards; bz's own model.pt has the whole weights.
            _log.warning("mlflow_model_skipped", reason="fsdp shards the weights")
            return
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.pt"
            torch.save(model.state_dict(), path)
            client.log_artifact(run_id, str(path))

    @hook
    def on_exception(self, context: PluginContext) -> None:
        """Mark the run ``FAILED`` (a failure or an interrupt), keeping what was logged."""
        found = self._run(context) if self.client is not None else None
        if found is None:
            return
        client, run_id = found
        # Nothing more this session (an interrupt's end_training_session included); the
        # id stays, in the checkpoint too, and a resume marks the run RUNNING again.
        self.client = None
        client.set_terminated(run_id, status="FAILED")


def _finite(value: float) -> float:
    # MLflow stores NaN; infinities it stores as the largest floats anyway.
    return value if not math.isinf(value) else math.copysign(1.7976931348623157e308, value)


def _value_limit() -> int:
    """MLflow's own limit on a param's length, where this version says it."""
    try:
        from mlflow.utils import validation
    except ImportError:  # pragma: no cover - an MLflow without the module
        return MAX_VALUE_LENGTH
    limit = getattr(validation, "MAX_PARAM_VAL_LENGTH", MAX_VALUE_LENGTH)
    return limit if isinstance(limit, int) and limit > 0 else MAX_VALUE_LENGTH


# The contract the plugin guide asks of every plugin, checked by mypy: the loader
# builds it as Mlflow(MlflowConfig(**options)).
_: ConfiguredPluginClass[MlflowConfig] = Mlflow
