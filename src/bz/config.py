"""The run configuration (``bzconfig.json``) and the one converter that reads it.

Everything that comes from JSON is structured here, once, by a single strict
``cattrs`` converter: unknown keys, wrong types and out-of-range values become a
:class:`~bz.ConfigError` whose lines name the JSON path and suggest the nearest valid
name. Inside bz, code trusts these types.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs

from bz._config_values import (
    ConfigValueError,
    ExactlyOne,
    MetricSpec,
    PluginSpec,
    Seconds,
    _check_device,
    _checkpoint_seconds,
    _max_time,
    at_least,
    between,
    greater_than,
    metric_specs,
    plugin_specs,
)
from bz._converter import structure, too_deep_message, too_long_number_message, unstructure
from bz._errors import ConfigError
from bz._typecheck import check_field_types

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_FILE",
    "ConfigError",
    "ConfigValueError",
    "DistributedConfig",
    "FsdpConfig",
    "GradientClip",
    "KeepBest",
    "MetricSpec",
    "PluginSpec",
    "RunConfig",
    "Seconds",
    "at_least",
    "between",
    "find_config_file",
    "load_config",
    "structure",
    "unstructure",
]

SEED_MIN = -(2**63)
"""The smallest seed ``torch.manual_seed`` accepts."""
SEED_MAX = 2**64 - 1
"""The largest seed ``torch.manual_seed`` accepts."""

DEFAULT_CONFIG_FILE = "bzconfig.json"
CONFIG_ENV_VAR = "BZ_CONFIG"

T = TypeVar("T")


def _module_names(value: Any) -> tuple[str, ...] | None:
    """``shard_modules`` as a tuple (JSON gives a list); a bare string is refused."""
    if value is None or isinstance(value, tuple):
        return value
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"shard_modules: expected a list of class names, got {value!r}")
    return tuple(value)


@attrs.frozen
class _NamedClasses:
    """``shard_modules``' validator: every class name is a non-empty string."""

    def __call__(self, _instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, tuple) and not all(isinstance(n, str) and n for n in value):
            raise ConfigValueError(attribute.name, "class names must be non-empty strings")

    def json_schema(self) -> dict[str, Any]:
        # The same rule for editors: `items` applies only when the value is an array.
        return {"items": {"minLength": 1}}


@attrs.frozen
class FsdpConfig:
    """How ``strategy: "fsdp"`` shards the model (FSDP2's ``fully_shard``)."""

    shard_modules: tuple[str, ...] | None = attrs.field(
        default=None, converter=_module_names, validator=_NamedClasses()
    )
    """Class names of the submodules sharded as units (e.g. ``["TransformerBlock"]``);
    ``null``: each direct child of the model that has parameters. The root is always
    sharded last, holding whatever the units leave."""
    reshard_after_forward: bool = True
    """Free each unit's gathered parameters after its forward (gathered again for the
    backward): less memory, one more all-gather per unit per step."""
    offload_to_cpu: bool = False
    """Keep the sharded parameters, their gradients and the optimizer step on the CPU
    (FSDP's ``CPUOffloadPolicy``): for models whose shard still does not fit a GPU.
    Needs a GPU device."""

    def __attrs_post_init__(self) -> None:
        check_field_types(self)


def _fsdp_table(value: FsdpConfig | Mapping[str, Any]) -> FsdpConfig:
    """In Python, ``distributed.fsdp`` may be given as a dict, read like the JSON table."""
    return structure(dict(value), FsdpConfig) if isinstance(value, Mapping) else value


@attrs.frozen
class DistributedConfig:
    """How several processes train together (``torchrun`` or ``--nproc-per-node``)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: ``nccl`` on CUDA, ``gloo`` otherwise."""
    timeout: float = attrs.field(default=300.0, validator=at_least(1.0))
    """Seconds a collective waits for the other processes before failing."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp``: every process holds the whole model; ``fsdp``: each holds a shard of the
    parameters, gradients and optimizer state (checkpoints are then sharded)."""
    fsdp: FsdpConfig = attrs.field(factory=FsdpConfig, converter=_fsdp_table)
    """Settings of ``strategy: "fsdp"`` (ignored under ``ddp``)."""

    def __attrs_post_init__(self) -> None:
        check_field_types(self)


def _distributed_table(value: DistributedConfig | Mapping[str, Any]) -> DistributedConfig:
    """In Python, ``distributed`` may be given as a dict, read like the JSON table."""
    return structure(dict(value), DistributedConfig) if isinstance(value, Mapping) else value


_one_clipping = ExactlyOne(
    ("max_norm", "value"),
    'give exactly one of "max_norm" (clip the total norm) or "value" (clip each gradient element)',
)


@attrs.frozen
class GradientClip:
    """How gradients are clipped before each optimizer step."""

    max_norm: float | None = attrs.field(default=None, validator=greater_than(0.0))
    """Rescale all gradients together so that their total norm is at most this."""
    norm_type: float = attrs.field(default=2.0, validator=at_least(0.0))
    """The p of the p-norm ``max_norm`` measures (2.0: Euclidean)."""
    value: float | None = attrs.field(default=None, validator=[greater_than(0.0), _one_clipping])
    """Clamp every gradient element to ``[-value, value]`` (instead of ``max_norm``)."""

    def __attrs_post_init__(self) -> None:
        check_field_types(self)


def _clip_table(value: GradientClip | Mapping[str, Any] | None) -> GradientClip | None:
    """In Python, ``gradient_clip`` may be given as a dict, read like the JSON table."""
    return structure(dict(value), GradientClip) if isinstance(value, Mapping) else value


@attrs.frozen
class KeepBest:
    """Which epoch-end checkpoints to keep by a metric, besides ``keep_last``'s newest."""

    monitor: str = "validation_loss"
    """The value that ranks them: ``validation_loss``, ``training_loss``, a configured
    metric (``accuracy``: the validation one when there is validation data) or
    ``training_<metric>`` / ``validation_<metric>``."""
    mode: Literal["min", "max"] = "min"
    """``min``: lower is better; ``max``: higher is better."""
    count: int = attrs.field(default=1, validator=at_least(1))
    """How many of the best to keep."""

    def __attrs_post_init__(self) -> None:
        check_field_types(self)


def _keep_best_table(value: KeepBest | Mapping[str, Any] | None) -> KeepBest | None:
    """In Python, ``keep_best`` may be given as a dict, read like the JSON table."""
    return structure(dict(value), KeepBest) if isinstance(value, Mapping) else value


DEFAULT_TRAIN_SCRIPT = "train.py"
"""train_script when bzconfig.json does not set it: the file beside bzconfig.json."""


@attrs.frozen
class RunConfig:
    """Everything ``bzconfig.json`` can say about a run."""

    epochs: int = attrs.field(default=10, validator=at_least(1))
    """Number of epochs to train."""
    device: str = attrs.field(default="auto", validator=_check_device)
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    seed: int | None = attrs.field(default=0, validator=between(SEED_MIN, SEED_MAX))
    """Seed for Python, NumPy and torch (-2**63 to 2**64 - 1, what torch accepts);
    ``null`` leaves the generators alone."""
    hyperparameters: dict[str, Any] = attrs.field(factory=dict)
    """Free-form values handed to ``train.py`` and shown to plugins."""
    metrics: tuple[MetricSpec, ...] = attrs.field(default=(), converter=metric_specs)
    """Metrics computed on training and validation data each epoch: ``"name"`` or
    ``{"name": {options}}`` (in Python, :class:`MetricSpec` objects too)."""
    plugins: tuple[PluginSpec, ...] = attrs.field(
        default=(PluginSpec("console_out", path="plugins[0]"),), converter=plugin_specs
    )
    """Plugins to load: ``"name"`` or ``{"name": {options}}`` (in Python,
    :class:`PluginSpec` objects too)."""
    plugin_errors: Literal["rewind", "isolate", "raise"] = "rewind"
    """What a plugin's fault does: ``rewind`` quarantines the plugin and replays from the
    last consistent state (the final weights are those of a run without it);
    ``isolate`` quarantines it and trains on from the fault (no snapshots: cheaper for
    large models); ``raise`` stops the run."""
    plugin_timeout: float | None = attrs.field(default=600.0, validator=at_least(0.001))
    """Seconds one plugin hook may run before it is interrupted and counts as a fault;
    ``null`` turns the limit off."""
    plugin_start_timeout: float | None = attrs.field(default=120.0, validator=at_least(0.001))
    """Seconds a plugin with ``"isolation": "process"`` may take to start (a fresh
    interpreter importing and creating it; not a hook, so not ``plugin_timeout``); one
    still starting then is ended and counts as a fault. ``null`` turns the limit off."""
    train_script: str = DEFAULT_TRAIN_SCRIPT
    """The file defining ``setup(config) -> TrainingSetup``, relative to the config."""
    checkpoint_interval: int = attrs.field(default=1, validator=at_least(0))
    """Write a checkpoint every this many epochs (and at the last one); 0 writes none."""
    checkpoint_dir: str = ".bz/checkpoints"
    """Where run folders (``<signature>/epoch-0003.pt``) go, relative to the config."""
    keep_last: int = attrs.field(default=3, validator=at_least(1))
    """How many checkpoints of a run to keep (the newest ones)."""
    keep_best: KeepBest | None = attrs.field(default=None, converter=_keep_best_table)
    """``{"monitor": "validation_loss", "mode": "min", "count": 3}``: also keep the
    ``count`` best epoch-end checkpoints by ``monitor``; null: only ``keep_last``."""
    resume: bool = True
    """Resume from the newest checkpoint of the same run, if there is one."""
    distributed: DistributedConfig = attrs.field(
        factory=DistributedConfig, converter=_distributed_table
    )
    """Multi-process settings (used only when launched with several processes)."""
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    """``32``; ``bf16-mixed`` or ``16-mixed``: autocast on the run's device (``16-mixed``
    adds a gradient scaler and needs CUDA)."""
    accumulate_grad_batches: int = attrs.field(default=1, validator=at_least(1))
    """Step the optimizer every this many batches (gradients add up in between)."""
    gradient_clip: GradientClip | None = attrs.field(default=None, converter=_clip_table)
    """``{"max_norm": X, "norm_type": 2.0}`` or ``{"value": X}``; null: no clipping."""
    max_steps: int | None = attrs.field(default=None, validator=at_least(1))
    """Stop after this many optimizer steps, in the middle of an epoch if need be."""
    max_time: Seconds | None = attrs.field(default=None, converter=_max_time)
    """Stop at the first step after this long (seconds or ``"HH:MM:SS"``), with a
    checkpoint; running ``bz train`` again continues."""
    validate_every_steps: int | None = attrs.field(default=None, validator=at_least(1))
    """Also validate every this many optimizer steps (as well as after each epoch)."""
    checkpoint_every_steps: int | None = attrs.field(default=None, validator=at_least(1))
    """Also write a checkpoint every this many optimizer steps (mid-epoch ones resume
    exactly)."""
    checkpoint_every_seconds: Seconds | None = attrs.field(
        default=None, converter=_checkpoint_seconds
    )
    """Also write a checkpoint at the first step after this long since the last one."""
    checkpoint_async: bool = False
    """Write checkpoints in the background (one at a time): training goes on while the
    previous checkpoint reaches the disk; the run ends only once the last one has."""
    check_finite: Literal["epoch", "step"] = "epoch"
    """When a non-finite training loss stops the run: ``epoch`` (read from the epoch's
    loss sum, no extra host read); ``step``: at the first batch whose loss (or gradient
    norm, when clipping computes one) is ``nan`` or infinite, before its optimizer step
    and any checkpoint of it (one host read per batch)."""
    deterministic: bool = False
    """Deterministic kernels only (``torch.use_deterministic_algorithms``, cuDNN's
    deterministic mode without benchmarking, ``CUBLAS_WORKSPACE_CONFIG``): the same
    seed gives the same weights on the same machine, often slower; an op without a
    deterministic kernel stops the run."""

    def __attrs_post_init__(self) -> None:
        # In Python, a value of the wrong type is refused here, not deep in training.
        check_field_types(self)

    def with_overrides(self, **changes: Any) -> RunConfig:
        """A copy with some keys replaced (values are validated like JSON input)."""
        data = unstructure(self)
        data.update(changes)
        return structure(data, RunConfig)


# -- files ---------------------------------------------------------------------------


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: ``explicit``, then ``$BZ_CONFIG``, then ``bzconfig.json``."""
    if explicit is not None:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if from_env:
        return Path(from_env)
    return Path(DEFAULT_CONFIG_FILE)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python's JSON keeps the last of two equal keys; an edit that added "epochs" again
    # would then silently overrule (or be overruled by) the first.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning every failure into a one-line ConfigError."""
    try:
        # "utf-8-sig": a byte-order mark (Notepad, PowerShell's Out-File) is no error.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError([("", "file not found")], str(path)) from None
    except OSError as exc:
        raise ConfigError([("", f"cannot read: {exc.strerror}")], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError([("", "not UTF-8 text")], str(path)) from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        message = f"invalid JSON: {json.dumps(exc.key)} is given twice in one object"
        raise ConfigError([("", message)], str(path)) from None
    except RecursionError:  # the parser recurses per level: far past MAX_DEPTH
        raise ConfigError([("", too_deep_message())], str(path)) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")],
            str(path),
        ) from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise ConfigError([("", too_long_number_message())], str(path)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> RunConfig:
    """Read and validate a ``bzconfig.json`` (see :func:`find_config_file`)."""
    file = find_config_file(path)
    try:
        return structure(read_json(file), RunConfig)
    except ConfigError as exc:
        raise exc.with_source(str(file)) from None
