"""Plugin packages: the runtime contract, bz.testing, and real installs that train.

Runtime contract: a package that fails to import, an entry point that is not a plugin,
a duplicated name and a hook with a wrong signature are reported (plugin, distribution,
error) and skipped; ``bz`` keeps running. The slow tests install real packages with pip
(the example package, and the plugin guide's own package exactly as the guide writes
it) and train with them through the ``bz`` command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests._plugin_packages_support import EXAMPLE_PACKAGE, REPO, Packages, packages
from tests._spec_blocks import block_starting_with, code_blocks

from bz.config import RunConfig, structure
from bz.plugins._hooks import HOOKS
from bz.plugins._loader import load_plugins
from bz.plugins._sandbox import PluginFailure
from bz.testing import check_plugin, load_plugin, make_context, run_plugin

__all__ = ["packages"]  # the fixture, imported for the tests below

GOOD = "class Good:\n    name = 'good'\n    def end_epoch(self, context: object) -> None: ...\n"


def config(plugins: list[Any], **fields: Any) -> RunConfig:
    return structure({"plugins": plugins, **fields}, RunConfig)


def load(plugins: list[Any], policy: str = "isolate") -> Any:
    run_config = config(plugins, plugin_errors=policy)
    return load_plugins(run_config.plugins, run_config)


@pytest.fixture
def faulty(packages: Packages) -> Packages:
    """One package with a plugin of every broken kind, and one good plugin."""
    packages.install(
        "faulty-plugins",
        {
            "good": "good_mod:Good",
            "broken": "broken_mod:Broken",
            "not_a_plugin": "odd_mod:VALUE",
            "bad_hook": "odd_mod:BadHook",
            "misnamed": "odd_mod:Misnamed",
            "nameless": "odd_mod:Nameless",
        },
        {
            "good_mod.py": GOOD,
            "broken_mod.py": "raise RuntimeError('half-installed')\n",
            "odd_mod.py": """
                from bz.plugins import PluginContext, hook

                VALUE = 42


                class BadHook:
                    name = "bad_hook"

                    def end_epoch(self) -> None: ...


                class Misnamed:
                    name = "misnamed"

                    @hook
                    def end_epok(self, context: PluginContext) -> None: ...


                class Nameless:
                    def end_epoch(self, context: PluginContext) -> None: ...
            """,
        },
        version="2.1.0",
    )
    return packages


# -- the runtime contract -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plugin", "stage", "error"),
    [
        (
            "broken",
            "import",
            "PluginImportError: broken_mod:Broken (from faulty-plugins 2.1.0) failed to "
            "import: {site}/broken_mod.py:1: RuntimeError: half-installed",
        ),
        (
            "not_a_plugin",
            "import",
            "NotAPluginError: odd_mod:VALUE (from faulty-plugins 2.1.0) is a int, not a plugin:"
            " an entry point must name a plugin class (or a function that returns a plugin)",
        ),
        (
            "bad_hook",
            "import",
            "NotAPluginError: odd_mod:BadHook (from faulty-plugins 2.1.0) "
            "end_epoch(self) -> None cannot be called as end_epoch(self, context) "
            "(at {site}/odd_mod.py:10)",
        ),
        (
            "misnamed",
            "import",
            "NotAPluginError: odd_mod:Misnamed (from faulty-plugins 2.1.0) end_epok is marked "
            "@hook but bz has no such hook (did you mean end_epoch?) (at {site}/odd_mod.py:16)",
        ),
        (
            "nameless",
            "load",
            "TypeError: Nameless is not a plugin: a plugin needs a `name: str` attribute "
            "(at {site}/odd_mod.py:20)",
        ),
    ],
)
def test_a_broken_plugin_is_reported_and_skipped(
    faulty: Packages, events: list[dict[str, Any]], plugin: str, stage: str, error: str
) -> None:
    loaded = load([plugin, "good"])
    assert loaded.active_names == ["good"]
    # A problem found by looking at the plugin names the plugin's own line: its
    # traceback holds only bz's frames.
    site = os.path.dirname(sys.modules["good_mod"].__file__ or "")
    error = error.format(site=site)
    assert [(f.plugin, f.stage, f.error) for f in loaded.faults] == [(plugin, stage, error)]
    (event,) = [e for e in events if e["event"] == "plugin_failed"]
    assert (event["plugin"], event["hook"], event["error"]) == (plugin, stage, error)


def test_a_broken_plugin_is_fatal_under_the_raise_policy(faulty: Packages) -> None:
    with pytest.raises(PluginFailure, match="plugin 'broken' failed in import"):
        load(["broken"], policy="raise")


def test_bz_train_goes_on_without_a_broken_package(
    faulty: Packages, project: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from bz.commands import cli

    project({"plugins": ["broken", "good"], "epochs": 1})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"], prog_name="bz")
    assert exit_info.value.code in (0, None)
    err = capsys.readouterr().err
    assert "broken" in err
    assert "QUARANTINED: plugin 'broken' failed in import" in err


def test_a_duplicated_name_warns_which_one_is_used_and_why(
    packages: Packages, events: list[dict[str, Any]]
) -> None:
    twin = "class Twin:\n    name = 'twin'\n"
    packages.install("zz-plugins", {"twin": "zz_twin:Twin"}, {"zz_twin.py": twin})
    packages.install("aa-plugins", {"twin": "aa_twin:Twin"}, {"aa_twin.py": twin})
    assert load(["twin"]).active_names == ["twin"]
    (event,) = [e for e in events if e["event"] == "plugin_name_duplicated"]
    assert event["hint"] == (
        "plugin name 'twin' is provided by aa-plugins (aa_twin:Twin) and by zz-plugins "
        "(zz_twin:Twin); using aa-plugins: the first distribution in alphabetical order "
        "is used"
    )
    assert "aa_twin" in sys.modules
    assert "zz_twin" not in sys.modules


# -- bz.testing -----------------------------------------------------------------------------


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def end_epoch(self, context: Any) -> None:
        self.seen.append((context.epoch, context.training_batch_count))


class Faulty:
    name = "faulty"

    def end_training_batch(self, context: Any) -> None:
        raise ZeroDivisionError("oops")


def test_run_plugin_trains_the_tiny_setup_deterministically() -> None:
    first, second = Recorder(), Recorder()
    a, b = run_plugin(first, epochs=2), run_plugin(second, epochs=2)
    assert first.seen == second.seen == [(0, 4), (1, 4)]
    assert [r.training_loss for r in a.history] == [r.training_loss for r in b.history]


def test_run_plugin_makes_plugin_faults_fail_the_test() -> None:
    with pytest.raises(PluginFailure, match="plugin 'faulty' failed in end_training_batch"):
        run_plugin(Faulty())
    isolated = run_plugin([Faulty(), Recorder()], policy="isolate")
    assert [r.name for r in isolated.plugins if r.fault] == ["faulty"]


def test_make_context_sets_fields_and_refuses_typos() -> None:
    context = make_context(epoch=3, training_loss_total=2.0, training_sample_count=4, rank=1)
    assert (context.epoch, context.training_loss, context.is_main_process) == (3, 0.5, False)
    with pytest.raises(TypeError, match="no field 'global_setp' \\(did you mean \"global_step\""):
        make_context(global_setp=1)


def test_check_plugin_and_load_plugin_use_the_loaders_rules() -> None:
    assert check_plugin(Recorder()) == ("end_epoch",)

    class NoContext:
        name = "no_context"

        def end_epoch(self) -> None: ...

    expected = r"end_epoch\(\).* cannot be called as end_epoch\(context\)"
    with pytest.raises(TypeError, match=expected):
        check_plugin(NoContext())
    assert isinstance(load_plugin(Recorder), Recorder)


# -- the guide ------------------------------------------------------------------------------


def test_the_plugin_guide_lists_every_hook_in_loop_order() -> None:
    guide = (REPO / "docs" / "plugin-guide.md").read_text(encoding="utf-8")
    rows = [line for line in guide.splitlines() if line.startswith("| `")]
    listed = [row.split("`")[1] for row in rows]
    assert listed[: len(HOOKS)] == [hook.name for hook in HOOKS]
    for hook, row in zip(HOOKS, rows, strict=False):
        assert hook.doc in row, f"the row of {hook.name} does not carry its HOOKS doc"


def test_spec_blocks_are_found() -> None:
    assert block_starting_with("# src/my_bz_plugin/my_plugin.py", "python").startswith("# src/")
    assert len(code_blocks("toml")) == 1
    assert '"my_plugin"' in code_blocks("json")[0]


# -- real installs (pip) --------------------------------------------------------------------


def _bz(args: list[str], cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "bz", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _pip_install(project: Path, site: Path) -> None:
    # --no-deps: bz-cli is already installed here; --target keeps the venv untouched.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(project),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_example_package_installs_tests_and_trains() -> None:
    result = subprocess.run(
        ["bash", str(EXAMPLE_PACKAGE / "ci.sh"), "--no-mypy"],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== ok: 5 lines in runs/training.log" in result.stdout
    assert "bz-example-plugins 0.1.0" in result.stdout


@pytest.mark.slow
def test_the_guides_package_installs_and_trains_as_written(tmp_path: Path) -> None:
    package = tmp_path / "my-bz-plugin"
    module = block_starting_with("# src/my_bz_plugin/my_plugin.py", "python")
    (package / "src" / "my_bz_plugin").mkdir(parents=True)
    (package / "pyproject.toml").write_text(code_blocks("toml")[0], encoding="utf-8")
    (package / "src" / "my_bz_plugin" / "__init__.py").write_text("", encoding="utf-8")
    (package / "src" / "my_bz_plugin" / "my_plugin.py").write_text(module, encoding="utf-8")
    site = tmp_path / "site"
    _pip_install(package, site)

    listed = _bz(["list-plugins"], tmp_path, site)
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith("my_plugin ")]
    assert row.split() == ["my_plugin", "my-bz-plugin", "0.1.0", "my_bz_plugin.my_plugin:MyPlugin"]

    project = tmp_path / "project"
    project.mkdir()
    (project / "bzconfig.json").write_text(code_blocks("json")[0], encoding="utf-8")
    from tests._support import TINY_TRAIN_PY

    (project / "train.py").write_text(TINY_TRAIN_PY, encoding="utf-8")
    trained = _bz(["train", "--epochs", "6", "--device", "cpu"], project, site)
    assert trained.returncode == 0, trained.stderr[-3000:]
    printed = [line for line in trained.stdout.splitlines() if line.startswith("Epoch ")]
    # The guide's plugin prints every log_interval (5, from the guide's bzconfig.json) epochs.
    assert [line.split(":")[0] for line in printed] == ["Epoch 0", "Epoch 5"]
    assert json.loads(code_blocks("json")[0])["plugins"][1]["my_plugin"]["log_interval"] == 5

    unit_tests = block_starting_with("# tests/test_my_plugin.py", "python")
    (package / "tests").mkdir()
    (package / "tests" / "test_my_plugin.py").write_text(unit_tests, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(site)}
    guide_tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=package,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert guide_tests.returncode == 0, guide_tests.stdout[-3000:]
