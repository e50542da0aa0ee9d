"""``PluginContext``: what the training loop shows its plugins.

During a run plugins receive a :class:`LoopView` of the loop's context: the values the
loop owns (epoch, counters, losses, the metric values it computed, model, optimizer)
read-only, the channels the plugin guide documents open (``should_stop_training``,
``extra``, adding a plugin's own entries to ``training_metrics`` /
``validation_metrics``). A ``PluginContext`` built by hand, as plugin tests do, is an
ordinary object: every field can be set.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Iterable, Iterator, Mapping
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch

    from bz.config import RunConfig


_CPU_READS = [True]
"""Whether :class:`DeviceSum` sums CPU values as Python floats (see
:func:`summing_as_on_a_device`); one flag, read when a sum starts a run of weights."""


@contextlib.contextmanager
def summing_as_on_a_device() -> Iterator[None]:
    """Inside the block, :class:`DeviceSum` adds CPU tensors as it adds a GPU's (in place,
    nothing read), so that counting host reads on the CPU shows what a device run reads;
    ``bz.testing.count_host_reads`` enters it. The sums are the same bit for bit."""
    before = _CPU_READS[0]
    _CPU_READS[0] = False
    try:
        yield
    finally:
        _CPU_READS[0] = before


class DeviceSum:
    """Per-batch scalars summed where they live; a device's reach the host only when read.

    The loop adds each batch's detached mean loss with the batch's sample count as its
    weight (the count comes from shapes). Two sums come out of it: :meth:`value`,
    weighted by the counts (the sample-weighted total bz's epoch means divide), and
    :meth:`batch_sum`, the plain sum of the batches' mean losses (what the original
    bz-cli called ``training_loss_total``). Reading one converts once.

    On a device (CUDA, MPS) each value is added in place into one device scalar, the
    run's sum, so nothing is kept per batch and nothing is read: one in-place ``add_``
    per batch, no synchronisation. On the CPU, which is the host and computes
    synchronously, each value is read as a Python float (``item``: no wait, nothing to
    synchronise) and added to a Python float, about a tenth of the cost of a tensor
    ``add_``; Python floats are IEEE float64 added in the same order, so the sums are
    the very same numbers as a float64 device sum's. Batches of one epoch share a size
    except (usually) the last, so the weight is applied per run of equal weights: when
    the weight changes, the run's sum is folded into the totals (times its weight) and a
    new run starts. The sums are kept in float64 (float32 on MPS, which has no float64).
    """

    __slots__ = ("_folded", "_folded_batches", "_run", "_weight")

    def __init__(self, initial: float = 0.0, batches: float | None = None) -> None:
        """``initial``: the weighted sum so far; ``batches``: the plain sum so far (the
        weighted one when not given, as for weights of 1)."""
        self._run: torch.Tensor | float | None = None
        """The plain sum of the values added since the weight last changed: a Python
        float for CPU values, else a device scalar."""
        self._weight: int | None = None
        """The weight of the values in ``_run``."""
        self._folded: torch.Tensor | float = initial
        self._folded_batches: torch.Tensor | float = initial if batches is None else batches

    def add(self, value: torch.Tensor, weight: int = 1) -> torch.Tensor | float:
        """Add ``value`` (a scalar, attached to a graph or not: what is added is never
        part of one) with ``weight``; never synchronises a device. Returns what was
        added: the float read from a CPU value, else ``value`` detached."""
        if weight == self._weight:
            run = self._run
            if type(run) is float:  # a CPU value: read, which waits for nothing
                read: float = value.item()
                self._run = run + read
                return read
            value = value.detach()
            run.add_(value)  # type: ignore[union-attr]  # set with the weight
            return value
        return self._start_run(value, weight)

    def _start_run(self, value: torch.Tensor, weight: int) -> torch.Tensor | float:
        import torch

        self._fold()
        device = value.device.type
        if device == "cpu" and _CPU_READS[0]:
            read: float = value.item()
            # 0.0 + x, as the device sum's zeros().add_(x) (which makes -0.0 into 0.0).
            self._run, self._weight = 0.0 + read, weight
            return read
        dtype = torch.float32 if device == "mps" else torch.float64
        # A fresh tensor (never an alias of ``value``, which add_ would change), and a
        # normal one even when made in inference mode (validation), so later batches
        # can be added to it outside inference mode.
        with torch.inference_mode(False):
            run = torch.zeros((), dtype=dtype, device=value.device)
        value = value.detach()
        run.add_(value)
        self._run, self._weight = run, weight
        return value

    def _fold(self) -> None:
        """Fold the current run into the totals (where it lives); no run after it."""
        run = self._run
        if run is not None:
            self._folded, self._folded_batches = self._sums()
            self._run = self._weight = None

    def _sums(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The weighted and the plain sum so far (new values; nothing changes here, so
        reading a sum mid-epoch never changes how the rest is added up)."""
        run = self._run
        if run is None:
            return self._folded, self._folded_batches
        assert self._weight is not None
        return self._folded + run * self._weight, self._folded_batches + run

    def value(self) -> float:
        """The weighted sum so far, as a Python float (a device's: one device-to-host read)."""
        return float(self._sums()[0])

    def batch_sum(self) -> float:
        """The plain sum of the values so far, weights ignored (one read, as ``value``)."""
        return float(self._sums()[1])


class LastLoss:
    """The latest training batch's loss as the loop leaves it, made what
    :attr:`PluginContext.last_loss` shows only when someone reads it.

    The loop stores per batch what it has at hand anyway: on a device the detached loss
    (the tensor :class:`DeviceSum` added), on the CPU the float :class:`DeviceSum` read
    and the loss's dtype. A float becomes a CPU tensor of that dtype, the same number
    (a float widened from any floating dtype narrows back exactly), on the first read,
    and that tensor is kept for the reads after it. Neither form holds the graph.
    """

    __slots__ = ("dtype", "value")

    def __init__(self) -> None:
        self.value: torch.Tensor | float | None = None
        self.dtype: torch.dtype | None = None

    def tensor(self) -> torch.Tensor | None:
        """The loss as a tensor (None before the first training batch ends)."""
        value = self.value
        if type(value) is not float:
            return value  # type: ignore[return-value]  # a tensor or None
        import torch

        # A normal tensor even when first read under inference mode: later readers may
        # use it outside it.
        with torch.inference_mode(False):
            made = torch.tensor(value, dtype=self.dtype, device="cpu")
        self.value = made
        return made


class PluginContext:
    """The state of the run as plugins see it.

    The training loop owns the real state and refreshes this object from it before
    calling hooks. During a run plugins receive it through a :class:`LoopView`, which
    makes the loop's values read-only; plugins talk back through
    ``should_stop_training``, by adding entries to ``training_metrics`` /
    ``validation_metrics``, and through ``extra`` (data shared between plugins).

    ``PluginContext()`` with no arguments is valid and fully writable, which is handy
    in plugin tests.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        device: torch.device | None = None,
        hyperparameters: dict[str, Any] | None = None,
        epochs: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.epoch: int = 0
        """Zero-based index of the current epoch."""
        self.epochs: int = epochs
        """Number of epochs the run is configured for."""
        self.global_step: int = 0
        """Optimizer steps taken since the run began (survives resume)."""
        self.batch_index: int = 0
        """Zero-based index of the current batch within its loop."""
        self.training_batch_count: int = 0
        """Training batches seen so far in this epoch."""
        self.training_sample_count: int = 0
        """Training samples seen so far in this epoch (first dimension of the inputs)."""
        self.validation_batch_count: int = 0
        """Validation batches seen so far in this epoch."""
        self.validation_sample_count: int = 0
        """Validation samples seen so far in this epoch."""
        self.training_batches_per_epoch: int | None = None
        """``len(train_loader)`` when the loader has a length."""
        self.validation_batches_per_epoch: int | None = None
        """``len(val_loader)`` when there is one and it has a length."""
        self.training_metrics: dict[str, float] = {}
        """Training metrics of this epoch, filled after the training loop."""
        self.validation_metrics: dict[str, float] = {}
        """Validation metrics of this epoch, filled after the validation loop."""
        self.run_config: RunConfig | None = None
        """The whole configuration of the run (None outside a run)."""
        self.hyperparameters: dict[str, Any] = dict(hyperparameters or {})
        """The ``hyperparameters`` table of the configuration."""
        self.extra: dict[str, Any] = {}
        """Free-form data shared between plugins (``active_plugins`` lists them)."""
        self.should_stop_training: bool = False
        """Set to True to ask the loop to stop after the current training step (several
        processes stop after the same step; see ``docs/training.md``)."""
        self._model = model
        self._optimizer = optimizer
        self.scheduler: object | None = None
        """The learning-rate scheduler, if ``train.py`` returned one."""
        self.device = device
        """The device training runs on."""
        self.rank: int = rank
        """This process's rank (0 when not distributed)."""
        self.world_size: int = world_size
        """Number of training processes (1 when not distributed)."""
        self.checkpoint_path: Path | None = None
        """The checkpoint just saved or loaded, during the checkpoint hooks."""
        self.exception: BaseException | None = None
        """The error that is ending training, during ``on_exception``."""
        self._last_loss = LastLoss()
        """What :attr:`last_loss` shows (the loop writes it per batch)."""
        self.batch: Any = None
        """The current batch on the training device, in the per-batch hooks (a
        reference, not a copy): ``(inputs, targets)`` with a ``loss_fn``, the batch as
        the loader yielded it otherwise (a mapping, the argument of ``step``); None
        elsewhere."""
        self.outputs: Any = None
        """The model's outputs for the current batch (a ``step``'s ``predictions``), from
        ``after_backward`` (training) or ``end_validation_batch`` (validation) to the end
        of the batch; None elsewhere."""
        self.loss: torch.Tensor | None = None
        """The current batch's loss as computed (unscaled, still attached to the graph in
        ``after_backward``), where ``outputs`` is set; reading its value syncs."""
        self._training_loss = DeviceSum()
        self._validation_loss = DeviceSum()
        self._gradient_norm: torch.Tensor | None = None

    @property
    def model(self) -> torch.nn.Module | None:
        """The model being trained (acting on its weights is allowed; replacing it is not)."""
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer (changing its learning rate is allowed; replacing it is not)."""
        return self._optimizer

    @property
    def last_loss(self) -> torch.Tensor | None:
        """The latest training batch's loss, detached, as a device tensor (reading its
        value syncs; avoid per batch). None before the first training batch ends."""
        return self._last_loss.tensor()

    @last_loss.setter
    def last_loss(self, value: torch.Tensor | None) -> None:
        self._last_loss.value = value

    @property
    def is_main_process(self) -> bool:
        """True on rank 0, where logging and checkpointing plugins run."""
        return self.rank == 0

    @property
    def training_loss_total(self) -> float:
        """Sum of this epoch's training batches' mean losses, as the original bz-cli
        summed them: ``training_loss_total / training_batch_count`` is the mean batch
        loss (one device read when accessed). For the loss bz reports (weighted by
        batch sizes) read :attr:`training_loss`."""
        return self._training_loss.batch_sum()

    @training_loss_total.setter
    def training_loss_total(self, value: float) -> None:
        # A context built by hand (a plugin's test): both sums start at ``value``.
        self._training_loss = DeviceSum(float(value))

    @property
    def validation_loss_total(self) -> float:
        """Sum of this epoch's validation batches' mean losses, like
        ``training_loss_total``; :attr:`validation_loss` is the reported loss."""
        return self._validation_loss.batch_sum()

    @validation_loss_total.setter
    def validation_loss_total(self, value: float) -> None:
        self._validation_loss = DeviceSum(float(value))

    @property
    def training_loss(self) -> float:
        """Training loss this epoch, weighted by batch sizes: the mean over the samples
        seen so far (``nan`` before the first batch); the loss every built-in plugin,
        the console and ``FitResult`` report. One device read when accessed."""
        return _mean(self._training_loss.value(), self.training_sample_count)

    @property
    def validation_loss(self) -> float:
        """Validation loss this epoch, weighted by batch sizes: the mean over the samples
        seen so far (``nan`` before the first batch). One device read when accessed."""
        return _mean(self._validation_loss.value(), self.validation_sample_count)

    @property
    def gradient_norm(self) -> float | None:
        """The total gradient norm before clipping, in ``before_optimizer_step`` and
        ``end_training_batch`` of a step that clips by norm (``gradient_clip.max_norm``)
        or that a plugin asked for (``gradient_norm_every``, see ``docs/integrations.md``);
        None otherwise. Kept on the device: one device read when accessed."""
        norm = self._gradient_norm
        return None if norm is None else float(norm)


def _mean(total: float, count: int) -> float:
    return total / count if count else float("nan")


# -- what plugins see during a run --------------------------------------------------------

_CHANNELS = frozenset({"should_stop_training", "extra"})
"""Fields a plugin may assign through a :class:`LoopView` (the guide's channels)."""
_METRIC_FIELDS = frozenset({"training_metrics", "validation_metrics"})


def _channel_value(name: str, value: Any) -> Any:
    """What a plugin assigns to a channel, as the loop reads it, decided in the plugin's
    hook: ``should_stop_training`` becomes a ``bool`` there (a value whose truth cannot be
    told, a tensor of several elements, is that plugin's fault, not the loop's), and
    ``extra`` must stay a dict (the loop copies it for rewind's snapshots)."""
    if name == "should_stop_training":
        return value if type(value) is bool else bool(value)
    if type(value) is dict:
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"context.extra must be a dict, got {type(value).__name__}")
    return dict(value)


def _read_only(name: str) -> NoReturn:
    raise AttributeError(
        f"context.{name} is the training loop's and read-only for plugins; share your "
        "own data through context.extra, add metrics as new keys of "
        "context.training_metrics / validation_metrics, ask for a stop with "
        "context.should_stop_training"
    )


class LoopMetrics(dict[str, float]):
    """A metric dict the loop computed: plugins may add their own keys, not change the loop's.

    An ordinary ``dict`` for everything else (``json.dumps``, ``dict(...)``, iteration).
    Changing or removing a value the loop computed raises ``TypeError`` in the plugin
    that tried, which makes it that plugin's fault.
    """

    __slots__ = ("_owned",)

    def __init__(self, computed: Mapping[str, float]) -> None:
        super().__init__(computed)
        self._owned = frozenset(computed)

    def _check(self, key: str) -> None:
        if key in self._owned:
            raise TypeError(
                f"metric {key!r} was computed by the training loop and is read-only for "
                "plugins; add your own value under a new key"
            )

    def __setitem__(self, key: str, value: Any) -> None:  # float to mypy; checked at run time
        self._check(key)
        if not isinstance(value, numbers.Real) and getattr(value, "ndim", None) != 0:
            # Refused here, in the plugin that adds it: every logger formats the epoch's
            # metrics as numbers, and would take the blame for it.
            raise TypeError(
                f"metric {key!r}: a metric is a number (or a 0-d tensor), "
                f"got {type(value).__name__}"
            )
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._check(key)
        super().__delitem__(key)

    def setdefault(self, key: str, default: float = 0.0) -> float:
        """``dict.setdefault`` that cannot replace the loop's values (it never does)."""
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: float) -> None:
        """``dict.update``, one key at a time, so the loop's keys stay as computed."""
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> LoopMetrics:  # type: ignore[override,misc]  # same in-place contract as dict's, checked per key
        self.update(other)
        return self

    def pop(self, key: str, *default: Any) -> Any:
        """``dict.pop`` for a plugin's own keys."""
        if key in self:
            self._check(key)
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, float]:
        """Removes the newest of a plugin's own keys."""
        for key in reversed(list(self)):
            if key not in self._owned:
                return key, super().pop(key)
        raise KeyError("popitem(): no plugin-added metric to remove")

    def clear(self) -> None:
        """Removes every plugin-added key; the loop's stay."""
        for key in [key for key in self if key not in self._owned]:
            super().__delitem__(key)
        if self:
            self._check(next(iter(self)))


# -- the run's configuration, read-only ---------------------------------------------------


def _not_yours(where: str) -> NoReturn:
    raise TypeError(
        f"{where} is the run's configuration and read-only for plugins (the program that "
        "runs bz may use it again); change a copy of your own (copy.deepcopy)"
    )


class ConfigTable(dict[str, Any]):
    """A table of the run's configuration as plugins see it: an ordinary ``dict`` to read
    (``json.dumps``, ``dict(...)``, iteration, ``==``), read-only to change.

    Changing it raises ``TypeError`` in the plugin that tried, which makes it that
    plugin's fault; the caller's config is never touched. A copy (``copy.copy``,
    ``copy.deepcopy``, ``dict(...)`` one level deep, a pickle) is a plain ``dict``, the
    plugin's own.
    """

    __slots__ = ("_where",)

    def __init__(self, items: Mapping[str, Any], where: str) -> None:
        super().__init__(items)
        self._where = where

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        _not_yours(self._where)

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {key: copy.deepcopy(value, memo) for key, value in self.items()}

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        return dict, (dict(self),)


class ConfigList(list[Any]):
    """A list of the run's configuration as plugins see it (see :class:`ConfigTable`):
    an ordinary ``list`` to read, read-only to change; a copy is a plain ``list``."""

    __slots__ = ("_where",)

    def __init__(self, items: Iterable[Any], where: str) -> None:
        super().__init__(items)
        self._where = where

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        _not_yours(self._where)

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return [copy.deepcopy(value, memo) for value in self]

    def __reduce__(self) -> tuple[type[list[Any]], tuple[list[Any]]]:
        return list, (list(self),)


def read_only_value(value: Any, where: str, _seen: dict[int, Any] | None = None) -> Any:
    """``value`` with its tables and lists (at any depth, inside tuples too) read-only,
    named ``where`` in the error a change raises; other values as they are (shared)."""
    seen = {} if _seen is None else _seen
    if id(value) in seen:  # a table that holds itself, built in Python
        return seen[id(value)]
    if isinstance(value, Mapping):
        table = seen[id(value)] = ConfigTable({}, where)
        for key, item in value.items():
            dict.__setitem__(table, key, read_only_value(item, f"{where}[{key!r}]", seen))
        return table
    if isinstance(value, list):
        items = seen[id(value)] = ConfigList((), where)
        shown = (read_only_value(v, f"{where}[{i}]", seen) for i, v in enumerate(value))
        list.extend(items, shown)
        return items
    if type(value) is tuple:
        return tuple(read_only_value(v, f"{where}[{i}]", seen) for i, v in enumerate(value))
    return value


def read_only_config(config: RunConfig) -> RunConfig:
    """``config`` as plugins see it (the context's ``run_config``, ``create``'s
    ``training_config``): equal to it, its ``hyperparameters`` and the options of its
    ``metrics`` and ``plugins`` entries read-only. The rest of it is frozen already."""
    import attrs

    where = "run_config"
    return attrs.evolve(
        config,
        hyperparameters=read_only_value(config.hyperparameters, f"{where}.hyperparameters"),
        metrics=tuple(
            attrs.evolve(m, options=read_only_value(m.options, f"{where}.metrics[{i}].options"))
            for i, m in enumerate(config.metrics)
        ),
        plugins=tuple(
            attrs.evolve(p, options=read_only_value(p.options, f"{where}.plugins[{i}].options"))
            for i, p in enumerate(config.plugins)
        ),
    )


class LoopView(PluginContext):
    """The loop's context as plugins see it during a run (see the module docstring).

    Reads go through to the loop's context, so a plugin holding the view across hooks
    always sees current values. Assigning a value the loop owns raises
    ``AttributeError`` inside the plugin's hook: it becomes that plugin's fault and
    never reaches the loop or another plugin.
    """

    def __init__(self, source: PluginContext) -> None:
        # Deliberately not PluginContext.__init__: every field lives on `source`.
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_configured", {})

    def _configuration(self, name: str) -> Any:
        """The source's ``run_config`` / ``hyperparameters`` made read-only (see
        :func:`read_only_config`), once per object the source holds."""
        value = getattr(object.__getattribute__(self, "_source"), name)
        shown: dict[str, tuple[Any, Any]] = object.__getattribute__(self, "_configured")
        seen = shown.get(name)
        if seen is None or seen[0] is not value:
            if name == "run_config":
                made = None if value is None else read_only_config(value)
            else:
                made = read_only_value(value, f"context.{name}")
            seen = shown[name] = (value, made)
        return seen[1]

    # Read-only properties over PluginContext's attributes: LoopView.__setattr__ decides.
    @property
    def run_config(self) -> RunConfig | None:  # type: ignore[override]  # read-only here
        """The run's configuration, its tables and lists read-only (see the guide)."""
        return self._configuration("run_config")  # type: ignore[no-any-return]

    @property
    def hyperparameters(self) -> dict[str, Any]:  # type: ignore[override]  # as run_config
        """The ``hyperparameters`` table of the configuration, read-only."""
        return self._configuration("hyperparameters")  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        # Called only for names not found on the view itself: every field of the source.
        source: PluginContext = object.__getattribute__(self, "_source")
        value = getattr(source, name)
        if name in _METRIC_FIELDS and type(value) is not LoopMetrics:
            # A dict the loop has just computed: from now on its keys are the loop's.
            value = LoopMetrics(value)
            setattr(source, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CHANNELS:
            setattr(object.__getattribute__(self, "_source"), name, _channel_value(name, value))
            return
        _read_only(name)

    def __delattr__(self, name: str) -> None:
        _read_only(name)

    def __dir__(self) -> Iterable[str]:
        return dir(object.__getattribute__(self, "_source"))


# A plugin reads the loop's values through the view many times per batch. Found on the
# view's class, a field is one C-level attribute lookup on the source (~0.2 k
# instructions); through ``__getattr__`` it was a failed lookup, an AttributeError and a
# Python call first (~6.8 k). The metric dicts keep ``__getattr__`` (they are wrapped on
# first read); assignments still go through ``__setattr__`` (this property has no setter
# that anything reaches: ``LoopView.__setattr__`` decides).
# The configuration's fields are made read-only on first read (LoopView's properties).
for _field in vars(PluginContext()):
    if _field not in _METRIC_FIELDS and _field not in {"run_config", "hyperparameters"}:
        setattr(LoopView, _field, property(attrgetter(f"_source.{_field}")))
del _field
