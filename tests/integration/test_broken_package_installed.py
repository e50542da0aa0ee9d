"""A third-party plugin package that fails to import, installed beside bz.

What bz does with it depends on whether the run lists it: a run that does not never
imports it (discovery reads metadata only); a run that does trains without it and says
so (``bz check-config`` refuses it, exit 2). And the test suite itself draws its
configurations from bz's own plugins only, so such a package cannot break collection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner
from tests._config_strategies import metric_option_classes, plugin_option_classes
from tests._plugin_packages_support import Packages, packages
from tests._support import json_events

from bz.commands import cli
from bz.plugins._loader import discover

__all__ = ["packages"]  # the fixture, imported for the tests below


def _install_broken(packages: Packages) -> Path:
    return packages.install(
        "broken-plugins",
        {"broken": "broken_mod:Broken"},
        {"broken_mod.py": "import json\n\n\nraise RuntimeError('half-installed')\n"},
    )


def test_the_config_strategies_draw_only_bz_s_own_plugins(packages: Packages) -> None:
    # Collecting tests/unit/test_config.py used to import every installed plugin, and
    # one whose import raises failed the collection (a PluginImportError).
    _install_broken(packages)
    assert "broken" in discover().sources
    builtins = {name for name, source in discover().sources.items() if source.builtin}
    assert set(plugin_option_classes.__wrapped__()) == builtins
    assert "accuracy" in metric_option_classes.__wrapped__()


def test_a_run_that_does_not_list_it_never_imports_it(
    packages: Packages, project: Callable[..., Path]
) -> None:
    site = _install_broken(packages)
    project({"epochs": 1, "plugins": ["console_out"]})
    runner = CliRunner()
    trained = runner.invoke(cli, ["train", "--log-format", "json"])
    assert trained.exit_code == 0, trained.output
    assert not [e for e in json_events(trained.stdout) if e["event"] == "plugin_failed"]
    checked = runner.invoke(cli, ["check-config"])
    assert checked.exit_code == 0, checked.output
    assert checked.stderr == ""
    listed = runner.invoke(cli, ["list-plugins", "--json"])
    assert listed.exit_code == 0, listed.output
    errors = {entry["name"]: entry["error"] for entry in json.loads(listed.stdout)}
    assert errors["broken"] == (
        "PluginImportError: broken_mod:Broken (from broken-plugins 1.0.0) failed to import: "
        f"{site / 'broken_mod.py'}:4: RuntimeError: half-installed"
    )
    assert errors["console_out"] is None


def test_a_run_that_lists_it_trains_without_it_and_check_config_refuses_it(
    packages: Packages, project: Callable[..., Path]
) -> None:
    site = _install_broken(packages)
    project({"epochs": 1, "plugins": ["broken"]})
    runner = CliRunner()
    checked = runner.invoke(cli, ["check-config"])
    assert checked.exit_code == 2, checked.output
    assert checked.stderr == (
        "bz: error: bzconfig.json: plugin 'broken' failed in import: PluginImportError: "
        f"broken_mod:Broken (from broken-plugins 1.0.0) failed to import: "
        f"{site / 'broken_mod.py'}:4: RuntimeError: half-installed\n"
    )
    # The design's contract: a package that fails to import is reported and skipped.
    trained = runner.invoke(cli, ["train", "--log-format", "json"])
    assert trained.exit_code == 0, trained.output
    (fault,) = [e for e in json_events(trained.stdout) if e["event"] == "plugin_failed"]
    assert (fault["plugin"], fault["hook"]) == ("broken", "import")
