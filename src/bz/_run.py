"""``bz.run``: what ``bz train`` does, as a library function."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from bz._errors import ConfigError, UsageError
from bz._logging import get_logger
from bz._supervision import LOAD_STAGES
from bz.config import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_FILE,
    RunConfig,
    find_config_file,
    load_config,
    structure,
    unstructure,
)

if TYPE_CHECKING:
    from bz._setup import SetupFunction, TrainingSetup
    from bz.metrics import Metric
    from bz.plugins._faults import PluginFault
    from bz.plugins._sandbox import ErrorPolicy, PluginSet
    from bz.training.result import FitResult

_log = get_logger("bz")


def resolve_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[RunConfig, Path]:
    """The run's configuration and the folder its relative paths start from.

    ``path`` (``--config``) wins over ``$BZ_CONFIG``, which wins over ``bzconfig.json``.
    Without any of them, the defaults are used. ``overrides`` (command-line options)
    replace keys and are validated like the file.
    """
    explicit = path is not None or bool(os.environ.get(CONFIG_ENV_VAR))
    file = find_config_file(path)
    if file.exists() or explicit:
        config, base = load_config(file), file.resolve().parent
    else:
        config, base = RunConfig(), Path.cwd()
        _log.info("config_defaults", hint=f"no {DEFAULT_CONFIG_FILE} here; using defaults")
    if overrides:
        config = apply_overrides(config, overrides)
    return config, base


def apply_overrides(config: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """``config`` with keys replaced; dotted keys reach into tables (``hyperparameters.lr``)."""
    data = unstructure(config)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        table = data
        for part in parents:
            child = table.get(part)
            if not isinstance(child, dict):
                raise ConfigError(
                    [(dotted, f"{part!r} is not a table that can be reached into")], "command line"
                )
            table = child
        table[leaf] = value
    try:
        return structure(data, RunConfig)
    except ConfigError as exc:
        raise exc.with_source("command line") from None


def config_and_base(
    config: RunConfig | str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None,
    base_dir: str | os.PathLike[str] | None,
) -> tuple[RunConfig, Path]:
    """The run's configuration (overrides applied) and the folder its paths start from.

    ``config`` is a :class:`RunConfig` (paths then start from ``base_dir`` or the current
    folder) or a config file to look up as :func:`resolve_config` does.
    """
    if isinstance(config, RunConfig):
        run_config = apply_overrides(config, overrides) if overrides else config
        base = Path.cwd()
    else:
        run_config, base = resolve_config(config, overrides)
    return run_config, Path(base_dir) if base_dir is not None else base


@contextlib.contextmanager
def _attributed_to(source: str | None) -> Iterator[None]:
    """Name ``source`` in the ConfigErrors raised inside (unless they name a file)."""
    try:
        yield
    except ConfigError as exc:
        if source is None or exc.source is not None:
            raise
        raise exc.with_source(source) from None


def config_source(config: RunConfig | str | os.PathLike[str] | None) -> str | None:
    """The file a configuration was read from (None: built in code, or the defaults)."""
    if isinstance(config, RunConfig):
        return None
    file = find_config_file(config)
    explicit = config is not None or bool(os.environ.get(CONFIG_ENV_VAR))
    return str(file) if file.exists() or explicit else None


def blamed_source(
    config: RunConfig | str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None,
    key: str,
) -> str | None:
    """Where the value of ``key`` (``plugins`` or ``metrics``) came from, for its errors:
    ``--set`` when an override replaced it, else the config file (None: built in code)."""
    if overrides and any(name == key or name.startswith(f"{key}.") for name in overrides):
        return "--set"
    return config_source(config)


def run(
    config: RunConfig | str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    plugin_errors: ErrorPolicy | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    smoke: bool = False,
) -> FitResult:
    """Load the configuration, ``train.py`` and the plugins, then train.

    ``config`` is a :class:`RunConfig` or the path of a ``bzconfig.json`` (default: the
    lookup :func:`resolve_config` describes). Raises :class:`bz.BzError` subclasses
    whose ``exit_code`` is what ``bz train`` exits with.

    ``smoke`` (``bz train --smoke``) trains one epoch of one training batch and one
    validation batch with every plugin and metric, writes and reads no checkpoint, and
    ignores the step and time limits: a quick check that a run would start.
    """
    from bz._setup import call_setup
    from bz.training.device import request_cublas_determinism, seed_everything
    from bz.training.trainer import fit_seeded

    run_config, base, metrics, setup_function, plugins = _prepare(
        config, overrides, plugin_errors, base_dir, smoke
    )
    script = base / run_config.train_script
    if run_config.seed is not None:
        seed_everything(run_config.seed)
    if run_config.deterministic:  # cuBLAS reads it once: before setup() can use CUDA
        request_cublas_determinism()
    setup = call_setup(setup_function, run_config, script)
    _check_monitors(config, overrides, run_config, setup, plugins, metrics)
    _log.info(
        "training_started",
        script=str(script),
        epochs=run_config.epochs,
        plugins=plugins.active_names,
    )
    return fit_seeded(
        setup,
        run_config,
        plugins,
        metrics=metrics,
        checkpoint_dir=base / run_config.checkpoint_dir,
        limit_batches=1 if smoke else None,
    )


def _check_monitors(
    config: RunConfig | str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None,
    run_config: RunConfig,
    setup: TrainingSetup,
    plugins: PluginSet,
    metrics: Mapping[str, Metric],
) -> None:
    """Refuse a watched name the run never produces (``early_stopping``'s ``monitor``,
    ``keep_best.monitor``) before training, naming where it was configured; ``fit``
    checks the same for callers in Python."""
    from bz.plugins._entries import entry_paths
    from bz.plugins._names import check_monitors
    from bz.training.checkpoint.best import check_monitor
    from bz.training.control import check_validation_steps

    names = [*metrics, *setup.metrics]
    validates = setup.val_loader is not None
    with _attributed_to(blamed_source(config, overrides, "plugins")):
        paths = entry_paths(run_config.plugins)  # named as structuring names them
        watchers = _watching(plugins.active, run_config)
        check_monitors(watchers, names, validates=validates, paths=paths)
    with _attributed_to(blamed_source(config, overrides, "keep_best")):
        check_monitor(run_config.keep_best, names, validates=validates)
    with _attributed_to(blamed_source(config, overrides, "validate_every_steps")):
        check_validation_steps(run_config, validates)


def _watching(active: Iterable[object], run_config: RunConfig) -> list[object]:
    """The plugins whose options the checks made once ``setup()`` is known read
    (:func:`bz.plugins._names.check_monitors`): ``active``, where each of bz's own
    plugins run in a process of their own (a proxy, holding no options) is replaced by
    its options, structured here as its process structured them. A proxy of another
    plugin stays: it may add the metric a name watches, so nothing is refused.
    """
    from bz.plugins._isolated import IsolatedPlugin
    from bz.plugins._loader import check_plugin_options, discover
    from bz.plugins._names import ConfiguredOptions

    plugins = list(active)
    proxies = {p.name for p in plugins if isinstance(p, IsolatedPlugin)}
    if not proxies:
        return plugins
    discovery = discover()
    own = [
        spec
        for spec in run_config.plugins
        if spec.name in proxies
        and spec.name in discovery.sources
        and discovery.sources[spec.name].module.startswith("bz.plugins.")
    ]
    options, _ = check_plugin_options(own, run_config, discovery=discovery)
    kept = [p for p in plugins if not (isinstance(p, IsolatedPlugin) and p.name in options)]
    return [*kept, *(ConfiguredOptions(name, config) for name, config in options.items())]


class _Prepared(NamedTuple):
    """A run checked up to the user's ``setup()``: what ``fit`` needs besides it."""

    config: RunConfig
    base: Path
    metrics: dict[str, Metric]
    setup_function: SetupFunction
    plugins: PluginSet


def _prepare(
    config: RunConfig | str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None,
    plugin_errors: ErrorPolicy | None,
    base_dir: str | os.PathLike[str] | None,
    smoke: bool,
) -> _Prepared:
    """Everything :func:`run` checks before train.py's ``setup()`` runs (bad input: a
    :class:`UsageError`), in order: config, metrics, train.py, plugins, device, folder."""
    from bz._setup import load_setup_function
    from bz.metrics import build_metrics
    from bz.plugins._loader import load_plugins
    from bz.training.device import resolve_device
    from bz.training.precision import check_precision

    run_config, base = config_and_base(config, overrides, base_dir)
    if plugin_errors is not None:
        run_config = run_config.with_overrides(plugin_errors=plugin_errors)
    if smoke:
        run_config = run_config.with_overrides(**SMOKE_OVERRIDES)

    # Everything the config names is checked before the user's code runs; problems in
    # plugin and metric options name the file, as `bz check-config` does (or `--set`,
    # when the list came from the command line).
    with _attributed_to(blamed_source(config, overrides, "metrics")):
        metrics = build_metrics(run_config.metrics)
    setup_function = load_setup_function(base / run_config.train_script, run_config.train_script)
    restarted_without = _restarted_without()
    at_load = [fault for fault in restarted_without if fault.stage in LOAD_STAGES]
    with _attributed_to(blamed_source(config, overrides, "plugins")):
        plugins = load_plugins(run_config.plugins, run_config, left_out=at_load)
    _tell_supervisor(plugins, restarted_without)
    # An unusable device, or a precision it cannot do, is reported before setup() runs.
    try:
        device = resolve_device(run_config.device)
    except UsageError as exc:
        source = (
            "the command line" if overrides and "device" in overrides else config_source(config)
        )
        raise UsageError(f"{source}: {exc}" if source else str(exc)) from None
    check_precision(run_config.precision, device)
    if (
        run_config.checkpoint_interval > 0
        or run_config.checkpoint_every_steps is not None
        or run_config.checkpoint_every_seconds is not None
    ):
        # A run that cannot keep what it trains should not start: a read-only or
        # missing mount is found now, not after hours of training.
        from bz.training.checkpoint.store import writable_problem

        problem = writable_problem(base / run_config.checkpoint_dir)
        if problem is not None:
            raise UsageError(problem)
    return _Prepared(run_config, base, metrics, setup_function, plugins)


def _restarted_without() -> list[PluginFault]:
    """Under a supervising ``bz train``: the plugins it restarted training without, each
    having ended the process it ran in (in a hook, or while it loaded)."""
    from bz import _supervision
    from bz.plugins._faults import PluginFault

    return [
        PluginFault(str(entry["plugin"]), str(entry.get("hook", "?")), str(entry.get("error")))
        for entry in _supervision.quarantined()
    ]


def _tell_supervisor(plugins: PluginSet, restarted_without: Sequence[PluginFault]) -> None:
    """Under a supervising ``bz train``: leave out the plugins it restarted training
    without (those that died loading were not loaded), and tell it the names behind the
    plugin numbers it watches."""
    from bz import _supervision
    from bz.plugins._hooks import HOOK_NAMES

    if restarted_without:
        plugins.set_aside([f for f in restarted_without if f.stage not in LOAD_STAGES])
        for fault in restarted_without:
            _log.warning(
                "plugin_quarantined",
                plugin=fault.plugin,
                hook=fault.stage,
                error=fault.error,
                hint="it ended the training process; training resumed without it",
            )
    names = [report.name for report in plugins.report()][: len(plugins)]
    _supervision.announce(names, HOOK_NAMES)


def check_before_launch(
    config: str | os.PathLike[str] | None, overrides: Mapping[str, Any], *, smoke: bool
) -> None:
    """What every process of ``bz train --nproc-per-node N`` checks before ``setup()``,
    done once in the launcher, so that bad input is one error line, not one per process.

    This imports train.py (to find its ``setup``) in the launcher as well.
    """
    _prepare(config, overrides, None, None, smoke)


SMOKE_OVERRIDES: Mapping[str, Any] = {
    "epochs": 1,
    "checkpoint_interval": 0,
    "checkpoint_every_steps": None,
    "checkpoint_every_seconds": None,
    "resume": False,
    "max_steps": None,
    "max_time": None,
    "validate_every_steps": None,
}
"""What ``--smoke`` changes in the configuration (it also caps every loop at one batch)."""


__all__ = ["UsageError", "apply_overrides", "resolve_config", "run"]
