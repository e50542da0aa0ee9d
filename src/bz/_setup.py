"""``TrainingSetup`` and the ``train.py`` contract.

A project's ``train.py`` defines::

    def setup(config: bz.RunConfig) -> bz.TrainingSetup: ...

bz imports the file, calls ``setup`` once (after seeding), and trains what it returns.
A ``train.py`` that is missing, does not parse, or has no usable ``setup`` is bad input
(exit 2); an exception raised by the user's code is a failed run (exit 1), reported
with the file and line where it happened.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from bz._errors import TrainingError, UsageError, describe_exception, user_frame
from bz.config import DEFAULT_TRAIN_SCRIPT

if TYPE_CHECKING:
    import torch

    from bz.config import RunConfig
    from bz.metrics import Metric

Batch = Any
"""A batch from a loader, of any structure: ``(inputs, targets)`` pairs for a
``loss_fn``, mappings for a model that computes its own loss, anything for a ``step``.
bz moves the tensors in it to the device, keeping every container's type."""


@attrs.frozen
class StepResult:
    """What a ``step`` returns when the loss alone is not enough.

    ``loss`` is the batch's scalar loss tensor (bz scales it for accumulation and calls
    backward). ``predictions`` and ``targets`` are what the metrics named in
    ``bzconfig.json`` (and ``TrainingSetup.metrics``) see: they are needed exactly when
    there are metrics. ``samples`` is the batch's sample count as a Python ``int``,
    for the sample-weighted epoch loss; left out, it is the first dimension of the
    batch's first tensor.
    """

    loss: torch.Tensor
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    samples: int | None = None


if TYPE_CHECKING:
    from typing import TypeAlias

    Step: TypeAlias = Callable[[torch.nn.Module, Any], "torch.Tensor | StepResult"]
    """A user's step: ``(model, batch) -> loss`` or ``-> StepResult``."""

SchedulerInterval = Literal["epoch", "step"]


def _is_module(_instance: Any, _attribute: Any, value: Any) -> None:
    import torch

    if not isinstance(value, torch.nn.Module):
        raise UsageError(
            f"TrainingSetup: model must be a torch.nn.Module, got {type(value).__name__}"
        )


def _is_optimizer(_instance: Any, _attribute: Any, value: Any) -> None:
    import torch

    if not isinstance(value, torch.optim.Optimizer):
        raise UsageError(
            f"TrainingSetup: optimizer must be a torch.optim.Optimizer, got {type(value).__name__}"
        )


def _is_callable(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not callable(value):
        raise UsageError(
            f"TrainingSetup: {attribute.name} must be callable, got {type(value).__name__}"
        )
    if isinstance(value, type) and _is_module_class(value):
        # nn.CrossEntropyLoss without its (): calling it builds a module from the
        # outputs and targets, and fails inside torch with nothing of the user's named.
        raise UsageError(
            f"TrainingSetup: {attribute.name} is the class {value.__name__}, not a "
            f"function: pass an instance, {attribute.name}={value.__name__}()"
        )


_CALLED_AS = {"loss_fn": "loss_fn(outputs, targets)", "step": "step(model, batch)"}
"""How bz calls each function of a ``TrainingSetup`` (two positional arguments)."""


def _takes_two_arguments(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A ``loss_fn`` or ``step`` bz cannot call with its two arguments is refused when the
    setup is built (exit 2, at train.py's line), not a TypeError inside bz at the first
    batch."""
    if value is None:
        return
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin or extension callable: let the call tell
        return
    try:
        signature.bind(object(), object())
    except TypeError:
        name = getattr(value, "__name__", type(value).__name__)
        raise UsageError(
            f"TrainingSetup: {attribute.name} cannot be called as "
            f"{_CALLED_AS[attribute.name]}: {name}{signature} takes other arguments"
        ) from None


def _is_module_class(value: type) -> bool:
    import torch

    return issubclass(value, torch.nn.Module)


def _is_iterable(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, Iterable):
        raise UsageError(
            f"TrainingSetup: {attribute.name} must be iterable, got {type(value).__name__}"
        )


def _is_loader(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        raise UsageError(f"TrainingSetup: {attribute.name} is required, got None")
    _is_iterable(_instance, attribute, value)


def _optimizes_the_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer made for another model (a copy, the model before it was rebuilt)
    would train nothing and report no error: the run's weights would never change."""
    own = {id(p) for p in model.parameters()}
    if not own:
        return
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if held and not any(id(p) in own for p in held):
        raise UsageError(
            f"TrainingSetup: the optimizer holds none of the model's parameters ({len(held)} "
            "others): build it from model.parameters() of the model you pass"
        )


def _is_interval(_instance: Any, _attribute: Any, value: Any) -> None:
    if value not in ("epoch", "step"):
        raise UsageError(
            f"TrainingSetup: scheduler_interval must be 'epoch' or 'step', got {value!r}"
        )


@attrs.frozen(kw_only=True)
class TrainingSetup:
    """What ``train.py`` hands bz: the model and everything needed to train it.

    How a batch becomes a loss, one of three ways:

    - ``loss_fn``: loaders yield ``(inputs, targets)`` pairs and the loss is
      ``loss_fn(model(inputs), targets)``, a scalar tensor; metrics see
      ``model(inputs)`` and ``targets``.
    - neither ``loss_fn`` nor ``step`` (the Hugging Face convention): loaders yield
      mappings, bz calls ``model(**batch)`` and trains on the output's ``loss``
      (attribute or key); metrics see its ``logits`` and ``batch["labels"]``.
    - ``step(model, batch)``: your function returns the loss tensor or a
      :class:`StepResult` (the loss, what metrics see, the sample count). It runs under
      autocast; bz does the rest (devices, accumulation, backward, clipping, the
      optimizer step, sums, metrics, plugins). The same step validates (in eval mode,
      without gradients).

    ``scheduler`` (optional) is stepped once per epoch, after the training loop
    (``ReduceLROnPlateau`` receives the validation loss), or with
    ``scheduler_interval="step"`` after every optimizer step. ``metrics`` adds metric
    objects of your own (anything with ``update``/``compute``/``reset``, torchmetrics
    included) to those named in ``bzconfig.json``.
    """

    model: torch.nn.Module = attrs.field(validator=_is_module)
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = attrs.field(
        default=None, validator=[_is_callable, _takes_two_arguments]
    )
    optimizer: torch.optim.Optimizer = attrs.field(validator=_is_optimizer)
    train_loader: Iterable[Batch] = attrs.field(validator=_is_loader)
    val_loader: Iterable[Batch] | None = attrs.field(default=None, validator=_is_iterable)
    scheduler: Any = None
    metrics: Mapping[str, Metric] = attrs.field(factory=dict)
    step: Step | None = attrs.field(default=None, validator=[_is_callable, _takes_two_arguments])
    scheduler_interval: SchedulerInterval = attrs.field(default="epoch", validator=_is_interval)

    def __attrs_post_init__(self) -> None:
        _optimizes_the_model(self.model, self.optimizer)
        if self.step is not None and self.loss_fn is not None:
            raise UsageError(
                "TrainingSetup: give loss_fn or step, not both (a step computes its own loss)"
            )
        if self.scheduler_interval == "step" and self.scheduler is None:
            raise UsageError(
                "TrainingSetup: scheduler_interval='step' steps a scheduler, and no "
                "scheduler is given (pass scheduler=..., or leave scheduler_interval out)"
            )
        if self.scheduler_interval == "step" and _is_plateau(self.scheduler):
            raise UsageError(
                "TrainingSetup: ReduceLROnPlateau cannot step per optimizer step (it "
                "needs the epoch's validation loss): leave scheduler_interval at 'epoch'"
            )


def _is_plateau(scheduler: object) -> bool:
    if scheduler is None:
        return False
    import torch

    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


SetupFunction = Callable[["RunConfig"], TrainingSetup]

TRAIN_SCRIPT_MODULE_PREFIX = "_bz_train_script_"
"""The start of the module name train.py is imported under (then a hash of its path)."""


def missing_script_hint(train_script: str) -> str:
    """What to do about a train_script that is not there: the default one or a named one."""
    if train_script == DEFAULT_TRAIN_SCRIPT:
        return (
            "bz looks for train.py next to bzconfig.json; set train_script in "
            "bzconfig.json or run `bz init`"
        )
    return f"bzconfig.json's train_script names it ({train_script!r}): fix the path"


def load_setup_function(path: Path, train_script: str = DEFAULT_TRAIN_SCRIPT) -> SetupFunction:
    """Import ``path`` (``train_script`` as the config gives it) and return its ``setup``."""
    if not path.is_file():
        problem = "a folder, not a file" if path.is_dir() else "file not found"
        raise UsageError(f"{path}: {problem} ({missing_script_hint(train_script)})")
    # A name that is the same in every process (str hashes are salted per process):
    # the run signature names train.py's functions by it.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    module_name = f"{TRAIN_SCRIPT_MODULE_PREFIX}{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # The script may import its neighbours (a models.py beside it).
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[module_name] = module
    _importable_in_workers(module_name, path.resolve())
    from bz.training.interrupts import StopSignalWitness

    with StopSignalWitness() as witness:  # as in call_setup: a signal stops the import
        try:
            spec.loader.exec_module(module)
        except SyntaxError as exc:
            raise UsageError(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from None
        except Exception as exc:
            witness.raise_if_stopped(exc)
            if _written_for_bz_cli_0(exc):
                raise UsageError(
                    f"{path}: `get_config()` is how bz-cli 0.x's train.py began; bz imports "
                    "train.py and calls its `def setup(config: bz.RunConfig) -> "
                    'bz.TrainingSetup` (see "Coming from bz-cli 0.x" in bz\'s README)'
                ) from None
            raise TrainingError(f"{path} failed while importing: {user_frame(exc, path)}") from exc
        except SystemExit as exc:  # not a finished run, whatever code it names
            raise TrainingError(
                f"{path} called sys.exit() while importing: {user_frame(exc, path)}"
            ) from exc
    setup = getattr(module, "setup", None)
    if setup is None:
        raise UsageError(
            f"{path}: no setup function (define `def setup(config: bz.RunConfig) -> "
            "bz.TrainingSetup`)"
        )
    if not callable(setup):
        raise UsageError(f"{path}: setup is {type(setup).__name__}, not a function")
    _check_takes_the_config(setup, path)
    checked: SetupFunction = setup
    return checked


_SHIM = """\
# Written by bz: imports the train script below under the name bz imported it, for the
# processes that unpickle its objects (DataLoader workers started by spawn or forkserver).
import importlib.util
import sys

_spec = importlib.util.spec_from_file_location(__name__, {script!r})
_module = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
"""

_shims: Path | None = None
"""The folder of this process's shims (on ``sys.path``, removed at exit)."""


def _importable_in_workers(module_name: str, script: Path) -> None:
    """Make ``module_name`` importable in processes this one starts fresh.

    A class or function of train.py (a ``Dataset``, a ``collate_fn``) reaches a DataLoader
    worker pickled by reference to ``module_name``. A forked worker has the module; one
    started by ``spawn`` or ``forkserver`` (macOS's and Windows' default, Linux's from
    Python 3.14) imports it, and finds it through a one-file shim that imports train.py
    under that name (running its top level there, as a spawned worker runs any script's).
    Such processes are given this process's ``sys.path``; the shim's folder is last on it.
    """
    global _shims
    if _shims is None:
        import atexit
        import shutil
        import tempfile

        _shims = Path(tempfile.mkdtemp(prefix="bz-train-script-"))
        atexit.register(shutil.rmtree, _shims, ignore_errors=True)
        sys.path.append(str(_shims))
    shim = _shims / f"{module_name}.py"
    if not shim.exists():
        shim.write_text(_SHIM.format(script=str(script)), encoding="utf-8")


def _check_takes_the_config(setup: Callable[..., object], path: Path) -> None:
    """A ``setup`` that cannot be called with the config alone is a problem with the
    file (exit 2), found before anything runs, not a TypeError inside bz."""
    try:
        signature = inspect.signature(setup)
    except (TypeError, ValueError):  # a builtin or extension callable: let the call tell
        return
    try:
        signature.bind(object())
    except TypeError:
        code = getattr(setup, "__code__", None)
        where = f"{path}:{code.co_firstlineno}" if code is not None else str(path)
        raise UsageError(
            f"{where}: setup{signature} must take one argument, the run's config "
            "(`def setup(config: bz.RunConfig) -> bz.TrainingSetup`)"
        ) from None


def _written_for_bz_cli_0(exc: Exception) -> bool:
    """Whether importing train.py failed on the original bz-cli's ``get_config``
    (``from bz import get_config``, or ``bz.get_config()``)."""
    if isinstance(exc, ImportError):
        return exc.name in ("bz", "bz.config") and "'get_config'" in str(exc)
    return isinstance(exc, AttributeError) and "'get_config'" in str(exc) and "bz" in str(exc)


def call_setup(setup: SetupFunction, config: RunConfig, path: Path | None = None) -> TrainingSetup:
    """Run the user's ``setup`` and check what it returns."""
    from bz.training.interrupts import StopSignalWitness

    where = str(path) if path else "setup"
    # A Ctrl-C or SIGTERM while setup runs stops the run (130 / 143), even when its
    # handler failed where it landed and left another exception in its place.
    with StopSignalWitness() as witness:
        try:
            result = setup(config)
        except UsageError as exc:  # TrainingSetup refused what it was given: bad input
            raise UsageError(f"{_location(exc, path) or where + ': '}{exc}") from None
        except Exception as exc:
            witness.raise_if_stopped(exc)
            raise TrainingError(f"{where}: setup failed: {user_frame(exc, path)}") from exc
        except SystemExit as exc:  # not a finished run, whatever code it names
            raise TrainingError(
                f"{where}: setup called sys.exit(): {user_frame(exc, path)}"
            ) from exc
    if not isinstance(result, TrainingSetup):
        raise UsageError(
            f"{where}: setup returned {type(result).__name__}; it must return bz.TrainingSetup"
        )
    return result


def _location(exc: BaseException, path: Path | None) -> str:
    """``file:line: `` of the user's line that raised ``exc`` (empty when unknown)."""
    text = user_frame(exc, path)
    described = describe_exception(exc)
    return text[: -len(described)] if text.endswith(described) else ""
