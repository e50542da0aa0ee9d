"""Helpers for testing bz plugins: a context, a tiny training run, the loader's checks.

::

    from bz.testing import capture_logs, check_plugin, make_context, run_plugin

    def test_end_epoch_logs_the_loss() -> None:
        plugin = MyPlugin()
        plugin.end_epoch(make_context(epoch=5, training_loss_total=1.5))

    def test_trains_with_my_plugin() -> None:
        result = run_plugin(MyPlugin(), epochs=2)      # plugin faults raise
        assert result.epochs_completed == 2

    def test_events() -> None:
        with capture_logs() as events:                 # structlog.testing.capture_logs
            run_plugin(MyPlugin())
        assert {"event": "my_event", "plugin": "my_plugin"}.items() <= events[-1].items()

Everything here is deterministic and runs on the CPU in well under a second. Importing
this module imports torch.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from unittest.mock import patch

import torch
from structlog.testing import capture_logs
from torch import nn

from bz._converter import nearest
from bz._setup import TrainingSetup
from bz.config import RunConfig, structure
from bz.plugins._context import PluginContext, summing_as_on_a_device
from bz.plugins._inspection import check_plugin as _check_plugin
from bz.training.trainer import FitResult, Trainer

if TYPE_CHECKING:
    from bz.plugins._protocol import NamedPlugin
    from bz.plugins._sandbox import ErrorPolicy

__all__ = [
    "HOST_READS",
    "capture_logs",
    "check_plugin",
    "count_host_reads",
    "load_plugin",
    "make_context",
    "run_plugin",
    "tiny_setup",
]

_BATCH_SIZE = 16
_FEATURES = 4
_CLASSES = 2


def tiny_setup(
    *, batches: int = 4, validation: bool = True, seed: int = 0, lr: float = 0.1
) -> TrainingSetup:
    """A two-layer classifier on ``16 * batches`` random points; same seed, same setup.

    Loaders are plain lists of ``(inputs, targets)`` batches (they have a length, so
    ``context.training_batches_per_epoch`` is set). The validation set is the first two
    training batches.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(_BATCH_SIZE * batches, _FEATURES, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(_FEATURES, 8), nn.ReLU(), nn.Linear(8, _CLASSES))
    train = [
        (inputs[start : start + _BATCH_SIZE], targets[start : start + _BATCH_SIZE])
        for start in range(0, len(inputs), _BATCH_SIZE)
    ]
    return TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        train_loader=train,
        val_loader=train[:2] if validation else None,
    )


def run_plugin(
    plugin: NamedPlugin | Sequence[NamedPlugin],
    *,
    epochs: int = 2,
    policy: ErrorPolicy = "raise",
    setup: TrainingSetup | None = None,
    config: RunConfig | None = None,
) -> FitResult:
    """Train :func:`tiny_setup` (or ``setup``) on the CPU with ``plugin``.

    ``policy="raise"`` (the default here, unlike ``bz train``) turns a fault in the
    plugin into :class:`bz.TrainingError` with the plugin, hook and error in its
    message, so a test fails loudly instead of passing with a quarantined plugin. Use
    ``"isolate"`` to check how your plugin behaves next to a failing one.
    """
    plugins = [plugin] if not isinstance(plugin, Sequence) else list(plugin)
    # `plugins` in the config is not read: Trainer.fit trains with the objects given.
    run_config = (config or RunConfig()).with_overrides(
        epochs=epochs, plugin_errors=policy, device="cpu"
    )
    return Trainer().fit(setup or tiny_setup(), run_config, plugins)


def make_context(**fields: Any) -> PluginContext:
    """A :class:`~bz.plugins.PluginContext` with some fields set, for calling hooks.

    ``make_context(epoch=5, training_loss_total=1.5, validation_metrics={"accuracy":
    0.9})``. An unknown field is a ``TypeError`` that suggests the nearest real one, so
    a typo in a test does not silently set an attribute nobody reads.
    """
    constructor = {"model", "optimizer", "device", "hyperparameters", "epochs"}
    constructor |= {"rank", "world_size"}
    context = PluginContext(**{k: v for k, v in fields.items() if k in constructor})
    known = _context_fields(context)
    for key, value in fields.items():
        if key in constructor:
            continue
        if key not in known:
            hint = nearest(key, known)
            suggestion = f' (did you mean "{hint}"?)' if hint else ""
            raise TypeError(f"PluginContext has no field {key!r}{suggestion}")
        setattr(context, key, value)
    return context


def _context_fields(context: PluginContext) -> list[str]:
    public = [name for name in vars(context) if not name.startswith("_")]
    # The loss totals are properties with setters (device sums underneath).
    settable = [
        name
        for name, value in vars(PluginContext).items()
        if isinstance(value, property) and value.fset is not None
    ]
    return sorted({*public, *settable})


def check_plugin(plugin: object) -> tuple[str, ...]:
    """Run the loader's checks on a plugin object; return the hooks it implements.

    Raises ``TypeError`` with the loader's message when bz would refuse the plugin: no
    ``name: str``, a hook that cannot be called as ``hook(context)``, or a method marked
    ``@hook`` whose name is not a hook.
    """
    name = getattr(plugin, "name", type(plugin).__name__)
    return _check_plugin(str(name), plugin)


def load_plugin(
    factory: Any, options: Mapping[str, Any] | None = None, *, config: RunConfig | None = None
) -> NamedPlugin | None:
    """Create a plugin from JSON ``options`` the way ``bz train`` does.

    ``factory`` is what your entry point names (a class). Options are structured into
    its ``Config`` (errors are :class:`bz.ConfigError` with the JSON path), or handed to
    its ``create(config_data, training_config)``. ``None`` means "not created"
    (``enabled: false``).
    """
    from bz.plugins._loader import load_plugins

    name = str(getattr(factory, "name", getattr(factory, "__name__", "plugin")))
    data: dict[str, Any] = {"plugins": [{name: dict(options or {})}]}
    run_config = structure(data, RunConfig) if config is None else config
    specs = structure(data, RunConfig).plugins
    plugins = load_plugins(specs, run_config, policy="raise", registry={name: factory})
    active = plugins.active
    return active[0] if active else None


HOST_READS: tuple[str, ...] = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__array__",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__format__",
    "__repr__",
    "nonzero",
)
"""Every way a tensor's value reaches Python; on a GPU each one stalls the pipeline."""


@contextlib.contextmanager
def count_host_reads(counter: Counter[str]) -> Iterator[None]:
    """Count, by kind, every read of a tensor's value back to the host inside the block.

    Only outermost calls count (``f"{t}"`` calling ``item`` is one read). Use it to
    show that a plugin's per-batch hooks never stall the device::

        counter: Counter[str] = Counter()
        with count_host_reads(counter):
            run_plugin(MyPlugin())
        assert counter["item"] == 0

    Inside the block the loop adds each batch's loss as it does on a device (in place,
    nothing read), where on the CPU it otherwise reads it as a Python float (which
    synchronises nothing there): what is counted on the CPU is what a device run reads.
    """
    depth = [0]

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0:
                counter[name] += 1
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    with contextlib.ExitStack() as stack:
        stack.enter_context(summing_as_on_a_device())
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            stack.enter_context(patch.object(torch.Tensor, name, wrap(name, original)))
        if torch.cuda.is_available():
            stack.enter_context(
                patch.object(
                    torch.cuda, "synchronize", wrap("synchronize", torch.cuda.synchronize)
                )
            )
        yield
