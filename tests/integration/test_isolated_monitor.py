"""A watched name is checked the same for a plugin in a process of its own: bz's own
``early_stopping`` run so is refused as in process, and another plugin run so may add
the metric a name watches (nothing refused)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bz.commands import cli

pytestmark = pytest.mark.slow  # each run starts a plugin's process

ProjectFactory = Callable[..., Path]


def test_early_stopping_in_its_own_process_is_refused_a_name_nothing_produces(
    project: ProjectFactory,
) -> None:
    options = {"monitor": "val_acc", "restore_best_weights": False, "isolation": "process"}
    project({"metrics": ["accuracy"], "plugins": ["console_out", {"early_stopping": options}]})
    result = CliRunner().invoke(cli, ["train"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        "bz: error: bzconfig.json: plugins[1].early_stopping.monitor: 'val_acc' is no value"
    )
    assert "epoch 1/" not in result.stderr  # nothing trained


def _install_scorer(site: Path) -> None:
    """A plugin that is not bz's own, adding ``my_score`` to the validation metrics."""
    (site / "scorer_plugin.py").write_text(
        textwrap.dedent(
            """
            from bz.plugins import PluginContext


            class Scorer:
                name = "scorer"

                def end_epoch(self, context: PluginContext) -> None:
                    context.validation_metrics["my_score"] = 1.0 / (context.epoch + 1)
            """
        ),
        encoding="utf-8",
    )
    info = site / "bz_scorer-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bz-scorer\nVersion: 0.0.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[bz.plugins]\nscorer = scorer_plugin:Scorer\n", encoding="utf-8"
    )


def test_a_metric_another_plugin_adds_from_its_own_process_may_be_watched(
    project: ProjectFactory, tmp_path_factory: pytest.TempPathFactory, monkeypatch: Any
) -> None:
    site = tmp_path_factory.mktemp("site")
    _install_scorer(site)
    monkeypatch.syspath_prepend(str(site))
    stopping = {"monitor": "my_score", "patience": 1, "mode": "max", "min_delta": 0.0}
    project(
        {
            "epochs": 4,
            "plugins": [{"scorer": {"isolation": "process"}}, {"early_stopping": stopping}],
        }
    )
    result = CliRunner().invoke(cli, ["train", "--log-format", "json"])
    # Refused before: the proxy looked like one of bz's own plugins, which add no metric.
    assert result.exit_code == 0, result.output
    assert '"event": "early_stopping_stop"' in result.stdout  # it watched my_score
