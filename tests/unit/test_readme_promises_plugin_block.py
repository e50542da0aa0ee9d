"""README's "Writing a plugin" block is a plugin that works as written.

The block is read from the README and executed; the class it defines is trained with
`early_stopping` (which its `order` names), and its `self.logger.info("epoch_done",
loss=context.training_loss)` is an event with the epoch's loss, once per epoch, after
`early_stopping`'s hook.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import structlog
from tests._support import tiny_setup

import bz
from bz.plugins.early_stopping import EarlyStopping, EarlyStoppingConfig

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _block() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
    (block,) = [b for b in blocks if "class MyPlugin(Plugin):" in b]
    return str(block)


def test_the_readme_plugin_runs_and_logs_its_event_after_early_stopping() -> None:
    scope: dict[str, Any] = {}
    exec(compile(_block(), "README.md", "exec"), scope)
    plugin = scope["MyPlugin"]()
    stopper = EarlyStopping(EarlyStoppingConfig(patience=100))
    config = bz.RunConfig(epochs=2, device="cpu", plugins=[])
    with structlog.testing.capture_logs() as events:
        result = bz.Trainer().fit(tiny_setup(), config, [plugin, stopper])
    assert all(report.fault is None for report in result.plugins)
    assert [report.name for report in result.plugins] == ["early_stopping", "my_plugin"]
    done = [e for e in events if e["event"] == "epoch_done"]
    assert [e["loss"] for e in done] == [r.training_loss for r in result.history]
    assert all(e.get("plugin") == "my_plugin" for e in done)
