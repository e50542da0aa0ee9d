"""``bz.run``: what ``bz train`` does, as a library function."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from bz._errors import ConfigError, UsageError
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
    from bz._sandbox import ErrorPolicy
    from bz._trainer import FitResult

_log = structlog.get_logger("bz")


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


def run(
    config: RunConfig | str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    plugin_errors: ErrorPolicy | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> FitResult:
    """Load the configuration, ``train.py`` and the plugins, then train.

    ``config`` is a :class:`RunConfig` or the path of a ``bzconfig.json`` (default: the
    lookup :func:`resolve_config` describes). Raises :class:`bz.BzError` subclasses
    whose ``exit_code`` is what ``bz train`` exits with.
    """
    from bz._loader import load_plugins
    from bz._setup import call_setup, load_setup_function
    from bz._trainer import Trainer, seed_everything
    from bz.metrics import build_metrics

    if isinstance(config, RunConfig):
        run_config = apply_overrides(config, overrides) if overrides else config
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        run_config, base = resolve_config(config, overrides)
        base = Path(base_dir) if base_dir is not None else base
    if plugin_errors is not None:
        run_config = run_config.with_overrides(plugin_errors=plugin_errors)

    # Everything the config names is checked before the user's code runs.
    metrics = build_metrics(run_config.metrics)
    script = base / run_config.train_script
    setup_function = load_setup_function(script)
    plugins = load_plugins(run_config.plugins, run_config)
    if run_config.seed is not None:
        seed_everything(run_config.seed)
    setup = call_setup(setup_function, run_config, script)
    _log.info(
        "training_started",
        script=str(script),
        epochs=run_config.epochs,
        plugins=plugins.active_names,
    )
    return Trainer().fit(setup, run_config, plugins, metrics=metrics)


__all__ = ["UsageError", "apply_overrides", "resolve_config", "run"]
