"""``bz check-config`` on a ``monitor`` the config's metrics do not give, when a plugin
that is not bz's own is listed: that plugin may add the value (the plugin guide's
``context.validation_metrics["..."] = ...``), and ``bz train`` then refuses nothing, so
the warning names the plugin as well as ``train.py``'s setup.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner
from tests._plugin_packages_support import Packages, packages
from tests._support import json_events

from bz.commands import cli

__all__ = ["packages"]  # the fixture, imported for the tests below

_ADDER = """
from bz.plugins import PluginContext


class Adder:
    name = "adder"

    def end_validation_loop(self, context: PluginContext) -> None:
        context.validation_metrics["agreement"] = 1.0 / (1 + context.epoch)
"""

_WATCHING = {"early_stopping": {"monitor": "agreement", "mode": "max", "patience": 1}}


def _install_adder(packages: Packages) -> None:
    packages.install("adder-plugin", {"adder": "adder_mod:Adder"}, {"adder_mod.py": _ADDER})


def test_the_warning_names_the_plugin_that_may_add_the_value(
    packages: Packages, project: Callable[..., Path]
) -> None:
    _install_adder(packages)
    project({"epochs": 3, "plugins": ["adder", _WATCHING]})
    runner = CliRunner()
    checked = runner.invoke(cli, ["check-config"])
    assert checked.exit_code == 0, checked.output
    (line,) = checked.stderr.splitlines()
    assert line.startswith(
        "bzconfig.json: plugins[1].early_stopping.monitor: 'agreement' is no value this "
        "run produces; "
    ), line
    assert line.endswith("(unless train.py's setup or plugin 'adder' adds it)"), line
    # ... and it was right not to refuse it: the plugin adds the value, and early
    # stopping watches it (falling after the first epoch: a stop after the second).
    trained = runner.invoke(cli, ["train", "--log-format", "json"])
    assert trained.exit_code == 0, trained.output
    events = json_events(trained.stdout)
    assert not [e for e in events if e["event"] == "early_stopping_monitor_missing"]
    finished = [e for e in events if e["event"] == "epoch_finished"]
    assert [e["validation_metrics"]["agreement"] for e in finished] == [1.0, 0.5]


def test_without_such_a_plugin_only_train_py_may_add_it(
    packages: Packages, project: Callable[..., Path]
) -> None:
    _install_adder(packages)  # installed, not listed: it adds nothing to this run
    project({"epochs": 1, "plugins": [_WATCHING]})
    checked = CliRunner().invoke(cli, ["check-config"])
    assert checked.exit_code == 0, checked.output
    (line,) = checked.stderr.splitlines()
    assert line.endswith("(unless train.py's setup adds it)"), line
    assert "plugins[0].early_stopping.monitor: 'agreement'" in line


def test_keep_best_names_only_train_py_whatever_plugins_are_listed(
    packages: Packages, project: Callable[..., Path]
) -> None:
    # keep_best reads the run's own values: `bz train` refuses a name a plugin adds.
    _install_adder(packages)
    project({"epochs": 1, "plugins": ["adder"], "keep_best": {"monitor": "agreement"}})
    runner = CliRunner()
    checked = runner.invoke(cli, ["check-config"])
    assert checked.exit_code == 0, checked.output
    (line,) = checked.stderr.splitlines()
    assert line.startswith("bzconfig.json: keep_best.monitor: 'agreement'"), line
    assert line.endswith("(unless train.py's setup adds it)"), line
    assert runner.invoke(cli, ["train"]).exit_code == 2
