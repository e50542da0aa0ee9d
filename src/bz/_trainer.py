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
    end_training_session
    on_exception                     # instead of the rest, when training fails

The loop owns every counter and the loss sums. Before hooks run it copies them into
the context, so what a plugin writes there never changes what the loop does next.
Nothing here reads a device value back to the host per batch.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import structlog
import torch

from bz._context import DeviceSum, PluginContext
from bz._errors import TrainingError, UsageError
from bz._loader import plugin_set
from bz._sandbox import PluginFailure, PluginReport, PluginSet
from bz._setup import user_frame
from bz.config import RunConfig

if TYPE_CHECKING:
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
    """The outcome of :meth:`Trainer.fit`."""

    epochs_completed: int
    global_step: int
    stopped_early: bool
    history: tuple[EpochRecord, ...]
    plugins: tuple[PluginReport, ...]
    seconds: float

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

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        for metric in self._items:
            metric.update(outputs, targets)

    def compute(self) -> dict[str, float]:
        """One host read for all metrics together."""
        if not self._metrics:
            return {}
        from bz.metrics import compute_all

        return compute_all(self._metrics)

    def reset(self) -> None:
        for metric in self._items:
            metric.reset()

    def to(self, device: torch.device) -> None:
        for metric in self._items:
            move = getattr(metric, "to", None)
            if callable(move):
                move(device)


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
    ) -> FitResult:
        """Train for ``config.epochs`` epochs (or until a plugin asks to stop).

        ``metrics`` overrides the metrics built from ``config.metrics``; the setup's own
        ``metrics`` are always added.
        """
        config = config or RunConfig()
        if not isinstance(plugins, PluginSet):
            plugins = plugin_set(list(plugins), config.plugin_errors)
        if metrics is None:
            from bz.metrics import build_metrics

            metrics = build_metrics(config.metrics)
        if config.seed is not None:
            seed_everything(config.seed)
        run = _Run(setup, config, plugins, {**metrics, **setup.metrics})
        return run.fit()


class _Run:
    """One call of ``fit``: the loop's own state lives here."""

    def __init__(
        self,
        setup: TrainingSetup,
        config: RunConfig,
        plugins: PluginSet,
        metrics: Mapping[str, Metric],
    ) -> None:
        self.setup = setup
        self.config = config
        self.plugins = plugins
        self.device = resolve_device(config.device)
        self.model = setup.model.to(self.device)
        self.forward = self._compile(self.model) if config.compile else self.model
        self.train_metrics = _Metrics(metrics)
        self.val_metrics = _Metrics({name: copy.deepcopy(m) for name, m in metrics.items()})
        self.train_metrics.to(self.device)
        self.val_metrics.to(self.device)
        self.move_batches = self.device.type != "cpu"
        # Loop state (the context only ever shows copies of these).
        self.epoch = 0
        self.global_step = 0
        self.batch_index = 0
        self.train_batches = 0
        self.val_batches = 0
        self.train_loss = DeviceSum()
        self.val_loss = DeviceSum()
        self.context = PluginContext(
            model=setup.model,
            optimizer=setup.optimizer,
            device=self.device,
            hyperparameters=config.hyperparameters,
            epochs=config.epochs,
        )
        self.context.scheduler = setup.scheduler
        self.context.training_batches_per_epoch = _length(setup.train_loader)
        self.context.validation_batches_per_epoch = _length(setup.val_loader)

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
        ctx.validation_batch_count = self.val_batches
        ctx._training_loss = self.train_loss
        ctx._validation_loss = self.val_loss
        return ctx

    def _hook(self, hook: str) -> None:
        # The context is refreshed only when someone will look at it.
        if self.plugins.implements(hook):
            self.plugins.call(hook, self._show())

    # -- the run ---------------------------------------------------------------------

    def fit(self) -> FitResult:
        started = time.perf_counter()
        history: list[EpochRecord] = []
        stopped_early = False
        self.context.extra["active_plugins"] = self.plugins.active_names
        try:
            self._hook("start_training_session")
            for epoch in range(self.config.epochs):
                self.epoch = epoch
                history.append(self._epoch())
                if self.context.should_stop_training:
                    stopped_early = epoch + 1 < self.config.epochs
                    _log.info("stop_requested", epoch=epoch, step=self.global_step)
                    break
            self._hook("end_training_session")
        except PluginFailure:
            self._fail_session()
            raise
        except (KeyboardInterrupt, UsageError) as exc:
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
            epochs_completed=len(history),
            global_step=self.global_step,
            stopped_early=stopped_early,
            history=tuple(history),
            plugins=tuple(self.plugins.report()),
            seconds=time.perf_counter() - started,
        )

    def _fail_session(self, exc: BaseException | None = None) -> None:
        self.context.exception = exc
        # Plugins get to flush what they hold; the sandbox still guards them, but with
        # "raise" a second plugin fault must not hide the first error.
        policy = self.plugins.policy
        self.plugins.policy = "isolate"
        try:
            self._hook("on_exception")
        finally:
            self.plugins.policy = policy
        self.plugins.log_summary()

    def _epoch(self) -> EpochRecord:
        started = time.perf_counter()
        ctx = self.context
        ctx.extra["active_plugins"] = self.plugins.active_names
        ctx.training_metrics = {}
        ctx.validation_metrics = {}
        self.train_batches = self.val_batches = self.batch_index = 0
        self.train_loss = DeviceSum()
        self.val_loss = DeviceSum()
        self._hook("start_epoch")
        self._train_loop()
        validated = self.setup.val_loader is not None
        if validated:
            self._validation_loop()
        self._step_scheduler(validated)
        self._hook("end_epoch")
        return EpochRecord(
            epoch=self.epoch,
            training_loss=_mean(self.train_loss, self.train_batches),
            validation_loss=_mean(self.val_loss, self.val_batches) if validated else None,
            training_metrics=dict(ctx.training_metrics),
            validation_metrics=dict(ctx.validation_metrics),
            seconds=time.perf_counter() - started,
        )

    def _train_loop(self) -> None:
        metrics, hook, step = self.train_metrics, self._hook, self._step
        self.model.train()
        metrics.reset()
        self._hook("start_training_loop")
        for index, batch in enumerate(self.setup.train_loader):
            self.batch_index = index
            hook("start_training_batch")
            step(batch)
            hook("end_training_batch")
        self.context.training_metrics = metrics.compute()
        self._hook("end_training_loop")

    def _step(self, batch: Any) -> None:
        # A method of its own so that the batch, outputs and graph die when it returns
        # instead of living in the loop's frame until the next batch replaces them.
        setup, hook = self.setup, self._hook
        if self.move_batches:
            batch = _to_device(batch, self.device)
        inputs, targets = _unpack(batch, "train_loader")
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
        self.train_metrics.update(outputs.detach(), targets)
        self.global_step += 1
        self.train_batches += 1
        self.context.last_loss = detached

    def _validation_loop(self) -> None:
        assert self.setup.val_loader is not None
        forward, loss_fn = self.forward, self.setup.loss_fn
        metrics, hook = self.val_metrics, self._hook
        self.model.eval()
        metrics.reset()
        self.batch_index = 0
        self._hook("start_validation_loop")
        with torch.no_grad():
            for index, batch in enumerate(self.setup.val_loader):
                self.batch_index = index
                hook("start_validation_batch")
                if self.move_batches:
                    batch = _to_device(batch, self.device)
                inputs, targets = _unpack(batch, "val_loader")
                outputs = forward(inputs)
                loss = loss_fn(outputs, targets)
                self.val_loss.add(loss.detach())
                metrics.update(outputs, targets)
                self.val_batches += 1
                hook("end_validation_batch")
        self.context.validation_metrics = metrics.compute()
        self._hook("end_validation_loop")

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


def _mean(total: DeviceSum, count: int) -> float:
    return total.value() / count if count else float("nan")
