"""The run configuration (``bzconfig.json``) and the one converter that reads it.

Everything that comes from JSON is structured here, once, by a single strict
``cattrs`` converter: unknown keys, wrong types and out-of-range values become a
:class:`~bz.ConfigError` whose lines name the JSON path and suggest the nearest valid
name. Inside bz, code trusts these types.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NewType, TypeVar

import attrs
import cattrs
from cattrs.errors import (
    BaseValidationError,
    ForbiddenExtraKeysError,
)
from cattrs.gen import make_dict_structure_fn

from bz._errors import ConfigError
from bz._typecheck import check_field_types

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_FILE",
    "ConfigError",
    "ConfigValueError",
    "DistributedConfig",
    "GradientClip",
    "MetricSpec",
    "PluginSpec",
    "RunConfig",
    "Seconds",
    "at_least",
    "between",
    "config_fields",
    "converter",
    "find_config_file",
    "load_config",
    "metric_specs",
    "nearest",
    "plugin_specs",
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


class ConfigValueError(ValueError):
    """A value that has the right type but is not allowed, raised by a validator.

    ``field`` names the attribute so the error can carry the full JSON path.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


# -- validators -------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(minimum: float) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """An attrs validator: the value (when not None) is ``>= minimum``."""

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not _is_number(value):
            return  # None, or a wrong type the field's type check reports
        # Written as "not >=" so that NaN, which compares false to everything, is refused.
        if not value >= minimum:
            raise ConfigValueError(attribute.name, f"must be >= {minimum}, got {value!r}")

    return check


def between(low: float, high: float) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """An attrs validator: the value (when not None) lies in ``[low, high]``."""

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if _is_number(value) and not low <= value <= high:
            raise ConfigValueError(
                attribute.name, f"must be between {low} and {high}, got {value!r}"
            )

    return check


_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check_device(_instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if isinstance(value, str) and not _DEVICE_PATTERN.fullmatch(value):
        raise ConfigValueError(
            attribute.name,
            f'expected "auto", "cpu", "cuda", "cuda:N" or "mps", got {_show(value)}',
        )


Seconds = NewType("Seconds", float)
"""A duration: seconds in JSON as a number, or a ``"HH:MM:SS"`` / ``"D:HH:MM:SS"`` string."""

_CLOCK = re.compile(r"(?:(\d+):)?(\d+):([0-5]?\d):([0-5]?\d(?:\.\d*)?)")


def parse_seconds(value: object) -> Seconds:
    """A duration from a number of seconds or an ``"[D:]HH:MM:SS"`` string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"expected a finite number of seconds >= 0, got {_show(value)}")
        return Seconds(float(value))
    if isinstance(value, str):
        match = _CLOCK.fullmatch(value.strip())
        if match is None:
            raise ValueError(f'expected seconds or "HH:MM:SS", got {_show(value)}')
        days, hours, minutes, seconds = match.groups()
        total = ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + float(seconds)
        return Seconds(total)
    raise TypeError(f'expected seconds or "HH:MM:SS", got {_show(value)}')


def _optional_seconds(field: str, value: float | str | None) -> Seconds | None:
    if value is None:
        return None
    try:
        return parse_seconds(value)
    except (TypeError, ValueError) as exc:
        # In Python the converter runs first: name the field, as the JSON path would.
        raise type(exc)(f"{field}: {exc}") from None


def _max_time(value: float | str | None) -> Seconds | None:
    return _optional_seconds("max_time", value)


def _checkpoint_seconds(value: float | str | None) -> Seconds | None:
    return _optional_seconds("checkpoint_every_seconds", value)


# -- the configuration --------------------------------------------------------------


@attrs.frozen
class PluginSpec:
    """One entry of the ``plugins`` list: a name and the JSON options given for it."""

    name: str
    options: Mapping[str, Any] = attrs.field(factory=dict)
    path: str = attrs.field(default="", eq=False)
    """Where the entry sits in the file, e.g. ``plugins[1].my_plugin`` (not compared)."""

    @property
    def enabled(self) -> bool:
        """False when the options say ``"enabled": false``."""
        return self.options.get("enabled", True) is not False


@attrs.frozen
class MetricSpec:
    """One entry of the ``metrics`` list: a metric name and its options."""

    name: str
    options: Mapping[str, Any] = attrs.field(factory=dict)
    path: str = attrs.field(default="", eq=False)


SpecEntry = str | Mapping[str, Mapping[str, Any] | None]
"""What a ``metrics`` or ``plugins`` entry may be in Python: as in JSON, a name or
``{name: options}`` (``None`` options meaning none)."""

SpecT = TypeVar("SpecT", PluginSpec, MetricSpec)


def _specs(kind: type[SpecT], key: str, value: object) -> tuple[SpecT, ...]:
    """``value`` as specs of ``kind``: what ``RunConfig`` does with Python input.

    JSON reaches here already structured (a tuple of specs); Python callers may pass
    what the JSON holds. Anything else is refused now, with a ``TypeError`` that says
    what is accepted, rather than failing later inside ``fit``.
    """
    accepted = f"a list of names, {{name: {{options}}}} or {kind.__name__} objects"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"RunConfig({key}=...) takes {accepted}, got {_show(value)}")
    specs: list[SpecT] = []
    for index, item in enumerate(value):
        path = f"{key}[{index}]"
        if isinstance(item, kind):
            specs.append(item if item.path else attrs.evolve(item, path=f"{path}.{item.name}"))
        elif isinstance(item, str):
            specs.append(kind(item, {}, path))
        elif (
            isinstance(item, Mapping)
            and len(item) == 1
            and isinstance(name := next(iter(item)), str)
            and (item[name] is None or _is_options(item[name]))
        ):
            specs.append(kind(name, dict(item[name] or {}), f"{path}.{name}"))
        else:
            raise TypeError(
                f"RunConfig({key}=...): {path} is {_show(item)}; expected "
                f'"name", {{"name": {{options}}}} or a {kind.__name__}'
            )
    return tuple(specs)


def _is_options(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(key, str) for key in value)


def metric_specs(value: Iterable[MetricSpec | SpecEntry]) -> tuple[MetricSpec, ...]:
    """``RunConfig.metrics`` from names, ``{name: options}`` or :class:`MetricSpec` objects."""
    return _specs(MetricSpec, "metrics", value)


def plugin_specs(value: Iterable[PluginSpec | SpecEntry]) -> tuple[PluginSpec, ...]:
    """``RunConfig.plugins`` from names, ``{name: options}`` or :class:`PluginSpec` objects."""
    return _specs(PluginSpec, "plugins", value)


@attrs.frozen
class DistributedConfig:
    """How several processes train together (``torchrun`` or ``--nproc-per-node``)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: ``nccl`` on CUDA, ``gloo`` otherwise."""
    timeout: float = attrs.field(default=300.0, validator=at_least(1.0))
    """Seconds a collective waits for the other processes before failing."""

    def __attrs_post_init__(self) -> None:
        check_field_types(self)


def _distributed_table(value: DistributedConfig | Mapping[str, Any]) -> DistributedConfig:
    """In Python, ``distributed`` may be given as a dict, read like the JSON table."""
    return structure(dict(value), DistributedConfig) if isinstance(value, Mapping) else value


def _one_clipping(instance: GradientClip, _attribute: attrs.Attribute[Any], _value: Any) -> None:
    if (instance.max_norm is None) == (instance.value is None):
        raise ConfigValueError(
            "max_norm",
            'give exactly one of "max_norm" (clip the total norm) or "value" (clip each '
            "gradient element)",
        )


@attrs.frozen
class GradientClip:
    """How gradients are clipped before each optimizer step."""

    max_norm: float | None = attrs.field(default=None, validator=at_least(0.0))
    """Rescale all gradients together so that their total norm is at most this."""
    norm_type: float = attrs.field(default=2.0, validator=at_least(0.0))
    """The p of the p-norm ``max_norm`` measures (2.0: Euclidean)."""
    value: float | None = attrs.field(default=None, validator=[at_least(0.0), _one_clipping])
    """Clamp every gradient element to ``[-value, value]`` (instead of ``max_norm``)."""

    def __attrs_post_init__(self) -> None:
        check_field_types(self)


def _clip_table(value: GradientClip | Mapping[str, Any] | None) -> GradientClip | None:
    """In Python, ``gradient_clip`` may be given as a dict, read like the JSON table."""
    return structure(dict(value), GradientClip) if isinstance(value, Mapping) else value


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
    train_script: str = "train.py"
    """The file defining ``setup(config) -> TrainingSetup``, relative to the config."""
    checkpoint_interval: int = attrs.field(default=1, validator=at_least(0))
    """Write a checkpoint every this many epochs (and at the last one); 0 writes none."""
    checkpoint_dir: str = ".bz/checkpoints"
    """Where run folders (``<signature>/epoch-0003.pt``) go, relative to the config."""
    keep_last: int = attrs.field(default=3, validator=at_least(1))
    """How many checkpoints of a run to keep (the newest ones)."""
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

    def __attrs_post_init__(self) -> None:
        # In Python, a value of the wrong type is refused here, not deep in training.
        check_field_types(self)

    def with_overrides(self, **changes: Any) -> RunConfig:
        """A copy with some keys replaced (values are validated like JSON input)."""
        data = unstructure(self)
        data.update(changes)
        return structure(data, RunConfig)


# -- the converter -------------------------------------------------------------------


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _type_name(value: Any) -> str:
    return {
        bool: "boolean",
        int: "int",
        float: "float",
        str: "string",
        list: "list",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _strict_scalar(kind: type, label: str, accepts: tuple[type, ...]) -> Callable[[Any, Any], Any]:
    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and bool not in accepts:
            raise TypeError(f"expected {label}, got {_show(value)}")
        if not isinstance(value, accepts):
            raise TypeError(f"expected {label}, got {_show(value)}")
        return kind(value)

    return hook


def _literal_hook(value: Any, literal: Any) -> Any:
    allowed = typing.get_args(literal)
    if value in allowed and type(value) in {type(a) for a in allowed}:
        return value
    choices = ", ".join(_show(a) for a in allowed)
    message = f"expected one of {choices}, got {_show(value)}"
    if isinstance(value, str):
        hint = nearest(value, [a for a in allowed if isinstance(a, str)])
        if hint:
            message += f' (did you mean "{hint}"?)'
    raise ValueError(message)


def _entries(value: Any, key: str, kind: str) -> Iterator[tuple[str, Mapping[str, Any], str]]:
    if not isinstance(value, list):
        raise ConfigError([("", f"expected a list, got {_show(value)}")])
    # Problems carry paths relative to the list (the error walker prefixes the key);
    # specs carry absolute paths so later errors (plugin options) can name them.
    problems: list[tuple[str, str]] = []
    for index, item in enumerate(value):
        path = f"{key}[{index}]"
        if isinstance(item, str):
            yield item, {}, path
        elif isinstance(item, dict) and len(item) == 1:
            ((name, options),) = item.items()
            if options is None:
                options = {}
            if not isinstance(options, dict):
                problems.append(
                    (f"[{index}].{name}", f"expected an object of options, got {_show(options)}")
                )
                continue
            yield name, options, f"{path}.{name}"
        else:
            problems.append(
                (
                    f"[{index}]",
                    f'expected "{kind}" or {{"{kind}": {{...options}}}}, got {_show(item)}',
                )
            )
    if problems:
        raise ConfigError(problems)


def _structure_plugins(value: Any, _type: Any) -> tuple[PluginSpec, ...]:
    return tuple(
        PluginSpec(name, options, path)
        for name, options, path in _entries(value, "plugins", "name")
    )


def _structure_metrics(value: Any, _type: Any) -> tuple[MetricSpec, ...]:
    return tuple(
        MetricSpec(name, options, path)
        for name, options, path in _entries(value, "metrics", "name")
    )


def _unstructure_specs(specs: tuple[PluginSpec | MetricSpec, ...]) -> list[Any]:
    return [{spec.name: dict(spec.options)} if spec.options else spec.name for spec in specs]


def _json_object(value: Any, _type: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {_show(value)}")
    return dict(value)


def _is_literal(annotation: Any) -> bool:
    origin: object = typing.get_origin(annotation)
    return origin is Literal


def _objects_only(conv: cattrs.Converter) -> Callable[[type], Callable[[Any, Any], Any]]:
    """Attrs classes are structured from JSON objects only (cattrs would crash on a list)."""

    def factory(cls: type) -> Callable[[Any, Any], Any]:
        structure_fields: Callable[[Any, Any], Any] = make_dict_structure_fn(
            cls, conv, _cattrs_forbid_extra_keys=True
        )

        def hook(value: Any, _type: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {_show(value)}")
            return structure_fields(value, cls)

        return hook

    return factory


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook_factory(attrs.has, _objects_only(conv))
    conv.register_structure_hook(bool, _strict_scalar(bool, "boolean", (bool,)))
    conv.register_structure_hook(int, _strict_scalar(int, "int", (int,)))
    conv.register_structure_hook(float, _strict_scalar(float, "number", (int, float)))
    conv.register_structure_hook(str, _strict_scalar(str, "string", (str,)))
    conv.register_structure_hook(Seconds, lambda value, _type: parse_seconds(value))
    conv.register_structure_hook_func(_is_literal, _literal_hook)
    conv.register_structure_hook_func(lambda t: t == dict[str, Any], _json_object)
    conv.register_structure_hook_func(lambda t: t == tuple[PluginSpec, ...], _structure_plugins)
    conv.register_structure_hook_func(lambda t: t == tuple[MetricSpec, ...], _structure_metrics)
    conv.register_unstructure_hook_func(
        lambda t: t in (tuple[PluginSpec, ...], tuple[MetricSpec, ...]), _unstructure_specs
    )
    return conv


converter: cattrs.Converter = _make_converter()
"""The one converter bz structures JSON with (strict types, no unknown keys)."""


# -- errors with JSON paths -----------------------------------------------------------


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word``, if any is close enough to suggest."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _join(path: str, segment: str | int) -> str:
    if isinstance(segment, int):
        return f"{path}[{segment}]"
    if segment.startswith("[") or not path:
        return f"{path}{segment}"
    return f"{path}.{segment}"


def _note_segment(exc: BaseException) -> str | int | None:
    for note in getattr(exc, "__notes__", ()):
        name = getattr(note, "name", None)
        if isinstance(name, str):
            return name
        index = getattr(note, "index", None)
        if isinstance(index, (int, str)):  # list positions and dict keys
            return index
    return None


def _required_hint(exc: BaseException, key: str | int) -> str:
    """``"every": <int>``: the key to add, with the type the field wants."""
    for note in getattr(exc, "__notes__", ()):
        kind = getattr(note, "type", None)
        if kind is not None:
            return f'"{key}": <{_annotation_name(kind)}>'
    return f'"{key}"'


def _annotation_name(annotation: Any) -> str:
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return {bool: "boolean", str: "string", float: "number", dict: "object"}.get(
            annotation, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def config_fields(cls: type) -> list[str]:
    """The JSON keys an attrs config class accepts."""
    return [field.name for field in attrs.fields(cls)]


def _problems(exc: BaseException, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(exc, ForbiddenExtraKeysError):
        allowed = config_fields(exc.cl) if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            message = "unknown key"
            hint = nearest(key, allowed)
            if hint:
                message += f' (did you mean "{hint}"?)'
            elif allowed:
                message += f" (valid keys: {', '.join(allowed)})"
            yield _join(path, key), message
    elif isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            segment = _note_segment(sub)
            subpath = path if segment is None else _join(path, segment)
            if isinstance(sub, KeyError) and segment is not None:
                yield subpath, f"missing required key (add {_required_hint(sub, segment)})"
            else:
                yield from _problems(sub, subpath)
    elif isinstance(exc, ConfigError):
        for sub_path, message in exc.problems:
            yield (_join(path, sub_path) if sub_path else path), message
    elif isinstance(exc, ConfigValueError):
        yield _join(path, exc.field), exc.message
    elif isinstance(exc, ValueError) and (match := _attrs_validator_message(exc)):
        # attrs.validators word their errors "'field' must be ...": give the field a path.
        yield _join(path, match["field"]), match["message"]
    else:
        yield path, str(exc)


_ATTRS_VALIDATOR = re.compile(r"^'(?P<field>\w+)' (?P<message>.+)$", re.DOTALL)
# min_len / max_len: "Length of 'tag' must be <= 8: 11".
_ATTRS_LENGTH = re.compile(r"^Length of '(?P<field>\w+)' (?P<message>.+)$", re.DOTALL)


def _attrs_validator_message(exc: ValueError) -> dict[str, str] | None:
    """``field`` and ``message`` of an attrs validator's error, if it is one."""
    # in_ passes (message, attribute, options, value) as arguments: the text is the first.
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    match = _ATTRS_VALIDATOR.match(text)
    if match is None:
        match = _ATTRS_LENGTH.match(text)
        if match is not None:
            return {"field": match["field"], "message": f"length {match['message']}"}
        return None
    return {"field": match["field"], "message": match["message"]}


def structure(data: Any, cls: type[T], path: str = "") -> T:
    """Structure JSON ``data`` into ``cls``; raise :class:`ConfigError` with JSON paths."""
    if attrs.has(cls) and not isinstance(data, dict):
        raise ConfigError([(path, f"expected an object, got {_show(data)}")])
    try:
        return converter.structure(data, cls)
    except ConfigError as exc:
        raise ConfigError(list(_problems(exc, path))) from None
    except (BaseValidationError, ConfigValueError, ValueError, TypeError) as exc:
        crash = _code_fault(exc)
        if crash is not None:
            raise crash from None
        raise ConfigError(list(_problems(exc, path))) from None


# What bad input raises; anything else inside structuring is a bug in someone's code
# (a config class's validator, say) and must not be reported as the user's mistake.
_INPUT_ERRORS = (
    ConfigError,
    ConfigValueError,
    ForbiddenExtraKeysError,
    ValueError,
    TypeError,
    KeyError,
)


def _code_fault(exc: BaseException) -> BaseException | None:
    """The first exception in ``exc`` (a cattrs error group) that is not about input."""
    if isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            found = _code_fault(sub)
            if found is not None:
                return found
        return None
    return None if isinstance(exc, _INPUT_ERRORS) else exc


def input_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions structuring raises for values that do not fit (not code faults)."""
    return (*_INPUT_ERRORS, BaseValidationError)


def unstructure(value: Any) -> Any:
    """The JSON form of a config object (``structure`` reads it back unchanged)."""
    return converter.unstructure(value)


# -- files ---------------------------------------------------------------------------


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: ``explicit``, then ``$BZ_CONFIG``, then ``bzconfig.json``."""
    if explicit is not None:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if from_env:
        return Path(from_env)
    return Path(DEFAULT_CONFIG_FILE)


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning every failure into a one-line ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", "file not found")], str(path)) from None
    except OSError as exc:
        raise ConfigError([("", f"cannot read: {exc.strerror}")], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError([("", "not UTF-8 text")], str(path)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")],
            str(path),
        ) from None


def load_config(path: str | os.PathLike[str] | None = None) -> RunConfig:
    """Read and validate a ``bzconfig.json`` (see :func:`find_config_file`)."""
    file = find_config_file(path)
    try:
        return structure(read_json(file), RunConfig)
    except ConfigError as exc:
        raise exc.with_source(str(file)) from None
