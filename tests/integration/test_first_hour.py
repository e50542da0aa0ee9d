"""What a newcomer tripped on in their first hour, through the command line.

Each test reproduces one report of the issue "a user's first hour" (numbers in the
test names' comments) and checks what a user now sees instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result
from tests._fault_support import REPO_ROOT
from tests._plugin_packages_support import Packages, packages
from tests._support import run_bz

import bz
from bz.commands import cli
from bz.commands.report import read_run_log
from bz.plugins import PluginContext
from bz.plugins.run_log import RunLog, RunLogConfig
from bz.testing import make_context, tiny_setup

__all__ = ["packages"]  # the fixture, imported for the tests below

ProjectFactory = Callable[..., Path]


def bz_cli(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


GUIDE_STYLE = """
from typing import Any
from bz.plugins import Plugin, PluginContext


class Opener(Plugin):
    name = "opener"

    def __init__(self, log_file: str = "opened.log", every: int = 10) -> None:
        super().__init__()
        self.handle = open(log_file, "w")

    def end_epoch(self, context: PluginContext) -> None:
        print(f"epoch {context.epoch} from the plugin")

    @staticmethod
    def load_config(config_data: dict) -> dict:
        return {
            "log_file": config_data.get("log_file", "opened.log"),
            "every": config_data.get("every", 10),
            "enabled": config_data.get("enabled", True),
        }

    @staticmethod
    def create(config_data: dict, training_config: Any) -> "Opener | None":
        config = Opener.load_config(config_data)
        if not config.pop("enabled"):
            return None
        return Opener(**config)
"""


@pytest.fixture
def opener(packages: Packages) -> Packages:
    packages.install(
        "opener-plugin", {"opener": "opener_mod:Opener"}, {"opener_mod.py": GUIDE_STYLE}
    )
    return packages


# -- 5. list-plugins --verbose shows load_config options ---------------------------------


def test_list_plugins_verbose_lists_the_options_load_config_fills_in(opener: Packages) -> None:
    result = bz_cli("list-plugins", "--verbose")
    assert result.exit_code == 0, result.stderr
    block = result.stdout.split("opener", 1)[1].split("\n\n", 1)[0]
    assert "options (defaults from load_config; bz does not check them):" in block
    assert '    log_file: string (default "opened.log")' in block
    assert "    every: integer (default 10)" in block


# -- 6 and 15. check-config creates no plugin and checks train_script ----------------------


def test_check_config_checks_options_without_creating_plugins(
    opener: Packages, project: ProjectFactory
) -> None:
    folder = project({"plugins": [{"opener": {"log_file": "made-by-create.log"}}]})
    result = bz_cli("check-config")
    assert result.exit_code == 0, result.stderr
    assert "OK (1 plugin(s), 0 metric(s))" in result.stdout
    assert not (folder / "made-by-create.log").exists()


def test_check_config_refuses_a_missing_train_script(project: ProjectFactory) -> None:
    folder = project({"train_script": "training.py"})
    result = CliRunner().invoke(cli, ["check-config"])
    assert result.exit_code == 2
    assert f"train_script: {folder / 'training.py'} does not exist" in result.stderr
    # The hint names the setting that named the file, not the default train.py.
    assert "train_script names it ('training.py'): fix the path" in result.stderr
    assert "looks for train.py" not in result.stderr


def test_check_config_warns_of_a_monitor_nothing_produces(project: ProjectFactory) -> None:
    project({"plugins": [{"early_stopping": {"monitor": "val_accuracy"}}]})
    result = bz_cli("check-config")
    assert result.exit_code == 0, result.stderr
    assert "plugins[0].early_stopping.monitor: 'val_accuracy' is no value this run produces" in (
        result.stderr
    )


# -- 13. bz train refuses it before training ---------------------------------------------


def test_train_refuses_a_monitor_nothing_produces(project: ProjectFactory) -> None:
    project({"plugins": ["console_out", {"early_stopping": {"monitor": "val_acc"}}]})
    result = CliRunner().invoke(cli, ["train"])
    assert result.exit_code == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("bz: error:")]
    # The entry as the file lists it, as a misspelled option of the plugin is named.
    assert "bzconfig.json: plugins[1].early_stopping.monitor: 'val_acc' is no value" in line
    assert "epoch 1/" not in result.stderr  # nothing trained


# -- 7. a train.py in bz-cli 0.x's shape ---------------------------------------------------

OLD_TRAIN_PY = """
import torch
from bz import get_config

config = get_config()
config.model = torch.nn.Linear(4, 2)
"""


def test_a_train_py_in_the_original_shape_points_to_setup(project: ProjectFactory) -> None:
    project(train_py=OLD_TRAIN_PY)
    result = CliRunner().invoke(cli, ["train"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "def setup(config: bz.RunConfig) -> bz.TrainingSetup" in lines[0]
    assert '"Coming from bz-cli 0.x"' in lines[0]
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n## Coming from bz-cli 0.x\n" in readme


# -- 8. print() under --log-format json ---------------------------------------------------


def test_a_plugin_printing_leaves_json_stdout_json(
    opener: Packages, project: ProjectFactory
) -> None:
    project({"plugins": ["console_out", "opener"]})
    result = bz_cli("train", "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    printed = [(e["text"], e.get("plugin")) for e in events if e["event"] == "printed"]
    assert printed == [
        ("epoch 0 from the plugin", "opener"),
        ("epoch 1 from the plugin", "opener"),
    ]


# -- 9. bz report runs/* with a report.png among them ---------------------------------------


def test_report_skips_files_that_are_not_run_logs(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "20260101-000000"
    run.mkdir(parents=True)
    (run / "run_log.jsonl").write_text(
        json.dumps({"event": "epoch", "epoch": 0, "training_loss": 0.5}) + "\n", encoding="utf-8"
    )
    (tmp_path / "runs" / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    result = bz_cli("report", "--no-plot", str(run), str(tmp_path / "runs" / "report.png"))
    assert result.exit_code == 0, result.stderr
    assert "0.5" in result.stdout
    assert "report.png: not a run directory or run log, skipped" in result.stderr


# -- 15. an interrupted run is interrupted, not failed; a resumed one keeps its folder ------


def test_run_log_records_an_interrupt_as_one(tmp_path: Path) -> None:
    plugin = RunLog(RunLogConfig(log_dir=str(tmp_path)))
    context = make_context()
    plugin.start_training_session(context)
    context.exception = bz.TrainingInterrupted(None, 2)
    plugin.on_exception(context)
    assert read_run_log(tmp_path / "run_log.jsonl").status == "interrupted (`bz train` resumes it)"


def test_a_resumed_run_writes_on_into_its_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = bz.RunConfig(epochs=1, device="cpu", checkpoint_interval=1)
    bz.Trainer().fit(tiny_setup(), config, [RunLog()], checkpoint_dir=tmp_path / "ck")
    longer = config.with_overrides(epochs=2)
    result = bz.Trainer().fit(tiny_setup(), longer, [RunLog()], checkpoint_dir=tmp_path / "ck")
    assert result.resumed_from is not None
    (folder,) = (tmp_path / "runs").iterdir()
    history = read_run_log(folder / "run_log.jsonl")
    assert [e["epoch"] for e in history.epochs] == [0, 1]
    assert history.status == "finished"


# -- 11. one epoch numbering ----------------------------------------------------------------


def test_a_checkpoint_has_the_same_epoch_when_saved_and_when_resumed(tmp_path: Path) -> None:
    config = bz.RunConfig(epochs=2, device="cpu", checkpoint_every_steps=2, max_steps=6)
    with structlog.testing.capture_logs() as events:
        bz.Trainer().fit(tiny_setup(), config, checkpoint_dir=tmp_path)
        bz.Trainer().fit(
            tiny_setup(), config.with_overrides(max_steps=None), checkpoint_dir=tmp_path
        )
    saved = {e["path"]: e["epoch"] for e in events if e["event"] == "checkpoint_saved"}
    (resumed,) = [e for e in events if e["event"] == "resumed"]
    assert "-batch-" in Path(resumed["path"]).name  # 6 steps: inside the second epoch
    assert resumed["epoch"] == saved[resumed["path"]] == 2


def test_plugin_faults_count_epochs_from_1(project: ProjectFactory) -> None:
    class Failing:
        name = "failing"

        def end_epoch(self, context: PluginContext) -> None:
            raise RuntimeError("boom")

    result = bz.Trainer().fit(tiny_setup(), bz.RunConfig(epochs=1, device="cpu"), [Failing()])
    (report,) = result.plugins
    assert report.fault is not None
    assert "(epoch 1, step 4)" in report.fault.describe()


# -- 15. a plugin that fails to import ------------------------------------------------------


def test_a_plugin_that_fails_to_import_is_one_line_and_named_at_the_end(
    packages: Packages, project: ProjectFactory
) -> None:
    packages.install("broken-pkg", {"broken": "broken_mod:Broken"}, {"broken_mod.py": "1/0\n"})
    project({"plugins": ["console_out", "broken"], "epochs": 1})
    result = bz_cli("train")
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "bz: plugin 'broken' did not run: it failed in import" in result.stderr


# -- 10. make demo trains every time --------------------------------------------------------


def _demo_arguments() -> list[str]:
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("\ndemo:", 1)[1].splitlines()[1]
    match = re.search(r"cd (\S+) && \S+/bz (.*)$", recipe.strip())
    assert match is not None, recipe
    return match.group(2).split()


@pytest.mark.slow
def test_make_demo_trains_again_when_run_again(tmp_path: Path) -> None:
    example = REPO_ROOT / "examples" / "digits"
    for name in ("train.py", "bzconfig.json"):
        (tmp_path / name).write_text((example / name).read_text("utf-8"), encoding="utf-8")
    arguments = [*_demo_arguments(), "--epochs", "1", "--device", "cpu"]
    outcomes: list[Any] = []
    for _ in range(2):
        done = run_bz(tmp_path, *arguments)
        assert done.returncode == 0, done.stderr[-2000:]
        outcomes.append(done.stderr)
    assert all("bz: trained 1 epoch(s)" in stderr for stderr in outcomes), outcomes[1]


# -- 14. the README's install commands are true -------------------------------------------


@pytest.mark.slow
def test_the_readme_installs_from_a_checkout_or_the_wheel_it_names(tmp_path: Path) -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "pip install bz-cli" not in quick_start  # not published
    (wheel_name,) = set(re.findall(r"dist/(bz_cli-[^ \]']+\.whl)", quick_start))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    assert [path.name for path in tmp_path.glob("*.whl")] == [wheel_name]
