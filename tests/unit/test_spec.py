"""Every Python code block of the public plugin guide runs, as written, against bz.

The guide (a project-owned copy in tests/spec/) shows fragments as well as files: a
class, a pair of static methods, a test module, single hook functions. Each block is
executed exactly as printed; the test supplies only what the guide's surrounding text
implies (the file the block lives in, the class a method belongs to) and then checks
that the block does what the guide says it does.
"""

from __future__ import annotations

import logging
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests._spec_blocks import block_starting_with, code_blocks
from tests._support import Events, tiny_setup

import bz
from bz.config import PluginSpec, RunConfig, structure
from bz.plugins import Plugin, PluginContext
from bz.plugins._inspection import implemented_hooks
from bz.plugins._loader import load_plugins

CONFIG = RunConfig(epochs=2, device="cpu", plugins=())
PYTHON_BLOCKS = code_blocks("python")


def run_block(source: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Execute one block in a fresh namespace (optionally pre-filled) and return it."""
    scope: dict[str, Any] = {"__name__": "guide_block"} if namespace is None else namespace
    exec(compile(source, "custom-plugin-README.md", "exec"), scope)
    return scope


def guide_block(marker: str) -> str:
    """The Python block containing ``marker`` (exactly one must)."""
    (block,) = [b for b in PYTHON_BLOCKS if marker in b]
    return block


@pytest.fixture
def my_bz_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type]:
    """The guide's package, laid out as its 'Package Structure' section shows."""
    package = tmp_path / "src" / "my_bz_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "my_plugin.py").write_text(
        block_starting_with("# src/my_bz_plugin/my_plugin.py", "python"), encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    from my_bz_plugin.my_plugin import MyPlugin  # type: ignore[import-not-found]  # made above

    yield MyPlugin
    for name in [m for m in sys.modules if m.startswith("my_bz_plugin")]:
        del sys.modules[name]


def test_every_python_block_is_covered() -> None:
    # If the guide gains a block, this fails until a test here runs it.
    assert len(PYTHON_BLOCKS) == 10


def test_architecture_block_defines_a_working_plugin() -> None:
    scope = run_block(guide_block("class MyCustomPlugin(Plugin):"))
    plugin = scope["MyCustomPlugin"]()
    assert plugin.name == "my_plugin"
    assert implemented_hooks(plugin) == ("start_training_session", "end_epoch")
    plugin.start_epoch(PluginContext())  # inherited no-op
    result = bz.Trainer().fit(tiny_setup(), CONFIG, [plugin])
    assert result.plugins[0].calls == 1 + 2
    assert result.plugins[0].fault is None


def test_configuration_block_loads_and_creates() -> None:
    # The block holds two static methods of the plugin class; put them in one.
    methods = guide_block('def load_config(config_data: dict) -> Dict[str, Any]:\n    """Load')
    source = (
        "from typing import Any, Dict, Optional\n"
        "from bz.plugins import Plugin\n\n"
        "class MyPlugin(Plugin):\n"
        "    name = 'my_plugin'\n\n"
        "    def __init__(self, enabled=True, log_interval=10):\n"
        "        super().__init__(name=self.name)\n"
        "        self.log_interval = log_interval\n\n" + textwrap.indent(methods, "    ")
    )
    my_plugin = run_block(source)["MyPlugin"]
    assert my_plugin.load_config({}) == {"enabled": True, "log_interval": 10}
    assert my_plugin.create({"enabled": False}, CONFIG) is None
    made = my_plugin.create({"log_interval": 5}, CONFIG)
    assert isinstance(made, my_plugin)
    assert made.log_interval == 5
    plugins = load_plugins(
        [PluginSpec("my_plugin", {"log_interval": 3})], CONFIG, registry={"my_plugin": my_plugin}
    )
    assert [getattr(p, "log_interval", None) for p in plugins.active] == [3]


def test_implementation_block_loads_through_create(my_bz_plugin: type) -> None:
    spec = structure({"plugins": [{"my_plugin": {"enabled": True, "log_interval": 5}}]}, RunConfig)
    plugins = load_plugins(spec.plugins, CONFIG, registry={"my_plugin": my_bz_plugin})
    (plugin,) = plugins.active
    assert getattr(plugin, "log_interval") == 5  # noqa: B009  # the guide's attribute
    disabled = structure({"plugins": [{"my_plugin": {"enabled": False}}]}, RunConfig)
    assert (
        load_plugins(disabled.plugins, CONFIG, registry={"my_plugin": my_bz_plugin}).active == []
    )


def test_implementation_block_prints_every_log_interval_epochs(
    my_bz_plugin: type, capsys: pytest.CaptureFixture[str], events: Events
) -> None:
    plugin = my_bz_plugin(log_interval=2)
    bz.Trainer().fit(tiny_setup(), RunConfig(epochs=4, device="cpu", plugins=()), [plugin])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Epoch 0", "Epoch 2"]
    assert float(lines[0].split("= ")[1]) > 0


def test_unit_test_block_passes(my_bz_plugin: type) -> None:
    scope = run_block(block_starting_with("# tests/test_my_plugin.py", "python"))
    scope["test_plugin_creation"]()
    scope["test_plugin_config"]()


def test_integration_test_block_passes(
    my_bz_plugin: type, capsys: pytest.CaptureFixture[str]
) -> None:
    scope = run_block(guide_block("def test_plugin_integration():"), {"MyPlugin": my_bz_plugin})
    scope["test_plugin_integration"]()
    # MyPlugin() logs every 10 epochs, so epoch 5 prints nothing; epoch 10 would.
    assert capsys.readouterr().out == ""
    context = PluginContext()
    context.epoch = 10
    my_bz_plugin().end_epoch(context)
    assert capsys.readouterr().out == "Epoch 10: Loss = 0.0\n"


def test_debug_logging_block_does_not_disturb_training() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        run_block(guide_block("logging.basicConfig(level=logging.DEBUG)"))
        result = bz.Trainer().fit(tiny_setup(), CONFIG)
        assert result.epochs_completed == 2
    finally:
        root.handlers[:], root.level = handlers, level


def test_direct_method_test_block_runs(my_bz_plugin: type) -> None:
    run_block(
        guide_block("plugin.start_training_session(context)"),
        {"MyPlugin": my_bz_plugin, "PluginContext": PluginContext},
    )


def plugin_with(hook: Callable[..., None], hook_name: str) -> Plugin:
    """An explicit-subclass plugin whose ``hook_name`` is the guide's function."""
    cls = types.new_class("GuidePlugin", (Plugin,), {})
    cls.name = "guide_plugin"  # type: ignore[attr-defined]  # new_class returns a bare type
    setattr(cls, hook_name, hook)
    instance: Plugin = cls()
    return instance


def test_communication_block_shares_data_through_extra() -> None:
    scope = run_block(guide_block('context.extra["my_plugin_data"]'))
    seen: list[Any] = []

    class Reader:
        name = "reader"

        def end_epoch(self, context: PluginContext) -> None:
            seen.append(context.extra.get("my_plugin_data"))

    writer = plugin_with(scope["end_epoch"], "end_epoch")
    bz.Trainer().fit(tiny_setup(), CONFIG, [writer, Reader()])
    assert seen == [{"epoch": 0}, {"epoch": 1}]


def test_custom_metrics_block_adds_a_metric() -> None:
    scope = run_block(guide_block('context.training_metrics["my_custom_metric"]'))
    result = bz.Trainer().fit(tiny_setup(), CONFIG, [plugin_with(scope["end_epoch"], "end_epoch")])
    assert [r.training_metrics for r in result.history] == [{"my_custom_metric": 0.95}] * 2


def test_dependencies_block_warns_through_the_plugin_logger(
    events: Events,
) -> None:
    scope = run_block(guide_block('"tensorboard" not in context.extra'))
    plugin = plugin_with(scope["start_training_session"], "start_training_session")
    result = bz.Trainer().fit(tiny_setup(), CONFIG, [plugin])
    assert result.plugins[0].fault is None
    warnings = [e for e in events if e["event"] == "TensorBoard plugin not found"]
    assert warnings == [
        {"event": "TensorBoard plugin not found", "log_level": "warning", "plugin": "guide_plugin"}
    ]


def test_bzconfig_block_is_a_valid_config() -> None:
    import json

    (block,) = code_blocks("json")
    config = structure(json.loads(block), RunConfig)
    assert config.plugins == (
        PluginSpec("console_out"),
        PluginSpec("my_plugin", {"enabled": True, "log_interval": 5}),
    )
