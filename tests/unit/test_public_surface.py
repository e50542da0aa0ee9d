"""The public surface, pinned: every public module's ``__all__``, name by name.

A name added here is a promise to users, plugin authors or embedders; a name removed is
a break. Either is a decision: change the list below together with DEVELOPERS.md
("Public surface"), which says who each name is for.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

PUBLIC: dict[str, set[str]] = {
    "bz": {
        # running and embedding
        "RunConfig",
        "load_config",
        "TrainingSetup",
        "StepResult",
        "run",
        "Trainer",
        "FitResult",
        "EpochRecord",
        "PluginReport",
        "PluginFault",
        "seed_everything",
        "__version__",
        # errors to catch
        "BzError",
        "UsageError",
        "ConfigError",
        "MetricInputError",
        "TrainingError",
        "TrainingInterrupted",
        "NonFiniteLoss",
        "PluginFailure",
        "OrderCycleError",
    },
    "bz.plugins": {
        "Plugin",
        "PluginContext",
        "NamedPlugin",
        "StatefulPlugin",
        "ContextNotReady",
        "ConfiguredPluginClass",
        "CreatingPluginClass",
        "HookMethod",
        "hook",
        "HOOKS",
        "HOOK_NAMES",
        "HookSpec",
        "Order",
        "plugin_logger",
        "device_of",
        "loss_of",
        "model_of",
        "optimizer_of",
    },
    "bz.metrics": {
        "Metric",
        "MergeableMetric",
        "Accuracy",
        "F1Score",
        "Precision",
        "Recall",
        "TopKAccuracy",
        "MeanAbsoluteError",
        "MeanSquaredError",
        "build_metrics",
        "available_metrics",
        "MetricInfo",
        "MetricOption",
        "compute_all",
        "reduce_across_processes",
        "reset_all",
    },
    "bz.config": {
        "RunConfig",
        "DistributedConfig",
        "FsdpConfig",
        "GradientClip",
        "KeepBest",
        "PluginSpec",
        "MetricSpec",
        "Seconds",
        "load_config",
        "find_config_file",
        "CONFIG_ENV_VAR",
        "DEFAULT_CONFIG_FILE",
        "structure",
        "unstructure",
        "at_least",
        "between",
        "ConfigError",
        "ConfigValueError",
    },
    "bz.testing": {
        "tiny_setup",
        "run_plugin",
        "load_plugin",
        "check_plugin",
        "make_context",
        "capture_logs",
        "count_host_reads",
        "HOST_READS",
    },
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_the_decided_surface(module: str) -> None:
    exported = set(importlib.import_module(module).__all__)
    assert sorted(exported - PUBLIC[module]) == [], "new public names: decide and document"
    assert sorted(PUBLIC[module] - exported) == [], "public names removed: a break for users"


@pytest.mark.parametrize(("module", "name"), sorted((m, n) for m in PUBLIC for n in PUBLIC[m]))
def test_every_public_name_resolves_and_is_documented(module: str, name: str) -> None:
    value = getattr(importlib.import_module(module), name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert inspect.getdoc(value), f"{module}.{name} has no docstring"


@pytest.mark.parametrize("name", ["PluginSet", "tune"])
def test_what_bz_made_private_is_gone_from_the_top_level(name: str) -> None:
    # PluginSet: Trainer.fit takes plugin objects. tune: a command (`bz tune`).
    import bz

    assert name not in dir(bz)
    with pytest.raises(AttributeError):
        getattr(bz, name)


def test_importing_the_public_modules_does_not_import_torch() -> None:
    # Importing bz and its configuration is cheap: torch loads when training starts.
    code = "import sys, bz, bz.config; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
